"""Progress bars (xmatch_jax/progress.py): whole lines with counts when stderr is not a terminal, quiet for short
jobs, and an entry point (evaluate) that shows encoding and scoring progress in a log."""

import contextlib
import io
import os
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from xmatch_jax import inference
from xmatch_jax import progress

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _plain_every_update(monkeypatch):
  monkeypatch.delenv('XMATCH_PROGRESS_DELAY', raising=False)
  monkeypatch.setenv('XMATCH_PROGRESS_SECONDS', '0')


@contextlib.contextmanager
def captured_stderr():
  """sys.stderr replaced by a StringIO (not a terminal): what the bars write. (Entered in the test's body: pytest
  sets its own sys.stderr between fixture setup and the call.)"""
  buf = io.StringIO()
  with contextlib.redirect_stderr(buf):
    yield buf


def test_plain_lines_with_counts_when_not_a_terminal():
  with captured_stderr() as stderr, progress.bar(total=5, desc='demo', unit='pair', delay=0) as bar:
    for _ in range(5):
      bar.update(1)
  text = stderr.getvalue()
  assert '\r' not in text
  lines = text.splitlines()
  assert text.endswith('\n') and len(lines) >= 2, text
  assert all(line.startswith('demo:') for line in lines), text
  assert re.search(r'\b0/5\b', lines[0]) and re.search(r'\b5/5\b', lines[-1]), text
  assert 'pair/s' in lines[-1]


def test_nested_bars_write_no_cursor_moves_to_a_log():
  """Dev scoring inside the training bar: tqdm moves the cursor between the two; a log gets whole lines only."""
  with captured_stderr() as stderr, progress.bar(total=3, desc='train', delay=0) as outer:
    outer.update(1)
    with progress.bar(total=4, desc='dev scoring', delay=0) as inner:
      for _ in range(4):
        inner.update(1)
    outer.update(2)
  text = stderr.getvalue()
  assert '\x1b' not in text and 'dev scoring' in text and 'train' in text
  assert all(line.strip() for line in text.splitlines())


def test_short_jobs_stay_quiet_unless_the_delay_is_overridden(monkeypatch):
  with captured_stderr() as stderr:
    with progress.bar(total=3, desc='quiet', unit='step') as bar:  # default delay 10 s
      bar.update(3)
    assert stderr.getvalue() == ''
    monkeypatch.setenv('XMATCH_PROGRESS_DELAY', '0')
    with progress.bar(total=3, desc='shown', unit='step') as bar:
      bar.update(3)
  assert re.search(r'^shown: .*\b3/3\b', stderr.getvalue(), re.M), stderr.getvalue()
  monkeypatch.setenv('XMATCH_PROGRESS_DELAY', 'soon')
  with pytest.raises(ValueError, match='XMATCH_PROGRESS_DELAY'):
    progress.bar(total=1)


def test_map_chunks_counts_rows_and_keeps_results(monkeypatch):
  monkeypatch.setenv('XMATCH_PROGRESS_DELAY', '0')
  tree = {'x': np.arange(22, dtype=np.float32).reshape(11, 2)}
  fn = lambda t: {'y': jnp.sum(t['x'], axis=1) * 2}
  with captured_stderr() as stderr:
    want = inference.map_chunks(fn, tree, 4)
    assert stderr.getvalue() == ''  # no desc: no bar
    got = inference.map_chunks(fn, tree, 4, desc='encoding images', unit='image')
  np.testing.assert_array_equal(np.asarray(got['y']), np.asarray(want['y']))
  np.testing.assert_array_equal(np.asarray(got['y']), tree['x'].sum(1) * 2)
  text = stderr.getvalue()
  assert '\r' not in text
  counts = [int(m) for m in re.findall(r'^encoding images: .*?\b(\d+)/11\b', text, re.M)]
  assert counts[0] == 0 and counts[-1] == 11 and counts == sorted(counts), text
  assert set(counts) <= {0, 4, 8, 11}, text  # whole chunks, counted once computed
  assert 'image/s' in text


@pytest.mark.slow
def test_evaluate_shows_plain_progress_lines_in_a_log(tmp_path):
  """A real entry point in a non-terminal subprocess: encoding and all-pairs scoring report counts."""
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  env.setdefault('XMATCH_DATA_DIR', str(tmp_path / 'tfds'))
  env.pop('XMATCH_PROGRESS_DELAY', None)
  workdir = str(tmp_path / 'run')
  train = subprocess.run(
    [
      sys.executable,
      '-m',
      'xmatch_jax.train',
      '--config=configs/scan.py:shapes_tiny',
      f'--workdir={workdir}',
      '--config.max_steps=3',
      '--config.batch_size=32',
      '--config.model.embed_size=32',
      '--config.model.word_dim=16',
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert train.returncode == 0, train.stderr[-3000:]
  env.update(XMATCH_PROGRESS_SECONDS='0', XMATCH_PROGRESS_DELAY='0')
  proc = subprocess.run(
    [sys.executable, '-m', 'xmatch_jax.evaluate', f'--workdir={workdir}', '--split=test'],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  err = proc.stderr
  assert '\r' not in err
  # shapes_tiny test: 100 images, 500 captions, 50k pairs (unit_scale: 50.0k).
  assert re.search(r'^test scoring: encoding images: .*\b100/100\b.*image/s', err, re.M), err[-3000:]
  assert re.search(r'^test scoring: encoding captions: .*\b500/500\b.*caption/s', err, re.M), err[-3000:]
  pairs = re.findall(r'^test scoring: .*?([\d.]+k?)/50\.0k .*pair/s', err, re.M)
  assert pairs and pairs[-1] == '50.0k', err[-3000:]
