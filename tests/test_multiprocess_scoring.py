"""All-pairs and re-rank scoring split over 2 localhost processes x 2 CPU devices (gloo) equal one device's, for
SCAN and RDAN, with the last process's share of images padded; an interrupted evaluation's finished column, kept by
process 0, is sent to every process (tests/multiprocess_scoring_check.py runs in each process)."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from tests.test_multiprocess import needs_gloo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK = os.path.join(ROOT, 'tests', 'multiprocess_scoring_check.py')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


@needs_gloo
@pytest.mark.slow
def test_scores_split_over_two_processes_equal_one_device(tmp_path):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}
  coordinator = f'localhost:{_free_port()}'
  outs = [str(tmp_path / f'process_{i}.json') for i in range(2)]
  procs = [
    subprocess.Popen(
      [sys.executable, CHECK, coordinator, '2', str(i), outs[i], str(tmp_path / 'resume')],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      start_new_session=True,
    )
    for i in range(2)
  ]
  logs = []
  for proc in procs:
    try:
      logs.append(proc.communicate(timeout=240)[0])
    except subprocess.TimeoutExpired:
      for p in procs:
        os.killpg(p.pid, signal.SIGKILL)
      pytest.fail('2-process scoring timed out')
  assert [p.returncode for p in procs] == [0, 0], '\n'.join(log[-3000:] for log in logs)
  for i, path in enumerate(outs):
    with open(path) as f:
      result = json.load(f)
    for name, got in result.items():
      assert got['processes'] == 2 and got['devices'] == 2 and got['shape'] == [29, 21], (i, name, got)
      assert got['max_abs_diff'] <= 1e-6, (i, name, got)
      assert got['list_max_abs_diff'] <= 1e-6, (i, name, got)
      assert got['shortlist_shape'] == [29, 21] and got['shortlist_max_abs_diff'] <= 1e-6, (i, name, got)
      assert got['resumed_max_abs_diff'] <= 1e-6, (i, name, got)  # process 0's stored column, on both
      assert got['store_removed'], (i, name, got)
