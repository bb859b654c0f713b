"""What training, evaluation and the Retriever share: config files, the model of a config, caption encoding.

What a workdir holds is xmatch_jax/workdirs.py."""

import os

import ml_collections
import numpy as np

from xmatch_jax import errors
from xmatch_jax import models
from xmatch_jax import workdirs
from xmatch_jax.data import batching
from xmatch_jax.data import vocab as vocab_lib


def load_config_file(spec: str, root: str = '') -> ml_collections.ConfigDict:
  """'configs/rdan.py:f30k' -> that file's get_config('f30k'); the path is tried as given, then under `root`.
  (Tools use this; `xmatch_jax.train` reads --config through ml_collections' config_flags.)"""
  import importlib.util  # pylint: disable=g-import-not-at-top

  path, _, arg = spec.partition(':')
  if not os.path.exists(path) and root:
    path = os.path.join(root, path)
  if not os.path.exists(path):
    raise errors.MissingFileError(
      f'config file {spec.partition(":")[0]!r} not found; expected a config file such as '
      'configs/scan.py:shapes (see configs/).'
    )
  module_spec = importlib.util.spec_from_file_location('xmatch_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def check_config_overrides(argv: list[str]) -> None:
  """Raises errors.UserError when the config file given by `--config=FILE[:ARG]` in `argv` is missing or refuses
  its argument, or when a `--config.a.b=...` override has no field a.b (naming the nearest existing ones);
  ml_collections reports these as tracebacks."""
  import difflib  # pylint: disable=g-import-not-at-top

  spec, keys = None, []
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      spec = arg.split('=', 1)[1]
    elif arg == '--config' and i + 1 < len(argv):
      spec = argv[i + 1]
    elif arg.startswith(('--config.', '--noconfig.')):
      keys.append(arg.split('=', 1)[0].split('config.', 1)[1])
  if spec is None:
    return
  try:
    config = load_config_file(spec)
  except (ValueError, KeyError) as e:  # no such file, or get_config refusing its argument (an unknown dataset)
    kind = errors.MissingFileError if isinstance(e, FileNotFoundError) else errors.UserError
    raise kind(f'--config={spec}: {e}') from e
  if not keys:
    return
  for key in keys:
    node, parts = config, key.split('.')
    for depth, part in enumerate(parts):
      if isinstance(node, ml_collections.ConfigDict) and part in node:
        node = node[part]
        continue
      parent = '.'.join(parts[:depth])
      fields = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      near = difflib.get_close_matches(part, fields, n=2, cutoff=0.8)
      where = f'config.{parent}' if parent else 'the config'
      hint = f' Did you mean {", ".join(repr(n) for n in near)}?' if near else ''
      if isinstance(node, ml_collections.ConfigDict):
        raise errors.UserError(
          f'--config.{key}: {where} of {spec} has no field {part!r}.{hint} Its fields: {", ".join(fields)}.'
        )
      raise errors.UserError(f'--config.{key}: {where} of {spec} is a value ({node!r}), not a group of fields.')


def build_model(config: ml_collections.ConfigDict, vocab_size: int, img_dim: int, workdir: str = ''):
  """The model of `config`; a BERT-based model of a workdir takes the BERT config saved in W/bert."""
  model_config = config.model
  if (
    workdir
    and models.uses_bert(config.model.name)
    and os.path.exists(os.path.join(workdirs.bert_dir(workdir), 'config.json'))
  ):
    model_config = ml_collections.ConfigDict(config.model.to_dict())
    model_config.bert_dir = workdirs.bert_dir(workdir)
  return models.build_model(model_config, vocab_size=vocab_size, img_dim=img_dim)


def encode_captions(vocab: vocab_lib.Vocabulary, captions: list, config: ml_collections.ConfigDict):
  """Raw strings -> (tokens [n, L] int32, mask [n, L] float32) padded to one bucket; counts truncations."""
  for i, caption in enumerate(captions):
    if not isinstance(caption, str):
      raise errors.UserError(f'caption {i} is a {type(caption).__name__} ({caption!r:.60}); expected a str.')
    if not caption.strip():
      raise errors.UserError(f'caption {i} is empty ({caption!r}); captions need at least one word.')
  token_arrays = [vocab.encode(c) for c in captions]
  longest = max(config.caption_buckets)
  if not config.truncate_captions:
    for i, tokens in enumerate(token_arrays):
      if len(tokens) > longest:
        raise errors.UserError(
          f'caption {i} has {len(tokens)} tokens, longer than the largest bucket ({longest}) of '
          'config.caption_buckets; add a larger bucket or set config.truncate_captions=True (longer '
          'captions are then cut to it and counted).'
        )
  tokens, mask, n_truncated = batching.pad_captions(
    token_arrays, tuple(config.caption_buckets), truncate=bool(config.truncate_captions)
  )
  if n_truncated:
    print(
      f'note: {n_truncated} caption(s) longer than {max(config.caption_buckets)} tokens were truncated '
      '(config.truncate_captions=True).'
    )
  return tokens, mask


def img_dim_of(images: dict) -> int:
  """Size of the region features (0 for datasets of pixels only, which DAER reads)."""
  return int(np.shape(images['regions'])[-1]) if 'regions' in images else 0  # np.shape: no read of lazy rows
