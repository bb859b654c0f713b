"""How long a training run takes to stop on SIGTERM (a preemption), and what a kill -9 loses.

  python tools/stop_latency.py --after_steps=30 -- --config=configs/rdan.py:shapes --workdir=/tmp/stop_w
  python tools/stop_latency.py --after_steps=3 -- --config=configs/rdan.py:f30k --workdir=/tmp/stop_paper
  python tools/stop_latency.py --signal=KILL --after_steps=517 -- --config=configs/scan.py:shapes --workdir=/tmp/kill_w

Runs `python -m xmatch_jax.train <flags after -->` and follows its progress bar, which counts completed steps.
Once the bar reaches --after_steps it sends the signal, then waits for the run to exit and reads the step it saved
from "stopped by signal ... at step N". It prints the seconds from signal to exit, the steps run after the signal
and the seconds per step (from the bar's steps and times between its first value and the signal). The loop keeps
at most one step in flight, so the run stops within two steps plus the save (docs/architecture.md, "Faults"): on a
cluster, two steps plus the save must fit in the grace time between SIGTERM and SIGKILL (SLURM's default 30 s).
The child's bar redraws once a second (XMATCH_PROGRESS_SECONDS=1, unless set), so with steps much shorter than a
second the signal comes some steps after --after_steps. The workdir must be new or empty, so that the run starts at
step 0.

--signal=KILL (kill -9: no save is possible) measures instead the work a kill loses: the newest complete checkpoint
(W/checkpoints/<step>), the steps the bar showed past it (negative when steps are much shorter than the bar's
second), and the seconds from that checkpoint's commit (the mtime of its commit_success.txt) to the kill. Saves
happen at evaluations, every config.checkpoint_every_steps and whenever config.checkpoint_every_minutes have
passed, so at a random moment (draw --after_steps at random) a kill loses at most about the smaller interval, plus
an evaluation in progress.
"""

import collections
import os
import re
import signal
import subprocess
import sys
import threading
import time

from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from xmatch_jax import checkpoints  # pylint: disable=g-import-not-at-top
from xmatch_jax import cli  # pylint: disable=g-import-not-at-top
from xmatch_jax import errors  # pylint: disable=g-import-not-at-top
from xmatch_jax import workdirs  # pylint: disable=g-import-not-at-top

_BAR = re.compile(r'(?:^|\s)(?:train|stage \w+):\s+\d+%.*?\|\s*(\d+)/(\d+) ')  # the training loop's bar
_STOPPED = re.compile(r'stopped by signal (\w+) at step (\d+)')

FLAGS = flags.FlagValues()
flags.DEFINE_integer(
  'after_steps', 30, 'send the signal once the bar shows this many completed steps', flag_values=FLAGS
)
flags.DEFINE_enum('signal', 'TERM', ['TERM', 'INT', 'KILL'], 'the signal to send', flag_values=FLAGS)
flags.DEFINE_string('json', '', 'also write the result here', flag_values=FLAGS)


class BarWatch:
  """Reads the child's output line by line; records (time, completed steps) of every bar redraw and the stop line."""

  def __init__(self, stream):
    self.seen = []  # (monotonic seconds, steps)
    self.stopped = None  # (signal name, step)
    self.lines = collections.deque(maxlen=5)  # the last lines, for an error
    self.changed = threading.Condition()
    self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
    self._thread.start()

  def _read(self, stream):
    for raw in iter(stream.readline, ''):
      for line in raw.replace('\r', '\n').splitlines():
        with self.changed:
          self.lines.append(line)
          bar = _BAR.search(line)
          if bar:
            self.seen.append((time.monotonic(), int(bar.group(1))))
          stop = _STOPPED.search(line)
          if stop:
            self.stopped = (stop.group(1), int(stop.group(2)))
          self.changed.notify_all()
    with self.changed:
      self.changed.notify_all()

  def join(self):
    self._thread.join()


def newest_checkpoint(workdir: str) -> tuple:
  """(step, commit time in seconds since the epoch) of the newest complete checkpoint of `workdir`, or (0, None)."""
  directory = workdirs.checkpoints_dir(workdir)
  steps = checkpoints.finished_steps(directory)
  if not steps:
    return 0, None
  path = os.path.join(directory, str(steps[-1]))
  marker = os.path.join(path, 'commit_success.txt')
  return steps[-1], os.path.getmtime(marker if os.path.exists(marker) else path)


def measure(train_flags: list, after_steps: int, signum: int, workdir: str) -> dict:
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  env.setdefault('XMATCH_PROGRESS_SECONDS', '1')  # piped output otherwise redraws every 30 s
  child = subprocess.Popen(
    [sys.executable, '-m', 'xmatch_jax.train'] + train_flags,
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  watch = BarWatch(child.stdout)
  with watch.changed:
    while child.poll() is None and not (watch.seen and watch.seen[-1][1] >= after_steps):
      watch.changed.wait(timeout=0.2)
  if child.poll() is not None:
    watch.join()
    tail = '\n'.join(watch.lines)
    raise errors.UserError(
      f'the training run exited (status {child.returncode}) before its bar reached {after_steps} steps; its last '
      f'lines:\n{tail}'
    )
  signalled_at, bar_steps = watch.seen[-1][0], watch.seen[-1][1]
  child.send_signal(signum)
  sent, sent_wall = time.monotonic(), time.time()
  returncode = child.wait()
  exited = time.monotonic()
  watch.join()
  # From the first redraw after step 1: the compile of step 0 is not a step time.
  first_time, first_steps = next(((t, steps) for t, steps in watch.seen if steps >= 1), watch.seen[0])
  step_seconds = (signalled_at - first_time) / (bar_steps - first_steps) if bar_steps > first_steps else None
  if signum == signal.SIGKILL:
    step, committed = newest_checkpoint(workdir)
    return {
      'train_flags': train_flags,
      'signal': 'SIGKILL',
      'bar_steps_at_signal': bar_steps,
      'newest_checkpoint': step,
      'steps_lost': bar_steps - step,
      'seconds_lost': None if committed is None else round(sent_wall - committed, 1),
      'seconds_per_step': round(step_seconds, 3) if step_seconds else None,
      'returncode': returncode,
    }
  if watch.stopped is None:
    raise errors.UserError(f'the run exited with status {returncode} without "stopped by signal ... at step N"')
  return {
    'train_flags': train_flags,
    'signal': watch.stopped[0],
    'bar_steps_at_signal': bar_steps,
    'stopped_at_step': watch.stopped[1],
    'steps_after_signal': watch.stopped[1] - bar_steps,
    'seconds_to_exit': round(exited - sent, 2),
    'seconds_per_step': round(step_seconds, 3) if step_seconds else None,
    'returncode': returncode,
  }


def main(argv=None) -> int:
  positional = cli.parse_flags(FLAGS, argv, __doc__, args='-- TRAIN_FLAGS...')
  if not positional:
    cli.usage_error('give the training flags after --, e.g. -- --config=configs/rdan.py:shapes --workdir=W')
  if FLAGS.after_steps < 1:
    cli.usage_error(f'--after_steps={FLAGS.after_steps}: expected an int >= 1')
  workdir = next((a.split('=', 1)[1] for a in positional if a.startswith('--workdir=')), None)
  if workdir is None:
    cli.usage_error('the training flags need --workdir=W (new or empty)')
  if os.path.isdir(workdir) and os.listdir(workdir):
    cli.usage_error(f'--workdir={workdir} is not empty: the run would resume instead of starting at step 0')
  result = measure(positional, FLAGS.after_steps, getattr(signal, f'SIG{FLAGS.signal}'), workdir)
  per_step = f'{result["seconds_per_step"]:.2f} s a step' if result['seconds_per_step'] else 'step time unknown'
  if FLAGS.signal == 'KILL':
    lost = 'no checkpoint yet' if result['seconds_lost'] is None else f'{result["seconds_lost"]:.1f} s after its commit'
    print(
      f'SIGKILL when the bar showed {result["bar_steps_at_signal"]} steps ({per_step}); newest complete checkpoint: '
      f'step {result["newest_checkpoint"]}, {result["steps_lost"]} steps behind, {lost}'
    )
    cli.write_json(FLAGS.json, result)
    return 0
  print(
    f'SIG{FLAGS.signal} when the bar showed {result["bar_steps_at_signal"]} steps; stopped at step '
    f'{result["stopped_at_step"]} ({result["steps_after_signal"]} steps later, {per_step}), exit status '
    f'{result["returncode"]} after {result["seconds_to_exit"]:.1f} s'
  )
  cli.write_json(FLAGS.json, result)
  return 0


if __name__ == '__main__':
  sys.exit(cli.run_tool(main))
