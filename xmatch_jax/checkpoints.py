"""Orbax checkpoints of a training run: the latest few steps plus the best on dev rsum.

Layout in the workdir: `checkpoints/<step>/` (latest, `keep` of them) and `best/<step>/` (one). Each holds
`state` (params, optimizer state, step) and `meta` (json: epoch, dev metrics, best rsum). The data position is
the step itself: batches are a pure function of (seed, step).
"""

import logging
import os

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

  def save(self, step: int, state, meta: dict, is_best: bool = False) -> None:
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    self.latest.save(step, args=args, force=True)
    if is_best:
      self.best.save(step, args=args, force=True)

  def wait(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

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
    self.wait()
    self.latest.close()
    self.best.close()


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
