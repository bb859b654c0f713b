"""Several devices and processes: `jax.distributed` start-up, the `data` mesh, per-process batches, topology.

One code path from 1 CPU to many hosts (docs/architecture.md, "Parallelism"). `python -m xmatch_jax.parallel` prints the
device topology (after starting `jax.distributed` when the environment asks for it, as training does).
"""

import os
import signal
import socket
import threading

from absl import flags
import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh
import numpy as np

from xmatch_jax import errors

CPU_COLLECTIVES = ('gloo', 'mpi')


def _env_int(name: str, default: int) -> int:
  value = os.environ.get(name, '')
  try:
    return int(value) if value else default
  except ValueError:
    raise errors.UserError(f'${name} = {value!r}; expected an int.') from None


def initialize(coordinator: str = '', num_processes: int = 0, process_id: int = -1, cpu_collectives: str = '') -> bool:
  """Starts `jax.distributed` when a multi-process run is asked for; returns whether it did.

  Explicit arguments win over $XMATCH_COORDINATOR (host:port of process 0), $XMATCH_NUM_PROCESSES,
  $XMATCH_PROCESS_ID and $XMATCH_CPU_COLLECTIVES. Without a coordinator, a SLURM job step of several tasks
  (srun, $SLURM_STEP_NUM_TASKS > 1) is detected by jax itself (one process per task, the task's GPU by
  $SLURM_LOCALID unless $JAX_LOCAL_DEVICE_IDS says otherwise). `cpu_collectives` ('gloo' or 'mpi') sets the
  CPU backend's cross-process collectives. Must run before any JAX computation.
  """
  coordinator = coordinator or os.environ.get('XMATCH_COORDINATOR', '')
  num_processes = num_processes or _env_int('XMATCH_NUM_PROCESSES', 0)
  process_id = process_id if process_id >= 0 else _env_int('XMATCH_PROCESS_ID', -1)
  cpu_collectives = cpu_collectives or os.environ.get('XMATCH_CPU_COLLECTIVES', '')
  if cpu_collectives:
    if cpu_collectives not in CPU_COLLECTIVES:
      raise errors.UserError(f'cpu_collectives = {cpu_collectives!r}; expected one of {CPU_COLLECTIVES}.')
    jax.config.update('jax_cpu_collectives_implementation', cpu_collectives)
  if coordinator:
    if ':' not in coordinator:
      raise errors.UserError(f'coordinator = {coordinator!r}; expected host:port of process 0.')
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise errors.UserError(
        f'num_processes = {num_processes}, process_id = {process_id}; expected num_processes >= 1 '
        'and 0 <= process_id < num_processes with a coordinator.'
      )
    jax.distributed.initialize(coordinator, num_processes, process_id)
    return True
  if num_processes > 1 or process_id >= 0:
    raise errors.UserError(
      f'num_processes = {num_processes}, process_id = {process_id} without a coordinator; expected '
      '--coordinator=host:port (or $XMATCH_COORDINATOR) as well.'
    )
  if 'SLURM_JOB_ID' in os.environ and _env_int('SLURM_STEP_NUM_TASKS', 1) > 1:
    jax.distributed.initialize()  # jax reads coordinator, process count and id from SLURM
    return True
  return False


def define_flags() -> None:
  """The multi-process flags of `train` and `evaluate` (absl's global FLAGS), read by `initialize_from_flags`."""
  flags.DEFINE_string(
    'coordinator',
    '',
    'host:port of process 0 in a multi-process run (or $XMATCH_COORDINATOR); '
    'not needed under srun, where SLURM is detected.',
  )
  flags.DEFINE_integer('num_processes', 0, 'Processes in the run, with --coordinator (or $XMATCH_NUM_PROCESSES).')
  flags.DEFINE_integer('process_id', -1, 'This process, 0 ... num_processes - 1 (or $XMATCH_PROCESS_ID).')
  flags.DEFINE_string(
    'cpu_collectives',
    '',
    "Cross-process collectives on CPU: 'gloo' or 'mpi' (or "
    '$XMATCH_CPU_COLLECTIVES); for several CPU processes, e.g. launch/localhost_cpu.sh.',
  )


def initialize_from_flags() -> bool:
  """`initialize` with the flags of `define_flags`."""
  f = flags.FLAGS
  return initialize(f.coordinator, f.num_processes, f.process_id, f.cpu_collectives)


def topology() -> str:
  """One line: this process and the devices of every process."""
  by_process = {}
  for d in jax.devices():
    by_process.setdefault(d.process_index, []).append(d.id)
  local = jax.local_devices()
  return (
    f'topology: process {jax.process_index()} of {jax.process_count()} on {socket.gethostname()}; '
    f'{jax.device_count()} {local[0].platform} device(s) ({local[0].device_kind}), ids by process '
    + ', '.join(f'{p}: {ids}' for p, ids in sorted(by_process.items()))
  )


def data_mesh() -> Mesh:
  """All devices of all processes on one `data` axis, each process's devices next to each other (so each
  process holds a contiguous block of a batch's rows)."""
  return Mesh(np.array(sorted(jax.devices(), key=lambda d: (d.process_index, d.id))), ('data',))


def process_rows(sharding, n: int) -> slice:
  """The rows of an [n, ...] array that this process's devices hold under a row `sharding`."""
  spans = sorted(
    {
      (s[0].start or 0, n if s[0].stop is None else s[0].stop)
      for s in sharding.addressable_devices_indices_map((n,)).values()
    }
  )
  start, stop = spans[0][0], spans[-1][1]
  if sum(b - a for a, b in spans) != stop - start:
    raise errors.UserError(f'this process holds rows {spans} of {n}; expected one contiguous block (see data_mesh).')
  return slice(start, stop)


def shard_batch(batch, sharding):
  """A global batch (the same numpy tree on every process) -> global arrays split by rows over `sharding`.

  Each process transfers only its own rows; every leaf is computed from the whole batch, so all processes agree
  on shapes such as the padded caption length.
  """
  rows = process_rows(sharding, len(jax.tree.leaves(batch)[0]))
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)[rows], np.shape(x)), batch
  )


def local_copy(tree):
  """Replicated arrays -> the same values on this process's first device, for work each process does alone
  (dev scoring) without collectives."""

  def one(x):
    if not x.is_fully_replicated:
      raise errors.UserError(f'array of shape {x.shape} is sharded ({x.sharding}); expected a replicated array.')
    return x.addressable_data(0)

  return jax.tree.map(one, tree)


def sync(name: str) -> None:
  """Waits until every process gets here (nothing to wait for with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def first_on_process_zero(fn, name: str):
  """fn() on process 0, then on the others: for steps where process 0 writes files that the others then read."""
  result = fn() if jax.process_index() == 0 else None
  sync(name)
  return result if jax.process_index() == 0 else fn()


def agree(values: dict) -> dict:
  """Process 0's float values on every process (decisions such as "best checkpoint" must be the same)."""
  if jax.process_count() == 1:
    return values
  keys = list(values)  # the same order on every process (the same code made the dict)
  bits = np.array([values[k] for k in keys], np.float64).view(np.uint32)  # exact, without jax_enable_x64
  got = np.asarray(multihost_utils.broadcast_one_to_all(bits)).astype(np.uint32).view(np.float64)
  return {k: float(v) for k, v in zip(keys, got)}


class StopRequest:
  """SIGTERM / SIGINT (cluster preemption, Ctrl-C) recorded as a request to save and stop at a step boundary.

  Handlers are installed in the main thread only and restored by `close`. With several processes a request on any
  of them stops all at the same step: the flags are all-gathered every `every` steps.
  """

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
    self.signum = 0
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for s in signals:
        self._previous[s] = signal.signal(s, self._handle)

  def _handle(self, signum, frame):
    del frame
    self.signum = signum

  def should_stop(self, step: int, every: int) -> bool:
    if jax.process_count() == 1:
      return bool(self.signum)
    if step % every:
      return False
    flags = np.asarray(multihost_utils.process_allgather(np.int32(self.signum)))
    self.signum = int(flags.max())
    return bool(self.signum)

  def close(self) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}


if __name__ == '__main__':
  initialize()
  try:
    line = topology()
  except (RuntimeError, AssertionError) as e:  # jax 0.10 asserts when no platform of JAX_PLATFORMS starts
    raise SystemExit(
      f'error: jax started no backend for JAX_PLATFORMS={os.environ.get("JAX_PLATFORMS", "")!r} '
      f'({type(e).__name__}: {e}); expected a jax build for those devices (for GPUs e.g. '
      "pip install -U 'jax[cuda12]')."
    ) from e
  print(line, flush=True)
