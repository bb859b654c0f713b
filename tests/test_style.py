"""One style for the whole tree: `ruff format` and `ruff check` (settings in pyproject.toml) find nothing to change."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ruff(*args):
  return subprocess.run([sys.executable, '-m', 'ruff', *args], cwd=ROOT, capture_output=True, text=True, check=False)


def test_tree_is_formatted():
  result = _ruff('format', '--check', '--diff', '.')
  assert result.returncode == 0, f'run `ruff format .` (pyproject.toml has its settings):\n{result.stdout[-3000:]}'


def test_tree_passes_the_linter():
  result = _ruff('check', '--output-format', 'concise', '.')
  assert result.returncode == 0, f'run `ruff check --fix .`, then fix what remains:\n{result.stdout[-3000:]}'
