"""Official SCAN / VSE++ PyTorch checkpoints (`model_best.pth.tar`) -> xmatch workdirs.

The checkpoints hold `model` = [image encoder state_dict, text encoder state_dict] and `opt` (the argparse
hyper-parameters): `fc.weight` / `fc.bias` (EncoderImagePrecomp), `embed.weight` and `rnn.{weight,bias}_{ih,hh}_l<k>
[_reverse]` (EncoderText's nn.GRU). They are read with the safe unpickler (no pickled code runs). PyTorch's GRU gate
blocks (r, z, n rows of weight_ih / weight_hh) map onto Flax's GRUCell as described in models/layers.py:
ir/iz get b_i + b_h, in gets b_in, hn gets b_hn, hr/hz have no bias.
"""

import os
import types

import ml_collections
import numpy as np

from xmatch_jax.convert import torch_pickle

FORMATS = ('scan', 'vsepp')
DATA_NAMES = {'f30k_precomp': 'f30k', 'coco_precomp': 'coco'}


def _get(state: dict, key: str, source: str) -> np.ndarray:
  if key not in state:
    raise ValueError(f'{source}: missing weight {key!r} (have {sorted(state)[:8]} ...)')
  return np.asarray(state[key], np.float32)


def gru_cell_params(state: dict, layer: int, reverse: bool, source: str) -> dict:
  """One direction of one layer of a PyTorch nn.GRU state_dict ('rnn.' prefix) -> Flax GRUCell params."""
  suffix = f'l{layer}' + ('_reverse' if reverse else '')
  w_ih, w_hh = _get(state, f'rnn.weight_ih_{suffix}', source), _get(state, f'rnn.weight_hh_{suffix}', source)
  b_ih, b_hh = _get(state, f'rnn.bias_ih_{suffix}', source), _get(state, f'rnn.bias_hh_{suffix}', source)
  hidden = w_hh.shape[1]
  if w_ih.shape[0] != 3 * hidden or w_hh.shape != (3 * hidden, hidden):
    raise ValueError(f'{source}: rnn.weight_*_{suffix} shapes {w_ih.shape}, {w_hh.shape} are not a GRU of '
                     f'hidden size {hidden}')
  rows = lambda a, g: a[g * hidden:(g + 1) * hidden]
  return {
      'ir': {'kernel': rows(w_ih, 0).T, 'bias': rows(b_ih, 0) + rows(b_hh, 0)},
      'iz': {'kernel': rows(w_ih, 1).T, 'bias': rows(b_ih, 1) + rows(b_hh, 1)},
      'in': {'kernel': rows(w_ih, 2).T, 'bias': rows(b_ih, 2)},
      'hr': {'kernel': rows(w_hh, 0).T},
      'hz': {'kernel': rows(w_hh, 1).T},
      'hn': {'kernel': rows(w_hh, 2).T, 'bias': rows(b_hh, 2)},
  }


def convert_params(image_state: dict, text_state: dict, num_layers: int, bidirectional: bool,
                   source: str = 'checkpoint') -> dict:
  """SCAN/VSE++ encoder state_dicts -> Flax params of xmatch's SCAN / VSEPP (same names for both)."""
  text = {'embed': {'embedding': _get(text_state, 'embed.weight', source + ' (text encoder)')}}
  for layer in range(num_layers):
    text[f'forward_{layer}'] = gru_cell_params(text_state, layer, False, source + ' (text encoder)')
    if bidirectional:
      text[f'backward_{layer}'] = gru_cell_params(text_state, layer, True, source + ' (text encoder)')
  expected = {'embed.weight'} | {f'rnn.{w}_{s}_l{l}{r}' for w in ('weight', 'bias') for s in ('ih', 'hh')
                                 for l in range(num_layers) for r in ([''] + (['_reverse'] if bidirectional else []))}
  unknown = sorted(set(text_state) - expected)
  if unknown:
    raise ValueError(f'{source} (text encoder): unexpected weights {unknown}; is --format right?')
  image_unknown = sorted(set(image_state) - {'fc.weight', 'fc.bias'})
  if image_unknown:
    raise ValueError(f'{source} (image encoder): unexpected weights {image_unknown} (only the precomp encoder\'s '
                     'fc is supported; weight_norm encoders are not)')
  image = {'fc': {'kernel': _get(image_state, 'fc.weight', source + ' (image encoder)').T,
                  'bias': _get(image_state, 'fc.bias', source + ' (image encoder)')}}
  return {'image_encoder': image, 'text_encoder': text}


def _opt(opt, name, default=None, required=False, source='checkpoint'):
  if isinstance(opt, types.SimpleNamespace):
    opt = vars(opt)
  if name not in opt:
    if required:
      raise ValueError(f'{source}: opt has no field {name!r}')
    return default
  return opt[name]


def config_from_opt(fmt: str, opt, source: str) -> ml_collections.ConfigDict:
  """The xmatch config equivalent to the checkpoint's `opt` (dataset from data_name)."""
  from configs import scan as scan_config  # pylint: disable=g-import-not-at-top
  from configs import vsepp as vsepp_config  # pylint: disable=g-import-not-at-top
  data_name = _opt(opt, 'data_name', 'f30k_precomp')
  dataset = DATA_NAMES.get(data_name)
  if dataset is None:
    raise ValueError(f'{source}: opt.data_name is {data_name!r}; expected one of {sorted(DATA_NAMES)}')
  get = lambda name, default=None, required=False: _opt(opt, name, default, required, source)
  if fmt == 'scan':
    c = scan_config.get_config(dataset)
    m = c.model
    m.bidirectional = bool(get('bi_gru', False))
    m.cross_attn = get('cross_attn', required=True)
    m.raw_feature_norm = get('raw_feature_norm', required=True)
    m.lambda_softmax = float(get('lambda_softmax', required=True))
    m.agg_func = get('agg_func', required=True)
    m.lambda_lse = float(get('lambda_lse', 6.0))
    m.no_txtnorm = bool(get('no_txtnorm', False))
    precomp = get('precomp_enc_type', 'basic')
    if precomp != 'basic':
      raise ValueError(f'{source}: opt.precomp_enc_type is {precomp!r}; only "basic" is supported')
  else:
    c = vsepp_config.get_config(dataset)
    m = c.model
    m.use_abs = bool(get('use_abs', False))
    if get('measure', 'cosine') != 'cosine':
      raise ValueError(f'{source}: opt.measure is {get("measure")!r}; only "cosine" is supported')
  m.embed_size = int(get('embed_size', required=True))
  m.word_dim = int(get('word_dim', required=True))
  m.num_layers = int(get('num_layers', 1))
  m.no_imgnorm = bool(get('no_imgnorm', False))
  c.loss.margin = float(get('margin', c.loss.margin))
  c.loss.max_violation = bool(get('max_violation', c.loss.max_violation))
  return c


def load(path: str, fmt: str):
  """Reads a checkpoint -> (config, params, meta)."""
  if fmt not in FORMATS:
    raise ValueError(f'--format must be one of {FORMATS}, got {fmt!r}')
  checkpoint = torch_pickle.load(path)
  if not isinstance(checkpoint, dict) or 'model' not in checkpoint or 'opt' not in checkpoint:
    raise ValueError(f'{path}: expected a dict with "model" ([image state_dict, text state_dict]) and "opt"')
  model = checkpoint['model']
  if not isinstance(model, (list, tuple)) or len(model) != 2:
    raise ValueError(f'{path}: "model" must be [image encoder state_dict, text encoder state_dict]')
  config = config_from_opt(fmt, checkpoint['opt'], path)
  params = convert_params(dict(model[0]), dict(model[1]), config.model.num_layers,
                          bool(config.model.get('bidirectional', False)), os.path.basename(path))
  meta = {k: float(checkpoint[k]) for k in ('epoch', 'best_rsum', 'Eiters') if k in checkpoint}
  return config, params, meta
