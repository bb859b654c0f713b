"""torchvision `mobilenet_v3_large` state_dict -> Flax variables of `models.mobilenet_v3.MobileNetV3Large`.

Read from a .pth (safe unpickler: no pickled code runs) or .safetensors file. Conv weights OIHW -> HWIO (depthwise
[C, 1, k, k] -> [k, k, 1, C]), Linear [out, in] -> [in, out], BatchNorm weight/bias -> params scale/bias and
running_mean/var -> batch_stats mean/var; num_batches_tracked is dropped. Unknown or missing keys and wrong shapes
are errors naming the key.
"""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from xmatch_jax import errors
from xmatch_jax.convert import torch_pickle
from xmatch_jax.models import mobilenet_v3

_BLOCK = re.compile(r'^features\.(\d+)\.block\.(\d+)\.(.+)$')
_STEM = re.compile(r'^features\.(\d+)\.([01])\.(.+)$')


def read_state_dict(path: str) -> dict:
  if path.endswith('.safetensors'):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

    if not os.path.exists(path):
      raise errors.MissingFileError(f'{path}: no such weights file (config.mobilenet_weights)')
    try:
      return load_file(path)
    except Exception as e:  # pylint: disable=broad-except - safetensors raises its own error types
      raise errors.UserError(
        f'{path}: cannot read safetensors file ({type(e).__name__}: {e}); expected a torchvision '
        'mobilenet_v3_large state_dict'
      ) from None
  state = torch_pickle.load(path)
  if isinstance(state, dict) and 'state_dict' in state:
    state = state['state_dict']
  if not isinstance(state, dict) or not all(isinstance(v, (np.ndarray, np.generic)) for v in state.values()):
    raise errors.UserError(
      f'{path}: expected a state_dict (a mapping of names to tensors) of torchvision '
      f'mobilenet_v3_large; got {type(state).__name__}'
    )
  return dict(state)


def _hwio(value: np.ndarray, where: str) -> np.ndarray:
  """A PyTorch convolution kernel [out, in, kh, kw] -> Flax's [kh, kw, in, out]."""
  if value.ndim != 4:
    raise errors.UserError(f'{where} has shape {value.shape}; expected a convolution kernel [out, in, kh, kw]')
  return value.transpose(2, 3, 1, 0)


def _conv_bn(part: str, rest: str, value: np.ndarray, where: str = 'weight'):
  """'0'/'1' (conv / bn) + leaf -> (collection, sub-path, array)."""
  if part == '0' and rest == 'weight':
    return 'params', ('conv', 'kernel'), _hwio(value, where)
  if part == '1':
    return {
      'weight': ('params', ('bn', 'scale')),
      'bias': ('params', ('bn', 'bias')),
      'running_mean': ('batch_stats', ('bn', 'mean')),
      'running_var': ('batch_stats', ('bn', 'var')),
    }.get(rest, (None, None)) + (value,)
  return None, None, value


def convert_state_dict(state: dict, expected: dict, source: str = 'state_dict') -> dict:
  """state: torchvision keys -> numpy; expected: `model.init(...)` variables (for shapes). Returns variables."""
  flat = {}
  for key, value in state.items():
    value = np.asarray(value, np.float32) if not key.endswith('num_batches_tracked') else value
    if key.endswith('num_batches_tracked'):
      continue
    collection, path = None, None
    if m := _BLOCK.match(key):
      layer, index, rest = m.groups()
      prefix = (f'features_{layer}', f'block_{index}')
      if rest.startswith(('fc1.', 'fc2.')):
        name, _, leaf = rest.partition('.')
        if leaf in ('weight', 'bias'):
          collection = 'params'
          path = prefix + (name, 'kernel' if leaf == 'weight' else 'bias')
          value = _hwio(value, f'{source}: {key}') if leaf == 'weight' else value
      else:
        part, _, leaf = rest.partition('.')
        collection, sub, value = _conv_bn(part, leaf, value, f'{source}: {key}')
        path = prefix + sub if sub else None
    elif m := _STEM.match(key):
      layer, part, leaf = m.groups()
      collection, sub, value = _conv_bn(part, leaf, value, f'{source}: {key}')
      path = (f'features_{layer}',) + sub if sub else None
    elif m := re.match(r'^classifier\.(\d+)\.(weight|bias)$', key):
      collection, path = 'params', (f'classifier_{m.group(1)}', 'kernel' if m.group(2) == 'weight' else 'bias')
      value = value.T if m.group(2) == 'weight' else value
    if path is None:
      raise errors.UserError(f'{source}: key {key!r} is not a mobilenet_v3_large weight')
    flat[(collection,) + path] = value
  want = {
    (col,) + tuple(str(p.key) for p in path): leaf.shape
    for col in expected
    for path, leaf in jax.tree_util.tree_leaves_with_path(expected[col])
  }
  missing = sorted('/'.join(k) for k in set(want) - set(flat))
  unknown = sorted('/'.join(k) for k in set(flat) - set(want))
  if missing or unknown:
    raise errors.UserError(
      f'{source}: does not fit the model: missing {missing[:4]}, unexpected {unknown[:4]} '
      '(a different num_classes or width?)'
    )
  variables = {}
  for key, value in flat.items():
    if value.shape != want[key]:
      raise errors.UserError(f'{source}: {"/".join(key)} has shape {value.shape}; the model expects {want[key]}')
    node = variables
    for part in key[:-1]:
      node = node.setdefault(part, {})
    node[key[-1]] = value
  return variables


def load_imagenet_mobilenet(path: str, width_mult: float) -> dict:
  """torchvision mobilenet_v3_large weights (.pth / .safetensors) -> {'params', 'batch_stats'} of the plain
  network and 'head': its classifier's first layer (FC 1280), without the classification layer (any number of
  classes)."""
  state = read_state_dict(path)
  classes = int(np.shape(state['classifier.3.weight'])[0]) if 'classifier.3.weight' in state else 0
  net = mobilenet_v3.MobileNetV3Large(num_classes=classes, width_mult=width_mult)
  expected = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  variables = convert_state_dict(state, expected, path)
  head = variables['params'].get('classifier_0')
  variables['params'] = {k: v for k, v in variables['params'].items() if not k.startswith('classifier_')}
  if head is not None:
    variables['head'] = head
  return variables
