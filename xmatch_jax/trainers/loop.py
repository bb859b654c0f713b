"""The step loop every trainer shares: progress, logging, non-finite checks, checkpoints, stop signals, memory plans.

A trainer supplies the compiled step, the batches and what happens at an evaluation point (`StepLoop.run`); the
loop owns the order of events, which is the same for every trainer:

  for each step: dispatch it (one step stays in flight, so the bar and its ETA count completed steps) ->
  at a log point fetch the pending metrics, stop on a non-finite loss, write them -> at an evaluation point (every
  `eval_every` epochs and the last step) call the trainer's `evaluate`, which checkpoints -> else every
  `checkpoint_every` steps, or when `checkpoint_every_minutes` of wall time have passed since the last save, save
  (in the background; a failed write stops the run at the next log point) -> on SIGTERM / SIGINT save (unless
  just saved) and raise `Interrupted`.
"""

import dataclasses
import json
import signal
import time
from typing import Callable
from typing import Optional

import jax
import numpy as np

from xmatch_jax import errors
from xmatch_jax import parallel
from xmatch_jax import progress as progress_lib
from xmatch_jax import workdirs


class MetricsWriter:
  """W/metrics.jsonl and TensorBoard (W/tb), written by process 0 only."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    if self.enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

      self._path, self._failed = workdirs.metrics_path(workdir), False
      self._jsonl = open(self._path, 'a')
      self._tb = SummaryWriter(workdirs.tensorboard_dir(workdir))

  def write(self, step: int, values: dict) -> None:
    if not self.enabled:
      return
    try:
      self._jsonl.write(json.dumps({'step': step, **{k: float(v) for k, v in values.items()}}) + '\n')
      self._jsonl.flush()
    except OSError as e:  # a full disk or a file size limit; the checkpoints so far are intact
      self._failed = True
      raise errors.UserError(
        f'{self._path}: writing the metrics of step {step} failed ({e.strerror}); training stopped. Free disk '
        'space or raise the file size limit, then run the same command to resume from the last checkpoint.'
      ) from e
    for k, v in values.items():
      self._tb.add_scalar(k, float(v), step)

  def close(self) -> None:
    if self.enabled:
      try:
        self._jsonl.close()
      except OSError:
        if not self._failed:
          raise  # else the failed write raised already; closing flushes the same bytes again
      self._tb.close()


class Interrupted(Exception):
  """Training stopped on a signal after saving a checkpoint at `step`; the same command resumes it."""

  def __init__(self, signum: int, step: int, workdir: str):
    self.signum, self.step = signum, step
    super().__init__(
      f'stopped by signal {signal.Signals(signum).name} at step {step}; checkpoint saved in '
      f'{workdir}/checkpoints. Run the same command to resume.'
    )


class CollapseWatch:
  """Notices a loss that sits at the value every collapsed (all-equal) score matrix gives, 2 B margin with hardest
  negatives: the embeddings stopped separating pairs (too high a learning rate, no warm-up, a data bug)."""

  def __init__(self, collapsed_loss: float, intervals: int = 5, tolerance: float = 0.02):
    self.collapsed_loss, self.intervals, self.tolerance = collapsed_loss, intervals, tolerance
    self.run = 0
    self.warned = False

  def update(self, loss: float) -> bool:
    """Records a logged mean loss; True once, when it has been at the collapse value for `intervals` logs."""
    near = abs(loss - self.collapsed_loss) <= self.tolerance * max(self.collapsed_loss, 1e-9)
    self.run = self.run + 1 if near else 0
    if self.run >= self.intervals and not self.warned:
      self.warned = True
      return True
    return False

  def message(self, step: int) -> str:
    return (
      f'warning: at step {step} the loss has been {self.collapsed_loss:.2f} (= 2 x batch x margin, every score '
      f'equal) for {self.run} log intervals: training may have collapsed. Try a lower learning rate or '
      'config.loss.warmup_epochs=1 (sum over negatives first, as VSE++).'
    )


def flush(pending: list, step: int, t0: float, where: str, prefix: str = '') -> dict:
  """Fetches pending step metrics and returns their means (keys prefixed) and steps/s; a non-finite loss stops the
  run (`where` says which checkpoint is kept)."""
  fetched = jax.device_get(pending)
  losses_seen = np.array([m['loss'] for m in fetched])
  if not np.isfinite(losses_seen).all():
    bad = step - len(fetched) + int(np.argmax(~np.isfinite(losses_seen))) + 1
    raise FloatingPointError(
      f'{prefix}loss is {losses_seen[~np.isfinite(losses_seen)][0]} at step {bad}; training stopped. {where}'
    )
  summary = {f'{prefix}{k}': float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
  summary[f'{prefix}steps_per_s'] = len(fetched) / max(time.time() - t0, 1e-9)
  return summary


@dataclasses.dataclass
class StepLoop:
  """One run of steps [start, total) of a trainer.

  Attributes:
    workdir: where the checkpoints go (named in messages).
    writer: the run's MetricsWriter.
    total: steps in all; steps_per_epoch: steps of one epoch.
    log_every / eval_every (epochs) / checkpoint_every (steps, 0: only at evaluations): the intervals.
    checkpoint_every_minutes: also save when this much wall time has passed since the last save (0: off), so a kill
      loses at most about that much work whatever the step time. With several processes the clock of process 0
      decides, at log points, so that all save at the same step.
    desc: the progress bar's label; prefix: of the logged metric names (a DAER stage: 'text/').
    collapse: a CollapseWatch checked at every log after `watch_after` steps, or None.
    clock: seconds, for the wall-time saves.
    check_saves: called at every log point; raises if a background checkpoint write has failed, so a full disk
      stops the run within a log interval of the failed save instead of at the next save.
  """

  workdir: str
  writer: MetricsWriter
  total: int
  steps_per_epoch: int
  log_every: int
  eval_every: int = 1
  checkpoint_every: int = 0
  checkpoint_every_minutes: float = 0.0
  desc: str = 'train'
  prefix: str = ''
  collapse: Optional[CollapseWatch] = None
  watch_after: int = 0
  clock: Callable[[], float] = time.monotonic
  check_saves: Callable[[], None] = lambda: None

  def run(
    self,
    state,
    start: int,
    step: Callable,
    evaluate: Callable,
    save: Callable,
    last_good: Callable[[], str],
  ):
    """Runs the steps; returns the final state.

    Args:
      state: the train state at step `start`.
      start: the first step to run (a resumed run's checkpoint step).
      step: (step index, state) -> (state, metrics on device): makes the batch and runs the compiled step.
      evaluate: (done, end_of_epoch, state) -> None: dev evaluation and checkpoint at an evaluation point.
      save: (done, state) -> None: a checkpoint between evaluation points (intervals and stop signals).
      last_good: () -> the sentence naming the checkpoint a non-finite loss leaves in place.
    """
    chief = jax.process_index() == 0
    progress = progress_lib.bar(
      total=self.total, desc=self.desc, unit='step', initial=start, disable=not chief, delay=0
    )
    stop = parallel.StopRequest()
    pending, t0, saved_at = [], time.time(), start
    saved_time = self.clock()
    in_flight = None  # the last dispatched step's metrics, not yet known to be computed

    def write_pending(done):
      nonlocal pending, t0
      summary = flush(pending, done, t0, last_good(), self.prefix)
      self.writer.write(done, summary)
      pending, t0 = [], time.time()
      return summary

    try:
      for index in range(start, self.total):
        state, metrics = step(index, state)
        pending.append(metrics)
        # At most one step runs ahead of the host: the next batch is prepared while this step computes, the bar
        # (and its ETA) counts completed steps, and a stop request is acted on within two steps (this one and the
        # one in flight) plus the save.
        if in_flight is not None:
          jax.block_until_ready(in_flight)
          progress.update(1)
        in_flight = metrics
        done = index + 1
        end_of_epoch = done % self.steps_per_epoch == 0
        if done % self.log_every == 0 or end_of_epoch or done == self.total:
          summary = write_pending(done)
          self.check_saves()
          progress.update(done - progress.n)  # the flush waited for every pending step
          in_flight = None
          loss = summary[f'{self.prefix}loss']
          if self.collapse is not None and done > self.watch_after and self.collapse.update(loss) and chief:
            progress_lib.write(self.collapse.message(done))
          progress.set_postfix(loss=f'{loss:.4g}')
        epoch = done // self.steps_per_epoch
        if (end_of_epoch and epoch % self.eval_every == 0) or done == self.total:
          evaluate(done, end_of_epoch, state)
          saved_at, saved_time = done, self.clock()
        elif (self.checkpoint_every and done % self.checkpoint_every == 0) or self._time_to_save(done, saved_time):
          if pending:
            write_pending(done)
          save(done, state)
          saved_at, saved_time = done, self.clock()
        if done < self.total and stop.should_stop(done, self.log_every):
          if pending:
            write_pending(done)
          if saved_at != done:
            save(done, state)
          raise Interrupted(stop.signum, done, self.workdir)
    finally:
      stop.close()
      progress.close()
    return state

  def _time_to_save(self, done: int, saved_time: float) -> bool:
    if not self.checkpoint_every_minutes:
      return False
    if jax.process_count() > 1 and done % self.log_every:
      return False  # processes agree only at log points
    due = self.clock() - saved_time >= 60 * self.checkpoint_every_minutes
    return parallel.agree({'due': float(due)})['due'] > 0


def step_memory_bytes(step_fn, state, batch) -> dict:
  """XLA's memory analysis of one compiled training step, per device: arguments (params, optimizer state, batch),
  outputs and temporaries (activations kept for the backward pass, the pair blocks' tensors)."""
  stats = step_fn.lower(state, batch).compile().memory_analysis()
  out = {
    'arguments': stats.argument_size_in_bytes,
    'outputs': stats.output_size_in_bytes,
    'temporaries': stats.temp_size_in_bytes,
    'aliased': stats.alias_size_in_bytes,
  }
  out['peak'] = out['arguments'] + out['outputs'] + out['temporaries'] - out['aliased']
  return out


def plan_memory(budget_gb: float, model, make_step: Callable, state, batch):
  """Prints the per-device memory estimate of a training step before the first one; with `budget_gb` > 0 halves
  the model's block_size (images per block of the all-pairs scorer) until the estimate fits.

  make_step: model -> compiled step function. Returns (model, compiled step function).
  """
  budget = budget_gb * 1e9
  block = model.block_size
  while True:
    step_fn = make_step(model)
    memory = step_memory_bytes(step_fn, state, batch)
    fits = not budget or memory['peak'] <= budget
    if jax.process_index() == 0:
      print(
        f'memory per device for one training step (XLA estimate'
        f'{f", block_size {block}" if block else ""}): {memory["peak"] / 1e9:.2f} GB (arguments '
        f'{memory["arguments"] / 1e9:.2f}, temporaries {memory["temporaries"] / 1e9:.2f})'
        f'{"" if fits else f" > budget {budget_gb} GB"}'
      )
    if fits:
      return model, step_fn
    if not block or block == 1:
      raise errors.UserError(
        f'config.memory_budget_gb = {budget_gb}: a training step needs '
        f'{memory["peak"] / 1e9:.2f} GB per device even at block_size {block or "-"}; lower '
        'config.batch_size or raise the budget.'
      )
    block = max(block // 2, 1)
    model = model.clone(block_size=block)
