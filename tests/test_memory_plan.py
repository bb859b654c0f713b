"""Memory planning: the per-device estimate of a training step (XLA's memory analysis) is printed before the first
step, and a budget halves the block size of the all-pairs scorer until the step fits. The checks run in a
subprocess (tests/memory_plan_check.py; see there why)."""

import json
import math
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope='module')
def seen():
  run = subprocess.run(
    [sys.executable, os.path.join(HERE, 'memory_plan_check.py')],
    capture_output=True,
    text=True,
    env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
    timeout=600,
  )
  assert run.returncode == 0, run.stderr[-3000:]
  return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_estimate_shrinks_with_the_block_size(seen):
  peaks = {int(b): p for b, p in seen['peaks'].items()}
  assert peaks[16] > peaks[8] > peaks[4] > peaks[2] > 0


@pytest.mark.slow
def test_budget_halves_the_block_size_until_the_step_fits(seen):
  fitted = seen['fitted']
  assert fitted['block_size'] == 4
  assert fitted['printed'].count('memory per device for one training step') == 3
  assert 'block_size 4' in fitted['printed']
  assert math.isfinite(seen['fitted_loss'])


@pytest.mark.slow
def test_no_budget_keeps_the_configured_block_and_an_impossible_one_is_an_error(seen):
  assert seen['unbudgeted']['block_size'] == 16 and 'block_size 16' in seen['unbudgeted']['printed']
  assert 'memory_budget_gb = 1e-09: a training step needs' in seen['impossible']['error']
  assert 'at block_size 1' in seen['impossible']['error']
