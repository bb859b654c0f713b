"""Mixed precision (config.model.dtype = 'bfloat16') against float32: scores, rankings, gradients, a train step.

Random inputs, 6 images x 9 captions, k=12 regions, n=10 tokens, D=64, same float32 params. Max |bf16 - f32| score
measured over seeds 0-3 (SCAN t2i: 0-15): VSE++ 1.5e-3, SCAN t2i 3.1e-2 (median 4e-3), SCAN i2t 4e-4, RDAN 4.7e-4,
MMCA 1.2e-3. SCAN t2i is the outlier because clipped_l2norm rescales a region's near-zero similarities to all words
to unit norm: its float32 scores move as much (2e-2) when the float32 encoder outputs are perturbed by 2^-9.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mmca as mmca_config
from configs import rdan as rdan_config
from configs import scan as scan_config
from configs import vsepp as vsepp_config
from xmatch_jax import losses
from xmatch_jax.models import build_model
from xmatch_jax.trainers import contrastive
from xmatch_jax.trainers import optim

N_IMG, N_CAP, K, N, D, IMG_DIM, VOCAB = 6, 9, 12, 10, 64, 32, 50
TINY_BERT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'tiny_bert')
TINY_BERT_VOCAB = 34

# name -> (model config, tolerance on max |bf16 score - float32 score|).
CASES = {
  'vsepp': ({'name': 'vsepp', 'word_dim': 32}, 5e-3),
  'scan_t2i': ({'name': 'scan', 'word_dim': 32, 'block_size': 4, 'remat': True}, 5e-2),
  'scan_i2t': ({'name': 'scan', 'word_dim': 32, 'cross_attn': 'i2t', 'lambda_softmax': 4.0, 'lambda_lse': 5.0}, 2e-3),
  'rdan': ({'name': 'rdan', 'word_dim': 32, 'cnn_channels': 8, 'block_size': 4, 'remat': True}, 2e-3),
  'mmca': ({'name': 'mmca', 'bert_dir': TINY_BERT, 'num_heads': 4, 'cnn_filters': 32, 'block_size': 4}, 5e-3),
}


def _models(name):
  config, _ = CASES[name]
  vocab = TINY_BERT_VOCAB if config['name'] == 'mmca' else VOCAB
  return tuple(
    build_model({**config, 'embed_size': D, 'dtype': dtype}, vocab_size=vocab, img_dim=IMG_DIM)
    for dtype in ('float32', 'bfloat16')
  )


def _inputs(seed, vocab, n_img=N_IMG, n_cap=N_CAP):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(3, N + 1, n_cap)
  mask = (np.arange(N)[None] < lengths[:, None]).astype(np.float32)
  return (
    {'regions': rng.standard_normal((n_img, K, IMG_DIM)).astype(np.float32)},
    {'tokens': (rng.integers(5, vocab, (n_cap, N)) * mask).astype(np.int32), 'mask': mask},
  )


def _params(model, seed):
  """`model.init`'s params for `jax.random.key(seed)`. They depend on the key, not on the inputs: init runs on the
  shapes of `_inputs(0, ...)` in every test, so its eager ops compile once per model."""
  return model.init(jax.random.key(seed), *_inputs(0, model.vocab_size))['params']


def _ranks(x):
  return np.argsort(np.argsort(x, axis=-1), axis=-1).astype(np.float64)


def _spearman_rows(a, b):
  """Spearman correlation of each row of a with the same row of b (no ties in float scores)."""
  ra, rb = _ranks(a), _ranks(b)
  ra, rb = ra - ra.mean(-1, keepdims=True), rb - rb.mean(-1, keepdims=True)
  return np.sum(ra * rb, -1) / np.sqrt(np.sum(ra**2, -1) * np.sum(rb**2, -1))


@pytest.mark.parametrize('name', list(CASES))
def test_bf16_scores_within_tolerance_of_float32(name):
  f32, bf16 = _models(name)
  images, text = _inputs(0, f32.vocab_size)
  variables = f32.init(jax.random.key(0), images, text)
  bf16_variables = bf16.init(jax.random.key(0), images, text)
  jax.tree.map(np.testing.assert_array_equal, variables, bf16_variables)  # params do not depend on dtype
  assert {leaf.dtype for leaf in jax.tree.leaves(bf16_variables)} == {jnp.dtype(jnp.float32)}

  want = np.asarray(jax.jit(f32.apply)(variables, images, text))
  got = jax.jit(bf16.apply)(variables, images, text)
  assert got.dtype == jnp.float32 and got.shape == (N_IMG, N_CAP)
  got = np.asarray(got)
  diff = np.max(np.abs(got - want))
  assert 0 < diff < CASES[name][1], diff  # 0 would mean bfloat16 was never used
  assert np.mean(_spearman_rows(want, got)) >= 0.95  # each image's ranking of the captions


@pytest.mark.parametrize('name', list(CASES))
def test_bf16_gradients_finite_float32_and_aligned(name):
  f32, bf16 = _models(name)
  images, text = _inputs(1, f32.vocab_size, n_cap=N_IMG)  # square: one caption per image
  params = _params(f32, 1)

  def grads(model):
    loss = lambda p: losses.contrastive_loss(model.apply({'params': p}, images, text), 0.2, True)
    return jax.jit(jax.grad(loss))(params)

  want, got = grads(f32), grads(bf16)
  assert {leaf.dtype for leaf in jax.tree.leaves(got)} == {jnp.dtype(jnp.float32)}
  flat = lambda tree: np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(tree)])
  want, got = flat(want), flat(got)
  assert np.all(np.isfinite(got)) and np.any(got != 0)
  # Measured cosine: SCAN t2i 0.995, the others >= 0.9997.
  assert want @ got / (np.linalg.norm(want) * np.linalg.norm(got)) > 0.98


@pytest.mark.parametrize(
  'module', [vsepp_config, scan_config, rdan_config, mmca_config], ids=lambda m: m.__name__.split('.')[-1]
)
def test_bf16_train_step_from_config_keeps_params_float32(module):
  config = module.get_config('shapes_tiny')
  config.model.dtype = 'bfloat16'
  config.model.embed_size = D
  if 'block_size' in config.model:
    config.model.block_size = 4
  if config.model.name == 'mmca':
    config.model.bert_dir = TINY_BERT
    config.model.cnn_filters = 32
    config.model.num_heads = 4
  else:
    config.model.word_dim = 32
  vocab = TINY_BERT_VOCAB if config.model.name == 'mmca' else VOCAB
  model = build_model(config.model, vocab_size=vocab, img_dim=IMG_DIM)
  assert model.dtype == 'bfloat16'
  images, text = _inputs(2, vocab, n_cap=N_IMG)
  batch = {'images': images, 'text': text, 'image_ids': np.arange(N_IMG, dtype=np.int32)}
  params = _params(model, 2)
  tx, schedule = optim.make_optimizer(config.optim, steps_per_epoch=10)
  tx = optim.freeze(tx, params, model.frozen_params)
  state = {'params': params, 'opt_state': tx.init(params), 'step': jnp.zeros((), jnp.int32)}
  step = jax.jit(functools.partial(contrastive.train_step, model=model, tx=tx, schedule=schedule, loss_cfg=config.loss))
  new_state, metrics = step(state, batch)
  assert np.isfinite(float(metrics['loss'])) and np.isfinite(float(metrics['grad_norm']))
  assert float(metrics['grad_norm']) > 0
  for tree in (new_state['params'], new_state['opt_state']):
    floats = [leaf for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.floating)]
    assert {leaf.dtype for leaf in floats} == {jnp.dtype(jnp.float32)}
    assert all(np.all(np.isfinite(leaf)) for leaf in floats)
  changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), params, new_state['params'])
  assert any(jax.tree.leaves(changed))


@pytest.mark.parametrize('model_name', ['vsepp', 'scan', 'rdan', 'mmca'])
def test_unknown_dtype_names_the_config_field_and_choices(model_name):
  config = {'name': model_name, 'dtype': 'float16'}
  if model_name == 'mmca':
    config['bert_dir'] = TINY_BERT
  with pytest.raises(
    ValueError,
    match=r'config\.model\.dtype \(\w+\.dtype\) must be one of '
    r"\('float32', 'bfloat16'\), got 'float16'",
  ):
    build_model(config, vocab_size=TINY_BERT_VOCAB, img_dim=IMG_DIM)


@pytest.mark.parametrize(
  'module', [vsepp_config, scan_config, rdan_config, mmca_config], ids=lambda m: m.__name__.split('.')[-1]
)
def test_configs_default_to_float32(module):
  assert module.get_config('f30k').model.dtype == 'float32'
