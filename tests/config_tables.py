"""Helpers of the config tests that compare a config with a table transcribed from a paper or an official script."""

import functools


def field(config, path: str):
  """config['a']['b'] for path 'a.b'."""
  return functools.reduce(lambda node, key: node[key], path.split('.'), config)


def mismatches(config, table: dict) -> dict:
  """{path: (config value, table value)} where they differ."""
  return {path: (field(config, path), want) for path, want in table.items() if field(config, path) != want}


def flat(config, prefix: str = '') -> dict:
  """{'a.b': value} of every leaf."""
  out = {}
  for key, value in config.items():
    out.update(flat(value, f'{prefix}{key}.') if hasattr(value, 'items') else {f'{prefix}{key}': value})
  return out


def changed_fields(base, variant) -> dict:
  """{path: variant value} of the leaves where `variant` differs from `base`."""
  base, variant = flat(base), flat(variant)
  return {k: variant[k] for k in base if base[k] != variant[k]}
