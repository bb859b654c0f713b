"""Two runs into one workdir: the second is refused naming the first (pid, host); a lock left by a dead process is
taken over with a warning; one of another host is refused with the way out."""

import json
import os
import socket
import subprocess
import sys

import pytest

from xmatch_jax import workdirs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_lock(workdir, pid, host=None):
  os.makedirs(workdir, exist_ok=True)
  with open(workdirs.lock_path(str(workdir)), 'w') as f:
    json.dump({'pid': pid, 'host': host or socket.gethostname(), 'started': '2026-12-03 10:00:00'}, f)


@pytest.fixture
def live_pid():
  proc = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])
  yield proc.pid
  proc.kill()
  proc.wait()


def test_a_live_run_holds_the_workdir_and_the_lock_goes_with_the_run(tmp_path, live_pid):
  _write_lock(tmp_path, live_pid)
  with pytest.raises(ValueError, match=rf'is in use by the training run of pid {live_pid} on host'):
    with workdirs.run_lock(str(tmp_path)):
      pass
  os.remove(workdirs.lock_path(str(tmp_path)))
  with workdirs.run_lock(str(tmp_path)):
    assert json.load(open(workdirs.lock_path(str(tmp_path))))['pid'] == os.getpid()
  assert not os.path.exists(workdirs.lock_path(str(tmp_path)))
  with pytest.raises(RuntimeError, match='boom'):  # released when the run fails too
    with workdirs.run_lock(str(tmp_path)):
      raise RuntimeError('boom')
  assert not os.path.exists(workdirs.lock_path(str(tmp_path)))


def test_a_dead_runs_lock_is_taken_over_and_another_hosts_is_refused(tmp_path, capsys):
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  _write_lock(tmp_path, dead.pid)
  with workdirs.run_lock(str(tmp_path)):
    assert json.load(open(workdirs.lock_path(str(tmp_path))))['pid'] == os.getpid()
  assert f'taking over the lock of pid {dead.pid}' in capsys.readouterr().out
  _write_lock(tmp_path, 1, host='another-host')
  with pytest.raises(ValueError, match=r'pid 1 on host another-host .* delete .*\.lock if that run is gone'):
    with workdirs.run_lock(str(tmp_path)):
      pass
  with open(workdirs.lock_path(str(tmp_path)), 'w') as f:
    f.write('{"pid": 12')  # cut short by a kill while it was written
  os.utime(workdirs.lock_path(str(tmp_path)), (0, 0))
  with workdirs.run_lock(str(tmp_path)):
    pass
  assert 'an unreadable lock file' in capsys.readouterr().out


@pytest.mark.slow
def test_the_second_train_command_fails_in_one_line(tmp_path, live_pid, data_dir):
  _write_lock(tmp_path / 'w', live_pid)
  run = subprocess.run(
    [
      sys.executable,
      '-m',
      'xmatch_jax.train',
      '--config=configs/scan.py:shapes_tiny',
      f'--workdir={tmp_path / "w"}',
      '--config.max_steps=1',
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    env={**os.environ, 'XMATCH_DATA_DIR': data_dir},
    timeout=600,
  )
  assert run.returncode == 2, run.stderr[-2000:]
  lines = run.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and f'pid {live_pid}' in lines[0], run.stderr
