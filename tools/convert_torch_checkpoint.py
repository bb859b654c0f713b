"""Converts an official SCAN or VSE++ PyTorch checkpoint into an xmatch workdir.

  python tools/convert_torch_checkpoint.py --format=scan --checkpoint=runs/f30k_scan_t2i/model_best.pth.tar \
      --vocab=vocab/f30k_precomp_vocab.json --workdir=runs/scan_f30k_official

The workdir gets config.json (from the checkpoint's `opt`), vocab.json (the SCAN-format vocabulary, checked against
the embedding size) and an orbax checkpoint marked best, so `python -m xmatch_jax.evaluate --workdir=W` and
`Retriever.from_workdir(W)` use it directly (and training can continue from it). The .pth.tar is read with an
allow-listed unpickler: no code in it runs.
"""

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

from xmatch_jax import checkpoints  # pylint: disable=g-import-not-at-top
from xmatch_jax import run_setup  # pylint: disable=g-import-not-at-top
from xmatch_jax import train  # pylint: disable=g-import-not-at-top
from xmatch_jax.convert import scan_checkpoint  # pylint: disable=g-import-not-at-top
from xmatch_jax.data import vocab as vocab_lib  # pylint: disable=g-import-not-at-top


def convert(fmt: str, checkpoint_path: str, vocab_path: str, workdir: str) -> dict:
  """Writes the workdir; returns a summary dict."""
  config, params, meta = scan_checkpoint.load(checkpoint_path, fmt)
  vocab = vocab_lib.Vocabulary.from_json(vocab_path)
  rows = params['text_encoder']['embed']['embedding'].shape[0]
  if rows != len(vocab):
    raise ValueError(f'{vocab_path}: {len(vocab)} words, but the checkpoint\'s embedding has {rows} rows; '
                     'is it the vocabulary the checkpoint was trained with?')
  img_dim = params['image_encoder']['fc']['kernel'].shape[0]
  if os.path.exists(os.path.join(workdir, 'checkpoints')) or os.path.exists(os.path.join(workdir, 'best')):
    raise ValueError(f'{workdir} already holds checkpoints; convert into a new directory')
  os.makedirs(workdir, exist_ok=True)
  model = run_setup.build_model(config, len(vocab), img_dim)
  expected = jax.eval_shape(model.init, jax.random.PRNGKey(0), {'regions': jnp.zeros((2, 1, img_dim))},
                            {'tokens': jnp.ones((2, 3), jnp.int32), 'mask': jnp.ones((2, 3))})['params']
  checkpoints.check_params_match(params, expected, checkpoint_path)
  params = jax.tree.map(jnp.asarray, params)
  tx, _ = train.make_optimizer(config.optim, steps_per_epoch=1)
  step = int(meta.get('Eiters', 0))
  state = {'params': params, 'opt_state': tx.init(params), 'step': jnp.asarray(step, jnp.int32)}
  run_setup.save_config(config, workdir, img_dim)
  vocab.to_json(os.path.join(workdir, run_setup.VOCAB_FILE))
  meta = {**meta, 'step': step, 'converted_from': os.path.abspath(checkpoint_path), 'format': fmt,
          'best_rsum': meta.get('best_rsum', -1.0)}
  ckpts = checkpoints.RunCheckpoints(workdir)
  ckpts.save(step, state, meta, is_best=True)
  ckpts.close()
  return {'model': config.model.name, 'dataset': config.dataset, 'img_dim': img_dim, 'vocab': len(vocab),
          'step': step, 'params': sum(x.size for x in jax.tree.leaves(params))}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--format', required=True, choices=scan_checkpoint.FORMATS)
  parser.add_argument('--checkpoint', required=True, help='model_best.pth.tar / checkpoint.pth.tar')
  parser.add_argument('--vocab', required=True, help='SCAN-format vocabulary json')
  parser.add_argument('--workdir', required=True)
  args = parser.parse_args(argv)
  summary = convert(args.format, args.checkpoint, args.vocab, args.workdir)
  print(f'{args.checkpoint} -> {args.workdir}: {summary}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
