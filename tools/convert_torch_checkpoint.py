"""Converts an official SCAN, VSE++ or GLFN PyTorch checkpoint into an xmatch workdir.

  python tools/convert_torch_checkpoint.py --format=scan --checkpoint=runs/f30k_scan_t2i/model_best.pth.tar \
      --vocab=vocab/f30k_precomp_vocab.json --workdir=runs/scan_f30k_official
  python tools/convert_torch_checkpoint.py --format=vsepp --checkpoint=runs/f30k_vse++_precomp/model_best.pth.tar \
      --vocab=vocab/f30k_precomp_vocab.pkl --workdir=runs/vsepp_f30k_official
  python tools/convert_torch_checkpoint.py --format=glfn --checkpoint=model_best_t2i_posiAttn_16X15.pth.tar \
      --bert_dir=PATH/bert-base --workdir=runs/glfn_f30k_official_t2i

GLFN checkpoints hold no BERT (the official code reads BERT vectors precomputed into files by code it does not
release): --bert_dir gives it (copied into W/bert, weights into the checkpoint), and xmatch's GLFN computes caption
token vectors (last hidden states of [CLS] tokens [SEP]) and tag vectors (their mean over a tag's [CLS] tokens [SEP])
with it. The imported model scores as the official one only if its features were made that way; see
xmatch_jax/convert/glfn_checkpoint.py for what is imported and what is refused. --vocab is not used for GLFN.
An official checkpoint is one direction (opt.cross_attn); the paper's t2i + i2t score is the ensemble of two
imported workdirs: python -m xmatch_jax.ensemble --workdir=W_t2i --workdir=W_i2t.

The workdir gets config.json (from the checkpoint's `opt`), vocab.json (scan, vsepp: the vocabulary in SCAN's json
format, read from SCAN's json or VSE++'s pickled vocab .pkl and checked against the embedding size; glfn: W/bert
instead) and an orbax checkpoint marked best, so `python -m xmatch_jax.evaluate --workdir=W` and
`Retriever.from_workdir(W)` use it directly (and training can continue from it). The .pth.tar is read with an
allow-listed unpickler: no code in it runs.
"""

import os
import sys

from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from xmatch_jax import checkpoints  # pylint: disable=g-import-not-at-top
from xmatch_jax import cli
from xmatch_jax import errors
from xmatch_jax import run_setup  # pylint: disable=g-import-not-at-top
from xmatch_jax import workdirs  # pylint: disable=g-import-not-at-top
from xmatch_jax.convert import glfn_checkpoint  # pylint: disable=g-import-not-at-top
from xmatch_jax.convert import scan_checkpoint  # pylint: disable=g-import-not-at-top
from xmatch_jax.data import vocab as vocab_lib  # pylint: disable=g-import-not-at-top
from xmatch_jax.data import wordpiece  # pylint: disable=g-import-not-at-top
from xmatch_jax.trainers import optim

FORMATS = scan_checkpoint.FORMATS + ('glfn',)


def _check_new_workdir(workdir: str) -> None:
  if workdirs.has_checkpoints(workdir):
    raise errors.UserError(f'{workdir} already holds checkpoints; convert into a new directory')


def _save(config, params, meta, model, img_dim: int, checkpoint_path: str, fmt: str, workdir: str) -> int:
  """Optimizer state as training builds it (frozen groups without state), config.json and the best checkpoint."""
  params = jax.tree.map(jnp.asarray, params)
  tx, _ = optim.make_optimizer(config.optim, steps_per_epoch=1)
  tx = optim.freeze(tx, params, model.frozen_params)
  step = int(meta.get('Eiters', 0))
  state = {'params': params, 'opt_state': tx.init(params), 'step': jnp.asarray(step, jnp.int32)}
  workdirs.save_config(config, workdir, img_dim)
  meta = {
    **meta,
    'step': step,
    'converted_from': os.path.abspath(checkpoint_path),
    'format': fmt,
    'best_rsum': meta.get('best_rsum', -1.0),
  }
  ckpts = checkpoints.RunCheckpoints(workdir)
  ckpts.save(step, state, meta, is_best=True)
  ckpts.close()
  return step


def convert_glfn(checkpoint_path: str, bert_dir: str, workdir: str, dataset: str = '') -> dict:
  """An official GLFN checkpoint + the BERT of its features -> workdir (W/bert: the BERT's config and tokenizer)."""
  config, params, meta = glfn_checkpoint.load(checkpoint_path, bert_dir, dataset)
  vocab = wordpiece.WordPieceVocab(bert_dir)
  img_dim = params['region_fc']['kernel'].shape[0] - config.model.position_dim - params['word_fc']['kernel'].shape[0]
  _check_new_workdir(workdir)
  os.makedirs(workdir, exist_ok=True)
  vocab.save(workdirs.bert_dir(workdir))
  model = run_setup.build_model(config, len(vocab), img_dim, workdir)
  expected = glfn_checkpoint.expected_params(model)
  checkpoints.check_params_match(params, expected, checkpoint_path)
  step = _save(config, params, meta, model, img_dim, checkpoint_path, 'glfn', workdir)
  return {
    'model': 'glfn',
    'score': config.model.score,
    'dataset': config.dataset,
    'img_dim': img_dim,
    'vocab': len(vocab),
    'step': step,
    'params': sum(np.size(x) for x in jax.tree.leaves(params)),
  }


def convert(
  fmt: str, checkpoint_path: str, vocab_path: str, workdir: str, bert_dir: str = '', dataset: str = ''
) -> dict:
  """Writes the workdir; returns a summary dict."""
  if fmt == 'glfn':
    if vocab_path:
      raise errors.UserError(
        '--vocab is not used by --format=glfn: captions and tags use the WordPiece tokenizer of '
        '--bert_dir (the official vocab json is never read by its model)'
      )
    return convert_glfn(checkpoint_path, bert_dir, workdir, dataset)
  if bert_dir or dataset:
    raise errors.UserError(f'--bert_dir / --dataset apply to --format=glfn only, not {fmt}')
  if not vocab_path:
    raise errors.UserError(
      f'--format={fmt} needs --vocab (the vocabulary json or VSE++ .pkl the checkpoint was trained with)'
    )
  config, params, meta = scan_checkpoint.load(checkpoint_path, fmt)
  vocab = vocab_lib.Vocabulary.load(vocab_path)
  rows = params['text_encoder']['embed']['embedding'].shape[0]
  if rows != len(vocab):
    raise errors.UserError(
      f"{vocab_path}: {len(vocab)} words, but the checkpoint's embedding has {rows} rows; "
      'is it the vocabulary the checkpoint was trained with?'
    )
  img_dim = params['image_encoder']['fc']['kernel'].shape[0]
  _check_new_workdir(workdir)
  os.makedirs(workdir, exist_ok=True)
  model = run_setup.build_model(config, len(vocab), img_dim)
  expected = jax.eval_shape(
    model.init,
    jax.random.PRNGKey(0),
    {'regions': jnp.zeros((2, 1, img_dim))},
    {'tokens': jnp.ones((2, 3), jnp.int32), 'mask': jnp.ones((2, 3))},
  )['params']
  checkpoints.check_params_match(params, expected, checkpoint_path)
  vocab.to_json(workdirs.vocab_path(workdir))
  step = _save(config, params, meta, model, img_dim, checkpoint_path, fmt, workdir)
  return {
    'model': config.model.name,
    'dataset': config.dataset,
    'img_dim': img_dim,
    'vocab': len(vocab),
    'step': step,
    'params': sum(x.size for x in jax.tree.leaves(params)),
  }


FLAGS = flags.FlagValues()
cli.define_enum('format', None, FORMATS, 'layout of the checkpoint (its codebase)', FLAGS)
flags.DEFINE_string('checkpoint', None, 'model_best.pth.tar / checkpoint.pth.tar', flag_values=FLAGS)
flags.DEFINE_string(
  'vocab',
  '',
  'vocabulary the checkpoint was trained with: SCAN json or VSE++ vocab .pkl (scan, vsepp; not glfn)',
  flag_values=FLAGS,
)
flags.DEFINE_string(
  'bert_dir',
  '',
  "glfn (required): Hugging Face BERT directory whose last hidden states the checkpoint's "
  'precomputed caption / tag features were (the paper: a 768-d BERT-base); the checkpoint holds '
  'no BERT',
  flag_values=FLAGS,
)
flags.DEFINE_string('dataset', '', 'glfn: xmatch dataset (f30k, coco) when opt.data_name names none', flag_values=FLAGS)
flags.DEFINE_string('workdir', None, 'workdir to write', flag_values=FLAGS)


def main(argv=None) -> int:
  cli.parse_flags(FLAGS, argv, __doc__, required=('format', 'checkpoint', 'workdir'))
  summary = convert(FLAGS.format, FLAGS.checkpoint, FLAGS.vocab, FLAGS.workdir, FLAGS.bert_dir, FLAGS.dataset)
  print(f'{FLAGS.checkpoint} -> {FLAGS.workdir}: {summary}')
  return 0


if __name__ == '__main__':
  sys.exit(cli.run_tool(main))
