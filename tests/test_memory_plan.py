"""Memory planning: the per-device estimate of a training step (XLA's memory analysis) is printed before the first
step, and a budget halves the block size of the all-pairs scorer until the step fits."""

import functools
import os
import sys

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import rdan as rdan_config  # noqa: E402  pylint: disable=g-import-not-at-top
from parallel_check import batch  # noqa: E402  pylint: disable=g-import-not-at-top
from xmatch_jax import train  # noqa: E402  pylint: disable=g-import-not-at-top
from xmatch_jax.models import build_model  # noqa: E402  pylint: disable=g-import-not-at-top


@pytest.fixture(scope='module')
def setup():
  config = rdan_config.get_config('shapes_tiny')
  config.model.embed_size = 32
  config.model.block_size = 16
  model = build_model(config.model, vocab_size=20, img_dim=10)
  data = batch(0, b=32)
  params = model.init(jax.random.key(0), data['images'], data['text'])['params']
  tx, schedule = train.make_optimizer(config.optim, 10)
  state = {'params': params, 'opt_state': tx.init(params), 'step': jnp.zeros((), jnp.int32)}

  def make_step(max_violation, model=model):
    return jax.jit(functools.partial(train.train_step, model=model, tx=tx, schedule=schedule, loss_cfg=config.loss,
                                     max_violation=max_violation))
  peaks = {b: train.step_memory_bytes(make_step(None, model.clone(block_size=b)), state, data)['peak']
           for b in (16, 8, 4, 2)}
  return config, model, make_step, state, data, peaks


def test_estimate_shrinks_with_the_block_size(setup):
  *_, peaks = setup
  assert peaks[16] > peaks[8] > peaks[4] > peaks[2] > 0


def test_budget_halves_the_block_size_until_the_step_fits(setup, capsys):
  config, model, make_step, state, data, peaks = setup
  config.memory_budget_gb = (peaks[8] + peaks[4]) / 2 / 1e9
  planned, step_fn = train.plan_memory(config, model, make_step, state, data)
  assert planned.block_size == 4
  printed = capsys.readouterr().out
  assert printed.count('memory per device for one training step') == 3 and 'block_size 4' in printed
  new_state, metrics = step_fn(state, data)
  assert jnp.isfinite(metrics['loss'])


def test_no_budget_keeps_the_configured_block_and_an_impossible_one_is_an_error(setup, capsys):
  config, model, make_step, state, data, _ = setup
  config.memory_budget_gb = 0.0
  assert train.plan_memory(config, model, make_step, state, data)[0].block_size == 16
  assert 'block_size 16' in capsys.readouterr().out
  config.memory_budget_gb = 1e-9
  with pytest.raises(ValueError, match='memory_budget_gb = 1e-09: a training step needs .* at block_size 1'):
    train.plan_memory(config, model, make_step, state, data)
