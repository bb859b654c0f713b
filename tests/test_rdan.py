"""RDAN against a plain numpy implementation of the paper's eqs 5-11; blocking, padding, configs."""

import functools

import config_tables  # pylint: disable=g-bad-import-order (tests/)
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common as config_common
from configs import rdan as rdan_config
from configs import scan as scan_config
from xmatch_jax import kernels
from xmatch_jax.models import model_fields
from xmatch_jax.models import rdan as rdan_module
from xmatch_jax.models.rdan import RDAN
from xmatch_jax.models.rdan import same_conv

N_IMG, K, D, CHANNELS = 5, 4, 6, 3
CAP_LENS = [7, 3, 1, 5, 2, 7]
N_WORDS = max(CAP_LENS)

# Table 3's ablations that change the scoring head (no-hard is a loss setting).
VARIANTS = {
  'full': {},
  'mu0': {'mu': 0.0},
  'mu1': {'mu': 1.0},
  'one_path': {'one_path': True},
  'no_cnn': {'use_cnn': False},
  'no_res': {'use_residual': False},
}


# ---------------------------------------------------------------- numpy reference, pair by pair
def np_softmax(x, axis):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def np_cosine_rows(x, y):
  """Cosine of x[r] with y[r] for every row r."""
  return np.sum(x * y, axis=1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))


def np_conv_same(x, kernel, bias):
  """Stride-1 cross-correlation of x [H, W, Cin] and kernel [kh, kw, Cin, Cout], 'same' zeros."""
  kh, kw = kernel.shape[:2]
  height, width = x.shape[:2]
  padded = np.pad(x, ((kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  out = np.zeros((height, width, kernel.shape[3])) + bias
  for di in range(kh):
    for dj in range(kw):
      out += padded[di : di + height, dj : dj + width] @ kernel[di, dj]
  return out


def np_rdan_pair(v, e, cnn, lambda_=4.0, mu=0.1, use_cnn=True, use_residual=True, one_path=False):
  """F(I, T) of eqs 5-11 for regions v [k, D] and the caption's real words e [n_c, D].

  Returns (score, alpha [k, n_c], beta [k, n_c]).
  """
  s = (v @ e.T) / np.outer(np.linalg.norm(v, axis=1), np.linalg.norm(e, axis=1))  # eq 5
  if use_cnn:  # eqs 6-7
    x = s[:, :, None]
    for layer in ('conv1', 'conv2', 'conv3'):
      x = np.maximum(np_conv_same(x, cnn[f'{layer}_kernel'], cnn[f'{layer}_bias']), 0.0)
    out = np_conv_same(x, cnn['out_kernel'], cnn['out_bias'])
    assert out.shape[2] == (1 if one_path else 2)
    s1, s2 = out[:, :, 0], out[:, :, -1]
    if use_residual:
      s1, s2 = s1 + s, s2 + s
  else:
    s1 = s2 = s
  alpha = np_softmax(lambda_ * s2, axis=1)  # eq 8: over words, for each region
  a = alpha @ e  # [k, D]
  beta = np_softmax(lambda_ * s1, axis=0)  # eq 9: over regions, for each word
  b = beta.T @ v  # [n_c, D]
  region_relevance = np_cosine_rows(v, a)  # eq 10
  word_relevance = np_cosine_rows(e, b)
  score = (1 - mu) * region_relevance.mean() + mu * word_relevance.mean()  # eq 11
  return score, alpha, beta


def np_rdan_scores(regions, words, cap_lens, cnn, **opts):
  regions, words = np.asarray(regions, np.float64), np.asarray(words, np.float64)
  scores = np.zeros((len(regions), len(cap_lens)))
  for i, v in enumerate(regions):
    for c, n_c in enumerate(cap_lens):
      scores[i, c] = np_rdan_pair(v, words[c, :n_c], cnn, **opts)[0]
  return scores


# ---------------------------------------------------------------- inputs and parameters
def random_reps(seed=0):
  """Unnormalised reps of varied norms; padded word positions hold large garbage to be ignored."""
  rng = np.random.default_rng(seed)
  n = N_WORDS
  regions = rng.normal(size=(N_IMG, K, D)) * rng.uniform(0.3, 3.0, size=(N_IMG, K, 1))
  n_cap = len(CAP_LENS)
  words = rng.normal(size=(n_cap, n, D)) * rng.uniform(0.3, 3.0, size=(n_cap, n, 1))
  mask = np.arange(n)[None] < np.asarray(CAP_LENS)[:, None]
  words = np.where(mask[..., None], words, 50.0 * rng.normal(size=words.shape))
  image_rep = {'regions': jnp.asarray(regions, jnp.float32)}
  text_rep = {'words': jnp.asarray(words, jnp.float32), 'mask': jnp.asarray(mask, jnp.float32)}
  return image_rep, text_rep


def make_model(**fields):
  fields.setdefault('cnn_channels', CHANNELS)
  return RDAN(vocab_size=10, img_dim=3, **fields)


def head_params(model, image_rep, text_rep, seed=0):
  """Relation CNN params of `model`, redrawn ~N(0, 1/fan_in) so that the CNN maps are O(1)."""
  variables = model.init(jax.random.key(seed), image_rep, text_rep, method=model.pair_scores)
  rng = np.random.default_rng(seed + 100)
  params = {}
  for module, leaves in variables.get('params', {}).items():
    params[module] = {}
    for name, leaf in leaves.items():
      fan_in = np.prod(leaf.shape[:3]) if leaf.ndim == 4 else 3.0
      params[module][name] = jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(fan_in), jnp.float32)
  return {'params': params}


def numpy_cnn(variables):
  cnn = variables['params'].get('relation_cnn', {})
  return {name: np.asarray(leaf, np.float64) for name, leaf in cnn.items()}


def reference_opts(model):
  return dict(
    lambda_=model.lambda_, mu=model.mu, use_cnn=model.use_cnn, use_residual=model.use_residual, one_path=model.one_path
  )


# ---------------------------------------------------------------- scores
@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_matches_numpy_equations(variant):
  image_rep, text_rep = random_reps(seed=1)
  model = make_model(block_size=2, **VARIANTS[variant])
  variables = head_params(model, image_rep, text_rep)
  got = jax.jit(lambda v, i, t: model.apply(v, i, t, method=model.pair_scores))(variables, image_rep, text_rep)
  want = np_rdan_scores(
    image_rep['regions'], text_rep['words'], CAP_LENS, numpy_cnn(variables), **reference_opts(model)
  )
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_cnn_and_ablations_change_the_scores():
  """The reference comparison is not vacuous: each variant moves the scores far beyond 1e-5."""
  image_rep, text_rep = random_reps(seed=1)
  scores = {}
  for variant, fields in VARIANTS.items():
    model = make_model(**fields)
    variables = head_params(model, image_rep, text_rep)
    scores[variant] = np.asarray(model.apply(variables, image_rep, text_rep, method=model.pair_scores))
  for variant in VARIANTS:
    if variant != 'full':
      assert np.abs(scores[variant] - scores['full']).max() > 1e-3, variant


def test_other_temperature_and_weight():
  image_rep, text_rep = random_reps(seed=2)
  model = make_model(lambda_=9.0, mu=0.6, block_size=3)
  variables = head_params(model, image_rep, text_rep, seed=1)
  got = model.apply(variables, image_rep, text_rep, method=model.pair_scores)
  want = np_rdan_scores(
    image_rep['regions'], text_rep['words'], CAP_LENS, numpy_cnn(variables), **reference_opts(model)
  )
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('variant', ['full', 'one_path'])
def test_attention_weights_match_numpy(variant):
  image_rep, text_rep = random_reps(seed=3)
  model = make_model(**VARIANTS[variant])
  variables = head_params(model, image_rep, text_rep)
  weights = model.apply(variables, image_rep, text_rep, method=model.attention_weights)
  cnn = numpy_cnn(variables)
  regions = np.asarray(image_rep['regions'], np.float64)
  words = np.asarray(text_rep['words'], np.float64)
  for i in range(N_IMG):
    for c, n_c in enumerate(CAP_LENS):
      _, alpha, beta = np_rdan_pair(regions[i], words[c, :n_c], cnn, **reference_opts(model))
      np.testing.assert_allclose(weights['alpha'][i, c, :, :n_c], alpha, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(weights['beta'][i, c, :, :n_c], beta, rtol=1e-5, atol=1e-6)
      assert np.all(weights['alpha'][i, c, :, n_c:] == 0)


def test_extra_padding_does_not_change_scores():
  image_rep, text_rep = random_reps(seed=4)
  garbage = 50.0 * np.random.default_rng(9).normal(size=(len(CAP_LENS), 5, D))
  text_rep_padded = {
    'words': jnp.concatenate([text_rep['words'], jnp.asarray(garbage, jnp.float32)], axis=1),
    'mask': jnp.pad(text_rep['mask'], ((0, 0), (0, 5))),
  }
  model = make_model(block_size=2)
  variables = head_params(model, image_rep, text_rep)
  scores = model.apply(variables, image_rep, text_rep, method=model.pair_scores)
  padded = model.apply(variables, image_rep, text_rep_padded, method=model.pair_scores)
  np.testing.assert_allclose(padded, scores, rtol=1e-6, atol=1e-6)


def _scores_and_grads(model, variables, image_rep, text_rep):
  """pair_scores and the gradient of a weighted sum w.r.t. the CNN params, regions and words."""
  weights = jnp.asarray(np.random.default_rng(0).normal(size=(N_IMG, len(CAP_LENS))), jnp.float32)

  def total(variables, regions, words):
    scores = model.apply(
      variables, {'regions': regions}, {'words': words, 'mask': text_rep['mask']}, method=model.pair_scores
    )
    return jnp.sum(weights * scores), scores

  grad_fn = jax.jit(jax.value_and_grad(total, argnums=(0, 1, 2), has_aux=True))
  (_, scores), grads = grad_fn(variables, image_rep['regions'], text_rep['words'])
  return scores, grads


def test_blocked_equals_unblocked_values_and_gradients():
  image_rep, text_rep = random_reps(seed=5)
  reference = make_model(block_size=N_IMG)
  variables = head_params(reference, image_rep, text_rep)
  want_scores, want_grads = _scores_and_grads(reference, variables, image_rep, text_rep)
  leaves = jax.tree_util.tree_leaves(want_grads)
  assert all(np.all(np.isfinite(leaf)) for leaf in leaves)
  assert all(np.abs(leaf).max() > 0 for leaf in leaves)
  # Padded word positions are not part of any score: their gradient is exactly zero.
  padded = ~np.asarray(text_rep['mask'], bool)
  assert np.all(np.asarray(want_grads[2])[padded] == 0)
  # Neither 2 nor 3 divides N_IMG = 5: the last block is zero-padded.
  for block_size, remat in [(2, True), (3, False)]:
    model = make_model(block_size=block_size, remat=remat)
    scores, grads = _scores_and_grads(model, variables, image_rep, text_rep)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-6, atol=1e-6)
    for grad, want in zip(jax.tree_util.tree_leaves(grads), leaves):
      np.testing.assert_allclose(grad, want, rtol=1e-5, atol=2e-5)


# ---------------------------------------------------------------- the compiled CPU kernel (xmatch_jax/kernels)
needs_compiler = pytest.mark.skipif(kernels._compiler() is None, reason='no C compiler: RDAN runs on XLA only')


@needs_compiler
@pytest.mark.parametrize('channels', [4, 8, 32])
@pytest.mark.parametrize('variant', ['full', 'one_path', 'no_res', 'mu0', 'mu1'])
def test_compiled_kernel_matches_numpy_equations(variant, channels):
  image_rep, text_rep = random_reps(seed=11)
  model = make_model(block_size=2, cnn_channels=channels, **VARIANTS[variant])
  variables = head_params(model, image_rep, text_rep)
  assert rdan_module.uses_kernel(channels, jnp.float32, 'auto')
  fn = jax.jit(lambda v, i, t: model.apply(v, i, t, method=model.pair_scores))
  assert kernels.relation_cnn_targets(channels)['RdanScores'] in fn.lower(variables, image_rep, text_rep).as_text()
  want = np_rdan_scores(
    image_rep['regions'], text_rep['words'], CAP_LENS, numpy_cnn(variables), **reference_opts(model)
  )
  np.testing.assert_allclose(fn(variables, image_rep, text_rep), want, rtol=1e-5, atol=1e-5)


@needs_compiler
def test_compiled_kernel_equals_xla_path_in_values_and_gradients():
  # 5 images x 40 captions = 200 pairs per unblocked call: several chunks of pairs, split over XLA's threads.
  rng = np.random.default_rng(12)
  lens = rng.integers(1, 10, size=40)
  mask = np.arange(9)[None] < lens[:, None]
  image_rep = {'regions': jnp.asarray(rng.normal(size=(N_IMG, K, D)), jnp.float32)}
  text_rep = {'words': jnp.asarray(rng.normal(size=(40, 9, D)), jnp.float32), 'mask': jnp.asarray(mask, jnp.float32)}
  weights = jnp.asarray(rng.normal(size=(N_IMG, 40)), jnp.float32)
  scores, grads = {}, {}
  for impl in ('xla', 'auto'):
    model = make_model(block_size=N_IMG, cnn_channels=8, conv_impl=impl)
    variables = head_params(model, image_rep, text_rep)

    def total(variables, regions, words, model=model):
      scores = model.apply(
        variables, {'regions': regions}, {'words': words, 'mask': text_rep['mask']}, method=model.pair_scores
      )
      return jnp.sum(weights * scores)

    score_fn = jax.jit(lambda v, i, t, model=model: model.apply(v, i, t, method=model.pair_scores))
    assert ('xmatch_RdanScores' in score_fn.lower(variables, image_rep, text_rep).as_text()) == (impl == 'auto')
    scores[impl] = score_fn(variables, image_rep, text_rep)
    # A differentiated call runs the kernel's maps, forward and backward, and eqs 7-11 on XLA.
    grad_fn = jax.jit(jax.grad(total, argnums=(0, 1, 2)))
    grad_text = grad_fn.lower(variables, image_rep['regions'], text_rep['words']).as_text()
    assert 'xmatch_RdanScores' not in grad_text
    assert ('xmatch_RelationCnnGrad' in grad_text) == (impl == 'auto')
    grads[impl] = jax.tree_util.tree_leaves(grad_fn(variables, image_rep['regions'], text_rep['words']))
  np.testing.assert_allclose(scores['auto'], scores['xla'], rtol=1e-6, atol=1e-6)
  for got, want in zip(grads['auto'], grads['xla']):
    assert np.abs(want).max() > 0
    # Sums over 200 pairs in another order (per chunk of 8 pairs, then over the chunks): to 1e-5 of the largest
    # (the output bias's gradient is 0 up to rounding: a softmax does not change when its logits shift).
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=max(1e-6, 1e-5 * np.abs(want).max()))


def _holey_masks(rng, c: int, n: int) -> jax.Array:
  """[c, n] word masks with padding between real words, trailing padding, one real word last and full rows."""
  valid = rng.uniform(size=(c, n)) < 0.6
  valid[0] = True
  valid[1, 4:] = False
  valid[2] = np.arange(n) % 3 == 0
  valid[3, :] = False
  valid[3, n - 1] = True
  return jnp.asarray(valid)


@needs_compiler
@pytest.mark.parametrize('channels', [8, 16, 64])  # 64: output channels in groups with AVX-512
def test_compiled_kernel_skips_trailing_padding_and_keeps_holes(channels):
  # The kernel computes each pair's maps up to its caption's last real word; masks with padding between real words,
  # an all-padding caption row and full-length captions must still give XLA's maps and scores.
  rng = np.random.default_rng(channels)
  b, c, k, n = 3, 7, 5, 19
  valid = _holey_masks(rng, c, n)
  params = rdan_module.RelationCNN(channels=channels, out_channels=2).init(jax.random.key(channels))['params']
  params = rdan_module.RelationCNN(channels=channels, out_channels=2).apply({'params': params})
  image = rdan_module.prepare_items(jnp.asarray(rng.normal(size=(b, k, D)), jnp.float32))
  text = rdan_module.prepare_items(jnp.asarray(rng.normal(size=(c, n, D)), jnp.float32), valid)
  sim = jnp.einsum('ikd,cnd->ickn', image['unit'], text['unit'])
  maps, scores = {}, {}
  for impl in ('auto', 'xla'):
    maps[impl] = jax.jit(
      lambda s, impl=impl: rdan_module.relation_maps(s, valid, params, use_residual=True, conv_impl=impl)
    )(sim)
    head = functools.partial(rdan_module.rdan_block_scores, lambda_=4.0, mu=0.3, use_residual=True, conv_impl=impl)
    scores[impl] = jax.jit(head)(image, text, params)
  for got, want in zip(maps['auto'], maps['xla']):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  assert np.all(np.isfinite(scores['xla']))
  np.testing.assert_allclose(scores['auto'], scores['xla'], rtol=1e-6, atol=1e-6)


@needs_compiler
@pytest.mark.parametrize('out_channels', [1, 2])
@pytest.mark.parametrize('channels', [8, 16, 64])
def test_compiled_backward_equals_xla_on_padding_and_holes(channels, out_channels):
  # RelationCnnGrad: the maps' vector-Jacobian product (dS and every weight) equals XLA's autodiff of the same
  # convolutions, on 3 x 7 = 21 pairs (three chunks of pairs' weight-gradient sums).
  rng = np.random.default_rng(channels + out_channels)
  b, c, k, n = 3, 7, 5, 19
  valid = _holey_masks(rng, c, n).at[4].set(False)  # and a caption of no word (its maps are still defined)
  module = rdan_module.RelationCNN(channels=channels, out_channels=out_channels)
  params = module.apply({'params': module.init(jax.random.key(channels))['params']})
  sim = jnp.asarray(rng.normal(size=(b, c, k, n)), jnp.float32) * valid[None, :, None, :]
  cotangent = jnp.asarray(rng.normal(size=(out_channels, b, c, k, n)), jnp.float32)
  mask = valid.astype(jnp.float32)
  grads = {}
  for name, fn in (
    ('kernel', rdan_module._relation_cnn_kernel),
    ('xla', lambda s, m, p: rdan_module._relation_cnn_xla(s, m, p, jnp.float32)),
  ):
    vjp_fn = jax.jit(lambda s, p, g, fn=fn: jax.vjp(lambda s, p: fn(s, mask, p), s, p)[1](g))
    text = vjp_fn.lower(sim, params, cotangent).as_text()
    assert ('RelationCnnGrad' in text) == (name == 'kernel')
    grads[name] = vjp_fn(sim, params, cotangent)
  for got, want in zip(jax.tree.leaves(grads['kernel']), jax.tree.leaves(grads['xla'])):
    assert np.abs(want).max() > 0
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@needs_compiler
@pytest.mark.parametrize('variant', ['full', 'one_path', 'no_cnn', 'mu0', 'mu1'])
@pytest.mark.parametrize('conv_impl', ['auto', 'xla'])
def test_paired_scores_equal_each_pair_scored_alone(conv_impl, variant):
  # The training step's rescored pairs: RDAN.paired_scores (one block of P maps) against pair_scores of one image
  # and one caption, vmapped, in values and in gradients (params and both reps).
  rng = np.random.default_rng(21)
  pairs = 11
  valid = _holey_masks(rng, pairs, 9)
  image_rep = {'regions': jnp.asarray(rng.normal(size=(pairs, K, D)), jnp.float32)}
  text_rep = {'words': jnp.asarray(rng.normal(size=(pairs, 9, D)), jnp.float32), 'mask': valid.astype(jnp.float32)}
  model = make_model(cnn_channels=8, conv_impl=conv_impl, **VARIANTS[variant])
  variables = head_params(model, image_rep, text_rep)
  weights = jnp.asarray(rng.normal(size=pairs), jnp.float32)

  def paired(v, regions, words):
    return model.apply(v, {'regions': regions}, {**text_rep, 'words': words}, method=model.paired_scores)

  def alone(v, regions, words):
    def one(r, w, m):
      return model.apply(v, {'regions': r[None]}, {'words': w[None], 'mask': m[None]}, method=model.pair_scores)[0, 0]

    return jax.vmap(one)(regions, words, text_rep['mask'])

  results = {}
  for name, fn in (('paired', paired), ('alone', alone)):
    value_and_grad = jax.jit(jax.value_and_grad(lambda *a, fn=fn: jnp.sum(weights * fn(*a)), argnums=(0, 1, 2)))
    results[name] = (jax.jit(fn)(variables, image_rep['regions'], text_rep['words']),) + value_and_grad(
      variables, image_rep['regions'], text_rep['words']
    )
  if variant != 'no_cnn' and conv_impl == 'auto':
    lowered = jax.jit(jax.grad(lambda *a: jnp.sum(paired(*a)))).lower(
      variables, image_rep['regions'], text_rep['words']
    )
    assert 'RelationCnnGrad' in lowered.as_text()
  assert np.all(np.isfinite(results['alone'][0]))
  for got, want in zip(jax.tree.leaves(results['paired']), jax.tree.leaves(results['alone'])):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_kernel_falls_back_to_xla_without_a_working_compiler(monkeypatch, tmp_path, caplog):
  kernels.relation_cnn_targets.cache_clear()
  monkeypatch.setenv('XMATCH_KERNEL_DIR', str(tmp_path))
  try:
    monkeypatch.setenv('CC', 'false')  # found on PATH, fails every build
    with caplog.at_level('WARNING', logger='xmatch_jax.kernels'):
      assert kernels.relation_cnn_targets(8) is None
    assert 'relation_cnn.c kernel unavailable, using XLA' in caplog.text
    assert not list(tmp_path.glob('*.so'))
    kernels.relation_cnn_targets.cache_clear()
    monkeypatch.setenv('CC', 'no-such-compiler-xmatch')
    assert kernels.relation_cnn_targets(8) is None
    kernels.relation_cnn_targets.cache_clear()
    monkeypatch.delenv('CC')
    monkeypatch.setenv('XMATCH_KERNELS', '0')
    assert kernels.relation_cnn_targets(8) is None
    assert not rdan_module.uses_kernel(8, jnp.float32, 'auto')
    # Channel counts the kernel is not built for, bfloat16 and conv_impl='xla' use XLA whatever the machine has.
    monkeypatch.delenv('XMATCH_KERNELS')
    kernels.relation_cnn_targets.cache_clear()
    assert kernels.relation_cnn_targets(3) is None and kernels.relation_cnn_targets(256) is None
    assert not rdan_module.uses_kernel(8, jnp.bfloat16, 'auto') and not rdan_module.uses_kernel(8, jnp.float32, 'xla')
  finally:
    kernels.relation_cnn_targets.cache_clear()


def _conv_without_bias(x, kernel):
  return rdan_module._conv(x, kernel, jnp.zeros(kernel.shape[-1]))


@pytest.mark.parametrize('conv', [same_conv, _conv_without_bias], ids=['same_conv', 'relation_layer'])
@pytest.mark.parametrize('kernel_shape', [(3, 1, 1, 4), (3, 3, 1, 4), (1, 3, 4, 4), (3, 3, 4, 4), (1, 1, 4, 2)])
def test_conv_backward_equals_autodiff_of_lax_conv(conv, kernel_shape):
  # The relation layers' single-input-channel path is a sum of shifted maps, not a convolution.
  rng = np.random.default_rng(10)
  x = jnp.asarray(rng.normal(size=(6, 5, 7, kernel_shape[2])), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=kernel_shape), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=(6, 5, 7, kernel_shape[3])), jnp.float32)

  def lax_conv(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  got_out, got_vjp = jax.vjp(conv, x, kernel)
  want_out, want_vjp = jax.vjp(lax_conv, x, kernel)
  np.testing.assert_allclose(got_out, want_out, rtol=1e-6, atol=1e-6)
  for got, want in zip(got_vjp(cotangent), want_vjp(cotangent)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the whole model
VOCAB, IMG_DIM, EMBED, WORD_DIM = 30, 10, 8, 5


def random_batch(seed, n_img=4, lens=(6, 2, 4), n_tokens=8):
  rng = np.random.default_rng(seed)
  mask = (np.arange(n_tokens)[None] < np.asarray(lens)[:, None]).astype(np.float32)
  tokens = np.where(mask > 0, rng.integers(1, VOCAB, size=mask.shape), 0).astype(np.int32)
  images = {'regions': jnp.asarray(rng.normal(size=(n_img, K, IMG_DIM)), jnp.float32)}
  return images, {'tokens': jnp.asarray(tokens), 'mask': jnp.asarray(mask)}


def _encode_then_score(model, variables, images, text):
  image_rep = model.apply(variables, images, method=model.encode_image)
  text_rep = model.apply(variables, text, method=model.encode_text)
  scores = model.apply(variables, image_rep, text_rep, method=model.pair_scores)
  return image_rep, text_rep, scores


def test_model_end_to_end_gradients_and_pad_tokens():
  model = RDAN(
    vocab_size=VOCAB,
    img_dim=IMG_DIM,
    embed_size=EMBED,
    word_dim=WORD_DIM,
    cnn_channels=CHANNELS,
    block_size=3,
    remat=True,
  )
  images, text = random_batch(seed=6)
  variables = jax.jit(model.init)(jax.random.key(0), images, text)
  assert set(variables['params']) == {'image_encoder', 'text_encoder', 'relation_cnn'}

  def loss(variables):
    image_rep, _, scores = _encode_then_score(model, variables, images, text)
    hinge = jnp.maximum(0.2 + scores - jnp.diagonal(scores[:3])[None], 0)
    return jnp.sum(hinge), (scores, image_rep)

  (_, (scores, image_rep)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables)
  assert scores.shape == (4, 3) and np.all(np.isfinite(scores))
  for path, grad in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(grad)), path
  for module in ('image_encoder', 'text_encoder', 'relation_cnn'):
    assert max(np.abs(g).max() for g in jax.tree_util.tree_leaves(grads['params'][module])) > 0

  # Eq 1 is a plain linear map: the paper does not l2-normalise the region features.
  fc = variables['params']['image_encoder']['fc']
  np.testing.assert_allclose(
    image_rep['regions'], np.asarray(images['regions']) @ fc['kernel'] + fc['bias'], rtol=1e-5, atol=1e-6
  )

  # Other pad token ids and extra pad positions do not change the scores.
  mask = np.asarray(text['mask'])
  longer_mask = np.pad(mask, ((0, 0), (0, 4)))
  other_pads = np.where(
    longer_mask > 0,
    np.pad(text['tokens'], ((0, 0), (0, 4))),
    np.arange(longer_mask.size).reshape(longer_mask.shape) % VOCAB,
  )
  scores_padded = jax.jit(model.apply)(
    variables, images, {'tokens': jnp.asarray(other_pads, jnp.int32), 'mask': jnp.asarray(longer_mask)}
  )
  np.testing.assert_allclose(scores_padded, scores, rtol=1e-6, atol=1e-6)


def test_shapes_warms_up_like_scan_and_the_paper_configs_do_not():
  for dataset in ('f30k', 'coco', 'shapes_tiny'):
    assert rdan_config.get_config(dataset).optim.warmup_steps == 0, dataset
  assert (
    rdan_config.get_config('shapes').optim.warmup_steps == scan_config.get_config('shapes').optim.warmup_steps == 100
  )


def test_l2norm_features_normalises_both_modalities():
  model = RDAN(
    vocab_size=VOCAB, img_dim=IMG_DIM, embed_size=EMBED, word_dim=WORD_DIM, cnn_channels=CHANNELS, l2norm_features=True
  )
  images, text = random_batch(seed=7)
  encode_both = lambda m, i, t: (m.encode_image(i)['regions'], m.encode_text(t)['words'])
  (regions, words), _ = jax.jit(functools.partial(model.init_with_output, method=encode_both))(
    jax.random.key(1), images, text
  )
  np.testing.assert_allclose(np.linalg.norm(regions, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(words[np.asarray(text['mask']) > 0], axis=-1), 1.0, rtol=1e-5)


def test_relation_cnn_shapes_and_pytorch_init():
  model = make_model(cnn_channels=5)
  image_rep, text_rep = random_reps(seed=8)
  cnn = model.init(jax.random.key(2), image_rep, text_rep, method=model.pair_scores)['params']['relation_cnn']
  shapes = {name: leaf.shape for name, leaf in cnn.items()}
  assert shapes == {
    'conv1_kernel': (3, 1, 1, 5),
    'conv1_bias': (5,),
    'conv2_kernel': (1, 3, 5, 5),
    'conv2_bias': (5,),
    'conv3_kernel': (3, 3, 5, 5),
    'conv3_bias': (5,),
    'out_kernel': (1, 1, 5, 2),
    'out_bias': (2,),
  }
  for layer, fan_in in (('conv1', 3), ('conv2', 15), ('conv3', 45), ('out', 5)):
    for part in ('kernel', 'bias'):
      assert np.abs(cnn[f'{layer}_{part}']).max() <= fan_in**-0.5
  one_path = make_model(one_path=True).init(jax.random.key(2), image_rep, text_rep, method=RDAN.pair_scores)
  assert one_path['params']['relation_cnn']['out_kernel'].shape == (1, 1, CHANNELS, 1)
  assert 'params' not in make_model(use_cnn=False).init(jax.random.key(2), image_rep, text_rep, method=RDAN.pair_scores)


@pytest.mark.parametrize(
  'fields,message',
  [
    ({'mu': 1.5}, 'RDAN.mu must be in [0, 1]'),
    ({'cnn_channels': 0}, 'RDAN.cnn_channels must be >= 1'),
    ({'block_size': 0}, 'RDAN.block_size must be >= 1'),
    ({'conv_impl': 'cuda'}, "RDAN.conv_impl must be one of ('auto', 'xla')"),
    ({'use_cnn': False, 'one_path': True}, 'RDAN.use_cnn=False'),
    ({'use_cnn': False, 'use_residual': False}, 'RDAN.use_cnn=False'),
  ],
)
def test_bad_fields_raise(fields, message):
  with pytest.raises(
    ValueError, match=message.replace('[', r'\[').replace(']', r'\]').replace('(', r'\(').replace(')', r'\)')
  ):
    make_model(**fields)


# ---------------------------------------------------------------- configs
@pytest.mark.parametrize('dataset', config_common.DATASETS)
@pytest.mark.parametrize('variant', [None, 'mu0', 'mu1', 'one_path', 'no_cnn', 'no_res', 'no_hard'])
def test_config_builds_a_valid_model(dataset, variant):
  config = rdan_config.get_config(dataset if variant is None else f'{dataset},{variant}')
  fields = config.model.to_dict()
  assert fields.pop('name') == 'rdan'
  assert set(fields) <= set(model_fields(RDAN))
  model = RDAN(vocab_size=10, img_dim=3, **fields)
  assert config.loss.max_violation == (variant != 'no_hard')
  assert model.mu == {'mu0': 0.0, 'mu1': 1.0}.get(variant, 0.1)
  assert model.one_path == (variant == 'one_path')
  assert model.use_cnn == (variant != 'no_cnn')
  assert model.use_residual == (variant != 'no_res')
  if dataset in config_common.PAPER_DATASETS:
    assert (model.embed_size, model.word_dim, model.lambda_, model.cnn_channels) == (1024, 300, 4.0, 32)
    assert (config.loss.margin, model.l2norm_features) == (0.2, False)


def test_config_rejects_unknown_variant():
  with pytest.raises(ValueError, match='unknown variant'):
    rdan_config.get_config('f30k,no_gru')


# Sec 3.1, 3.2 and 3.5 of the paper, transcribed. It gives no optimiser, schedule or batch size: those follow SCAN
# (docs/fidelity.md, RDAN-2) and are not checked here.
PAPER = {
  'model.embed_size': 1024,
  'model.word_dim': 300,
  'model.bidirectional': True,
  'model.cnn_channels': 32,
  'model.mu': 0.1,
  'model.lambda_': 4.0,
  'loss.margin': 0.2,
  'loss.max_violation': True,
  'model.use_cnn': True,
  'model.use_residual': True,
  'model.one_path': False,
}


@pytest.mark.parametrize('dataset', ['f30k', 'coco'])
def test_paper_configs_follow_section_3_5(dataset):
  config = rdan_config.get_config(dataset)
  wrong = config_tables.mismatches(config, PAPER)
  assert not wrong, f'config field: (config, paper): {wrong}'


@pytest.mark.parametrize(
  'variant,changes',
  [
    ('mu0', {'model.mu': 0.0}),
    ('mu1', {'model.mu': 1.0}),
    ('one_path', {'model.one_path': True}),
    ('no_cnn', {'model.use_cnn': False}),
    ('no_res', {'model.use_residual': False}),
    ('no_hard', {'loss.max_violation': False}),
  ],
)
def test_table_3_variants_change_what_they_name_and_nothing_else(variant, changes):
  assert (
    config_tables.changed_fields(rdan_config.get_config('f30k'), rdan_config.get_config(f'f30k,{variant}')) == changes
  )
