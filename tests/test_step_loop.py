"""trainers.loop.StepLoop's save policy: evaluation points, every `checkpoint_every` steps, and by wall time."""

import jax.numpy as jnp
import pytest

from xmatch_jax.trainers import loop


def _run(tmp_path, seconds_per_step: float, **fields) -> dict:
  now = [0.0]
  seen = {'evaluated': [], 'saved': []}

  def step(index, state):
    now[0] += seconds_per_step
    return state + 1, {'loss': jnp.float32(1.0)}

  steps = loop.StepLoop(
    workdir=str(tmp_path),
    writer=loop.MetricsWriter(str(tmp_path)),
    total=20,
    steps_per_epoch=10,
    log_every=5,
    clock=lambda: now[0],
    **fields,
  )
  state = steps.run(
    0,
    0,
    step,
    evaluate=lambda done, end_of_epoch, state: seen['evaluated'].append(done),
    save=lambda done, state: seen['saved'].append(done),
    last_good=lambda: 'no checkpoint',
  )
  assert state == 20
  return seen


def test_saves_by_wall_time_between_evaluations(tmp_path):
  # 15 s a step, a save due after 1 minute: every 4 steps, the clock restarting at each save or evaluation.
  seen = _run(tmp_path, 15.0, checkpoint_every_minutes=1.0)
  assert seen == {'evaluated': [10, 20], 'saved': [4, 8, 14, 18]}


@pytest.mark.parametrize('minutes', [0.0, 10.0])
def test_no_wall_time_saves_when_off_or_not_due(tmp_path, minutes):
  seen = _run(tmp_path, 15.0, checkpoint_every=3, checkpoint_every_minutes=minutes)
  assert seen == {'evaluated': [10, 20], 'saved': [3, 6, 9, 12, 15, 18]}
