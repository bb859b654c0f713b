"""tools/gpu_estimate.py: XLA's FLOP count of a training step covers the pair head's forward and backward, and the
time prediction is the max of the compute and memory bounds."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tools'))
import benchmark  # noqa: E402  pylint: disable=g-import-not-at-top
import gpu_estimate  # noqa: E402  pylint: disable=g-import-not-at-top


def test_step_flops_cover_the_pair_head_forward_and_backward():
  from xmatch_jax import run_setup  # pylint: disable=g-import-not-at-top

  k, n, d = 6, 5, 32
  costs = {}
  for b in (4, 8):
    config = run_setup.load_config_file('configs/scan.py:shapes_tiny', ROOT)
    config.model.update(embed_size=d, word_dim=16)
    costs[b] = gpu_estimate.step_cost(config, b, k, n, img_dim=24)
  model = benchmark.build(config, 100, 24)
  pair = {b: benchmark.scoring_flops(model, b, b, k, n)['total'] for b in (4, 8)}
  # Pairs grow 4x, encoders 2x: the extra FLOPs hold at least forward + backward (3x) of the extra pairs.
  assert costs[8]['flops'] - costs[4]['flops'] >= 3 * (pair[8] - pair[4])
  assert costs[8]['bytes'] > costs[4]['bytes'] > 0 and costs[4]['params'] == costs[8]['params']


def test_prediction_is_the_larger_bound():
  spec = gpu_estimate.GPUS['h100_sxm']
  cost = {'flops': 1e12, 'bytes': 1e9}
  p = gpu_estimate.predict(cost, 'h100_sxm', 'bfloat16', 0.5, 0.7)
  assert p['compute_ms'] == pytest.approx(1e3 * 1e12 / (0.5 * spec['bfloat16']))
  assert p['memory_ms'] == pytest.approx(1e3 * 1e9 / (0.7 * spec['bandwidth']))
  assert p['step_ms'] == max(p['compute_ms'], p['memory_ms']) and p['bound'] == 'compute'
  assert gpu_estimate.predict({'flops': 1e9, 'bytes': 1e12}, 'h100_sxm', 'float32', 0.5, 0.7)['bound'] == 'memory'


def test_bad_arguments_and_stage_trained_models_are_refused(capsys):
  with pytest.raises(SystemExit):
    gpu_estimate.parse_args(['--config=configs/scan.py:f30k', '--flop_efficiency=2'])
  assert '--flop_efficiency must be in (0, 1]' in capsys.readouterr().err
  from xmatch_jax import run_setup  # pylint: disable=g-import-not-at-top

  config = run_setup.load_config_file('configs/daer.py:shapes', ROOT)
  with pytest.raises(ValueError, match="trains with the 'staged' trainer"):
    gpu_estimate.step_cost(config, 4, 6, 5, 24)
