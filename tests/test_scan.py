"""SCAN against a numpy port of the official loop (kuanghuei/SCAN model.py), plus encoder checks."""

import itertools

import config_tables  # pylint: disable=g-bad-import-order (tests/)
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from xmatch_jax.models import build_model
from xmatch_jax.models import model_fields
from xmatch_jax.models.layers import GRUTextEncoder
from xmatch_jax.models.layers import RegionEncoder
from xmatch_jax.models.scan import AGG_FUNCS
from xmatch_jax.models.scan import RAW_FEATURE_NORMS
from xmatch_jax.models.scan import SCAN

N_IMG, K, D = 5, 4, 6
CAP_LENS = [7, 3, 1, 5, 2, 7]
N_WORDS = max(CAP_LENS)


# ---------------------------------------------------------------- numpy port of the official code
def np_l2norm(x, axis, eps=1e-8):
  return x / (np.sqrt(np.sum(x**2, axis=axis, keepdims=True)) + eps)


def np_l1norm(x, axis, eps=1e-8):
  return x / (np.sum(np.abs(x), axis=axis, keepdims=True) + eps)


def np_softmax(x, axis):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def np_leaky_relu(x):
  return np.where(x >= 0, x, 0.1 * x)


def np_func_attention(query, context, raw_feature_norm, smooth):
  """query [B, q, d], context [B, s, d] -> weighted context [B, q, d] (explicit vectors)."""
  attn = context @ query.transpose(0, 2, 1)  # [B, s, q]
  if raw_feature_norm == 'softmax':
    attn = np_softmax(attn, axis=2)
  elif raw_feature_norm == 'l2norm':
    attn = np_l2norm(attn, 2)
  elif raw_feature_norm == 'clipped_l2norm':
    attn = np_l2norm(np_leaky_relu(attn), 2)
  elif raw_feature_norm == 'l1norm':
    attn = np_l1norm(attn, 2)
  elif raw_feature_norm == 'clipped_l1norm':
    attn = np_l1norm(np_leaky_relu(attn), 2)
  elif raw_feature_norm == 'clipped':
    attn = np_leaky_relu(attn)
  elif raw_feature_norm != 'no_norm':
    raise ValueError(raw_feature_norm)
  attn = np_softmax(attn.transpose(0, 2, 1) * smooth, axis=2)  # [B, q, s]
  return attn @ context


def np_cosine(x1, x2, axis, eps=1e-8):
  w12 = np.sum(x1 * x2, axis)
  w1 = np.linalg.norm(x1, axis=axis)
  w2 = np.linalg.norm(x2, axis=axis)
  return w12 / np.maximum(w1 * w2, eps)


def np_aggregate(row_sim, agg_func, lambda_lse):
  if agg_func == 'LogSumExp':
    return np.log(np.exp(row_sim * lambda_lse).sum(axis=1)) / lambda_lse
  if agg_func == 'Max':
    return row_sim.max(axis=1)
  if agg_func == 'Sum':
    return row_sim.sum(axis=1)
  if agg_func == 'Mean':
    return row_sim.mean(axis=1)
  raise ValueError(agg_func)


def np_xattn_scores(
  images, captions, cap_lens, cross_attn, raw_feature_norm, agg_func, lambda_softmax=9.0, lambda_lse=6.0
):
  """xattn_score_t2i / xattn_score_i2t: loop over captions, each truncated to its length."""
  columns = []
  for c, n_word in enumerate(cap_lens):
    cap = np.repeat(captions[c : c + 1, :n_word], images.shape[0], axis=0)
    if cross_attn == 't2i':
      context = np_func_attention(cap, images, raw_feature_norm, lambda_softmax)
      row_sim = np_cosine(cap, context, axis=2)
    else:
      context = np_func_attention(images, cap, raw_feature_norm, lambda_softmax)
      row_sim = np_cosine(images, context, axis=2)
    columns.append(np_aggregate(row_sim, agg_func, lambda_lse))
  return np.stack(columns, axis=1)


# ---------------------------------------------------------------- inputs
def random_reps(seed=0, normalise=True):
  """Image and text reps; padded word positions hold large garbage the model must ignore."""
  rng = np.random.default_rng(seed)
  regions = rng.normal(size=(N_IMG, K, D))
  words = rng.normal(size=(len(CAP_LENS), N_WORDS, D))
  if normalise:
    regions = np_l2norm(regions, -1)
    words = np_l2norm(words, -1)
  mask = np.arange(N_WORDS)[None] < np.asarray(CAP_LENS)[:, None]
  words = np.where(mask[..., None], words, 50.0 * rng.normal(size=words.shape))
  image_rep = {'regions': jnp.asarray(regions, jnp.float32)}
  text_rep = {'words': jnp.asarray(words, jnp.float32), 'mask': jnp.asarray(mask, jnp.float32)}
  return image_rep, text_rep


def reference_scores(image_rep, text_rep, **opts):
  return np_xattn_scores(
    np.asarray(image_rep['regions'], np.float64), np.asarray(text_rep['words'], np.float64), CAP_LENS, **opts
  )


def scan_pair_scores(image_rep, text_rep, **fields):
  model = SCAN(vocab_size=10, img_dim=3, **fields)
  return model.apply({}, image_rep, text_rep, method=model.pair_scores)


# ---------------------------------------------------------------- scores
@pytest.mark.parametrize('cross_attn', ['t2i', 'i2t'])
def test_matches_official_loop_for_every_norm_and_aggregation(cross_attn):
  image_rep, text_rep = random_reps(seed=1)
  for raw_feature_norm, agg_func in itertools.product(RAW_FEATURE_NORMS, AGG_FUNCS):
    opts = dict(cross_attn=cross_attn, raw_feature_norm=raw_feature_norm, agg_func=agg_func)
    got = scan_pair_scores(image_rep, text_rep, block_size=N_IMG, **opts)
    want = reference_scores(image_rep, text_rep, **opts)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=str(opts))


@pytest.mark.parametrize('cross_attn', ['t2i', 'i2t'])
def test_matches_official_loop_unnormalised_features_and_other_temperatures(cross_attn):
  image_rep, text_rep = random_reps(seed=2, normalise=False)
  opts = dict(
    cross_attn=cross_attn, raw_feature_norm='clipped_l2norm', agg_func='LogSumExp', lambda_softmax=4.0, lambda_lse=20.0
  )
  got = scan_pair_scores(image_rep, text_rep, block_size=2, **opts)
  np.testing.assert_allclose(got, reference_scores(image_rep, text_rep, **opts), rtol=1e-5, atol=1e-5)


def _scores_and_grads(image_rep, text_rep, **fields):
  """pair_scores and the gradient of their sum w.r.t. the region and word reps."""

  def total(regions, words):
    scores = scan_pair_scores({'regions': regions}, {'words': words, 'mask': text_rep['mask']}, **fields)
    return jnp.sum(scores), scores

  grad_fn = jax.jit(jax.value_and_grad(total, argnums=(0, 1), has_aux=True))
  (_, scores), grads = grad_fn(image_rep['regions'], text_rep['words'])
  return scores, grads


@pytest.mark.parametrize(
  'cross_attn,raw_feature_norm,agg_func',
  [
    ('t2i', 'clipped_l2norm', 'LogSumExp'),
    ('i2t', 'clipped_l2norm', 'Mean'),
    ('t2i', 'softmax', 'Max'),
  ],
)
def test_blocked_equals_unblocked_values_and_gradients(cross_attn, raw_feature_norm, agg_func):
  image_rep, text_rep = random_reps(seed=3)
  opts = dict(cross_attn=cross_attn, raw_feature_norm=raw_feature_norm, agg_func=agg_func)
  want_scores, want_grads = _scores_and_grads(image_rep, text_rep, block_size=N_IMG, **opts)
  for grad in want_grads:
    assert np.all(np.isfinite(grad))
  # Padded word positions are not part of the score: their gradient is exactly zero.
  padded = ~np.asarray(text_rep['mask'], bool)
  assert np.all(np.asarray(want_grads[1])[padded] == 0)
  # Gradients are O(1); float32 rounding alone moves them by ~4e-6 (checked against float64),
  # and blocking changes the summation order.
  for block_size, remat in [(2, False), (3, True)]:  # neither divides N_IMG = 5
    scores, grads = _scores_and_grads(image_rep, text_rep, block_size=block_size, remat=remat, **opts)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-6, atol=1e-6)
    for grad, want in zip(grads, want_grads):
      np.testing.assert_allclose(grad, want, rtol=1e-5, atol=2e-5)


# ---------------------------------------------------------------- encoders and the whole model
VOCAB, IMG_DIM, EMBED, WORD_DIM = 30, 10, 8, 5


def random_batch(seed, n_img=4, lens=(6, 2, 4), n_tokens=8):
  rng = np.random.default_rng(seed)
  mask = (np.arange(n_tokens)[None] < np.asarray(lens)[:, None]).astype(np.float32)
  tokens = np.where(mask > 0, rng.integers(1, VOCAB, size=mask.shape), 0).astype(np.int32)
  images = {'regions': jnp.asarray(rng.normal(size=(n_img, K, IMG_DIM)), jnp.float32)}
  return images, {'tokens': jnp.asarray(tokens), 'mask': jnp.asarray(mask)}


def test_model_end_to_end_and_pad_tokens_do_not_matter():
  model = SCAN(vocab_size=VOCAB, img_dim=IMG_DIM, embed_size=EMBED, word_dim=WORD_DIM, block_size=3)
  images, text = random_batch(seed=4)
  variables = jax.jit(model.init)(jax.random.key(0), images, text)
  scores = jax.jit(model.apply)(variables, images, text)
  assert scores.shape == (4, 3) and np.all(np.isfinite(scores))

  encode_text = jax.jit(lambda v, t: model.apply(v, t, method=model.encode_text))
  text_rep = encode_text(variables, text)
  image_rep = model.apply(variables, images, method=model.encode_image)
  np.testing.assert_allclose(
    model.apply(variables, image_rep, text_rep, method=model.pair_scores), scores, rtol=1e-6, atol=1e-6
  )
  np.testing.assert_allclose(np.linalg.norm(image_rep['regions'], axis=-1), 1.0, rtol=1e-5)

  mask = np.asarray(text['mask'])
  other_pads = np.where(mask > 0, text['tokens'], np.arange(mask.size).reshape(mask.shape) % VOCAB)
  text_rep2 = encode_text(variables, {'tokens': jnp.asarray(other_pads, jnp.int32), 'mask': text['mask']})
  np.testing.assert_array_equal(text_rep2['words'], text_rep['words'])
  words = np.asarray(text_rep['words'])
  assert np.all(words[mask == 0] == 0)
  np.testing.assert_allclose(np.linalg.norm(words[mask > 0], axis=-1), 1.0, rtol=1e-5)


def test_bidirectional_gru_padded_equals_unpadded():
  encoder = GRUTextEncoder(VOCAB, WORD_DIM, EMBED, num_layers=1, bidirectional=True)
  tokens = jnp.asarray([[5, 9, 2, 7]], jnp.int32)
  variables = jax.jit(encoder.init)(jax.random.key(1), tokens, jnp.ones((1, 4)))
  apply = jax.jit(encoder.apply)
  words, final = apply(variables, tokens, jnp.ones((1, 4)))
  padded = jnp.asarray([[5, 9, 2, 7, 3, 3, 1]], jnp.int32)
  padded_mask = jnp.asarray([[1, 1, 1, 1, 0, 0, 0]], jnp.float32)
  words_p, final_p = apply(variables, padded, padded_mask)
  np.testing.assert_allclose(words_p[:, :4], words, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(final_p, final, rtol=1e-6, atol=1e-6)


def np_gru(x, p):
  """PyTorch nn.GRU equations over one sequence x [T, in]; p holds Flax GRUCell params."""
  sigmoid = lambda v: 1 / (1 + np.exp(-v))
  h = np.zeros(p['hn']['kernel'].shape[0])
  outputs = []
  for x_t in x:
    r = sigmoid(x_t @ p['ir']['kernel'] + p['ir']['bias'] + h @ p['hr']['kernel'])
    z = sigmoid(x_t @ p['iz']['kernel'] + p['iz']['bias'] + h @ p['hz']['kernel'])
    n = np.tanh(x_t @ p['in']['kernel'] + p['in']['bias'] + r * (h @ p['hn']['kernel'] + p['hn']['bias']))
    h = (1 - z) * n + z * h
    outputs.append(h)
  return np.stack(outputs)


# The unidirectional case is checked the same way in test_vsepp.py.
@pytest.mark.parametrize('num_layers,bidirectional', [(1, True), (2, True)])
def test_text_encoder_matches_numpy_pytorch_gru(num_layers, bidirectional):
  encoder = GRUTextEncoder(VOCAB, WORD_DIM, EMBED, num_layers=num_layers, bidirectional=bidirectional)
  _, text = random_batch(seed=5)
  variables = jax.jit(encoder.init)(jax.random.key(2), text['tokens'], text['mask'])
  words, final = jax.jit(encoder.apply)(variables, text['tokens'], text['mask'])
  params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables['params'])
  for c, length in enumerate(np.asarray(text['mask']).sum(-1).astype(int)):
    x = params['embed']['embedding'][np.asarray(text['tokens'][c, :length])]
    for layer in range(num_layers):
      forward = np_gru(x, params[f'forward_{layer}'])
      if bidirectional:
        backward = np_gru(x[::-1], params[f'backward_{layer}'])[::-1]
        x = np.concatenate([forward, backward], axis=-1)
      else:
        x = forward
    if bidirectional:
      out, want_final = (forward + backward) / 2, (forward[-1] + backward[0]) / 2
    else:
      out, want_final = forward, forward[-1]
    np.testing.assert_allclose(words[c, :length], np_l2norm(out, -1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(final[c], want_final, rtol=1e-5, atol=1e-6)


def test_region_encoder_is_linear_then_l2norm():
  encoder = RegionEncoder(EMBED)
  images, _ = random_batch(seed=6)
  variables = jax.jit(encoder.init)(jax.random.key(3), images['regions'])
  fc = jax.tree_util.tree_map(np.asarray, variables['params']['fc'])
  want = np_l2norm(np.asarray(images['regions']) @ fc['kernel'] + fc['bias'], -1)
  np.testing.assert_allclose(encoder.apply(variables, images['regions']), want, rtol=1e-5, atol=1e-6)
  limit = np.sqrt(6.0 / (IMG_DIM + EMBED))
  assert np.abs(fc['kernel']).max() <= limit and np.all(fc['bias'] == 0)


# ---------------------------------------------------------------- registry
def test_build_model_sets_fields():
  config = ml_collections.ConfigDict(
    {'name': 'scan', 'embed_size': 16, 'cross_attn': 'i2t', 'agg_func': 'Mean', 'block_size': 7}
  )
  model = build_model(config, vocab_size=11, img_dim=12)
  assert isinstance(model, SCAN)
  assert (model.vocab_size, model.img_dim, model.embed_size, model.cross_attn, model.agg_func, model.block_size) == (
    11,
    12,
    16,
    'i2t',
    'Mean',
    7,
  )
  assert 'lambda_lse' in model_fields(SCAN) and 'vocab_size' not in model_fields(SCAN)


@pytest.mark.parametrize(
  'config,message',
  [
    ({'name': 'scan', 'embed_sise': 16}, "unknown field 'embed_sise'"),
    ({'name': 'scan', 'vocab_size': 16}, "'vocab_size', which comes from the dataset"),
    (
      {'name': 'sacn'},
      "model config name must be one of ['daer', 'glfn', 'mmca', 'rdan', 'scan', 'vsepp'], got 'sacn'",
    ),
    ({'embed_size': 16}, 'got None'),
    ({'name': 'scan', 'agg_func': 'Median'}, 'SCAN.agg_func must be one of'),
    ({'name': 'scan', 'raw_feature_norm': 'l3norm'}, 'SCAN.raw_feature_norm must be one of'),
    ({'name': 'scan', 'cross_attn': 'both'}, 'SCAN.cross_attn must be one of'),
    ({'name': 'scan', 'block_size': 0}, 'SCAN.block_size must be >= 1'),
  ],
)
def test_build_model_errors(config, message):
  with pytest.raises(ValueError) as error:
    build_model(ml_collections.ConfigDict(config), vocab_size=11, img_dim=12)
  assert message in str(error.value)
  if 'unknown field' in message:
    assert "'scan'" in str(error.value)


# The official README's training arguments (kuanghuei/SCAN, "Arguments used to train ... models", LSE rows) on top
# of train.py's defaults (margin 0.2, batch 128, lr 2e-4, 30 epochs, lr_update 15, grad_clip 2, embed 1024).
OFFICIAL = {
  ('f30k', ''): {
    'model.lambda_softmax': 9.0,
    'model.lambda_lse': 6.0,
    'optim.learning_rate': 2e-4,
    'num_epochs': 30,
    'optim.lr_decay_epochs': 15,
  },
  ('f30k', 'i2t'): {
    'model.lambda_softmax': 4.0,
    'model.lambda_lse': 5.0,
    'optim.learning_rate': 2e-4,
    'num_epochs': 30,
    'optim.lr_decay_epochs': 15,
  },
  ('coco', ''): {
    'model.lambda_softmax': 9.0,
    'model.lambda_lse': 6.0,
    'optim.learning_rate': 5e-4,
    'num_epochs': 20,
    'optim.lr_decay_epochs': 10,
  },
  ('coco', 'i2t'): {
    'model.lambda_softmax': 4.0,
    'model.lambda_lse': 20.0,
    'optim.learning_rate': 5e-4,
    'num_epochs': 20,
    'optim.lr_decay_epochs': 10,
  },
}
COMMON = {
  'loss.margin': 0.2,
  'loss.max_violation': True,
  'batch_size': 128,
  'optim.grad_clip': 2.0,
  'model.embed_size': 1024,
  'model.word_dim': 300,
  'model.bidirectional': True,
  'model.num_layers': 1,
  'model.agg_func': 'LogSumExp',
  'model.raw_feature_norm': 'clipped_l2norm',
}


@pytest.mark.parametrize('dataset,variant', sorted(OFFICIAL))
def test_paper_configs_follow_the_official_arguments(dataset, variant):
  from configs import scan as scan_config  # pylint: disable=g-import-not-at-top

  config = scan_config.get_config(f'{dataset},{variant}' if variant else dataset)
  want = {**COMMON, **OFFICIAL[dataset, variant], 'model.cross_attn': variant or 't2i'}
  wrong = config_tables.mismatches(config, want)
  assert not wrong, f'config field: (config, official): {wrong}'
