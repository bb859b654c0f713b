"""Ensembles of trained workdirs: `python -m xmatch_jax.ensemble --workdir=W1 --workdir=W2 [--weights=0.5,0.5]
[--split=test] [--protocol=...]` sums the runs' score matrices with the weights and reports recall (e.g. GLFN's
t2i + i2t fusion of two runs, eq 33, or SCAN's t2i + i2t ensemble).

Each run's matrix is read from W/eval/<split>_scores.npy, or computed (and saved) with its best checkpoint. The runs
must be on the same dataset and split, with the same caption layout (W/eval/<split>_layout.npz: any 1-N captions per
image) and metric (recall, or mAP over category labels for DAER runs); the result goes to --out (json) if given.
"""

import json
import os

from absl import app
from absl import flags
from absl import logging as absl_logging
import numpy as np

from xmatch_jax import cli
from xmatch_jax import errors
from xmatch_jax import evaluate
from xmatch_jax import metrics as metrics_lib
from xmatch_jax import workdirs


def ensemble(
  run_dirs: list, weights: list | None = None, split: str | None = None, protocol: str | None = None
) -> dict:
  if len(run_dirs) < 2:
    raise errors.UserError(f'an ensemble needs at least 2 workdirs, got {len(run_dirs)}')
  weights = weights or [1.0 / len(run_dirs)] * len(run_dirs)
  if len(weights) != len(run_dirs):
    raise errors.UserError(f'{len(weights)} weights for {len(run_dirs)} workdirs')
  configs = {w: workdirs.load_config(w) for w in run_dirs}
  datasets = {w: c.dataset for w, c in configs.items()}
  if len(set(datasets.values())) != 1:
    raise errors.UserError(f'the runs are on different datasets: {datasets}')
  metric = {w: c.get('eval_metric', 'recall') for w, c in configs.items()}
  if len(set(metric.values())) != 1:
    raise errors.UserError(f'the runs are evaluated by different metrics: {metric}')
  if protocol is not None and metric[run_dirs[0]] == 'map':
    raise errors.UserError(f'--protocol={protocol} is a recall protocol; these runs are evaluated by mAP.')
  dataset = next(iter(datasets.values()))
  split, base, name = metrics_lib.resolve_protocol(protocol, dataset, split)
  total, layout = None, None
  for workdir, weight in zip(run_dirs, weights):
    path, layout_file = workdirs.scores_path(workdir, split), workdirs.layout_path(workdir, split)
    if not (os.path.exists(path) and os.path.exists(layout_file)):  # scores saved before layouts: scored again
      evaluate.evaluate_workdir(workdir, split, protocol, save_scores=True)
    sims = np.load(path, allow_pickle=False)
    if total is not None and sims.shape != total.shape:
      raise errors.UserError(f'{path}: scores of shape {sims.shape}; the first run has {total.shape}')
    with np.load(layout_file, allow_pickle=False) as f:
      this = {key: f[key] for key in f.files}
    if layout is not None and (
      this.keys() != layout.keys() or any(not np.array_equal(this[k], layout[k]) for k in this)
    ):
      raise errors.UserError(
        f'{layout_file}: other captions per image or labels than {workdirs.layout_path(run_dirs[0], split)} '
        '(the runs were evaluated on different data)'
      )
    layout = this
    total = weight * sims.astype(np.float64) if total is None else total + weight * sims
  if 'labels' in layout:
    labels = layout['labels']
    metrics, base = metrics_lib.map_metrics(total, labels, labels[layout['caption_to_image']]), 'map'
  else:
    metrics, base = metrics_lib.metrics_for(total, base, layout['caption_to_image'])
  return {
    **metrics,
    'kind': 'ensemble',
    'protocol': name or base,
    'dataset': dataset,
    'split': split,
    'workdirs': run_dirs,
    'weights': weights,
    'n_images': total.shape[0],
    'n_captions': total.shape[1],
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  absl_logging.set_verbosity(absl_logging.WARNING)
  f = flags.FLAGS
  weights = [float(w) for w in f.weights.split(',')] if f.weights else None
  result = ensemble(f.workdir, weights, f.split, f.protocol)
  keys, digits = (metrics_lib.MAP_KEYS, 3) if result['protocol'] == 'map' else (metrics_lib.RESULT_KEYS, 1)
  print(' '.join(f'{k} {result[k]:.{digits}f}' for k in keys) + f'  ({result["protocol"]})')
  if f.out:
    with open(f.out, 'w') as out:
      json.dump(result, out, indent=2)


if __name__ == '__main__':
  flags.DEFINE_multi_string('workdir', None, 'Runs to ensemble (repeat the flag).')
  flags.DEFINE_string('weights', '', 'Comma-separated weights (default: equal).')
  flags.DEFINE_string('split', None, "Split (default: test, or the named protocol's split).")
  flags.DEFINE_string('protocol', None, 'Evaluation protocol, as for xmatch_jax.evaluate.')
  flags.DEFINE_string('out', '', 'Write the result to this json file.')
  flags.mark_flag_as_required('workdir')
  cli.run_absl(main)
