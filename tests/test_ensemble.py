"""Ensembles read each run's saved score matrix and caption layout: custom data with 1-N captions per image and
mAP runs (category labels) are scored as `evaluate` scores them; runs on different data are refused."""

import json
import os

import numpy as np
import pytest

from configs import daer as daer_config
from configs import scan as scan_config
from xmatch_jax import ensemble
from xmatch_jax import errors
from xmatch_jax import metrics as metrics_lib
from xmatch_jax import workdirs


def _run(tmp_path, name, config, sims, caption_to_image, labels=None):
  """A workdir holding only what an ensemble reads: config.json and a saved evaluation of split test."""
  workdir = tmp_path / name
  (workdir / 'eval').mkdir(parents=True)
  (workdir / 'config.json').write_text(json.dumps(config.to_dict()))
  np.save(workdirs.scores_path(str(workdir), 'test'), sims.astype(np.float32))
  layout = {'caption_to_image': caption_to_image}
  if labels is not None:
    layout['labels'] = labels
  np.savez(workdirs.layout_path(str(workdir), 'test'), **layout)
  return str(workdir)


def test_runs_on_custom_data_with_1_to_n_captions_are_fused_over_their_layout(tmp_path):
  rng = np.random.default_rng(0)
  caption_to_image = np.array([0, 0, 0, 1, 2, 2, 3, 4, 4, 4, 4, 5])  # 6 images with 3, 1, 2, 1, 4, 1 captions
  config = scan_config.get_config('shapes')
  config.dataset = 'precomp'
  a, b = rng.normal(size=(2, 6, 12))
  runs = [_run(tmp_path, 'a', config, a, caption_to_image), _run(tmp_path, 'b', config, b, caption_to_image)]
  result = ensemble.ensemble(runs, [0.25, 0.75], 'test')
  fused = 0.25 * a.astype(np.float32).astype(np.float64) + 0.75 * b.astype(np.float32)
  want = metrics_lib.recall_metrics(fused, caption_to_image=caption_to_image)
  assert result['protocol'] == 'all' and result['n_captions'] == 12
  for key in metrics_lib.RESULT_KEYS:
    assert result[key] == pytest.approx(want[key], abs=1e-9)

  other = caption_to_image.copy()
  other[3] = 0  # caption 3 belongs to another image in this run's data
  c = _run(tmp_path, 'c', config, b, other)
  with pytest.raises(errors.UserError, match=r'c/eval/test_layout.npz: other captions per image or labels than'):
    ensemble.ensemble([runs[0], c], split='test')
  with pytest.raises(errors.UserError, match='needs 5 consecutive captions per image'):
    ensemble.ensemble(runs, split='test', protocol='1k')


def test_map_runs_are_fused_by_map_over_their_labels(tmp_path):
  rng = np.random.default_rng(1)
  caption_to_image = np.repeat(np.arange(8), 5)
  labels = rng.integers(0, 3, size=8)
  config = daer_config.get_config('shapes')
  a, b = rng.normal(size=(2, 8, 40))
  runs = [
    _run(tmp_path, 'a', config, a, caption_to_image, labels),
    _run(tmp_path, 'b', config, b, caption_to_image, labels),
  ]
  result = ensemble.ensemble(runs, split='test')
  fused = 0.5 * a.astype(np.float32).astype(np.float64) + 0.5 * b.astype(np.float32)
  want = metrics_lib.map_metrics(fused, labels, labels[caption_to_image])
  assert result['protocol'] == 'map'
  for key in metrics_lib.MAP_KEYS:
    assert result[key] == pytest.approx(want[key], abs=1e-12)
  with pytest.raises(errors.UserError, match='evaluated by mAP'):
    ensemble.ensemble(runs, split='test', protocol='1k')
  recall_run = _run(tmp_path, 'scan', scan_config.get_config('shapes'), a, caption_to_image)
  with pytest.raises(errors.UserError, match='different metrics'):
    ensemble.ensemble([runs[0], recall_run], split='test')
  assert os.path.exists(workdirs.layout_path(runs[0], 'test'))
