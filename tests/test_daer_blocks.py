"""DAER's blocks against plain numpy implementations of eqs 1-10 with the same weights, and the signed power's
gradient (finite everywhere, 0 at 0)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xmatch_jax.models import daer


def np_dense(p, x):
  return x @ p['kernel'] + (p['bias'] if 'bias' in p else 0)


def np_sigmoid(x):
  return 1 / (1 + np.exp(-x))


def test_dual_region_attention_equals_numpy_eqs_1_to_3():
  rng = np.random.default_rng(0)
  lengths = [7, 4, 1]
  x = rng.normal(size=(3, 7, 5)).astype(np.float32)
  valid = np.arange(7)[None] < np.array(lengths)[:, None]
  module = daer.DualRegionAttention(hidden=(6, 8, 6))
  variables = module.init(jax.random.key(0), x, valid)
  got = np.asarray(module.apply(variables, x, valid))
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables['params'])

  def f(h):
    for name in ('mlp_0', 'mlp_1', 'mlp_2'):
      h = np.maximum(np_dense(p[name], h), 0)
    return np_dense(p['mlp_out'], h)

  for q, n in enumerate(lengths):
    xq = x[q, :n].astype(np.float64)
    weights = []
    for window, w in ((3, 'w0'), (7, 'w1')):
      avg = np.stack([xq[max(0, j - window // 2) : j + window // 2 + 1].mean(0) for j in range(n)])
      mx = np.stack([xq[max(0, j - window // 2) : j + window // 2 + 1].max(0) for j in range(n)])
      weights.append(np_sigmoid(f(np_dense(p[w], avg) + np_dense(p[w], mx))))  # eqs 1-2
    np.testing.assert_allclose(got[q, :n], weights[0] * weights[1] * xq, atol=1e-5)  # eq 3
    assert (got[q, n:] == 0).all()


def test_dual_spatial_attention_equals_numpy_eqs_4_to_6():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 9, 8, 4)).astype(np.float32)
  module = daer.DualSpatialAttention()
  variables = module.init(jax.random.key(0), x)
  got = np.asarray(module.apply(variables, x))
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables['params'])
  pooled = np.concatenate([x.mean(-1, keepdims=True), x.max(-1, keepdims=True)], -1).astype(np.float64)

  def conv(kernel, bias):  # 'same' cross-correlation, explicit loops
    size = kernel.shape[0]
    padded = np.pad(pooled, ((0, 0), (size // 2,) * 2, (size // 2,) * 2, (0, 0)))
    out = np.zeros(pooled.shape[:3])
    for i in range(pooled.shape[1]):
      for j in range(pooled.shape[2]):
        out[:, i, j] = np.einsum('bhwc,hwc->b', padded[:, i : i + size, j : j + size], kernel[..., 0]) + bias[0]
    return out[..., None]

  small = np_sigmoid(conv(p['conv_small']['kernel'], p['conv_small']['bias']))  # eq 4
  large = np_sigmoid(conv(p['conv_large']['kernel'], p['conv_large']['bias']))  # eq 5
  np.testing.assert_allclose(got, small * large * x, atol=1e-5)  # eq 6


def test_relation_network_equals_numpy_mlp_on_every_concatenated_pair():
  rng = np.random.default_rng(2)
  text, image = rng.normal(size=(4, 6)).astype(np.float32), rng.normal(size=(3, 5)).astype(np.float32)
  text[0, 0] = 0.0
  module = daer.RelationNetwork(hidden=(7, 5))
  variables = module.init(jax.random.key(0), text, image)
  got = np.asarray(module.apply(variables, text, image))
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables['params'])
  w0 = np.concatenate([p['fc0_text']['kernel'], p['fc0_image']['kernel']])  # the first layer of eq 10
  for q in range(4):
    for i in range(3):
      r = np.concatenate([text[q], image[i]]).astype(np.float64)  # eq 7
      r = np.sign(r) * np.abs(r) ** 0.6  # eqs 8-9
      h = np.maximum(r @ w0 + p['fc0_text']['bias'], 0)
      h = np.maximum(np_dense(p['fc1'], h), 0)
      np.testing.assert_allclose(got[q, i], np_sigmoid(np_dense(p['out'], h))[0], atol=1e-6)


def test_signed_power_values_and_gradient():
  x = np.array([-8.0, -1e-3, 0.0, 1e-3, 2.0], np.float32)
  np.testing.assert_allclose(daer.signed_power(x, 0.6), np.sign(x) * np.abs(x) ** 0.6, rtol=1e-6)
  grad = np.asarray(jax.vmap(jax.grad(lambda v: daer.signed_power(v, 0.6)))(jnp.asarray(x)))
  assert np.isfinite(grad).all() and grad[2] == 0
  np.testing.assert_allclose(grad[[0, 1, 3, 4]], 0.6 * np.abs(x[[0, 1, 3, 4]]) ** -0.4, rtol=1e-5)
  eps = 1e-3  # central differences away from 0
  np.testing.assert_allclose(
    grad[4], (daer.signed_power(2 + eps, 0.6) - daer.signed_power(2 - eps, 0.6)) / (2 * eps), rtol=1e-3
  )


def test_relation_loss_is_squared_frobenius_to_the_category_matrix():
  sims = jnp.array([[0.9, 0.2], [0.1, 0.7], [0.5, 0.5]])
  loss = daer.relation_loss(sims, jnp.array([1, 2, 1]), jnp.array([1, 2]))
  target = np.array([[1, 0], [0, 1], [1, 0]])
  assert float(loss) == pytest.approx(float(np.sum((target - np.asarray(sims)) ** 2)))
