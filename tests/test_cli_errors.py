"""Errors a user causes print one line `error: ...` and exit 2 in every entry point; bugs keep their traceback.

Each case runs the real command in a subprocess, as a user would (xmatch_jax/cli.py).
"""

import concurrent.futures
import logging
import os
import subprocess
import sys

from absl import logging as absl_logging
import pytest

from xmatch_jax import checkpoints  # noqa: F401  (installs the orbax warning filter)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, env=None, data_dir=None):
  full_env = {k: v for k, v in os.environ.items() if k != 'XMATCH_DEBUG'}
  if data_dir:
    full_env['XMATCH_DATA_DIR'] = data_dir
  full_env.update(env or {})
  return subprocess.run([sys.executable] + args, cwd=ROOT, capture_output=True, text=True, timeout=300, env=full_env)


def _cases(tmp):
  nowhere = str(tmp / 'no_such_workdir')
  bad_json = tmp / 'bad.json'
  bad_json.write_text('{not json')
  # (command line, a piece of the expected message)
  return [
    # flags
    (['-m', 'xmatch_jax.evaluate'], 'Flag --workdir must have a value other than None'),
    (['-m', 'xmatch_jax.evaluate', f'--workdir={nowhere}', '--protocol=2k'], 'flag --protocol=2k'),
    (
      [
        '-m',
        'xmatch_jax.train',
        '--config=configs/scan.py:shapes_tiny',
        f'--workdir={nowhere}',
        '--config.batch_size=abc',
      ],
      'flag --config.batch_size=abc: invalid literal for int()',
    ),
    (['tools/export_params.py', f'--workdir={nowhere}'], 'the following arguments are required: --out'),
    (['tools/shapes_baselines.py', '--config', 'huge'], "invalid choice: 'huge'"),
    # configs
    (
      ['-m', 'xmatch_jax.train', '--config=configs/no_such_model.py', f'--workdir={nowhere}'],
      "config file 'configs/no_such_model.py' not found",
    ),
    (['-m', 'xmatch_jax.train', '--config=configs/scan.py:flickr', f'--workdir={nowhere}'], "unknown dataset 'flickr'"),
    (
      [
        '-m',
        'xmatch_jax.train',
        '--config=configs/scan.py:shapes_tiny',
        f'--workdir={nowhere}',
        '--config.model.embed_sise=3',
      ],
      "has no field 'embed_sise'. Did you mean 'embed_size'?",
    ),
    # paths and data
    (['-m', 'xmatch_jax.evaluate', f'--workdir={nowhere}'], 'is not a training workdir'),
    (['-m', 'xmatch_jax.retrieve', f'--workdir={nowhere}', '--caption', 'a red circle'], 'is not a training workdir'),
    (['-m', 'xmatch_jax.ensemble', f'--workdir={nowhere}'], 'an ensemble needs at least 2 workdirs'),
    (
      ['-m', 'xmatch_jax.train', '--config=configs/scan.py:f30k', f'--workdir={nowhere}'],
      'f30k_precomp: manual dir not found',
    ),
    # files
    (
      [
        'tools/convert_torch_checkpoint.py',
        '--format=scan',
        f'--checkpoint={tmp / "none.pth"}',
        f'--vocab={tmp / "v.json"}',
        f'--workdir={tmp / "w"}',
      ],
      'none.pth: no such checkpoint file',
    ),
    (
      ['tools/convert_features.py', 'tsv', f'--input={tmp / "none.tsv"}', f'--out_dir={tmp / "o"}', '--split=test'],
      'none.tsv: No such file or directory',
    ),
    (['tools/perf_table.py', str(bad_json)], 'bad.json: not valid json'),
    (['tools/plot_training.py', f'--workdir={nowhere}', f'--out={tmp / "c.png"}'], 'is not a training workdir'),
  ]


@pytest.mark.slow
def test_user_errors_print_one_line_and_exit_2(tmp_path):
  cases = _cases(tmp_path)
  data_dir = str(tmp_path / 'empty_data_dir')
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    results = list(pool.map(lambda case: _run(case[0], data_dir=data_dir), cases))
  for (args, expected), proc in zip(cases, results):
    where = f'{" ".join(args)}:\n{proc.stderr[-2000:]}'
    assert proc.returncode == 2, where
    assert 'Traceback' not in proc.stderr, where
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith('error: ') and expected in lines[-1], where
    assert sum(line.startswith('error: ') for line in lines) == 1, where


@pytest.mark.slow
def test_debug_env_shows_the_traceback(tmp_path):
  proc = _run(['-m', 'xmatch_jax.evaluate', f'--workdir={tmp_path / "none"}'], env={'XMATCH_DEBUG': '1'})
  assert proc.returncode == 1
  assert 'Traceback' in proc.stderr and 'MissingFileError: ' in proc.stderr


@pytest.mark.slow
def test_bugs_keep_their_traceback():
  code = 'from xmatch_jax import cli; import sys; sys.exit(cli.run_tool(lambda: {}["missing"]))'
  proc = _run(['-c', code])
  assert proc.returncode == 1 and 'Traceback' in proc.stderr and "KeyError: 'missing'" in proc.stderr
  code = (
    'from xmatch_jax import cli, errors; import sys\n'
    'def main():\n  raise errors.UserError("x.npy: field regions is 2-D; expected 3-D")\n'
    'sys.exit(cli.run_tool(main))'
  )
  proc = _run(['-c', code])
  assert proc.returncode == 2 and proc.stderr == 'error: x.npy: field regions is 2-D; expected 3-D\n'


def test_user_errors_are_still_value_and_file_errors():
  from xmatch_jax import errors  # pylint: disable=g-import-not-at-top

  assert issubclass(errors.UserError, ValueError)
  assert issubclass(errors.MissingFileError, FileNotFoundError) and issubclass(errors.MissingFileError, ValueError)


def test_orbax_missing_metadata_warning_is_dropped():
  seen = []
  handler = logging.Handler()
  handler.emit = lambda record: seen.append(record.getMessage())
  logger = absl_logging.get_absl_logger()
  logger.addHandler(handler)
  try:
    absl_logging.warning('Metadata file does not exist: %s', '/w/best/3/_CHECKPOINT_METADATA')
    absl_logging.warning('some other warning')
  finally:
    logger.removeHandler(handler)
  assert seen == ['some other warning']


@pytest.mark.slow
def test_help_is_not_an_error():
  proc = _run(['-m', 'xmatch_jax.evaluate', '--helpshort'])
  assert proc.returncode in (0, 1) and '--workdir' in proc.stdout + proc.stderr and 'error:' not in proc.stderr
