"""MMCA against plain numpy implementations of the paper's equations (1-7 and 8-14) with the same weights."""

import functools
import json
import os

import config_tables  # pylint: disable=g-bad-import-order (tests/)
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mmca as mmca_config
from xmatch_jax import errors
from xmatch_jax import kernels
from xmatch_jax import workdirs
from xmatch_jax.models import build_model
from xmatch_jax.models import mmca as mmca_lib

TINY_BERT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'tiny_bert')
VOCAB = 34  # tiny_bert's vocab.txt
N_IMG, K, IMG_DIM = 5, 6, 10
LENGTHS = [7, 5, 2, 3, 1]
N = max(LENGTHS)


# ------------------------------------------------------------------------------------------ numpy reference
def np_layer_norm(p, x, eps=1e-5):
  return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * p['scale'] + p['bias']


def np_linear(p, x):
  return x @ p['kernel'] + p['bias'] if 'bias' in p else x @ p['kernel']


def np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_transformer(p, f, heads, scale_by='head'):
  """Eqs 1-4 on one fragment set F [m, d], head by head."""
  m, d = f.shape
  dk = d // heads
  outs = []
  for i in range(heads):
    cols = slice(i * dk, (i + 1) * dk)
    q = np_linear(p['q'], f)[:, cols]
    k = np_linear(p['k'], f)[:, cols]
    v = np_linear(p['v'], f)[:, cols]
    outs.append(np_softmax(q @ k.T / np.sqrt(dk if scale_by == 'head' else d)) @ v)  # eq 1-2
  y = np_layer_norm(p['ln1'], f + np_linear(p['o'], np.concatenate(outs, -1)))  # eq 3 + residual, LN
  ffn = np_linear(p['ffn2'], np.maximum(np_linear(p['ffn1'], y), 0))  # eq 4
  return np_layer_norm(p['ln2'], y + ffn)


def np_l2(x):
  return x / (np.sqrt((x**2).sum(-1, keepdims=True)) + 1e-8)


def np_text_cnn(p, e, text_norm):
  """Eqs 6-7 on the real tokens e [n, D] of one caption."""
  n = e.shape[0]
  q = []
  for width in (1, 2, 3):
    kernel, bias = p[f'conv{width}']['kernel'], p[f'conv{width}']['bias']
    windows = [np.maximum(e[j : j + width].reshape(-1) @ kernel + bias, 0) for j in range(n - width + 1)]
    q.append(np.max(windows, axis=0) if windows else np.zeros(kernel.shape[1]))
  c = np_linear(p['fc'], np.concatenate(q))
  return np_layer_norm(p['ln'], c) if text_norm == 'layernorm' else np_l2(c)


def np_mmca_scores(params, regions, bert_features, lengths, heads, alpha, text_norm, self_scale, cross_scale):
  scores = np.zeros((len(regions), len(lengths)))
  for i, o in enumerate(regions):
    r = np_linear(params['region_fc'], o)
    i0 = np_l2(np_transformer(params['image_unit'], r, heads, self_scale).mean(0))  # eq 5
    for c, length in enumerate(lengths):
      e = bert_features[c, :length]
      c0 = np_text_cnn(params['text_cnn0'], e, text_norm)  # eqs 6-7
      if not alpha:
        scores[i, c] = i0 @ c0
        continue
      y = np.concatenate([r, np_linear(params['word_fc'], e)])  # Y = [R; E]
      yc = np_transformer(params['cross_unit'], y, heads, cross_scale)  # eqs 8-14
      i1 = np_l2(yc[: len(r)].mean(0))
      c1 = np_text_cnn(params['text_cnn1'], yc[len(r) :], text_norm)
      scores[i, c] = i0 @ c0 + alpha * i1 @ c1
  return scores


# ------------------------------------------------------------------------------------------ helpers
def _model(**fields):
  config = {
    'name': 'mmca',
    'bert_dir': TINY_BERT,
    'embed_size': 16,
    'num_heads': 4,
    'cnn_filters': 6,
    'block_size': 2,
    **fields,
  }
  return build_model(config, vocab_size=VOCAB, img_dim=IMG_DIM)


def _inputs(seed=0, pad_to=N):
  rng = np.random.default_rng(seed)
  mask = (np.arange(pad_to)[None] < np.array(LENGTHS)[:, None]).astype(np.float32)
  tokens = (rng.integers(5, VOCAB, (len(LENGTHS), pad_to)) * mask).astype(np.int32)
  return {'regions': rng.standard_normal((N_IMG, K, IMG_DIM)).astype(np.float32)}, {'tokens': tokens, 'mask': mask}


def _numpy_params(model, variables):
  def collect(module):
    return {
      'region_fc': {
        'kernel': module.region_fc.variables['params']['kernel'],
        'bias': module.region_fc.variables['params']['bias'],
      },
      'word_fc': {
        'kernel': module.word_fc.variables['params']['kernel'],
        'bias': module.word_fc.variables['params']['bias'],
      },
      'image_unit': module.image_unit(),
      'cross_unit': module.cross_unit(),
      'text_cnn0': module.text_cnn0(),
      'text_cnn1': module.text_cnn1() if module.alpha else {},
    }

  return jax.tree.map(lambda x: np.asarray(x, np.float64), model.apply(variables, method=collect))


def _numpy_scores(model, variables, images, text, scales=None):
  """`np_mmca_scores` with the model's weights, fields and (frozen) BERT features; `scales` = (self-attention,
  cross-attention) replaces the model's fields."""
  features = np.asarray(
    model.apply(
      variables, text['tokens'], text['mask'], method=lambda m, t, k: m.bert_encoder(t, k)['last_hidden_state']
    ),
    np.float64,
  )
  return np_mmca_scores(
    _numpy_params(model, variables),
    images['regions'].astype(np.float64),
    features,
    LENGTHS,
    model.num_heads,
    model.alpha,
    model.text_norm,
    *(scales or (model.self_attention_scale, model.cross_attention_scale)),
  )


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize(
  'fields',
  [
    {},
    {'text_norm': 'layernorm', 'alpha': 0.8},
    {'self_attention_scale': 'model', 'cross_attention_scale': 'head', 'block_size': 1},
    {'block_size': 100, 'num_heads': 2},
    {'alpha': 0.0},
    {'projection_bias': True},
  ],
)
def test_scores_equal_numpy_equations(fields):
  model = _model(**fields)
  images, text = _inputs()
  variables = model.init(jax.random.key(1), images, text)
  scores = np.asarray(model.apply(variables, images, text))
  expected = _numpy_scores(model, variables, images, text)
  np.testing.assert_allclose(scores, expected, atol=1e-5, rtol=1e-5)


def test_default_scales_and_projections_follow_eqs_1_to_4_and_8_to_11():
  """The self-attention unit divides by sqrt(d_k) (eq 1), the joint cross unit by sqrt(d) (eq 11): the
  reference is given the paper's scales, not the model's fields, so a default that reads them otherwise fails.
  Q, K, V and W^O are plain matrices (eqs 1-3, 8-10: "Q_F = F W_i^Q"); only eq 4's FFN has biases."""
  model = _model()
  images, text = _inputs()
  variables = model.init(jax.random.key(3), images, text)
  for unit in ('image_unit', 'cross_unit'):
    names = set(variables['params'][unit])
    assert {'q_kernel', 'k_kernel', 'v_kernel', 'o_kernel', 'ffn1_bias', 'ffn2_bias'} <= names, names
    assert not {'q_bias', 'k_bias', 'v_bias', 'o_bias'} & names, names
  scores = np.asarray(model.apply(variables, images, text))
  paper = _numpy_scores(model, variables, images, text, ('head', 'model'))
  np.testing.assert_allclose(scores, paper, atol=1e-5, rtol=1e-5)
  one_scale = _numpy_scores(model, variables, images, text, ('head', 'head'))
  assert np.max(np.abs(scores - one_scale)) > 1e-4  # the old single sqrt(d/h) setting differs


def test_cross_branch_of_a_pair_equals_the_stacked_sequence_alone():
  model = _model()
  images, text = _inputs(seed=3)
  variables = model.init(jax.random.key(2), images, text)
  image_rep = model.apply(variables, images, method=model.encode_image)
  text_rep = model.apply(variables, text, method=model.encode_text)

  def alone(module, i, c):
    y = jnp.concatenate([image_rep['regions'][i], text_rep['words'][c, : LENGTHS[c]]])[None]
    yc = mmca_lib.transformer_unit(module.cross_unit(), y, None, module.num_heads)[0]
    i1 = yc[:K].mean(0)
    c1 = mmca_lib.text_cnn(module.text_cnn1(), yc[K:][None], jnp.ones((1, LENGTHS[c]), bool), 'l2')[0]
    return i1 / jnp.linalg.norm(i1) @ c1

  def blocked(module):
    return mmca_lib.cross_block_scores(
      {k: image_rep[k] for k in ('regions', 'q', 'k', 'v')},
      {**{k: text_rep[k] for k in ('words', 'q', 'k', 'v')}, 'valid': text_rep['mask'] > 0},
      module.cross_unit(),
      module.text_cnn1(),
      heads=module.num_heads,
      text_norm='l2',
      attention_scale='head',
    )

  cross = np.asarray(model.apply(variables, method=blocked))
  # One program per caption length (the image index is traced): eagerly, every pair re-dispatched each op.
  alone_fn = jax.jit(functools.partial(model.apply, method=alone), static_argnums=2)
  for i in range(N_IMG):
    for c in range(len(LENGTHS)):
      np.testing.assert_allclose(cross[i, c], alone_fn(variables, i, c), atol=1e-5)


def l2norm(x):
  return x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1e-8)


def concat_softmax_cross_block_scores(
  image: dict,
  text: dict,
  p_cross: dict,
  p_cnn: dict,
  *,
  heads: int,
  text_norm: str,
  attention_scale: str,
) -> jax.Array:
  """The cross branch as first written: one softmax over the concatenated [regions; words] keys of every pair, and
  the unit's W^O, FFN and LayerNorms on the joint sequence Y_c [b, C, k + n, d] (the code runs them per half)."""
  regions, words, valid = image['regions'], text['words'], text['valid']
  b, k, d = regions.shape
  c, n, _ = words.shape
  scale = mmca_lib._scale(image['q'].shape[-1], d, attention_scale)
  key_valid = valid[None, :, None, None, :]  # [1, C, 1, 1, n]
  # Region queries over [regions; words] keys: Q_R K_R^T is per image, Q_R K_E^T per pair.
  rr = jnp.einsum('bkhd,blhd->bhkl', image['q'], image['k']) * scale  # [b, h, k, k]
  re = jnp.einsum('bkhd,cnhd->bchkn', image['q'], text['k']) * scale  # [b, C, h, k, n]
  logits = jnp.concatenate(
    [jnp.broadcast_to(rr[:, None], (b, c) + rr.shape[1:]), jnp.where(key_valid, re, -jnp.inf)], axis=-1
  )
  w = jax.nn.softmax(logits, axis=-1)
  att_r = jnp.einsum('bchkl,blhd->bckhd', w[..., :k], image['v']) + jnp.einsum(
    'bchkn,cnhd->bckhd', w[..., k:], text['v']
  )  # eq 13
  # Word queries: Q_E K_R^T per pair, Q_E K_E^T per caption.
  er = jnp.einsum('cnhd,bkhd->bchnk', text['q'], image['k']) * scale  # [b, C, h, n, k]
  ee = jnp.einsum('cnhd,cmhd->chnm', text['q'], text['k']) * scale  # [C, h, n, n]
  ee = jnp.where(valid[:, None, None, :], ee, -jnp.inf)
  logits = jnp.concatenate([er, jnp.broadcast_to(ee[None], (b,) + ee.shape)], axis=-1)
  w = jax.nn.softmax(logits, axis=-1)
  att_e = jnp.einsum('bchnk,bkhd->bcnhd', w[..., :k], image['v']) + jnp.einsum(
    'bchnm,cmhd->bcnhd', w[..., k:], text['v']
  )  # eq 14
  x = jnp.concatenate(
    [jnp.broadcast_to(regions[:, None], (b, c, k, d)), jnp.broadcast_to(words[None], (b, c, n, d))], axis=2
  )
  attended = jnp.concatenate([att_r, att_e], axis=2).reshape(b, c, k + n, d)
  y = mmca_lib.transformer_finish(p_cross, x, attended)  # Y_c [b, C, k + n, d]
  i1 = l2norm(jnp.mean(y[:, :, :k], axis=2))  # [b, C, d]
  c1 = mmca_lib.text_cnn(
    p_cnn,
    y[:, :, k:].reshape(b * c, n, d),
    jnp.broadcast_to(valid[None], (b, c, n)).reshape(b * c, n),
    text_norm,
  ).reshape(b, c, d)
  return jnp.sum(i1 * c1, axis=-1)


def test_split_softmax_equals_the_concatenated_softmax_in_values_and_gradients():
  """The cross branch scores each key block once per item (own modality) and once per pair (cross), and finishes
  the unit on the region and word halves separately; the first implementation concatenated the blocks of every pair,
  took one softmax and finished the joint sequence. Values and gradients agree."""
  model = _model()
  images, text = _inputs(seed=5)
  variables = model.init(jax.random.key(4), images, text)
  image_rep = model.apply(variables, images, method=model.encode_image)
  text_rep = model.apply(variables, text, method=model.encode_text)
  image = {k: image_rep[k] for k in ('regions', 'q', 'k', 'v')}
  words = {k: text_rep[k] for k in ('words', 'q', 'k', 'v')}
  valid = text_rep['mask'] > 0
  params = variables['params']

  def loss(fn, image, words, p_cross, p_cnn):
    scores = fn(
      image, {**words, 'valid': valid}, p_cross, p_cnn, heads=model.num_heads, text_norm='l2', attention_scale='model'
    )
    return jnp.sum(jnp.sin(3 * scores)), scores

  args = (
    image,
    words,
    model.apply(variables, method=lambda m: m.cross_unit()),
    model.apply(variables, method=lambda m: m.text_cnn1()),
  )
  (value, scores), grads = jax.jit(
    jax.value_and_grad(functools.partial(loss, mmca_lib.cross_block_scores), (0, 1, 2, 3), True)
  )(*args)
  (want_value, want_scores), want_grads = jax.jit(
    jax.value_and_grad(functools.partial(loss, concat_softmax_cross_block_scores), (0, 1, 2, 3), True)
  )(*args)
  del params
  np.testing.assert_allclose(scores, want_scores, atol=1e-6)
  np.testing.assert_allclose(value, want_value, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grads, want_grads)


def windows_text_cnn(p, words, valid, text_norm):
  """Eqs 6-7 as the first implementation computed them: each width's windows concatenated (im2col), one matmul."""
  n = words.shape[1]
  lengths = jnp.sum(valid, axis=-1)
  pooled = []
  for width in (1, 2, 3):
    kernel, bias = p[f'conv{width}']['kernel'], p[f'conv{width}']['bias']
    positions = max(n - width + 1, 0)
    if positions == 0:
      pooled.append(jnp.zeros(words.shape[:1] + kernel.shape[-1:]))
      continue
    windows = jnp.concatenate([words[:, j : j + positions] for j in range(width)], axis=-1)
    p_l = jax.nn.relu(windows @ kernel + bias)
    inside = jnp.arange(positions)[None, :] + width <= lengths[:, None]
    pooled.append(jnp.max(jnp.where(inside[..., None], p_l, 0.0), axis=1))
  sentence = jnp.concatenate(pooled, axis=-1) @ p['fc']['kernel'] + p['fc']['bias']
  return (
    mmca_lib.layer_norm(p['ln'], sentence)
    if text_norm == 'layernorm'
    else sentence / jnp.linalg.norm(sentence, axis=-1, keepdims=True)
  )


@pytest.mark.parametrize('n', [1, 2, 3, 4, 7, 20])
def test_winograd_text_cnn_equals_the_windows_matmul_in_values_and_gradients(n):
  """`text_cnn` runs widths 2 and 3 as Winograd F(2, w) tiles (odd and even output counts, captions shorter than
  a window, padding): the same embeddings and gradients as the windows' matmul, in float32."""
  rng = np.random.default_rng(n)
  dim, filters, batch = 24, 16, 6
  words = jnp.asarray(rng.standard_normal((batch, n, dim)), jnp.float32)
  valid = jnp.asarray(np.arange(n)[None] < rng.integers(1, n + 1, batch)[:, None])
  p = {
    f'conv{w}': {
      'kernel': jnp.asarray(rng.standard_normal((w * dim, filters)) / np.sqrt(w * dim), jnp.float32),
      'bias': jnp.asarray(0.1 * rng.standard_normal(filters), jnp.float32),
    }
    for w in (1, 2, 3)
  }
  p['fc'] = {'kernel': jnp.asarray(rng.standard_normal((3 * filters, dim)) / 5, jnp.float32), 'bias': jnp.zeros(dim)}
  p['ln'] = {'scale': jnp.asarray(1 + 0.1 * rng.standard_normal(dim), jnp.float32), 'bias': jnp.zeros(dim)}
  for text_norm in mmca_lib.TEXT_NORMS:

    def loss(fn, p, words):
      out = fn(p, words, valid, text_norm)
      return jnp.sum(jnp.sin(3 * out)), out

    (value, out), grads = jax.value_and_grad(functools.partial(loss, mmca_lib.text_cnn), (0, 1), True)(p, words)
    (want_value, want), want_grads = jax.value_and_grad(functools.partial(loss, windows_text_cnn), (0, 1), True)(
      p, words
    )
    np.testing.assert_allclose(out, want, atol=1e-6)
    np.testing.assert_allclose(value, want_value, atol=1e-5)  # a sum of 6 x 24 terms
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), grads, want_grads)


def test_extra_padding_changes_nothing():
  model = _model()
  images, text = _inputs()
  _, padded = _inputs(pad_to=N + 4)
  padded['tokens'][:, :N] = text['tokens']
  variables = model.init(jax.random.key(0), images, text)
  np.testing.assert_allclose(model.apply(variables, images, padded), model.apply(variables, images, text), atol=1e-5)


@pytest.mark.slow
def test_blocked_remat_gradients_equal_unblocked_and_bert_gets_none():
  images, text = _inputs()
  variables = _model().init(jax.random.key(0), images, text)

  def grads(model):
    loss = lambda p: jnp.sum(jnp.sin(model.apply({'params': p}, images, text)))
    return jax.jit(jax.grad(loss))(variables['params'])

  unblocked = grads(_model(block_size=100))
  blocked = grads(_model(block_size=2, remat=True))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), unblocked, blocked)
  assert all(float(jnp.max(jnp.abs(g))) == 0 for g in jax.tree.leaves(blocked['bert']))
  assert float(jnp.max(jnp.abs(blocked['cross_unit']['q_kernel']))) > 0


@pytest.mark.parametrize(
  'fields,message',
  [
    ({'embed_size': 18}, 'multiple of num_heads'),
    ({'text_norm': 'batchnorm'}, 'text_norm'),
    ({'self_attention_scale': 'none'}, 'self_attention_scale'),
    ({'cross_attention_scale': 'd'}, 'cross_attention_scale'),
    ({'block_size': 0}, 'block_size'),
  ],
)
def test_bad_fields_are_refused(fields, message):
  with pytest.raises(ValueError, match=message):
    _model(**fields)


def test_tokenizer_and_bert_must_agree():
  with pytest.raises(ValueError, match='tokenizer has 30 tokens but the BERT has 34'):
    build_model({'name': 'mmca', 'bert_dir': TINY_BERT}, vocab_size=30, img_dim=IMG_DIM)


# Sec 4.2 and sec 3.5 of the paper, transcribed: (config path, value). The same on both paper datasets.
PAPER = {
  'batch_size': 64,
  'num_epochs': 20,  # "trained for 20 epochs", "batch-size 64"
  'optim.learning_rate': 2e-4,
  'optim.lr_decay_epochs': 10,
  'optim.lr_decay_factor': 0.1,  # Adam, x0.1 at 10
  'loss.margin': 0.2,
  'loss.max_violation': True,  # m = 0.2, hard negatives only
  'model.embed_size': 256,
  'model.num_heads': 16,
  'model.cnn_filters': 256,  # d = 256 (Tables 4-5), 16 heads
  'model.alpha': 0.2,  # Table 6's best alpha
  'model.self_attention_scale': 'head',
  'model.cross_attention_scale': 'model',  # eq 1 sqrt(d_k), eq 11 sqrt(d)
  'model.projection_bias': False,  # "Q_F = F W_i^Q", "K_Y = Y W^K": no biases
  'eval_metric': 'recall',
}


@pytest.mark.parametrize('dataset', ['f30k', 'coco'])
def test_paper_configs_follow_section_4_2(dataset):
  config = mmca_config.get_config(dataset)
  wrong = config_tables.mismatches(config, PAPER)
  assert not wrong, f'config field: (config, paper): {wrong}'


@pytest.mark.parametrize(
  'variant,changes',
  [
    ('d64', {'model.embed_size': 64, 'model.cnn_filters': 64}),  # eq 7: W_e in R^{d x 3d}: d filters per size
    ('d512', {'model.embed_size': 512, 'model.cnn_filters': 512}),
    ('alpha0.4', {'model.alpha': 0.4}),
  ],
)
def test_variants_change_what_they_name_and_nothing_else(variant, changes):
  assert (
    config_tables.changed_fields(mmca_config.get_config('f30k'), mmca_config.get_config(f'f30k,{variant}')) == changes
  )


def test_workdirs_with_the_single_attention_scale_keep_their_meaning(tmp_path):
  config = mmca_config.get_config('shapes').to_dict()
  del config['model']['self_attention_scale'], config['model']['cross_attention_scale']
  del config['model']['projection_bias']
  config['model']['attention_scale'] = 'head'  # config.json of a run trained before the split
  (tmp_path / 'config.json').write_text(json.dumps(config))
  model = workdirs.load_config(str(tmp_path)).model
  assert (model.self_attention_scale, model.cross_attention_scale) == ('head', 'head')
  assert 'attention_scale' not in model
  assert model.projection_bias  # trained with Q, K, V, W^O biases, as every run saved before the field


def test_workdirs_saved_before_projection_bias_keep_their_biases(tmp_path):
  config = mmca_config.get_config('shapes').to_dict()
  del config['model']['projection_bias']
  (tmp_path / 'config.json').write_text(json.dumps(config))
  assert workdirs.load_config(str(tmp_path)).model.projection_bias
  config['model']['projection_bias'] = False
  (tmp_path / 'config.json').write_text(json.dumps(config))
  assert not workdirs.load_config(str(tmp_path)).model.projection_bias


# ---------------------------------------------------------------- the compiled CPU kernel (xmatch_jax/kernels)
needs_compiler = pytest.mark.skipif(kernels._compiler() is None, reason='no C compiler: MMCA runs on XLA only')


@needs_compiler
@pytest.mark.parametrize('num_heads', [4, 2, 1])  # heads of 4, 8 and 16 dimensions
def test_compiled_attention_matches_numpy_equations(num_heads):
  model = _model(num_heads=num_heads, block_size=3)
  images, text = _inputs(seed=7)
  variables = model.init(jax.random.key(6), images, text)
  assert mmca_lib.uses_kernel(16 // num_heads, N, jnp.float32, 'auto')
  fn = jax.jit(lambda v, i, t: model.apply(v, i, t))
  assert (
    kernels.mmca_attention_targets(16 // num_heads)['MmcaCrossImageMajor']
    in fn.lower(variables, images, text).as_text()
  )
  expected = _numpy_scores(model, variables, images, text)
  np.testing.assert_allclose(fn(variables, images, text), expected, atol=1e-5, rtol=1e-5)


@needs_compiler
@pytest.mark.parametrize('head_dim', [8, 16])
def test_compiled_attention_equals_xla_path_in_values_and_gradients(head_dim):
  # 5 images x 40 captions = 200 pairs per call (several chunks over XLA's threads); 20 regions and 1-27 words, so
  # both query sets span more than one vector of 16 lanes (tails of 4 and 11 queries) and captions have padded
  # keys.
  rng = np.random.default_rng(13)
  b, c, k, n, heads = 5, 40, 20, 27, 3
  lens = rng.integers(1, n + 1, size=c)
  valid = jnp.asarray(np.arange(n)[None] < lens[:, None])
  image = {x: jnp.asarray(rng.normal(size=(b, k, heads, head_dim)), jnp.float32) for x in 'qkv'}
  text = {x: jnp.asarray(rng.normal(size=(c, n, heads, head_dim)), jnp.float32) for x in 'qkv'}
  weights = [jnp.asarray(rng.normal(size=(b, c, m, heads * head_dim)), jnp.float32) for m in (k, n)]
  scale = 0.3
  values, grads = {}, {}
  for impl in ('xla', 'auto'):
    attend = jax.jit(
      lambda image, text, impl=impl: mmca_lib.cross_attention(image, text, valid, scale, jnp.float32, impl)
    )
    assert ('xmatch_MmcaCross' in attend.lower(image, text).as_text()) == (impl == 'auto')
    values[impl] = attend(image, text)

    def total(image, text, impl=impl):
      att_r, att_e = mmca_lib.cross_attention(image, text, valid, scale, jnp.float32, impl)
      return jnp.sum(weights[0] * att_r) + jnp.sum(jnp.where(valid[None, :, :, None], weights[1] * att_e, 0.0))

    # A differentiated call runs XLA's forward and backward (the kernel has no backward pass).
    grad_fn = jax.jit(jax.grad(total, argnums=(0, 1)))
    assert 'xmatch_MmcaCross' not in grad_fn.lower(image, text).as_text()
    grads[impl] = jax.tree_util.tree_leaves(grad_fn(image, text))
  for got, want in zip(values['auto'], values['xla']):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  for got, want in zip(grads['auto'], grads['xla']):
    assert np.abs(want).max() > 0
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_attention_kernel_falls_back_to_xla(monkeypatch, tmp_path, caplog):
  kernels.mmca_attention_targets.cache_clear()
  monkeypatch.setenv('XMATCH_KERNEL_DIR', str(tmp_path))
  try:
    monkeypatch.setenv('CC', 'false')  # found on PATH, fails every build
    with caplog.at_level('WARNING', logger='xmatch_jax.kernels'):
      assert kernels.mmca_attention_targets(8) is None
    assert 'mmca_attention.c kernel unavailable, using XLA' in caplog.text
    assert not list(tmp_path.glob('*.so'))
    kernels.mmca_attention_targets.cache_clear()
    monkeypatch.delenv('CC')
    monkeypatch.setenv('XMATCH_KERNELS', '0')
    assert kernels.mmca_attention_targets(8) is None
    assert not mmca_lib.uses_kernel(8, 20, jnp.float32, 'auto')
    monkeypatch.delenv('XMATCH_KERNELS')
    kernels.mmca_attention_targets.cache_clear()
    # Head sizes the kernel is not built for, more than 256 keys, bfloat16 and 'xla' use XLA whatever the machine has.
    assert kernels.mmca_attention_targets(3) is None and kernels.mmca_attention_targets(128) is None
    assert not mmca_lib.uses_kernel(8, 257, jnp.float32, 'auto')
    assert not mmca_lib.uses_kernel(8, 20, jnp.bfloat16, 'auto') and not mmca_lib.uses_kernel(8, 20, jnp.float32, 'xla')
  finally:
    kernels.mmca_attention_targets.cache_clear()


def test_attention_impl_is_checked():
  with pytest.raises(errors.UserError, match='attention_impl must be one of'):
    _model(attention_impl='c')
