"""The package's import graph has no cycle, counting imports inside functions: between modules, and between the
subpackages (data <- models <- convert; trainers above them), which docs/architecture.md layers."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = 'xmatch_jax'


def _modules() -> dict:
  """{dotted module name: path} of every module of the package."""
  out = {}
  for directory, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
    for name in files:
      if name.endswith('.py'):
        path = os.path.join(directory, name)
        dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, '.')
        out[dotted.removesuffix('.__init__')] = path
  return out


def import_graph() -> dict:
  """{module: modules of the package it imports anywhere in its file (function-level imports included)}."""
  modules = _modules()

  def known(name):
    while name and name not in modules:
      name = name.rpartition('.')[0]
    return name

  graph = {}
  for module, path in modules.items():
    edges = set()
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        edges.update(known(a.name) for a in node.names if a.name.startswith(PACKAGE))
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or '').startswith(PACKAGE):
        for alias in node.names:
          full = f'{node.module}.{alias.name}'
          edges.add(full if full in modules else known(node.module))
    graph[module] = edges - {module, ''}
  return graph


def subpackage_graph(graph: dict) -> dict:
  """Modules merged into their unit: a subpackage (xmatch_jax.data, ...) or a top-level module."""
  unit = lambda m: '.'.join(m.split('.')[:2])
  out = {}
  for module, edges in graph.items():
    out.setdefault(unit(module), set()).update(unit(e) for e in edges if unit(e) != unit(module))
  return out


def find_cycle(graph: dict) -> list:
  """One cycle [a, b, ..., a] of the directed graph, or []."""
  state, path = {}, []

  def visit(node):
    state[node] = 'open'
    path.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 'open':
        return path[path.index(nxt) :] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    state[node] = 'done'
    path.pop()
    return []

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return []


def test_finds_a_cycle_when_there_is_one():
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': set()}) == ['a', 'b', 'c', 'a']
  assert find_cycle({'a': {'b'}, 'b': set()}) == []


@pytest.mark.parametrize('level', ['modules', 'subpackages'])
def test_no_import_cycle(level):
  graph = import_graph()
  assert {'xmatch_jax.models', 'xmatch_jax.trainers.staged', 'xmatch_jax.data.bert_dir'} <= set(graph)
  if level == 'subpackages':
    graph = subpackage_graph(graph)
  assert find_cycle(graph) == []
