"""Official GLFN PyTorch checkpoints (github.com/smileslabsh/Generative-Label-Fused-Network) -> xmatch GLFN params.

The official `.pth.tar` holds `model` = [EncoderImagePrecomp state_dict, EncoderText state_dict] and `opt` (train.py's
argparse flags). Its layout:

  image: fc.weight [D, img_dim + D_b + H], fc.bias [D]        region fusion of [i_i, p_i, t_i]
         position_embedding.weight [G*G + 1, D_b]            block embeddings (row G*G: padding)
         posi_attn_matrix_add_tag.weight [D_b, img_dim + H]  f of eq 7, no bias, on [i_i, t_i]
  text:  fc.weight [W, H], fc.bias [W]                        BERT features -> GRU input (W = opt.bert_to_gru_size)
         rnn.{weight,bias}_{ih,hh}_l<k>[_reverse]            nn.GRU(W, D, num_layers, bidirectional)

which is xmatch's GLFN with the `official` variant (tag_in_fusion='once', train_position_attention=False,
t2i_max_attention_weight=0.5), score = opt.cross_attn, grid G from the embedding rows and top_l = L = 15 (the official
BOX_LEN). Sizes come from the shapes; the opt fields that restate them are checked against them.

The checkpoint holds no BERT. The official code reads precomputed 768-d BERT vectors from files
({split}_sentence_list/*: one per caption token; {split}_tags_vector/*: one per region tag) whose extraction code is
not released. The import takes the BERT from a Hugging Face directory (`bert_dir`) and xmatch's GLFN computes them
in the model: caption tokens = the last hidden states of [CLS] WordPiece tokens [SEP], a tag = the mean of the last
hidden states of its [CLS] tokens [SEP]. Scores equal the official ones only for features made that way.

Refused (named in the error): unidirectional GRU (bi_gru False), no_imgnorm / no_txtnorm, precomp_enc_type other
than 'basic', three state_dicts (the GAT fork), opt fields official GLFN's train.py does not have, unknown or
missing weights, shapes that disagree with each other, with opt or with the BERT.

The way back (export_params, opt_from_config; tools/export_torch_checkpoint.py) writes the same layout for the
`official` variant with score t2i or i2t only, without the BERT (the user keeps the BERT directory).
"""

import argparse
import collections
import dataclasses
import os
import types

import ml_collections
import numpy as np

from xmatch_jax import errors
from xmatch_jax.convert import hf_bert
from xmatch_jax.convert import scan_checkpoint
from xmatch_jax.convert import torch_pickle
from xmatch_jax.models import scan

BOX_LEN = 15  # official model.py / evaluation.py: boxes[:, :, :2 * BOX_LEN] are L block indices + L weights
IMAGE_KEYS = ('fc.weight', 'fc.bias', 'position_embedding.weight', 'posi_attn_matrix_add_tag.weight')
# Official data_name -> xmatch dataset (f30k_bottom / coco_bottom: its run scripts' names for the same data).
DATA_NAMES = {**scan_checkpoint.DATA_NAMES, 'f30k_bottom': 'f30k', 'coco_bottom': 'coco'}
# Every flag of official GLFN's train.py (plus the fields it sets on opt). The scoring ones are honoured or refused
# in config_from_opt; the rest only concern data paths, logging and training.
OPT_FIELDS = frozenset(
  (
    'data_path',
    'data_name',
    'vocab_path',
    'vocab_name',
    'nltk_data_path',
    'margin',
    'num_epochs',
    'batch_size',
    'word_dim',
    'embed_size',
    'grad_clip',
    'num_layers',
    'learning_rate',
    'lr_update',
    'workers',
    'log_step',
    'val_step',
    'logger_name',
    'model_name',
    'resume',
    'max_violation',
    'img_dim',
    'no_imgnorm',
    'no_txtnorm',
    'raw_feature_norm',
    'agg_func',
    'cross_attn',
    'precomp_enc_type',
    'bi_gru',
    'lambda_lse',
    'lambda_softmax',
    'bert_to_gru_size',
    'drop_out',
    'current_path',
    'vocab_size',
  )
)
OFFICIAL_T2I_MAX_ATTENTION_WEIGHT = 0.5  # xattn_score_t2i: row_sim + 0.5 * max_attn


def text_keys(num_layers: int) -> tuple:
  """EncoderText's state_dict keys for a bidirectional GRU of `num_layers` layers."""
  rnn = tuple(
    f'rnn.{w}_{s}_l{layer}{r}'
    for layer in range(num_layers)
    for r in ('', '_reverse')
    for w in ('weight', 'bias')
    for s in ('ih', 'hh')
  )
  return ('fc.weight', 'fc.bias') + rnn


def _gru_layers(text_state: dict) -> int:
  layers = {
    int(k[len('rnn.weight_ih_l') :].split('_')[0])
    for k in text_state
    if k.startswith('rnn.weight_ih_l') and k[len('rnn.weight_ih_l') :].split('_')[0].isdigit()
  }
  return max(layers) + 1 if layers else 0


def key_problems(state: dict, expected: tuple, what: str) -> list:
  """Every missing and every unexpected key of `state`, as messages."""
  missing, unknown = [k for k in expected if k not in state], sorted(set(state) - set(expected))
  return ([f'{what}: missing {missing}'] if missing else []) + ([f'{what}: unexpected {unknown}'] if unknown else [])


def sizes_of(image_state: dict, text_state: dict, source: str = 'checkpoint') -> dict:
  """Model sizes read from the shapes (img_dim, bert_hidden H, position_dim D_b, grid G, embed_size D, word_dim W,
  num_layers); raises listing every shape that disagrees with the others."""
  num_layers = _gru_layers(text_state)
  problems = key_problems(image_state, IMAGE_KEYS, 'image encoder') + key_problems(
    text_state, text_keys(max(num_layers, 1)), 'text encoder'
  )
  if problems:
    raise errors.UserError(
      f'{source}: weights do not match the official GLFN layout: '
      + '; '.join(problems)
      + f' (image encoder keys: {list(IMAGE_KEYS)}; text encoder: fc.weight, fc.bias and a '
      'bidirectional nn.GRU as rnn.*)'
    )
  shape = lambda state, key: tuple(np.shape(state[key]))
  fc, pos, posi = (
    shape(image_state, k) for k in ('fc.weight', 'position_embedding.weight', 'posi_attn_matrix_add_tag.weight')
  )
  text_fc = shape(text_state, 'fc.weight')
  problems = [
    f'{k} has {len(s)} dims, expected 2'
    for k, s in (
      ('fc.weight', fc),
      ('position_embedding.weight', pos),
      ('posi_attn_matrix_add_tag.weight', posi),
      ('text fc.weight', text_fc),
    )
    if len(s) != 2
  ]
  if problems:
    raise errors.UserError(f'{source}: {"; ".join(problems)}')
  word_dim, hidden = text_fc
  position_dim, rows = pos[1], pos[0]
  grid = int(round(np.sqrt(max(rows - 1, 0))))
  img_dim = posi[1] - hidden
  embed = fc[0]
  want = {
    ('image', 'fc.weight'): (embed, img_dim + position_dim + hidden),
    ('image', 'fc.bias'): (embed,),
    ('image', 'posi_attn_matrix_add_tag.weight'): (position_dim, img_dim + hidden),
    ('text', 'fc.bias'): (word_dim,),
  }
  for layer in range(num_layers):
    for r in ('', '_reverse'):
      in_dim = word_dim if layer == 0 else 2 * embed
      want[('text', f'rnn.weight_ih_l{layer}{r}')] = (3 * embed, in_dim)
      want[('text', f'rnn.weight_hh_l{layer}{r}')] = (3 * embed, embed)
      want[('text', f'rnn.bias_ih_l{layer}{r}')] = (3 * embed,)
      want[('text', f'rnn.bias_hh_l{layer}{r}')] = (3 * embed,)
  for (side, key), expected in want.items():
    got = shape(image_state if side == 'image' else text_state, key)
    if got != expected:
      problems.append(f'{side} {key} is {list(got)}, expected {list(expected)}')
  if grid * grid + 1 != rows:
    problems.append(f'image position_embedding.weight has {rows} rows, expected G*G + 1 (a G x G block grid)')
  if img_dim <= 0:
    problems.append(
      f'image posi_attn_matrix_add_tag.weight has {posi[1]} columns, expected img_dim + {hidden} '
      f'(BERT size from text fc.weight)'
    )
  if grid * grid < BOX_LEN:
    problems.append(f'grid {grid} x {grid} has fewer than L = {BOX_LEN} blocks')
  if problems:
    raise errors.UserError(
      f'{source}: shapes do not fit the official GLFN layout (D={embed}, D_b={position_dim}, '
      f'H={hidden}, W={word_dim}): ' + '; '.join(problems)
    )
  return {
    'img_dim': img_dim,
    'bert_hidden': hidden,
    'position_dim': position_dim,
    'grid': grid,
    'embed_size': embed,
    'word_dim': word_dim,
    'num_layers': num_layers,
  }


def convert_params(image_state: dict, text_state: dict, source: str = 'checkpoint') -> tuple[dict, dict]:
  """Official encoder state_dicts -> (xmatch GLFN params without the `bert` group, sizes)."""
  sizes = sizes_of(image_state, text_state, source)
  get = lambda state, key: np.asarray(state[key], np.float32)
  gru = {}
  for layer in range(sizes['num_layers']):
    gru[f'forward_{layer}'] = scan_checkpoint.gru_cell_params(text_state, layer, False, source + ' (text encoder)')
    gru[f'backward_{layer}'] = scan_checkpoint.gru_cell_params(text_state, layer, True, source + ' (text encoder)')
  params = {
    'object_fc': {'kernel': get(image_state, 'posi_attn_matrix_add_tag.weight').T},  # on [i_i, t_i]
    'block_embed': {'embedding': get(image_state, 'position_embedding.weight')},
    'region_fc': {'kernel': get(image_state, 'fc.weight').T, 'bias': get(image_state, 'fc.bias')},  # [i, p, t]
    'word_fc': {'kernel': get(text_state, 'fc.weight').T, 'bias': get(text_state, 'fc.bias')},
    'gru': gru,
  }
  return params, sizes


def _opt_dict(opt, source: str) -> dict:
  if isinstance(opt, (types.SimpleNamespace, argparse.Namespace)):
    return dict(vars(opt))
  if isinstance(opt, dict):
    return dict(opt)
  raise errors.UserError(f'{source}: opt is a {type(opt).__name__}; expected the argparse.Namespace of train.py')


def config_from_opt(
  opt, sizes: dict, bert_dir: str, dataset: str = '', source: str = 'checkpoint'
) -> ml_collections.ConfigDict:
  """The xmatch GLFN config of the checkpoint's `opt` and weight sizes (configs/glfn.py's `official` variant).

  Raises:
    ValueError: an opt field the official train.py lacks, a scoring option xmatch's GLFN cannot express, a missing
      scoring field, an opt size that disagrees with the weights, or a data_name without a dataset (pass `dataset`).
  """
  from configs import glfn as glfn_config  # pylint: disable=g-import-not-at-top

  opt = _opt_dict(opt, source)
  unknown = sorted(set(opt) - OPT_FIELDS)
  if unknown:
    raise errors.UserError(
      f"{source}: opt fields {unknown} are not flags of official GLFN's train.py (a fork, e.g. the "
      'GAT variant?); only the official model can be imported'
    )

  def get(name, default=None, required=False):
    if name not in opt:
      if required:
        raise errors.UserError(f"{source}: opt has no field {name!r} (official GLFN's train.py always sets it)")
      return default
    return opt[name]

  if not dataset:
    data_name = get('data_name', 'precomp')
    dataset = DATA_NAMES.get(data_name)
    if dataset is None:
      raise errors.UserError(
        f'{source}: opt.data_name is {data_name!r}, which names no dataset (expected one of '
        f'{sorted(DATA_NAMES)}); pass the dataset explicitly (--dataset=f30k or coco)'
      )
  refusals = []
  if not get('bi_gru', False):
    refusals.append("opt.bi_gru is False: xmatch's GLFN has only the bidirectional GRU (directions averaged)")
  for field in ('no_imgnorm', 'no_txtnorm'):
    if get(field, False):
      refusals.append(f"opt.{field} is True: xmatch's GLFN always l2-normalises region and word vectors")
  if get('precomp_enc_type', 'basic') != 'basic':
    refusals.append(
      f'opt.precomp_enc_type is {get("precomp_enc_type")!r}: only "basic" (the official code\'s '
      'weight_norm encoder has no position attention and cannot run with its model)'
    )
  cross_attn = get('cross_attn', required=True)
  if cross_attn not in scan.CROSS_ATTN:
    refusals.append(f'opt.cross_attn is {cross_attn!r}, expected one of {scan.CROSS_ATTN}')
  raw_norm = get('raw_feature_norm', required=True)
  if raw_norm not in scan.RAW_FEATURE_NORMS:
    refusals.append(f'opt.raw_feature_norm is {raw_norm!r}, expected one of {scan.RAW_FEATURE_NORMS}')
  agg = get('agg_func', required=True)
  if agg not in scan.AGG_FUNCS:
    refusals.append(f'opt.agg_func is {agg!r}, expected one of {scan.AGG_FUNCS}')
  for field, size in (
    ('embed_size', 'embed_size'),
    ('bert_to_gru_size', 'word_dim'),
    ('num_layers', 'num_layers'),
    ('img_dim', 'img_dim'),
  ):
    value = get(field, required=True)
    if int(value) != sizes[size]:
      refusals.append(f'opt.{field} is {value} but the weights have {size} {sizes[size]}')
  if refusals:
    raise errors.UserError(f'{source}: cannot import: ' + '; '.join(refusals))

  c = glfn_config.get_config(f'{dataset},official,{cross_attn}')
  m = c.model
  m.bert_dir = bert_dir
  for field in ('embed_size', 'word_dim', 'num_layers', 'position_dim', 'grid'):
    m[field] = int(sizes[field])
  m.top_l = BOX_LEN
  m.raw_feature_norm = raw_norm
  m.t2i_agg_func = m.i2t_agg_func = agg  # the official opt holds one agg_func for the model
  m[f'{cross_attn}_lambda_softmax'] = float(get('lambda_softmax', required=True))
  m[f'{cross_attn}_lambda_lse'] = float(get('lambda_lse', required=True))
  m.t2i_max_attention_weight = OFFICIAL_T2I_MAX_ATTENTION_WEIGHT
  c.loss.margin = float(get('margin', c.loss.margin))
  c.loss.max_violation = bool(get('max_violation', c.loss.max_violation))
  return c


def load_bert(bert_dir: str, hidden: int, source: str = 'checkpoint') -> dict:
  """The Flax params of the BERT in `bert_dir` (no pooler); its hidden size must be the checkpoint's H."""
  bert_config, params, _ = hf_bert.load_checkpoint(bert_dir)
  if bert_config.hidden_size != hidden:
    raise errors.UserError(
      f'{source}: the text encoder reads {hidden}-d BERT features (fc.weight), but {bert_dir} has '
      f'hidden_size {bert_config.hidden_size}; pass the BERT the features were made with'
    )
  params = dict(params)
  params.pop('pooler_dense', None)  # GLFN reads token states, not the pooled [CLS]
  return params


def load(path: str, bert_dir: str, dataset: str = ''):
  """Reads an official GLFN checkpoint (safe unpickler, no pickled code runs) -> (config, params with `bert`, meta).

  Raises:
    ValueError: no `bert_dir`, or anything the module docstring lists as refused (named in the message).
  """
  if not bert_dir:
    raise errors.UserError(
      f'{path}: GLFN checkpoints hold no BERT; pass the BERT whose features the model was trained on '
      '(--bert_dir: a Hugging Face BERT directory; the paper used a 768-d BERT-base)'
    )
  checkpoint = torch_pickle.load(path)
  if not isinstance(checkpoint, dict) or 'model' not in checkpoint or 'opt' not in checkpoint:
    raise errors.UserError(f'{path}: expected a dict with "model" ([image state_dict, text state_dict]) and "opt"')
  model = checkpoint['model']
  if not isinstance(model, (list, tuple)) or len(model) != 2:
    n = len(model) if isinstance(model, (list, tuple)) else type(model).__name__
    raise errors.UserError(
      f'{path}: "model" must be [image encoder state_dict, text encoder state_dict]; got {n} '
      '(three state_dicts are the GAT fork, which is not official GLFN)'
    )
  source = os.path.basename(path)
  params, sizes = convert_params(dict(model[0]), dict(model[1]), source)
  config = config_from_opt(
    checkpoint['opt'], sizes, os.path.abspath(bert_dir) if os.path.isdir(bert_dir) else bert_dir, dataset, source
  )
  params['bert'] = load_bert(bert_dir, sizes['bert_hidden'], source)
  # Official GLFN saves 'epoch': epoch + 1, already the number of finished epochs.
  meta = {k: float(checkpoint[k]) for k in ('epoch', 'best_rsum', 'Eiters') if k in checkpoint}
  return config, params, meta


# The official code's fixed behaviour: config fields export requires, with the official value.
OFFICIAL_FIELDS = {
  'tag_in_fusion': 'once',
  'train_position_attention': False,
  't2i_max_attention_weight': OFFICIAL_T2I_MAX_ATTENTION_WEIGHT,
  'position_eps': 1e-6,
  'use_tags': True,
  'text_encoder': 'bert_gru',
  'top_l': BOX_LEN,
}
# Official train.py flags no xmatch field holds: its argparse defaults (vocab_size: set from a vocab json the model
# never reads; not written).
_RUNTIME = {
  'data_path': './data/',
  'vocab_path': './vocab/',
  'vocab_name': 'f30k_precomp_vocab.json',
  'nltk_data_path': '',
  'workers': 10,
  'log_step': 10,
  'val_step': 2000,
  'logger_name': './runs/runX/log',
  'model_name': './runs/runX/checkpoint',
  'resume': '',
  'no_imgnorm': False,
  'no_txtnorm': False,
  'precomp_enc_type': 'basic',
  'bi_gru': True,
  'drop_out': 0.5,
  'current_path': '',
  'word_dim': 300,
}  # word_dim: unused by GLFN (bert_to_gru_size is the GRU input)
# xmatch dataset -> official data_name (the official run scripts' names where they have one).
_DATA_NAME_OF = {
  'f30k': 'f30k_bottom',
  'coco': 'coco_bottom',
  **{v: k for k, v in scan_checkpoint.DATA_NAMES.items() if v not in ('f30k', 'coco')},
}
# Model fields that change how xmatch computes or where the BERT is, not what the exported weights mean; alpha and
# the other direction's lambdas are unused by a one-direction model and not carried.
_NOT_CARRIED = {
  'block_size',
  'remat',
  'tag_batch',
  'dtype',
  'bert_dir',
  'bert',
  'alpha',
  'embed_size',
  'word_dim',
  'num_layers',
  'official_init',  # how training starts, not what a checkpoint holds
  'position_dim',
  'grid',
}


def export_params(params: dict, config, source: str = 'params') -> tuple:
  """xmatch GLFN params -> (image encoder state_dict, text encoder state_dict) in the official layout (OrderedDicts
  of float32 arrays); the `bert` group is not exported. convert_params(*export_params(p, c)) == p without `bert`.

  GRU r / z biases go whole into bias_ih, zeros into bias_hh (scan_checkpoint.gru_state): the same forward.
  """
  get = lambda *path: scan_checkpoint._param(params, path, source)  # pylint: disable=protected-access
  num_layers = int(config.model.num_layers)
  unknown = sorted(set(params) - {'object_fc', 'block_embed', 'region_fc', 'word_fc', 'gru', 'bert'})
  if unknown:
    raise errors.UserError(f'{source}: parameter groups {unknown} have no place in the official GLFN layout')
  image = collections.OrderedDict(
    [
      ('fc.weight', get('region_fc', 'kernel').T.copy()),
      ('fc.bias', get('region_fc', 'bias')),
      ('position_embedding.weight', get('block_embed', 'embedding')),
      ('posi_attn_matrix_add_tag.weight', get('object_fc', 'kernel').T.copy()),
    ]
  )
  text = collections.OrderedDict(
    [('fc.weight', get('word_fc', 'kernel').T.copy()), ('fc.bias', get('word_fc', 'bias'))]
  )
  gru = params.get('gru', {}) if hasattr(params, 'get') else {}
  expected = {f'{d}_{layer}' for layer in range(num_layers) for d in ('forward', 'backward')}
  missing, extra = sorted(expected - set(gru)), sorted(set(gru) - expected)
  if missing or extra:
    raise errors.UserError(
      f'{source}: gru has {sorted(gru)}, expected {sorted(expected)} (model.num_layers={num_layers}, bidirectional)'
    )
  for layer in range(num_layers):
    for reverse in (False, True):
      cell = gru[f'{"backward" if reverse else "forward"}_{layer}']
      text.update(scan_checkpoint.gru_state(cell, layer, reverse, f'{source}: gru'))
  sizes_of(image, text, source)  # the shapes must fit together as the importer reads them
  return image, text


def opt_from_config(config, img_dim: int | None = None, source: str = 'config') -> argparse.Namespace:
  """The official train.py `opt` of an xmatch GLFN config: config_from_opt(opt, sizes, bert_dir) gives back its
  dataset, model (up to bert_dir and fields a one-direction model does not use) and loss.

  Raises:
    ValueError: not GLFN, or not the official variant with score t2i / i2t (the field and official value named).
  """
  m = config.model
  if m.get('name') != 'glfn':
    raise errors.UserError(f'{source}: model {m.get("name")!r} is not glfn')
  if img_dim is None:
    if 'data_info' not in config or 'img_dim' not in config.data_info:
      raise errors.UserError(f"{source}: no data_info.img_dim (a workdir's config.json has it); pass img_dim")
    img_dim = config.data_info.img_dim
  from xmatch_jax import models  # pylint: disable=g-import-not-at-top

  fields = m.to_dict() if hasattr(m, 'to_dict') else dict(m)
  defaults = {
    f.name: f.default for f in dataclasses.fields(models.MODELS['glfn']) if f.default is not dataclasses.MISSING
  }
  get = lambda field: fields.get(field, defaults.get(field))
  refusals = []
  score = get('score')
  if score not in scan.CROSS_ATTN:
    refusals.append(
      f'model.score is {score!r}; official GLFN scores one direction per model (t2i or i2t; the '
      'fused score is an ensemble of two exports)'
    )
  for field, value in OFFICIAL_FIELDS.items():
    if get(field) != value:
      refusals.append(f'model.{field} is {get(field)!r}; official GLFN has {value!r}')
  data_name = _DATA_NAME_OF.get(config.dataset)
  if data_name is None:
    refusals.append(f'dataset {config.dataset!r} has no official data_name; expected one of {sorted(_DATA_NAME_OF)}')
  handled = (
    set(OFFICIAL_FIELDS)
    | _NOT_CARRIED
    | {
      'name',
      'score',
      'raw_feature_norm',
      't2i_agg_func',
      'i2t_agg_func',
      't2i_lambda_softmax',
      't2i_lambda_lse',
      'i2t_lambda_softmax',
      'i2t_lambda_lse',
    }
  )
  unknown = sorted(set(fields) - handled)
  if unknown:
    refusals.append(f"model fields {unknown} have no counterpart in official GLFN's opt")
  if refusals:
    raise errors.UserError(
      f"{source}: cannot export as an official GLFN checkpoint (only configs/glfn.py's official "
      'variant with score t2i or i2t): ' + '; '.join(refusals)
    )
  opt = {
    **_RUNTIME,
    'data_name': data_name,
    'margin': float(config.loss.margin),
    'num_epochs': int(config.num_epochs),
    'batch_size': int(config.batch_size),
    'embed_size': int(get('embed_size')),
    'grad_clip': float(config.optim.grad_clip),
    'num_layers': int(get('num_layers')),
    'learning_rate': float(config.optim.learning_rate),
    'lr_update': int(config.optim.lr_decay_epochs),
    'max_violation': bool(config.loss.max_violation),
    'img_dim': int(img_dim),
    'raw_feature_norm': get('raw_feature_norm'),
    'agg_func': get(f'{score}_agg_func'),
    'cross_attn': score,
    'lambda_lse': float(get(f'{score}_lambda_lse')),
    'lambda_softmax': float(get(f'{score}_lambda_softmax')),
    'bert_to_gru_size': int(get('word_dim')),
  }
  return argparse.Namespace(**opt)


def expected_params(model) -> dict:
  """Param shapes of a GLFN model (for key / shape checks of imported or exported weights)."""
  import jax  # pylint: disable=g-import-not-at-top

  return jax.eval_shape(model.init, jax.random.PRNGKey(0), *model.example_inputs())['params']
