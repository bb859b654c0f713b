"""Evaluation: `python -m xmatch_jax.evaluate --workdir=W [--split=test] [--protocol=PROTOCOL]`.

PROTOCOL: 1k, 5k, fold5, f30k_1k, coco_1k_fold5 or coco_5k.

Scores every image against every caption of the split with the workdir's best checkpoint (latest if no best),
computes recall exactly as SCAN's evaluation.py (or, for runs with config.eval_metric = 'map' such as DAER on
category datasets, mAP both ways, eq 12 of the DAER paper) and writes W/eval/<split>.json.
"""

import json
import os
import time

from absl import app
from absl import flags
from absl import logging as absl_logging
import jax
import numpy as np

from xmatch_jax import checkpoints
from xmatch_jax import cli
from xmatch_jax import errors
from xmatch_jax import inference
from xmatch_jax import metrics as metrics_lib
from xmatch_jax import rerank
from xmatch_jax import run_setup
from xmatch_jax import workdirs
from xmatch_jax.data import load_split


def evaluate_workdir(
  workdir: str, split: str | None = 'test', protocol: str | None = None, save_scores: bool = False, rerank_k: int = 0
) -> dict:
  """Scores `split` with W's best checkpoint and writes W/eval/<split>.json. Returns the result dict.

  `protocol`: 1k / 5k / fold5, a named protocol (f30k_1k, coco_1k_fold5, coco_5k; split None = its split), or
  None (from the split size; a 5000-image split is ambiguous and must be named). `save_scores` also writes the
  [n_images, n_captions] float32 score matrix to W/eval/<split>_scores.npy (for ensembles, xmatch_jax.ensemble).
  `rerank_k` > 0: two-stage retrieval (xmatch_jax.rerank), the full head scores each query's top k candidates of
  the global score; recall protocols only; written to W/eval/<split>_rerank<k>.json.
  """
  config = workdirs.load_config(workdir)
  split, protocol, name = metrics_lib.resolve_protocol(protocol, config.dataset, split)
  vocab = workdirs.load_vocab(workdir)
  data = load_split(config.dataset, split, config.data_dir or None)
  model = run_setup.build_model(config, len(vocab), run_setup.img_dim_of(data.images), workdir)
  variables, meta, which = checkpoints.load_variables(workdir, model)
  tokens, mask = run_setup.encode_captions(vocab, data.captions, config)
  metric = config.get('eval_metric', 'recall')
  if metric == 'map' and protocol is not None:
    raise errors.UserError(
      f'--protocol={protocol} is a recall protocol; this run is evaluated by mAP over category '
      'labels (config.eval_metric = "map").'
    )
  if rerank_k and (metric != 'recall' or protocol == 'fold5'):
    raise errors.UserError(
      '--rerank_k works with the recall protocols 1k / 5k over a whole split; got '
      f'metric {metric!r}, protocol {protocol!r}.'
    )
  scorer = inference.Scorer(model, variables, config.eval_image_chunk, config.eval_text_batch, desc=f'{split} scoring')
  image_rep = jax.block_until_ready(scorer.encode_images(data.images))
  text_rep = jax.block_until_ready(scorer.encode_text(tokens, mask))
  start = time.perf_counter()
  if rerank_k:
    sims_i2t, sims = rerank.rerank(scorer, image_rep, text_rep, rerank_k)  # sims: the text-to-image matrix
  else:
    sims = scorer.pair_scores(image_rep, text_rep)
  seconds = time.perf_counter() - start
  n_img = sims.shape[0]
  if metric == 'map':
    labels = np.asarray(data.images['label'])
    metrics, protocol = metrics_lib.map_metrics(sims, labels, labels[data.caption_to_image]), 'map'
  else:
    metrics, protocol = metrics_lib.metrics_for(sims, protocol)
    if rerank_k:
      metrics = rerank.two_way_recall(sims_i2t, sims)
  result = {
    **metrics,
    'kind': 'single',
    'protocol': name or protocol,
    'dataset': config.dataset,
    'split': split,
    'n_images': n_img,
    'n_captions': sims.shape[1],
    'model': config.model.name,
    'checkpoint': which,
    'checkpoint_step': int(meta.get('step', -1)),
    'rerank_k': int(rerank_k),
    'scoring_seconds': round(seconds, 3),
  }
  os.makedirs(workdirs.eval_dir(workdir), exist_ok=True)
  with open(workdirs.result_path(workdir, split, rerank_k), 'w') as f:
    json.dump(result, f, indent=2)
  if save_scores:
    np.save(workdirs.scores_path(workdir, split), np.asarray(sims, np.float32))
  return result


def format_table(result: dict) -> str:
  head = (
    f'{result["model"]} on {result["dataset"]}/{result["split"]} ({result["n_images"]} images, '
    f'{result["n_captions"]} captions, protocol {result["protocol"]}, {result["checkpoint"]} checkpoint '
    f'step {result["checkpoint_step"]})'
  )
  keys = metrics_lib.MAP_KEYS if result['protocol'] == 'map' else metrics_lib.RESULT_KEYS
  names = '  '.join(f'{k:>8}' for k in keys)
  values = '  '.join(f'{result[k]:8.4f}' if result['protocol'] == 'map' else f'{result[k]:8.1f}' for k in keys)
  return f'{head}\n{names}\n{values}'


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
  f = flags.FLAGS
  result = evaluate_workdir(f.workdir, f.split, f.protocol, save_scores=f.save_scores, rerank_k=f.rerank_k)
  print(format_table(result))
  print(
    f'scoring took {result["scoring_seconds"]:.1f} s'
    + (f' (re-ranking the top {f.rerank_k})' if f.rerank_k else ' (exhaustive)')
  )
  print(f'written to {workdirs.result_path(f.workdir, result["split"], f.rerank_k)}')


if __name__ == '__main__':
  flags.DEFINE_string('workdir', None, 'Training workdir.')
  flags.DEFINE_string('split', None, "Split to evaluate (default: test, or the named protocol's split).")
  flags.DEFINE_enum(
    'protocol',
    None,
    sorted(metrics_lib.PROTOCOLS) + sorted(metrics_lib.NAMED_PROTOCOLS),
    'Evaluation protocol (default: from the split size).',
  )
  flags.DEFINE_bool('save_scores', False, 'Also write W/eval/<split>_scores.npy (for xmatch_jax.ensemble).')
  flags.DEFINE_integer(
    'rerank_k',
    0,
    'Two-stage retrieval: re-score only the top K candidates of the global score per query (0: score every pair).',
  )
  flags.mark_flags_as_required(['workdir'])
  cli.run_absl(main)
