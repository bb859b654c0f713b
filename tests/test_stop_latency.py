"""tools/stop_latency.py: a real training process, signalled once its bar shows N steps, saves and exits, and the
tool reports the step it stopped at (the timings themselves are measured by the tool, never tested)."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tools'))
import stop_latency  # pylint: disable=g-import-not-at-top

from xmatch_jax.checkpoints import RunCheckpoints  # pylint: disable=g-import-not-at-top

TRAIN = ['--config=configs/scan.py:shapes_tiny', '--config.model.embed_size=32', '--config.batch_size=16']


@pytest.mark.slow
def test_the_signalled_run_saves_the_step_it_reports(tmp_path, capsys):
  workdir = tmp_path / 'w'
  out = tmp_path / 'stop.json'
  assert stop_latency.main(['--after_steps=5', f'--json={out}', '--'] + TRAIN + [f'--workdir={workdir}']) == 0
  result = json.loads(out.read_text())
  assert result['signal'] == 'SIGTERM' and result['returncode'] == 143
  # The bar redraws at most once a second, so it may lag the steps done: the stop comes at or after what it showed.
  assert result['stopped_at_step'] >= result['bar_steps_at_signal'] >= 5 and result['seconds_to_exit'] > 0
  assert RunCheckpoints(str(workdir)).latest.latest_step() == result['stopped_at_step']
  assert f'stopped at step {result["stopped_at_step"]}' in capsys.readouterr().out


def test_refuses_a_workdir_that_would_resume(tmp_path, capsys):
  (tmp_path / 'checkpoints').mkdir()
  with pytest.raises(SystemExit) as exit_:
    stop_latency.main(['--'] + TRAIN + [f'--workdir={tmp_path}'])
  assert exit_.value.code == 2 and 'is not empty: the run would resume' in capsys.readouterr().err


def test_a_run_that_ends_before_the_signal_is_one_error(tmp_path):
  with pytest.raises(stop_latency.errors.UserError, match=r'exited \(status 2\) before its bar reached 5 steps'):
    stop_latency.main(['--after_steps=5', '--'] + TRAIN + ['--config.no_such_field=1', f'--workdir={tmp_path / "w"}'])


@pytest.mark.slow
def test_a_kill_reports_the_newest_checkpoint_and_what_it_lost(tmp_path, capsys):
  workdir = tmp_path / 'w'
  out = tmp_path / 'kill.json'
  train = TRAIN + ['--config.checkpoint_every_steps=4', f'--workdir={workdir}']
  assert stop_latency.main(['--signal=KILL', '--after_steps=10', f'--json={out}', '--'] + train) == 0
  result = json.loads(out.read_text())
  assert result['signal'] == 'SIGKILL' and result['returncode'] == -9
  # Saves every 4 steps (and at the epoch end), written in the background: the newest complete one is at most two
  # saves (+ the step in flight) behind the step the bar showed; the bar may lag the steps done, so nothing bounds
  # it from above.
  step = result['newest_checkpoint']
  assert step > 0 and step >= result['bar_steps_at_signal'] - 9 and result['seconds_lost'] >= 0
  assert result['steps_lost'] == result['bar_steps_at_signal'] - step
  assert step == max(int(d) for d in os.listdir(workdir / 'checkpoints') if d.isdigit())
  assert f'newest complete checkpoint: step {step}' in capsys.readouterr().out
