"""Orbax checkpoints of a training run: the latest few steps plus the best on dev rsum.

Layout in the workdir: `checkpoints/<step>/` (latest, `keep` of them) and `best/<step>/` (one). Each holds
`state` (params, optimizer state, step) and `meta` (json: epoch, dev metrics, best rsum). The data position is
the step itself: batches are a pure function of (seed, step).
"""

import contextlib
import errno
import logging
import os
import re
import sys
import traceback

from absl import logging as absl_logging
import jax
import orbax.checkpoint as ocp

from xmatch_jax import errors
from xmatch_jax import workdirs


class _DropMissingMetadataWarning(logging.Filter):
  """orbax warns 'Metadata file does not exist' on every load of a checkpoint written without its optional
  metadata file (imported checkpoints, older orbax); the checkpoint is complete, so the warning only alarms."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith('Metadata file does not exist')


absl_logging.get_absl_logger().addFilter(_DropMissingMetadataWarning())


class _DropOrbaxSaveErrors(logging.Filter):
  """A failed background save makes orbax log the same OSError with a stack from each of its threads; the run stops
  with CheckpointWriteError, which names the step, the reason and what is intact. XMATCH_DEBUG=1 keeps them."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR and f'{os.sep}orbax{os.sep}' in record.pathname and not _debug())


absl_logging.get_absl_logger().addFilter(_DropOrbaxSaveErrors())


class _DropOrbaxUnretrievedTasks(logging.Filter):
  """The same failed save, seen by asyncio when it collects orbax's write task or the future gathering its write
  fragments: 'Task (or _GatheringFuture) exception was never retrieved' with the OSError's stack, at a moment that
  depends on the garbage collector. Likewise a failed read of a corrupted checkpoint, already reported by
  `restore_latest` ('could not be read') and recovered from, whose task is a wrapper named outside orbax: its
  traceback runs through orbax. XMATCH_DEBUG=1 keeps them."""

  def filter(self, record: logging.LogRecord) -> bool:
    message = str(record.msg)
    unretrieved = _UNRETRIEVED.match(message) is not None and (_in_orbax(message) or _raised_in_orbax(record.exc_info))
    return not (unretrieved and not _debug())


# asyncio's words for any Task or Future subclass collected with an exception nobody retrieved.
_UNRETRIEVED = re.compile(r'\w+ exception was never retrieved')


def _in_orbax(path: str) -> bool:
  return f'{os.sep}orbax{os.sep}' in path


def _raised_in_orbax(exc_info) -> bool:
  """Whether the exception of a log record's exc_info passed through a frame of orbax's files."""
  exc = exc_info[1] if isinstance(exc_info, tuple) and len(exc_info) == 3 else None
  tb = exc.__traceback__ if exc is not None else None
  return any(_in_orbax(frame.filename) for frame in traceback.extract_tb(tb)) if tb is not None else False


logging.getLogger('asyncio').addFilter(_DropOrbaxUnretrievedTasks())


def _debug() -> bool:
  return os.environ.get('XMATCH_DEBUG', '') not in ('', '0')


def _drop_closed_loop_callbacks(hook):
  """After a failed write, tensorstore completes the save's remaining writes and calls back into the event loop
  orbax already closed: 'RuntimeError: Event loop is closed' for each, and at exit an ImportError from every
  pending write coroutine. They are consequences of the error CheckpointWriteError reports; others pass on."""

  def unraisable(info):
    message = str(info.exc_value)
    closed_loop = isinstance(info.exc_value, RuntimeError) and message == 'Event loop is closed'
    at_exit = isinstance(info.exc_value, ImportError) and 'Python is likely shutting down' in message
    if (closed_loop or at_exit) and not _debug():
      return
    hook(info)

  return unraisable


sys.unraisablehook = _drop_closed_loop_callbacks(sys.unraisablehook)


class CheckpointWriteError(errors.UserError):
  """A checkpoint could not be written (full disk, file size limit, permissions); the earlier ones are intact."""


def _manager(directory: str, keep: int) -> ocp.CheckpointManager:
  # latest/ and best/ save the same step at once: in multi-process runs their background threads need their own
  # barrier names, or orbax's barriers collide (hangs / "barrier already ongoing").
  multiprocessing = ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=os.path.basename(directory))
  return ocp.CheckpointManager(
    os.path.abspath(directory),
    options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, multiprocessing_options=multiprocessing),
  )


def _abstract(tree):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class RunCheckpoints:
  """Latest and best checkpoints of one workdir."""

  def __init__(self, workdir: str, keep: int = 2):
    self.workdir = workdir
    self.latest = _manager(workdirs.checkpoints_dir(workdir), keep)
    self.best = _manager(workdirs.best_dir(workdir), 1)
    self._writing = None  # the step being written in the background
    self._failed = False

  def save(self, step: int, state, meta: dict, is_best: bool = False) -> None:
    """Starts writing `step` in the background (orbax finishes it into checkpoints/<step> by an atomic rename).

    Raises CheckpointWriteError when this or the previous background write fails.
    """
    self.wait()  # an earlier write's failure surfaces here, before the next one starts
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    self._writing = step
    with self._reporting_failures():
      self.latest.save(step, args=args, force=True)
      if is_best:
        self.best.save(step, args=args, force=True)

  def wait(self) -> None:
    """Waits for the background write; CheckpointWriteError if it failed."""
    with self._reporting_failures():
      self.latest.wait_until_finished()
      self.best.wait_until_finished()
    self._writing = None

  def check(self) -> None:
    """Raises CheckpointWriteError if a background write has failed; does not wait for one in progress."""
    with self._reporting_failures():
      self.latest.check_for_errors()
      self.best.check_for_errors()

  @contextlib.contextmanager
  def _reporting_failures(self):
    """Turns an exception of orbax's save path into `write_error` (once: later ones repeat the first)."""
    try:
      yield
    except CheckpointWriteError:
      raise
    except Exception as e:  # noqa: BLE001 - whatever stopped the write (OSError, tensorstore's ValueError)
      if self._failed:
        raise
      raise self.write_error(e) from e

  def write_error(self, error: Exception) -> CheckpointWriteError:
    """The one-line error for a failed write of the current step: the reason, and which checkpoints are intact."""
    self._failed = True
    step = self._writing
    latest, best = finished_steps(self.latest.directory), finished_steps(self.best.directory)
    # latest/ is written first; if its step finished, the failed write was best/'s
    where = workdirs.best_dir(self.workdir) if step in latest else workdirs.checkpoints_dir(self.workdir)
    intact = ', '.join(
      [f'{workdirs.checkpoints_dir(self.workdir)}/{s}' for s in latest]
      + [f'{workdirs.best_dir(self.workdir)}/{s}' for s in best]
    )
    resume = f'it resumes from step {latest[-1]}' if latest else 'it starts from step 0'
    return CheckpointWriteError(
      f'{where}/{step}: writing the checkpoint failed ({_write_failure_reason(error)}); training stopped. '
      f'Intact: {intact or "none"}. Free disk space, raise the file size limit (ulimit -f) or make {self.workdir} '
      f'writable, then run the same command: {resume}.'
    )

  def has_checkpoint(self) -> bool:
    return self.latest.latest_step() is not None or self.best.latest_step() is not None

  def restore_latest(self, target_state):
    """Restores the newest readable latest-checkpoint into the structure of `target_state`.

    Returns (state, meta), or None when there is none. A checkpoint that fails to read (half-written or
    corrupted) is reported and the previous one is used; UnreadableCheckpoints when none can be read.
    """
    return _restore_newest(self.latest, target_state)

  def restore_for_eval(self, target_state=None):
    """The best checkpoint if one was kept, else the latest. Returns (state, meta, which).

    With `target_state` None the saved tree is returned as saved, on this process's first device (for reading
    params; whatever mesh wrote it).
    """
    unreadable = []
    for which, manager in (('best', self.best), ('latest', self.latest)):
      try:
        restored = _restore_newest(manager, target_state)
      except UnreadableCheckpoints as e:
        unreadable.append(str(e))
        continue
      if restored is not None:
        return (*restored, which)
    if unreadable:
      raise UnreadableCheckpoints(' '.join(unreadable))
    raise errors.MissingFileError(f'{self.workdir}: no checkpoint in best/ or checkpoints/; train first.')

  def close(self) -> None:
    """Finishes the background write and closes. After a reported write failure it only closes (the error was
    raised already)."""
    try:
      self.wait()
    except Exception:  # noqa: BLE001 - after a reported failure orbax raises the same error again here
      if not self._failed:
        raise
    finally:
      for manager in (self.latest, self.best):
        try:
          manager.close()
        except Exception:  # noqa: BLE001 - the failed write is what is reported; closing must not replace it
          if not self._failed:
            raise


def finished_steps(directory) -> list:
  """Steps with a finished checkpoint in `directory`: orbax renames a step's directory to its number only when its
  write completed."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


def _write_failure_reason(error: Exception) -> str:
  """'File too large [errno 27]' from an OSError or from tensorstore's message; else the message's first line."""
  code = getattr(error, 'errno', None)
  if code is None:
    found = _OS_ERROR_CODE.search(str(error))
    code = int(found.group(1)) if found else None
  if code is not None:
    return f'{os.strerror(code)} [errno {errno.errorcode.get(code, code)}]'
  return f'{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ""}'


def _local_target(manager: ocp.CheckpointManager, step: int):
  """The saved tree's shapes and dtypes placed on this process's first device: a checkpoint written by any mesh
  (8 devices, several hosts) restores for reading on one device."""
  metadata = ocp.StandardCheckpointer().metadata(os.path.join(manager.directory, str(step), 'state')).item_metadata
  metadata = getattr(metadata, 'tree', metadata)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)


class UnreadableCheckpoints(ValueError):
  """A checkpoint directory holds steps, but none of them can be read (or none fits the model's state)."""


def _restore_newest(manager: ocp.CheckpointManager, target_state):
  """(state, meta) of the newest readable step; None when there is no step; UnreadableCheckpoints when every step
  fails to read (truncated files, or the state of another model / optimiser setting)."""
  steps = sorted(manager.all_steps(), reverse=True)
  first_error = None
  for step in steps:
    try:
      target = _local_target(manager, step) if target_state is None else _abstract(target_state)
      state_args = ocp.args.StandardRestore(target)
      restored = manager.restore(step, args=ocp.args.Composite(state=state_args, meta=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001 - any read failure means this step is unusable; try the previous one
      logging.warning(
        'checkpoint %s/%d could not be read (%s: %s); trying the previous one.',
        manager.directory,
        step,
        type(e).__name__,
        e,
      )
      first_error = first_error or f'{type(e).__name__}: {str(e)[:300]}'
      continue
    return restored['state'], restored['meta']
  if steps:
    raise UnreadableCheckpoints(
      f'{manager.directory}: none of the checkpoint steps {sorted(steps)} can be read (the newest failed with '
      f'{first_error}); expected a complete orbax checkpoint of this model and optimiser. Delete the broken step '
      'directories or use a new --workdir.'
    )
  return None


def check_params_match(params, expected, source: str) -> None:
  """Raises naming the first parameter whose path or shape differs from what the model expects."""
  got = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(params)}
  want = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(expected)}
  missing, unknown = sorted(set(want) - set(got)), sorted(set(got) - set(want))
  if missing or unknown:
    raise errors.UserError(
      f'{source}: checkpoint parameters do not fit the model: missing {missing[:5]}, '
      f'unknown {unknown[:5]} (is this a checkpoint of another model?).'
    )
  for key, shape in want.items():
    if got[key] != shape:
      raise errors.UserError(
        f'{source}: parameter {key} has shape {got[key]} in the checkpoint; the model expects {shape}.'
      )


def expected_variables(model) -> dict:
  """The variable collections of `model` as shape / dtype structs (no computation)."""
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), *model.example_inputs())


def load_variables(workdir: str, model):
  """Best (else latest) variables of W (params, and BatchNorm statistics where the model has them), checked against
  the model's parameter shapes. Returns (variables, meta, which)."""
  expected = expected_variables(model)
  state, meta, which = RunCheckpoints(workdir).restore_for_eval()
  for collection in expected:
    if collection not in state:
      raise errors.UserError(f'{workdir}/{which}: the checkpoint has no {collection!r}; the model needs it.')
    check_params_match(state[collection], expected[collection], f'{workdir}/{which}')
  return {collection: state[collection] for collection in expected}, meta, which
