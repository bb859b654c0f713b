"""Official SCAN / VSE++ PyTorch checkpoints (`model_best.pth.tar`) <-> xmatch workdirs.

The checkpoints hold `model` = [image encoder state_dict, text encoder state_dict] and `opt` (the argparse
hyper-parameters): `fc.weight` / `fc.bias` (EncoderImagePrecomp; SCAN's EncoderImageWeightNormPrecomp stores
`fc.weight_g` / `fc.weight_v` instead, folded here into the weight it computes), `embed.weight` and
`rnn.{weight,bias}_{ih,hh}_l<k>[_reverse]` (EncoderText's nn.GRU). They are read with the safe unpickler (no
pickled code runs). PyTorch's GRU gate blocks (r, z, n rows of weight_ih / weight_hh) map onto Flax's GRUCell as
described in models/layers.py: ir/iz get b_i + b_h, in gets b_in, hn gets b_hn, hr/hz have no bias.

The way back (export_params, opt_from_config; tools/export_torch_checkpoint.py) writes the same layout.
"""

import argparse
import collections
import dataclasses
import os
import types

import ml_collections
import numpy as np

from xmatch_jax import errors
from xmatch_jax.convert import torch_pickle

FORMATS = ('scan', 'vsepp')
PRECOMP_ENC_TYPES = ('basic', 'weight_norm')  # SCAN's image encoders over precomputed features
# Official data_name -> xmatch dataset (shapes: the synthetic datasets, as written by the exporter).
DATA_NAMES = {
  'f30k_precomp': 'f30k',
  'coco_precomp': 'coco',
  'shapes_precomp': 'shapes',
  'shapes_tiny_precomp': 'shapes_tiny',
}
# VSE++'s other data names (its weights have the same layout): their features go in the custom_precomp manual dir,
# dataset precomp (one vector per image is read as k = 1).
VSEPP_DATA_NAMES = {**DATA_NAMES, 'f8k_precomp': 'precomp', '10crop_precomp': 'precomp', 'precomp': 'precomp'}
# xmatch dataset -> the data_name an export writes.
EXPORT_DATA_NAMES = {
  'f30k': 'f30k_precomp',
  'coco': 'coco_precomp',
  'shapes': 'shapes_precomp',
  'shapes_tiny': 'shapes_tiny_precomp',
  'precomp': 'precomp',
}


def _get(state: dict, key: str, source: str) -> np.ndarray:
  if key not in state:
    raise errors.UserError(f'{source}: missing weight {key!r} (have {sorted(state)[:8]} ...)')
  return np.asarray(state[key], np.float32)


def gru_cell_params(state: dict, layer: int, reverse: bool, source: str) -> dict:
  """One direction of one layer of a PyTorch nn.GRU state_dict ('rnn.' prefix) -> Flax GRUCell params."""
  suffix = f'l{layer}' + ('_reverse' if reverse else '')
  w_ih, w_hh = _get(state, f'rnn.weight_ih_{suffix}', source), _get(state, f'rnn.weight_hh_{suffix}', source)
  b_ih, b_hh = _get(state, f'rnn.bias_ih_{suffix}', source), _get(state, f'rnn.bias_hh_{suffix}', source)
  hidden = w_hh.shape[1]
  if w_ih.shape[0] != 3 * hidden or w_hh.shape != (3 * hidden, hidden):
    raise errors.UserError(
      f'{source}: rnn.weight_*_{suffix} shapes {w_ih.shape}, {w_hh.shape} are not a GRU of hidden size {hidden}'
    )
  rows = lambda a, g: a[g * hidden : (g + 1) * hidden]
  return {
    'ir': {'kernel': rows(w_ih, 0).T, 'bias': rows(b_ih, 0) + rows(b_hh, 0)},
    'iz': {'kernel': rows(w_ih, 1).T, 'bias': rows(b_ih, 1) + rows(b_hh, 1)},
    'in': {'kernel': rows(w_ih, 2).T, 'bias': rows(b_ih, 2)},
    'hr': {'kernel': rows(w_hh, 0).T},
    'hz': {'kernel': rows(w_hh, 1).T},
    'hn': {'kernel': rows(w_hh, 2).T, 'bias': rows(b_hh, 2)},
  }


def weight_norm_weight(g: np.ndarray, v: np.ndarray, source: str) -> np.ndarray:
  """PyTorch weight_norm's weight g * v / ||v||: with dim=None (SCAN's EncoderImageWeightNormPrecomp) g is a scalar
  and the norm is over all of v; with dim=k, g keeps only axis k and the norm runs over the other axes."""
  if g.ndim and (g.ndim != v.ndim or any(a not in (1, b) for a, b in zip(g.shape, v.shape))):
    raise errors.UserError(f'{source}: fc.weight_g of shape {g.shape} does not fit fc.weight_v of shape {v.shape}')
  axes = tuple(i for i in range(v.ndim) if not g.ndim or g.shape[i] == 1)
  v64 = v.astype(np.float64)
  return (g * v64 / np.sqrt(np.sum(v64 * v64, axis=axes, keepdims=True))).astype(np.float32)


def convert_params(
  image_state: dict,
  text_state: dict,
  num_layers: int,
  bidirectional: bool,
  source: str = 'checkpoint',
  weight_norm: bool = False,
) -> dict:
  """SCAN/VSE++ encoder state_dicts -> Flax params of xmatch's SCAN / VSEPP (same names for both).

  weight_norm: the image encoder is SCAN's EncoderImageWeightNormPrecomp (opt.precomp_enc_type 'weight_norm').
  """
  text = {'embed': {'embedding': _get(text_state, 'embed.weight', source + ' (text encoder)')}}
  for layer in range(num_layers):
    text[f'forward_{layer}'] = gru_cell_params(text_state, layer, False, source + ' (text encoder)')
    if bidirectional:
      text[f'backward_{layer}'] = gru_cell_params(text_state, layer, True, source + ' (text encoder)')
  expected = {'embed.weight'} | {
    f'rnn.{w}_{s}_l{i}{r}'
    for w in ('weight', 'bias')
    for s in ('ih', 'hh')
    for i in range(num_layers)
    for r in ([''] + (['_reverse'] if bidirectional else []))
  }
  unknown = sorted(set(text_state) - expected)
  if unknown:
    raise errors.UserError(f'{source} (text encoder): unexpected weights {unknown}; is --format right?')
  where = source + ' (image encoder)'
  weights = ('fc.weight_g', 'fc.weight_v') if weight_norm else ('fc.weight',)
  image_unknown = sorted(set(image_state) - {*weights, 'fc.bias'})
  if image_unknown:
    raise errors.UserError(
      f'{where}: unexpected weights {image_unknown}; opt.precomp_enc_type '
      f'{"weight_norm" if weight_norm else "basic"} has {sorted({*weights, "fc.bias"})}'
    )
  if weight_norm:
    kernel = weight_norm_weight(_get(image_state, 'fc.weight_g', where), _get(image_state, 'fc.weight_v', where), where)
  else:
    kernel = _get(image_state, 'fc.weight', where)
  image = {'fc': {'kernel': kernel.T, 'bias': _get(image_state, 'fc.bias', where)}}
  return {'image_encoder': image, 'text_encoder': text}


def _opt(opt, name, default=None, required=False, source='checkpoint'):
  if isinstance(opt, types.SimpleNamespace):
    opt = vars(opt)
  if name not in opt:
    if required:
      raise errors.UserError(f'{source}: opt has no field {name!r}')
    return default
  return opt[name]


def config_from_opt(fmt: str, opt, source: str) -> ml_collections.ConfigDict:
  """The xmatch config equivalent to the checkpoint's `opt` (dataset from data_name)."""
  from configs import scan as scan_config  # pylint: disable=g-import-not-at-top
  from configs import vsepp as vsepp_config  # pylint: disable=g-import-not-at-top

  data_name = _opt(opt, 'data_name', 'f30k_precomp')
  names = VSEPP_DATA_NAMES if fmt == 'vsepp' else DATA_NAMES
  dataset = names.get(data_name)
  if dataset is None:
    raise errors.UserError(f'{source}: opt.data_name is {data_name!r}; expected one of {sorted(names)}')
  get = lambda name, default=None, required=False: _opt(opt, name, default, required, source)
  base = 'f30k' if dataset == 'precomp' else dataset  # no config file takes the custom dataset: F30K's schedule
  if fmt == 'scan':
    c = scan_config.get_config(base)
    m = c.model
    m.bidirectional = bool(get('bi_gru', False))
    m.cross_attn = get('cross_attn', required=True)
    m.raw_feature_norm = get('raw_feature_norm', required=True)
    m.lambda_softmax = float(get('lambda_softmax', required=True))
    m.agg_func = get('agg_func', required=True)
    m.lambda_lse = float(get('lambda_lse', 6.0))
    m.no_txtnorm = bool(get('no_txtnorm', False))
    precomp = get('precomp_enc_type', 'basic')
    if precomp not in PRECOMP_ENC_TYPES:
      raise errors.UserError(f'{source}: opt.precomp_enc_type is {precomp!r}; expected one of {PRECOMP_ENC_TYPES}')
  else:
    c = vsepp_config.get_config(base)
    m = c.model
    m.use_abs = bool(get('use_abs', False))
    if get('measure', 'cosine') != 'cosine':
      raise errors.UserError(f'{source}: opt.measure is {get("measure")!r}; only "cosine" is supported')
  m.embed_size = int(get('embed_size', required=True))
  m.word_dim = int(get('word_dim', required=True))
  m.num_layers = int(get('num_layers', 1))
  m.no_imgnorm = bool(get('no_imgnorm', False))
  c.loss.margin = float(get('margin', c.loss.margin))
  c.loss.max_violation = bool(get('max_violation', c.loss.max_violation))
  c.loss.mask_same_image = False  # the official ContrastiveLoss masks only the diagonal (docs/fidelity.md, LOSS-1)
  c.dataset = dataset
  return c


def load(path: str, fmt: str):
  """Reads a checkpoint -> (config, params, meta)."""
  if fmt not in FORMATS:
    raise errors.UserError(f'--format must be one of {FORMATS}, got {fmt!r}')
  checkpoint = torch_pickle.load(path)
  if not isinstance(checkpoint, dict) or 'model' not in checkpoint or 'opt' not in checkpoint:
    raise errors.UserError(f'{path}: expected a dict with "model" ([image state_dict, text state_dict]) and "opt"')
  model = checkpoint['model']
  if not isinstance(model, (list, tuple)) or len(model) != 2:
    raise errors.UserError(f'{path}: "model" must be [image encoder state_dict, text encoder state_dict]')
  config = config_from_opt(fmt, checkpoint['opt'], path)
  weight_norm = fmt == 'scan' and _opt(checkpoint['opt'], 'precomp_enc_type', 'basic') == 'weight_norm'
  params = convert_params(
    dict(model[0]),
    dict(model[1]),
    config.model.num_layers,
    bool(config.model.get('bidirectional', False)),
    os.path.basename(path),
    weight_norm,
  )
  meta = {k: float(checkpoint[k]) for k in ('epoch', 'best_rsum', 'Eiters') if k in checkpoint}
  if fmt == 'scan' and 'epoch' in meta:
    meta['epoch'] += 1  # SCAN saves the index of its last finished epoch; xmatch's meta counts finished epochs
  return config, params, meta


# --- xmatch -> official (the inverse of the functions above) -----------------------------------------------------


def _param(params: dict, path: tuple, source: str) -> np.ndarray:
  node = params
  for i, key in enumerate(path):
    if not hasattr(node, 'keys'):
      raise errors.UserError(f'{source}: {"/".join(path[:i])} is an array; expected a group holding {key!r}')
    if key not in node:
      raise errors.UserError(f'{source}: missing parameter {"/".join(path[: i + 1])} (have {sorted(node)[:8]})')
    node = node[key]
  return np.array(node, np.float32)  # a copy, C-contiguous


def gru_state(cell: dict, layer: int, reverse: bool, source: str) -> collections.OrderedDict:
  """Flax GRUCell params -> one direction of one layer of a PyTorch nn.GRU state_dict ('rnn.' prefix).

  Rows r, z, n of weight_ih / weight_hh are ir, iz, in / hr, hz, hn. Flax's ir and iz biases are PyTorch's
  b_ir + b_hr and b_iz + b_hz, which cannot be split again: they go whole into bias_ih and bias_hh gets zeros
  there (its n rows are hn's bias, which must stay inside r * (W_hn h + b_hn)). The forward is identical; only
  the split of those two bias sums differs from the checkpoint a model was imported from.
  """
  name = 'backward' if reverse else 'forward'
  get = lambda *path: _param(cell, path, f'{source} ({name}_{layer})')
  hidden = get('hr', 'kernel').shape[1]
  suffix = f'l{layer}' + ('_reverse' if reverse else '')
  return collections.OrderedDict(
    [
      (f'rnn.weight_ih_{suffix}', np.concatenate([get(g, 'kernel').T for g in ('ir', 'iz', 'in')])),
      (f'rnn.weight_hh_{suffix}', np.concatenate([get(g, 'kernel').T for g in ('hr', 'hz', 'hn')])),
      (f'rnn.bias_ih_{suffix}', np.concatenate([get(g, 'bias') for g in ('ir', 'iz', 'in')])),
      (f'rnn.bias_hh_{suffix}', np.concatenate([np.zeros(2 * hidden, np.float32), get('hn', 'bias')])),
    ]
  )


def export_params(params: dict, num_layers: int, bidirectional: bool, source: str = 'params'):
  """Flax params of xmatch's SCAN / VSEPP -> (image encoder state_dict, text encoder state_dict), the official
  layout `convert_params` reads (OrderedDicts of float32 arrays, in nn.Module.state_dict order).

  convert_params(*export_params(p, ...)) == p exactly. The GRU's r and z biases come back as bias_ih = the sum,
  bias_hh = 0 (see gru_state): the same forward as the imported checkpoint, not the same split.
  """
  image = collections.OrderedDict(
    [
      ('fc.weight', _param(params, ('image_encoder', 'fc', 'kernel'), source).T.copy()),
      ('fc.bias', _param(params, ('image_encoder', 'fc', 'bias'), source)),
    ]
  )
  text = collections.OrderedDict([('embed.weight', _param(params, ('text_encoder', 'embed', 'embedding'), source))])
  encoder = params.get('text_encoder', {}) if hasattr(params, 'get') else {}
  for layer in range(num_layers):
    for reverse in [False, True] if bidirectional else [False]:
      key = f'{"backward" if reverse else "forward"}_{layer}'
      if key not in encoder:
        raise errors.UserError(
          f'{source}: missing parameter text_encoder/{key} (num_layers={num_layers}, bidirectional={bidirectional})'
        )
      text.update(gru_state(encoder[key], layer, reverse, f'{source}: text_encoder'))
  expected = {
    f'{d}_{i}' for i in range(num_layers) for d in (['forward', 'backward'] if bidirectional else ['forward'])
  } | {'embed'}
  unknown = sorted(set(encoder) - expected)
  if unknown:
    raise errors.UserError(
      f'{source}: unexpected text_encoder parameters {unknown} for num_layers={num_layers}, '
      f'bidirectional={bidirectional}'
    )
  return image, text


# Official train.py flags that no xmatch field holds: their defaults (SCAN's / VSE++'s argparse).
_SCAN_RUNTIME = {
  'data_path': './data/',
  'vocab_path': './vocab/',
  'workers': 10,
  'log_step': 10,
  'val_step': 500,
  'logger_name': './runs/runX/log',
  'model_name': './runs/runX/checkpoint',
  'resume': '',
  'precomp_enc_type': 'basic',
}
_VSEPP_RUNTIME = {
  'data_path': './data/',
  'vocab_path': './vocab/',
  'crop_size': 224,
  'workers': 10,
  'log_step': 10,
  'val_step': 500,
  'logger_name': 'runs/runX',
  'resume': '',
  'finetune': False,
  'cnn_type': 'vgg19',
  'use_restval': False,
  'measure': 'cosine',
}
# Model fields that only change how xmatch computes (memory, recomputation), not what.
_COMPUTE_ONLY = {'block_size', 'remat', 'dtype'}  # how xmatch computes, not what the weights mean
_L1_NORMS = ('l1norm', 'clipped_l1norm')


def opt_from_config(config, vocab_size: int, img_dim: int | None = None, source: str = 'config') -> argparse.Namespace:
  """The official train.py `opt` (argparse.Namespace) of an xmatch SCAN / VSE++ config: config_from_opt(fmt, opt)
  gives the config's model, loss and dataset back.

  Flags without an xmatch counterpart (paths, workers, logging) get the official defaults; img_dim defaults to
  config.data_info.img_dim (a workdir's config.json). Training settings the official train.py lacks (warm-up,
  lr_decay_factor, same-image masking in the loss) are not carried; its lr_update decays by 0.1 every lr_update
  epochs where xmatch decays once.

  Raises:
    ValueError: not a SCAN / VSE++ config, or a variant the official code cannot express (named in the message).
  """
  m = config.model
  name = m.get('name')
  if name not in FORMATS:
    raise errors.UserError(
      f'{source}: model {name!r} has no official SCAN / VSE++ checkpoint layout; only {FORMATS} can be exported'
    )
  if img_dim is None:
    if 'data_info' not in config or 'img_dim' not in config.data_info:
      raise errors.UserError(f"{source}: no data_info.img_dim (a workdir's config.json has it); pass img_dim")
    img_dim = config.data_info.img_dim
  from xmatch_jax import models  # pylint: disable=g-import-not-at-top

  fields = m.to_dict() if hasattr(m, 'to_dict') else dict(m)
  defaults = {
    f.name: f.default for f in dataclasses.fields(models.MODELS[name]) if f.default is not dataclasses.MISSING
  }
  get = lambda field: fields.get(field, defaults.get(field))
  data_name = EXPORT_DATA_NAMES.get(config.dataset)
  if data_name == 'precomp' and name != 'vsepp':
    data_name = None  # only VSE++'s code takes that name
  if data_name is None:
    raise errors.UserError(
      f'{source}: dataset {config.dataset!r} has no official data_name; expected one of {sorted(EXPORT_DATA_NAMES)}'
    )
  opt = {
    'data_name': data_name,
    'margin': float(config.loss.margin),
    'num_epochs': int(config.num_epochs),
    'batch_size': int(config.batch_size),
    'word_dim': int(get('word_dim')),
    'embed_size': int(get('embed_size')),
    'grad_clip': float(config.optim.grad_clip),
    'num_layers': int(get('num_layers')),
    'learning_rate': float(config.optim.learning_rate),
    'lr_update': int(config.optim.lr_decay_epochs),
    'max_violation': bool(config.loss.max_violation),
    'img_dim': int(img_dim),
    'no_imgnorm': bool(get('no_imgnorm')),
    'vocab_size': int(vocab_size),
  }
  if name == 'scan':
    handled = {
      'name',
      'embed_size',
      'word_dim',
      'num_layers',
      'bidirectional',
      'no_imgnorm',
      'no_txtnorm',
      'cross_attn',
      'raw_feature_norm',
      'lambda_softmax',
      'agg_func',
      'lambda_lse',
    }
    if get('raw_feature_norm') in _L1_NORMS:
      raise errors.UserError(
        f'{source}: model.raw_feature_norm is {get("raw_feature_norm")!r}; official SCAN cannot run '
        f'{_L1_NORMS} (its func_attention calls an undefined l1norm_d)'
      )
    opt = {
      **_SCAN_RUNTIME,
      **opt,
      'no_txtnorm': bool(get('no_txtnorm')),
      'raw_feature_norm': get('raw_feature_norm'),
      'agg_func': get('agg_func'),
      'cross_attn': get('cross_attn'),
      'bi_gru': bool(get('bidirectional')),
      'lambda_lse': float(get('lambda_lse')),
      'lambda_softmax': float(get('lambda_softmax')),
    }
  else:
    handled = {'name', 'embed_size', 'word_dim', 'num_layers', 'bidirectional', 'no_imgnorm', 'no_txtnorm', 'use_abs'}
    if get('bidirectional'):
      raise errors.UserError(f'{source}: model.bidirectional is True; official VSE++ has only a unidirectional GRU')
    if get('no_txtnorm'):
      raise errors.UserError(
        f'{source}: model.no_txtnorm is True; official VSE++ always l2-normalises the caption vector'
      )
    opt = {**_VSEPP_RUNTIME, **opt, 'use_abs': bool(get('use_abs'))}
  unknown = sorted(set(fields) - handled - _COMPUTE_ONLY)
  if unknown:
    raise errors.UserError(f"{source}: model fields {unknown} have no counterpart in official {name.upper()}'s opt")
  return argparse.Namespace(**opt)
