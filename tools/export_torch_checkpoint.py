"""Writes a trained xmatch SCAN, VSE++ or GLFN workdir as an official PyTorch checkpoint (no torch needed).

  python tools/export_torch_checkpoint.py --workdir=runs/scan_f30k --out=model_best.pth.tar \
      --vocab_out=vocab/f30k_precomp_vocab.json
  python tools/export_torch_checkpoint.py --workdir=runs/glfn_f30k_official_t2i --out=model_best_t2i.pth.tar

OUT gets what the official train.py's save_checkpoint writes, in torch.save's zip format:
{'epoch', 'model': [image encoder state_dict, text encoder state_dict], 'best_rsum', 'opt': argparse.Namespace,
'Eiters'}, from the workdir's best checkpoint (else its latest). `epoch` follows each codebase: SCAN stores the
index of the last finished epoch (it resumes at epoch + 1), VSE++ the number of finished epochs. The GRU's r and z
biases are written whole into bias_ih with zeros in bias_hh (xmatch keeps only their sum; the forward is the
same). The vocabulary (--vocab_out) is SCAN's json; the official code reads `<vocab_path>/<data_name>_vocab.json`
(VSE++ reads a pickled vocab.Vocabulary instead, `<data_name>_vocab.pkl`, with the same word <-> id map).
Reading OUT needs `torch.load(OUT, weights_only=False)` (or argparse.Namespace allowed as a safe global), as for
the official checkpoints. tools/convert_torch_checkpoint.py reads OUT back into a workdir.

GLFN (xmatch_jax/convert/glfn_checkpoint.py): only configs/glfn.py's `official` variant with score t2i or i2t (the
official code has one direction per model); `epoch` is the number of finished epochs. Official GLFN checkpoints
hold no BERT: OUT has none either (keep the BERT directory; W/bert has its config and tokenizer), and there is no
vocabulary to write (--vocab_out is refused).
"""

import math
import os
import sys

from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from xmatch_jax import checkpoints  # pylint: disable=g-import-not-at-top
from xmatch_jax import cli
from xmatch_jax import errors
from xmatch_jax import run_setup  # pylint: disable=g-import-not-at-top
from xmatch_jax import workdirs  # pylint: disable=g-import-not-at-top
from xmatch_jax.convert import glfn_checkpoint  # pylint: disable=g-import-not-at-top
from xmatch_jax.convert import scan_checkpoint  # pylint: disable=g-import-not-at-top
from xmatch_jax.convert import torch_writer  # pylint: disable=g-import-not-at-top
from xmatch_jax.data import vocab as vocab_lib  # pylint: disable=g-import-not-at-top

FORMATS = scan_checkpoint.FORMATS + ('glfn',)


def _restore(workdir: str, expected) -> tuple:
  """The best (else latest) checkpoint's params as numpy, checked against the model's, with its meta."""
  ckpts = checkpoints.RunCheckpoints(workdir)
  try:
    state, meta, which = ckpts.restore_for_eval()
  finally:
    ckpts.close()
  checkpoints.check_params_match(state['params'], expected, f'{workdir}/{which}')
  step = int(meta.get('step', int(np.asarray(state['step']))))
  return jax.tree.map(np.asarray, state['params']), meta, which, step


def _finished_epochs(meta: dict) -> int:
  return math.floor(float(meta.get('epoch', 0)) + 1e-9)  # xmatch's meta: epochs done (fractional mid-epoch)


def export_glfn(workdir: str, config, out: str, vocab_out: str = '') -> dict:
  """A GLFN workdir -> OUT ({'epoch', 'model': [image, text state_dicts], 'best_rsum', 'opt', 'Eiters'}, no BERT)."""
  source = workdirs.config_path(workdir)
  if vocab_out:
    raise errors.UserError(
      "--vocab_out does not apply to GLFN: its captions use the BERT's WordPiece tokenizer "
      f'({workdirs.bert_dir(workdir)}), not a vocabulary json'
    )
  img_dim = int(config.data_info.img_dim)
  opt = glfn_checkpoint.opt_from_config(config, img_dim, source)  # refuses what official code lacks
  vocab = workdirs.load_vocab(workdir)
  model = run_setup.build_model(config, len(vocab), img_dim, workdir)
  expected = glfn_checkpoint.expected_params(model)
  params, meta, which, step = _restore(workdir, expected)
  image_state, text_state = glfn_checkpoint.export_params(params, config, f'{workdir}/{which}')
  checkpoint = {
    'epoch': _finished_epochs(meta),
    'model': [image_state, text_state],
    'best_rsum': float(meta.get('best_rsum', 0.0)),
    'opt': opt,
    'Eiters': step,
  }
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  torch_writer.save(checkpoint, out)
  return {
    'model': 'glfn',
    'score': opt.cross_attn,
    'dataset': config.dataset,
    'data_name': opt.data_name,
    'checkpoint': which,
    'step': step,
    'epoch': checkpoint['epoch'],
    'params': sum(int(np.size(x)) for x in jax.tree.leaves([image_state, text_state])),
    'bert_not_exported': workdirs.bert_dir(workdir),
  }


def export(workdir: str, out: str, vocab_out: str = '') -> dict:
  """Writes OUT (and the vocabulary to vocab_out if given); returns a summary dict."""
  config = workdirs.load_config(workdir)
  source = workdirs.config_path(workdir)
  name = config.model.get('name') if 'model' in config else None
  if name not in FORMATS:
    raise errors.UserError(
      f'{source}: model {name!r} cannot be exported: only {FORMATS} workdirs have an official PyTorch checkpoint layout'
    )
  if name == 'glfn':
    return export_glfn(workdir, config, out, vocab_out)
  vocab_path = workdirs.vocab_path(workdir)
  if not os.path.exists(vocab_path):
    raise errors.MissingFileError(f'{vocab_path} not found: a SCAN / VSE++ workdir keeps its vocabulary there')
  vocab = vocab_lib.Vocabulary.from_json(vocab_path)
  img_dim = int(config.data_info.img_dim)
  opt = scan_checkpoint.opt_from_config(config, len(vocab), img_dim, source)  # refuses what official code lacks

  model = run_setup.build_model(config, len(vocab), img_dim, workdir)
  expected = jax.eval_shape(model.init, jax.random.PRNGKey(0), *model.example_inputs())['params']
  params, meta, which, step = _restore(workdir, expected)
  image_state, text_state = scan_checkpoint.export_params(
    params, int(config.model.num_layers), bool(config.model.get('bidirectional', False)), f'{workdir}/{which}'
  )

  finished = _finished_epochs(meta)
  epoch = finished - 1 if name == 'scan' else finished
  checkpoint = {
    'epoch': int(epoch),
    'model': [image_state, text_state],
    'best_rsum': float(meta.get('best_rsum', 0.0)),
    'opt': opt,
    'Eiters': step,
  }
  out_dir = os.path.dirname(os.path.abspath(out))
  os.makedirs(out_dir, exist_ok=True)
  torch_writer.save(checkpoint, out)
  if vocab_out:
    os.makedirs(os.path.dirname(os.path.abspath(vocab_out)), exist_ok=True)
    vocab.to_json(vocab_out)
  return {
    'model': name,
    'dataset': config.dataset,
    'data_name': opt.data_name,
    'checkpoint': which,
    'step': step,
    'epoch': checkpoint['epoch'],
    'vocab': len(vocab),
    'params': sum(int(x.size) for x in jax.tree.leaves(params)),
  }


FLAGS = flags.FlagValues()
flags.DEFINE_string('workdir', None, 'trained xmatch SCAN / VSE++ / GLFN workdir', flag_values=FLAGS)
flags.DEFINE_string('out', None, 'checkpoint to write, e.g. model_best.pth.tar', flag_values=FLAGS)
flags.DEFINE_string('vocab_out', '', 'also write the SCAN-format vocabulary json here (scan, vsepp)', flag_values=FLAGS)


def main(argv=None) -> int:
  cli.parse_flags(FLAGS, argv, __doc__, required=('workdir', 'out'))
  summary = export(FLAGS.workdir, FLAGS.out, FLAGS.vocab_out)
  print(f'{FLAGS.workdir} -> {FLAGS.out}: {summary}')
  if summary['model'] == 'glfn':
    print(
      f'BERT weights are not part of official GLFN checkpoints and were not written: keep the BERT directory '
      f'(its config and tokenizer are in {summary["bert_not_exported"]}); importing OUT again needs it as '
      '--bert_dir'
    )
  if FLAGS.vocab_out:
    print(f'vocabulary -> {FLAGS.vocab_out} (official code reads <vocab_path>/{summary["data_name"]}_vocab.json)')
  return 0


if __name__ == '__main__':
  sys.exit(cli.run_tool(main))
