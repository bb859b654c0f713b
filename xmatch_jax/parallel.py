"""Several devices and processes: `jax.distributed` start-up, the `data` mesh, per-process batches, topology.

One code path from 1 CPU to many hosts (docs/architecture.md, "Parallelism"). `python -m xmatch_jax.parallel` prints the
device topology (after starting `jax.distributed` when the environment asks for it, as training does).
"""

import atexit
import contextlib
import os
import re
import signal
import socket
import sys
import threading
import time

from absl import flags
import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh
import numpy as np

from xmatch_jax import errors

CPU_COLLECTIVES = ('gloo', 'mpi')
DEFAULT_HEARTBEAT_TIMEOUT = 60  # seconds without a heartbeat before a process counts as lost
JAX_HEARTBEAT_MARGIN = 30  # jax's own heartbeat timeout is this much longer, so that _watch_processes acts first
_ALIVE = 'xmatch_alive/'  # key prefix of the processes' counters in the coordination service
_STOP = 'xmatch_stop/'  # key prefix of the stop requests: '<step> <signal>' per signalled process
LOST_PROCESS_STATUS = 75  # EX_TEMPFAIL: a peer was lost; relaunching every process resumes the run


def _env_int(name: str, default: int) -> int:
  value = os.environ.get(name, '')
  try:
    return int(value) if value else default
  except ValueError:
    raise errors.UserError(f'${name} = {value!r}; expected an int.') from None


def initialize(
  coordinator: str = '',
  num_processes: int = 0,
  process_id: int = -1,
  cpu_collectives: str = '',
  heartbeat_timeout: int = 0,
) -> bool:
  """Starts `jax.distributed` when a multi-process run is asked for; returns whether it did.

  Explicit arguments win over $XMATCH_COORDINATOR (host:port of process 0), $XMATCH_NUM_PROCESSES,
  $XMATCH_PROCESS_ID, $XMATCH_CPU_COLLECTIVES and $XMATCH_HEARTBEAT_TIMEOUT. Without a coordinator, a SLURM job
  step of several tasks (srun, $SLURM_STEP_NUM_TASKS > 1) is detected by jax itself (one process per task, the
  task's GPU by $SLURM_LOCALID unless $JAX_LOCAL_DEVICE_IDS says otherwise). `cpu_collectives` ('gloo' or 'mpi')
  sets the CPU backend's cross-process collectives. Must run before any JAX computation.

  A process that stops sending heartbeats for `heartbeat_timeout` seconds (default 60; killed, crashed, preempted,
  its host gone) makes every other process print one line naming it and exit with status 75 (`lose_process`),
  instead of waiting in a collective or aborting with a stack dump: docs/architecture.md, "Faults".
  """
  coordinator = coordinator or os.environ.get('XMATCH_COORDINATOR', '')
  num_processes = num_processes or _env_int('XMATCH_NUM_PROCESSES', 0)
  process_id = process_id if process_id >= 0 else _env_int('XMATCH_PROCESS_ID', -1)
  cpu_collectives = cpu_collectives or os.environ.get('XMATCH_CPU_COLLECTIVES', '')
  heartbeat_timeout = heartbeat_timeout or _env_int('XMATCH_HEARTBEAT_TIMEOUT', DEFAULT_HEARTBEAT_TIMEOUT)
  if heartbeat_timeout < 1:
    raise errors.UserError(f'heartbeat_timeout = {heartbeat_timeout}; expected seconds >= 1.')
  global _heartbeat_timeout
  _heartbeat_timeout = heartbeat_timeout
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
    jax.distributed.initialize(
      coordinator, num_processes, process_id, heartbeat_timeout_seconds=heartbeat_timeout + JAX_HEARTBEAT_MARGIN
    )
    _watch_processes(heartbeat_timeout)
    return True
  if num_processes > 1 or process_id >= 0:
    raise errors.UserError(
      f'num_processes = {num_processes}, process_id = {process_id} without a coordinator; expected '
      '--coordinator=host:port (or $XMATCH_COORDINATOR) as well.'
    )
  if 'SLURM_JOB_ID' in os.environ and _env_int('SLURM_STEP_NUM_TASKS', 1) > 1:
    # jax reads the coordinator, process count and id from SLURM
    jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout + JAX_HEARTBEAT_MARGIN)
    _watch_processes(heartbeat_timeout)
    return True
  return False


def lose_process(lost: list, detail: str, heartbeat_timeout: int) -> None:
  """What a process does when another one of the run is lost: one line naming it (`lost`, the ids the watch saw
  go quiet; else `detail`, the failure that showed it), exit 75.

  Called by the watch thread of `_watch_processes`, or by `lost_process_stops_this_one`. The main thread may be
  inside a collective that will never finish, and jax's own shutdown would wait for the lost process and abort, so
  this exits at once (os._exit) after the `on_lost_process` cleanups. The checkpoints written so far are complete
  (orbax renames a step's directory only when every process finished it): relaunching every process resumes from
  the last one.
  """
  for cleanup in list(_on_lost):
    try:
      cleanup()
    except Exception:  # noqa: BLE001 - exiting regardless; a cleanup must not keep this process alive
      pass
  if lost:
    ids = ', '.join(map(str, lost))
    what = f'lost process {ids} (no heartbeat for {heartbeat_timeout} s: killed, crashed or preempted)'
  else:
    what = f'lost another process of the run ({" ".join(detail.split())[:240]})'
  print(
    f'error: process {jax.process_index()} of {jax.process_count()}: {what}. Stopping this one too (exit '
    f'{LOST_PROCESS_STATUS}); relaunch every process with the same command to resume from the last checkpoint.',
    file=sys.stderr,
    flush=True,
  )
  sys.stdout.flush()
  os._exit(LOST_PROCESS_STATUS)  # pylint: disable=protected-access


_on_lost = []  # run by lose_process before it exits: e.g. releasing the workdir lock for the relaunch


@contextlib.contextmanager
def on_lost_process(cleanup):
  """Runs `cleanup()` if `lose_process` ends this process inside the block (its os._exit skips `finally`)."""
  _on_lost.append(cleanup)
  try:
    yield
  finally:
    _on_lost.remove(cleanup)


_PEER_LOSS = re.compile(r'connection (reset|closed) by peer|socket closed|broken pipe|heartbeat|UNAVAILABLE', re.I)
_heartbeat_timeout = DEFAULT_HEARTBEAT_TIMEOUT


@contextlib.contextmanager
def lost_process_stops_this_one():
  """Around a multi-process job's main work: a collective that fails because a peer vanished (gloo's 'Connection
  reset by peer') waits for the watch thread of `_watch_processes` to name the lost process (within the heartbeat
  timeout), then exits with one line either way (`lose_process`). Other errors pass."""
  try:
    yield
  except Exception as e:
    if jax.process_count() > 1 and _PEER_LOSS.search(str(e)):
      deadline = time.monotonic() + _heartbeat_timeout + 15
      while time.monotonic() < deadline:  # the watch thread calls lose_process with the lost process's id
        time.sleep(0.5)
      lose_process([], f'{type(e).__name__}: {e}', _heartbeat_timeout)
    raise


def _watch_processes(timeout: int, every: float = 2.0) -> None:
  """Starts a daemon thread through which the processes watch each other: every `every` seconds each one bumps its
  counter in the coordination service's key-value store and reads the others'; a counter that has not moved for
  `timeout` seconds means that process is lost (killed, crashed, preempted, its host gone), and `lose_process`
  ends this one with a line naming it.

  jax's own heartbeats (timeout set `JAX_HEARTBEAT_MARGIN` s longer in `initialize`) would abort every other
  process with a C++ stack dump, and its missed-heartbeat callback cannot be set from Python in jax 0.10
  (std::bad_cast); so this watch acts first. A lost process 0 takes the service with it: the others then stop at
  once through jax's abort (docs/architecture.md, "Faults").

  At exit the thread is stopped and joined before jax shuts down: Python ends a daemon thread that returns from
  the client's C++ call during finalization by unwinding it (pthread_exit), which aborts the process through the
  binding's noexcept frames ('terminate called after throwing an instance of ...'; seen in CI after a clean
  SIGTERM save, exit -6 instead of 143).
  """
  client = _distributed_client()
  if client is None:
    return
  me, everyone = jax.process_index(), range(jax.process_count())
  stop = threading.Event()

  def watch():
    beat, seen = 0, {}  # process -> (its last counter, when it last moved)
    while not stop.is_set():
      beat += 1
      try:
        client.key_value_set(f'{_ALIVE}{me}', str(beat), allow_overwrite=True)
        counters = dict(client.key_value_dir_get(_ALIVE))
      except Exception:  # noqa: BLE001 - the service is unreachable: jax's own error handling takes over
        return
      now = time.monotonic()
      for p in everyone:
        counter = counters.get(f'{_ALIVE}{p}')
        if p not in seen or seen[p][0] != counter:
          seen[p] = (counter, now)
      lost = [p for p in everyone if p != me and now - seen[p][1] > timeout]
      if lost:
        lose_process(lost, '', timeout)
      stop.wait(every)

  thread = threading.Thread(target=watch, name='xmatch-process-watch', daemon=True)
  thread.start()

  def stop_watching():
    stop.set()
    thread.join(timeout=every + 10)  # a client call in flight ends or fails within seconds

  atexit.register(stop_watching)  # runs before jax's own atexit shutdown, registered when jax was imported


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
  flags.DEFINE_integer(
    'heartbeat_timeout',
    0,
    f'Seconds without a heartbeat after which a process counts as lost and the others stop with one line (exit '
    f'{LOST_PROCESS_STATUS}); 0: $XMATCH_HEARTBEAT_TIMEOUT or {DEFAULT_HEARTBEAT_TIMEOUT}.',
  )


def initialize_from_flags() -> bool:
  """`initialize` with the flags of `define_flags`."""
  f = flags.FLAGS
  return initialize(f.coordinator, f.num_processes, f.process_id, f.cpu_collectives, f.heartbeat_timeout)


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

  Handlers are installed in the main thread only and restored by `close`. With several processes a signal on any
  of them stops all at the same step, two steps after the boundary where the signalled process noticed it: that
  process writes the step into the coordination service's key-value store, and every process reads the keys at
  every boundary (one small request a step). A process at boundary b has finished step b - 1, which needs every
  process to have dispatched it, so no process is past boundary b + 1 and a key written at b is seen by all before
  any reaches b + 2; each stops at the smallest step written. Without jax's client the flags are all-gathered
  every `every` steps instead.
  """

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
    self.signum = 0
    self._stop_at = None
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for s in signals:
        self._previous[s] = signal.signal(s, self._handle)

  def _handle(self, signum, frame):
    del frame
    self.signum = signum

  def should_stop(self, step: int, every: int) -> bool:
    """Whether to save and stop at boundary `step` (steps < `step` done, as in `StepLoop`)."""
    if jax.process_count() == 1:
      return bool(self.signum)
    client = _distributed_client()
    if client is None:
      if step % every:
        return False
      flags = np.asarray(multihost_utils.process_allgather(np.int32(self.signum)))
      self.signum = int(flags.max())
      return bool(self.signum)
    if self.signum and self._stop_at is None:
      client.key_value_set(f'{_STOP}{jax.process_index()}', f'{step + 2} {self.signum}', allow_overwrite=True)
    requests = [value.split() for _, value in client.key_value_dir_get(_STOP)]
    if requests:
      self._stop_at, signum = min((int(at), int(signum)) for at, signum in requests)
      self.signum = self.signum or signum
    return self._stop_at is not None and step >= self._stop_at

  def close(self) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}


def _distributed_client():
  """jax's coordination-service client of a multi-process run, or None."""
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top

  return getattr(jax_distributed.global_state, 'client', None)


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
