"""Runs the memory-planning checks in a process of their own and prints one JSON line of what it saw.

Used by test_memory_plan.py: compiling a step only for XLA's memory analysis, then training with the same jit in
one process, left XLA state that aborted a later test's training step in the same pytest process.
"""

import contextlib
import functools
import io
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from parallel_check import batch  # noqa: E402  pylint: disable=g-import-not-at-top

from configs import rdan as rdan_config  # noqa: E402  pylint: disable=g-import-not-at-top
from xmatch_jax.models import build_model  # noqa: E402  pylint: disable=g-import-not-at-top
from xmatch_jax.trainers import contrastive
from xmatch_jax.trainers import loop
from xmatch_jax.trainers import optim


def main() -> dict:
  config = rdan_config.get_config('shapes_tiny')
  config.model.embed_size = 32
  config.model.block_size = 16
  # The dense loss: its backward holds every block's maps, which the block size bounds. (The rescored hardest-negative
  # step backpropagates through 3 B pairs only; its peak here is not the scorer's.)
  config.loss.rescore_hardest = False
  model = build_model(config.model, vocab_size=20, img_dim=10)
  data = batch(0, b=32)
  params = model.init(jax.random.key(0), data['images'], data['text'])['params']
  tx, schedule = optim.make_optimizer(config.optim, 10)
  state = {'params': params, 'opt_state': tx.init(params), 'step': jnp.zeros((), jnp.int32)}

  def make_step(model):
    return jax.jit(
      functools.partial(contrastive.train_step, model=model, tx=tx, schedule=schedule, loss_cfg=config.loss)
    )

  peaks = {b: loop.step_memory_bytes(make_step(model.clone(block_size=b)), state, data)['peak'] for b in (16, 8, 4, 2)}
  out = {'peaks': peaks}

  def plan(budget_gb):
    config.memory_budget_gb = budget_gb
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
      try:
        planned, step_fn = loop.plan_memory(config.memory_budget_gb, model, make_step, state, data)
      except ValueError as e:
        return {'error': str(e)}
    return {'block_size': planned.block_size, 'printed': printed.getvalue(), 'step_fn': step_fn}

  fitted = plan((peaks[8] + peaks[4]) / 2 / 1e9)
  _, metrics = fitted.pop('step_fn')(state, data)
  out.update(fitted=fitted, fitted_loss=float(metrics['loss']))
  unbudgeted = plan(0.0)
  unbudgeted.pop('step_fn')
  out.update(unbudgeted=unbudgeted, impossible=plan(1e-9))
  return out


if __name__ == '__main__':
  print(json.dumps(main()))
