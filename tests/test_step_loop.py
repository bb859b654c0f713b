"""trainers.loop.StepLoop: the save policy (evaluation points, every `checkpoint_every` steps, by wall time) and the
bound on steps dispatched ahead of the host."""

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


def test_at_most_one_step_runs_ahead_of_the_host(tmp_path):
  """The loop waits for step i - 1 before going past step i: with JAX's asynchronous dispatch an unbounded backlog
  of steps made a stop signal wait for all of them, and on 8 fake CPU devices it let the device threads' collectives
  starve (a rendezvous timeout at step ~70 of the SCAN `shapes` run; docs/architecture.md, "Faults")."""
  finished, ahead = set(), []

  class Pending(float):
    """A step's loss that is 'computed' only when the loop blocks on it."""

    def block_until_ready(self):
      finished.add(self.step)
      return self

    def copy_to_host_async(self):  # jax.device_get, at log points, waits for the value too
      finished.add(self.step)

  def step(index, state):
    ahead.append(index - len(finished))  # steps dispatched but not known to be finished, this one included
    loss = Pending(1.0)
    loss.step = index
    return state + 1, {'loss': loss}

  steps = loop.StepLoop(
    workdir=str(tmp_path), writer=loop.MetricsWriter(str(tmp_path)), total=30, steps_per_epoch=30, log_every=10
  )
  steps.run(0, 0, step, evaluate=lambda *a: None, save=lambda *a: None, last_good=lambda: '')
  assert max(ahead) <= 1, ahead
