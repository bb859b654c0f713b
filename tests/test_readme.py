"""README's two commands stay true: CI runs the test command verbatim; the main job names real files."""

import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _commands():
  with open(os.path.join(ROOT, 'README.md')) as f:
    text = f.read()
  quick = text.split('## Quick start', 1)[1].split('\n## ', 1)[0]
  return re.findall(r'```\n(.*?)\n```', quick, flags=re.S)


def test_readme_has_exactly_two_commands():
  commands = _commands()
  assert len(commands) == 2, commands
  assert all('\n' not in c for c in commands)


def test_ci_runs_the_readme_test_command():
  _, test_command = _commands()
  with open(os.path.join(ROOT, '.ci', 'run')) as f:
    ci_lines = [line.strip() for line in f]
  assert test_command in ci_lines


def test_main_job_names_existing_config_and_default_dataset():
  main_command, _ = _commands()
  configs = re.findall(r'--config=(configs/\w+\.py):(\w+)', main_command)
  assert configs, main_command
  for path, dataset in configs:
    assert os.path.exists(os.path.join(ROOT, path)), path
    assert dataset == 'shapes'
  assert 'xmatch_jax.evaluate' in main_command


def test_performance_table_is_generated_from_the_benchmark_json():
  sys.path.insert(0, os.path.join(ROOT, 'tools'))
  import perf_table  # pylint: disable=g-import-not-at-top
  names = ('scan_t2i_f30k', 'rdan_f30k', 'mmca_f30k')
  table = perf_table.table([os.path.join(ROOT, 'tools', 'perf_results', f'{n}.json') for n in names])
  assert table in open(os.path.join(ROOT, 'README.md')).read()
