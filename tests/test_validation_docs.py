"""README's "Input validation" table: every row names a test that exists (file and function, read with ast)."""

import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADING = '## Input validation'
COLUMNS = ['input', 'bad case', 'error says (excerpt)', 'test']


def _table_rows(readme: str) -> list:
  """The cells of each body row of the first Markdown table under HEADING (up to the next heading)."""
  lines = readme.splitlines()
  assert HEADING in [line.strip() for line in lines], f'README.md has no "{HEADING}" heading'
  start = [line.strip() for line in lines].index(HEADING) + 1
  table = []
  for line in lines[start:]:
    if line.startswith('#'):
      break
    if line.strip().startswith('|'):
      table.append(line.strip())
    elif table:  # the first table ended
      break
  split = lambda row: [cell.strip() for cell in re.split(r'(?<!\\)\|', row.strip().strip('|'))]
  assert len(table) >= 3, f'no table (header, separator, rows) under "{HEADING}"'
  assert split(table[0]) == COLUMNS, f'table header is {split(table[0])}; expected {COLUMNS}'
  assert all(set(cell) <= set('-: ') for cell in split(table[1])), 'second table line is not a separator'
  return [split(row) for row in table[2:]]


def _functions(path: str) -> set:
  with open(path, encoding='utf-8') as f:
    tree = ast.parse(f.read(), filename=path)
  return {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_every_row_of_the_input_validation_table_names_an_existing_test():
  with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
    rows = _table_rows(f.read())
  problems, functions = [], {}
  for number, cells in enumerate(rows, 1):
    if len(cells) != len(COLUMNS) or not all(cells):
      problems.append(f'row {number}: expected {len(COLUMNS)} non-empty cells; got {cells}')
      continue
    match = re.fullmatch(r'`?(tests/[\w/]+\.py)::(test_\w+)`?', cells[-1])
    if not match:
      problems.append(f'row {number}: test cell {cells[-1]!r}; expected tests/<file>.py::<test name>')
      continue
    path, name = match.groups()
    full = os.path.join(ROOT, path)
    if not os.path.isfile(full):
      problems.append(f'row {number}: {path} does not exist')
      continue
    if full not in functions:
      functions[full] = _functions(full)
    if name not in functions[full]:
      problems.append(f'row {number}: {path} defines no function {name}')
  assert not problems, '\n'.join(problems)
