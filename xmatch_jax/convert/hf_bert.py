"""Hugging Face BERT checkpoints -> Flax params of `xmatch_jax.models.bert.BertModel`.

A checkpoint directory holds config.json, the weights (model.safetensors, or pytorch_model.bin read by the safe
unpickler, never by executing pickled code) and the tokenizer (tokenizer.json, or vocab.txt +
tokenizer_config.json). Keys are mapped one by one; a missing encoder weight, an unknown key or a shape that
disagrees with config.json is an error naming the file and the key. Pre-training heads (`cls.*`) and buffers
(`*.position_ids`) are not part of the encoder: they are skipped and listed in the returned report.

  config, params, report = load_checkpoint('path/to/bert-base-uncased')

The directory is located by `xmatch_jax.data.bert_dir.resolve_dir` ('minilm': the installed all-MiniLM-L6-v2); its
tokenizer is read by `xmatch_jax.data.wordpiece`.
"""

import os
import re
from typing import Optional

import numpy as np

from xmatch_jax import errors
from xmatch_jax.convert import torch_pickle
from xmatch_jax.data.bert_dir import resolve_dir
from xmatch_jax.models.bert import BertConfig

WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin')
# Written by tools/convert_bert.py: the Flax params, keys joined by '/'.
FLAX_WEIGHTS = 'flax_model.safetensors'
_SKIPPED = (re.compile(r'^cls\.'), re.compile(r'position_ids$'))
_LAYER = re.compile(r'^encoder\.layer\.(\d+)\.(.+)$')


def read_state_dict(directory: str) -> tuple[dict, str]:
  """The checkpoint's tensors as numpy arrays, and the file they came from."""
  for name in WEIGHT_FILES:
    path = os.path.join(directory, name)
    if not os.path.exists(path):
      continue
    if name.endswith('.safetensors'):
      from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

      try:
        return load_file(path), path
      except Exception as e:  # pylint: disable=broad-except
        raise errors.UserError(f'{path}: cannot read safetensors file: {e}') from None
    state = torch_pickle.load(path)
    if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
      raise errors.UserError(f'{path}: expected a state_dict (a mapping of names to tensors)')
    return dict(state), path
  raise errors.MissingFileError(f'{directory}: no BERT weights; expected one of {WEIGHT_FILES}')


def _flax_path(key: str) -> Optional[tuple[str, ...]]:
  """Hugging Face BertModel key -> Flax param path, e.g. encoder.layer.3.attention.self.query.weight ->
  (encoder_layer_3, attention_self, query, kernel); None for keys outside the encoder."""
  module, _, leaf = key.rpartition('.')
  if module.startswith('embeddings.'):
    name = module[len('embeddings.') :]
    path = ('embeddings', name)
  elif module == 'pooler.dense':
    path = ('pooler_dense',)
  else:
    match = _LAYER.match(module)
    if not match:
      return None
    layer, rest = match.groups()
    if rest.startswith('attention.self.'):
      path = (f'encoder_layer_{layer}', 'attention_self', rest[len('attention.self.') :])
    else:
      path = (f'encoder_layer_{layer}', rest.replace('.', '_'))
  if path[-1].endswith('LayerNorm'):
    kind = {'weight': 'scale', 'gamma': 'scale', 'bias': 'bias', 'beta': 'bias'}.get(leaf)
  elif path[-1].endswith('_embeddings'):
    kind = {'weight': 'embedding'}.get(leaf)
  else:
    kind = {'weight': 'kernel', 'bias': 'bias'}.get(leaf)
  return None if kind is None else path + (kind,)


def convert_state_dict(state: dict, config: BertConfig, source: str = 'state_dict') -> tuple[dict, list]:
  """Maps a BertModel (or BertFor*) state_dict onto Flax params.

  Args:
    state: name -> numpy array.
    config: the checkpoint's BertConfig (shapes are checked against it).
    source: file name for error messages.

  Returns:
    (params nested dict for `BertModel(config).apply({'params': params}, ...)`, skipped keys).

  Raises:
    ValueError: unknown key, missing weight, or a shape that disagrees with the config.
  """
  _check_layer_count(
    config, {int(m.group(1)) for k in state if (m := re.search(r'encoder\.layer\.(\d{1,9})\.', k))}, source
  )
  expected = _expected_shapes(config)
  has_prefix = any(k.startswith('bert.') for k in state)
  flat, skipped = {}, []
  for key, value in state.items():
    name = key[len('bert.') :] if has_prefix and key.startswith('bert.') else key
    if any(p.search(name) for p in _SKIPPED):
      skipped.append(key)
      continue
    path = _flax_path(name)
    if path is None or path not in expected:
      raise errors.UserError(
        f'{source}: key {key!r} is not a BERT encoder weight this model knows (is the checkpoint a BERT model?)'
      )
    value = np.asarray(value, np.float32)
    if path[-1] == 'kernel':
      value = value.T  # torch Linear stores [out, in]
    if value.shape != expected[path]:
      raise errors.UserError(f'{source}: {key} has shape {value.shape}; config.json implies {expected[path]}')
    flat[path] = value
  missing = sorted('/'.join(p) for p in expected if p not in flat)
  if missing:
    raise errors.UserError(f'{source}: missing BERT weight(s) {missing[:5]}{" ..." if len(missing) > 5 else ""}')
  return _nest(flat), skipped


def _check_layer_count(config: BertConfig, layers: set, source: str) -> None:
  """The weights must hold as many encoder layers as config.json says (checked before the model's shapes are
  traced layer by layer: a corrupt layer count would take forever)."""
  held = max(layers) + 1 if layers else 0
  if config.num_hidden_layers > held:
    raise errors.UserError(
      f'{source}: holds encoder layers 0 .. {held - 1}; config.json has num_hidden_layers = {config.num_hidden_layers}'
    )


def _expected_shapes(config: BertConfig) -> dict:
  """{flax param path tuple: shape} of BertModel(config)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from xmatch_jax.models.bert import BertModel  # pylint: disable=g-import-not-at-top

  params = jax.eval_shape(
    lambda: BertModel(config).init(jax.random.key(0), jnp.ones((1, 1), jnp.int32), jnp.ones((1, 1)))
  )['params']
  return {tuple(str(p.key) for p in path): leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


def _nest(flat: dict) -> dict:
  params = {}
  for path, value in flat.items():
    node = params
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = value
  return params


def write_flax_params(params: dict, path: str) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  flat = {
    '/'.join(str(p.key) for p in keys): np.ascontiguousarray(leaf)
    for keys, leaf in jax.tree_util.tree_leaves_with_path(params)
  }
  save_file(flat, path)


def read_flax_params(path: str, config: BertConfig) -> dict:
  """Params written by `write_flax_params`, checked against the config's shapes."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

  try:
    flat = {tuple(k.split('/')): v for k, v in load_file(path).items()}
  except Exception as e:  # pylint: disable=broad-except - safetensors raises its own error types
    raise errors.UserError(
      f'{path}: cannot read safetensors file ({type(e).__name__}: {e}); expected the Flax BERT '
      'params that tools/convert_bert.py writes'
    ) from None
  _check_layer_count(
    config, {int(k[0][len('encoder_layer_') :]) for k in flat if re.fullmatch(r'encoder_layer_\d{1,9}', k[0])}, path
  )
  expected = _expected_shapes(config)
  unknown = sorted('/'.join(k) for k in set(flat) - set(expected))
  missing = sorted('/'.join(k) for k in set(expected) - set(flat))
  if unknown or missing:
    raise errors.UserError(f'{path}: params do not match config.json: unknown {unknown[:5]}, missing {missing[:5]}')
  for key, shape in expected.items():
    if flat[key].shape != shape:
      raise errors.UserError(f'{path}: {"/".join(key)} has shape {flat[key].shape}; config.json implies {shape}')
  return _nest(flat)


def load_checkpoint(directory: str) -> tuple[BertConfig, dict, list]:
  """Reads a Hugging Face BERT directory ('minilm' for the installed MiniLM package), or one written by
  tools/convert_bert.py.

  Returns:
    (config, Flax params, skipped keys).
  """
  directory = resolve_dir(directory)
  config_path = os.path.join(directory, 'config.json')
  if not os.path.exists(config_path):
    raise errors.MissingFileError(f'{directory}: no config.json (a Hugging Face BERT checkpoint directory has one)')
  config = BertConfig.from_json(config_path)
  flax_path = os.path.join(directory, FLAX_WEIGHTS)
  if os.path.exists(flax_path):
    return config, read_flax_params(flax_path, config), []
  state, source = read_state_dict(directory)
  params, skipped = convert_state_dict(state, config, source)
  return config, params, skipped
