"""Multi-process training on localhost: launch/localhost_cpu.sh with 2 processes x 2 CPU devices (gloo collectives)
trains 3 SCAN steps on shapes_tiny like 1 process x 4 devices: the same losses in metrics.jsonl and the same final
checkpoint to 1e-5, written by both processes after a dev evaluation split over both; `evaluate` split over the
2 processes gives the score matrix and results of a 1-process evaluation. The 2 x 2 run goes first on a
fresh data directory, so process 0 also generates the dataset while process 1 waits for it. Also: the settings that
start a multi-process run are checked, and a negative config.max_steps is refused."""

import json
import os
import re
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import scan as scan_config
from xmatch_jax import parallel
from xmatch_jax.checkpoints import RunCheckpoints
from xmatch_jax.trainers import contrastive

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'launch', 'localhost_cpu.sh')
STEPS = 3
TRAIN_FLAGS = [
  '--config=configs/scan.py:shapes_tiny',
  '--config.model.embed_size=32',
  '--config.model.word_dim=16',
  '--config.batch_size=8',
  '--config.num_epochs=1',
  f'--config.max_steps={STEPS}',
  '--config.log_every_steps=1',
]


def _gloo_missing() -> str:
  """Why this jax cannot run CPU collectives across processes over gloo; '' when it can."""
  version = tuple(int(part) for part in re.findall(r'\d+', jax.__version__)[:3])
  if version < (0, 4, 27):
    return f'jax {jax.__version__} predates the jax_cpu_collectives_implementation=gloo option (jax 0.4.27)'
  from jax._src import lib  # pylint: disable=g-import-not-at-top

  extension = getattr(lib, '_jax', None) or getattr(lib, 'xla_extension', None)
  if not hasattr(extension, 'make_gloo_tcp_collectives'):
    return f'this jaxlib ({jax.__version__}) was built without gloo CPU collectives (make_gloo_tcp_collectives)'
  return ''


GLOO_MISSING = _gloo_missing()
needs_gloo = pytest.mark.skipif(bool(GLOO_MISSING), reason=f'multi-process CPU test skipped: {GLOO_MISSING}')


def _launch(
  processes: int, devices: int, workdir: str, data_dir: str, log_dir: str, module: str = 'xmatch_jax.train'
) -> str:
  """Runs launch/localhost_cpu.sh (training, or `module` with only --workdir); returns process 0's output."""
  env = {**os.environ, 'PYTHON': sys.executable, 'XMATCH_DATA_DIR': data_dir, 'LOG_DIR': log_dir, 'MODULE': module}
  env.pop('PORT', None)  # the script picks a free port
  flags = TRAIN_FLAGS if module == 'xmatch_jax.train' else ['--save_scores']
  command = ['bash', SCRIPT, str(processes), str(devices), *flags, f'--workdir={workdir}']
  proc = subprocess.Popen(
    command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
  )
  try:
    out, _ = proc.communicate(timeout=240)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)  # the script and every process it started
    out, _ = proc.communicate()
    pytest.fail(f'{processes} x {devices} run timed out:\n{out[-3000:]}')
  logs = ''.join(open(os.path.join(log_dir, name)).read()[-2000:] for name in sorted(os.listdir(log_dir)))
  assert proc.returncode == 0, f'{processes} x {devices} run failed:\n{out[-3000:]}\n{logs}'
  return out


def _losses(workdir: str) -> dict:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {r['step']: r['loss'] for r in map(json.loads, f) if 'loss' in r}


def _state(workdir: str):
  state, meta, which = RunCheckpoints(workdir).restore_for_eval()
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(state)}, meta, which


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  base = tmp_path_factory.mktemp('multiprocess')
  data_dir = str(base / 'tfds')
  out = {}
  for processes, devices in ((2, 2), (1, 4)):
    name = f'{processes}x{devices}'
    os.makedirs(base / f'logs_{name}')
    out[name] = (str(base / name), _launch(processes, devices, str(base / name), data_dir, str(base / f'logs_{name}')))
  return out


@needs_gloo
@pytest.mark.slow
def test_both_runs_print_their_topology_and_process_count(runs):
  assert 'topology: process 0 of 2' in runs['2x2'][1] and '0: [0, 1], 1: [2048, 2049]' in runs['2x2'][1]
  assert 'topology: process 0 of 1' in runs['1x4'][1] and '0: [0, 1, 2, 3]' in runs['1x4'][1]
  assert '4 device(s) in 2 process(es)' in runs['2x2'][1]


@needs_gloo
@pytest.mark.slow
def test_two_processes_of_two_devices_log_the_losses_of_one_process_of_four(runs):
  multi, single = _losses(runs['2x2'][0]), _losses(runs['1x4'][0])
  assert sorted(multi) == list(range(1, STEPS + 1)) == sorted(single)
  diff = max(abs(multi[s] - single[s]) for s in single)
  assert diff <= 1e-5, (multi, single)


@needs_gloo
@pytest.mark.slow
def test_two_processes_of_two_devices_save_the_parameters_of_one_process_of_four(runs):
  multi, multi_meta, which = _state(runs['2x2'][0])
  single, single_meta, _ = _state(runs['1x4'][0])
  assert which == 'best' and multi_meta['step'] == single_meta['step'] == STEPS
  assert multi_meta['dev'] == pytest.approx(single_meta['dev'], abs=1e-6)  # dev evaluated in the 2-process run
  assert sorted(multi) == sorted(single)
  diff = {key: float(np.max(np.abs(multi[key] - single[key]))) for key in single}
  assert max(diff.values()) <= 1e-5, sorted(diff.items(), key=lambda kv: -kv[1])[:5]


@needs_gloo
@pytest.mark.slow
def test_evaluation_split_over_two_processes_equals_one_process(runs, tmp_path):
  workdir = runs['2x2'][0]
  data_dir = os.path.join(os.path.dirname(workdir), 'tfds')
  results = {}
  for processes, devices in ((2, 2), (1, 1)):
    log_dir = tmp_path / f'eval_{processes}x{devices}'
    os.makedirs(log_dir)
    out = _launch(processes, devices, workdir, data_dir, str(log_dir), module='xmatch_jax.evaluate')
    assert 'written to' in out, out
    with open(os.path.join(workdir, 'eval', 'test.json')) as f:
      result = json.load(f)
    results[processes] = (result, np.load(os.path.join(workdir, 'eval', 'test_scores.npy')))
  (multi, multi_scores), (single, single_scores) = results[2], results[1]
  assert multi_scores.shape == single_scores.shape == (multi['n_images'], multi['n_captions'])
  assert float(np.max(np.abs(multi_scores - single_scores))) <= 1e-6
  assert {k: v for k, v in multi.items() if k != 'scoring_seconds'} == {
    k: v for k, v in single.items() if k != 'scoring_seconds'
  }


def test_negative_max_steps_is_refused():
  config = scan_config.get_config('shapes_tiny')
  config.max_steps = -1
  with pytest.raises(ValueError, match=r'config.max_steps = -1 is impossible; expected an int >= 0'):
    contrastive.check_config(config)


def test_half_given_distributed_settings_are_refused(monkeypatch):
  for name in ('XMATCH_COORDINATOR', 'XMATCH_NUM_PROCESSES', 'XMATCH_PROCESS_ID', 'XMATCH_CPU_COLLECTIVES'):
    monkeypatch.delenv(name, raising=False)
  with pytest.raises(ValueError, match='without a coordinator; expected --coordinator=host:port'):
    parallel.initialize(num_processes=2, process_id=0)
  with pytest.raises(ValueError, match='expected host:port of process 0'):
    parallel.initialize(coordinator='localhost', num_processes=2, process_id=0)
  with pytest.raises(ValueError, match='expected num_processes >= 1 and 0 <= process_id < num_processes'):
    parallel.initialize(coordinator='localhost:1234', num_processes=2, process_id=2)
  monkeypatch.setenv('XMATCH_NUM_PROCESSES', 'two')
  with pytest.raises(ValueError, match=r"XMATCH_NUM_PROCESSES = 'two'; expected an int"):
    parallel.initialize()
