"""The compiled CPU kernels built for AVX2 without AVX-512 (`XMATCH_KERNEL_MARCH=x86-64-v3`): on an AVX-512 machine
the native build never runs the 8-float vector code paths (the lane sums, four vectors per position at 32 channels)."""

import pathlib
import platform

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xmatch_jax import kernels
from xmatch_jax.models import mmca
from xmatch_jax.models import rdan


def _has_avx2() -> bool:
  if platform.machine() not in ('x86_64', 'AMD64') or kernels._compiler() is None:
    return False
  try:
    flags = pathlib.Path('/proc/cpuinfo').read_text().split()
  except OSError:
    return False
  return {'avx2', 'fma', 'bmi2'} <= set(flags)


pytestmark = pytest.mark.skipif(not _has_avx2(), reason='needs an x86-64 CPU with AVX2 and a C compiler')


@pytest.fixture
def avx2_build(monkeypatch, tmp_path):
  monkeypatch.setenv('XMATCH_KERNEL_MARCH', 'x86-64-v3')
  monkeypatch.setenv('XMATCH_KERNEL_DIR', str(tmp_path))
  kernels.relation_cnn_targets.cache_clear()
  kernels.mmca_attention_targets.cache_clear()
  yield tmp_path
  kernels.relation_cnn_targets.cache_clear()
  kernels.mmca_attention_targets.cache_clear()


@pytest.mark.parametrize('channels', [8, 32])
def test_relation_cnn_avx2_build_equals_xla(avx2_build, channels):
  rng = np.random.default_rng(channels)
  b, c, k, n = 3, 11, 7, 13
  params = rdan.RelationCNN(channels=channels, out_channels=2).init(jax.random.key(channels))['params']
  valid = jnp.asarray(np.arange(n)[None] < rng.integers(1, n + 1, size=c)[:, None])
  sim = jnp.asarray(rng.normal(size=(b, c, k, n)), jnp.float32) * valid[None, :, None, :]
  fns = {
    impl: jax.jit(lambda s, impl=impl: rdan.relation_maps(s, valid, params, use_residual=True, conv_impl=impl))
    for impl in ('auto', 'xla')
  }
  targets = kernels.relation_cnn_targets(channels)
  assert targets and list(avx2_build.glob('relation_cnn_*.so'))
  assert targets['RelationCnn'] in fns['auto'].lower(sim).as_text()
  for got, want in zip(fns['auto'](sim), fns['xla'](sim)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  # The backward pass (RelationCnnGrad), dS and the weights.
  cotangent = jnp.asarray(rng.normal(size=(2, b, c, k, n)), jnp.float32)
  mask = valid.astype(jnp.float32)
  grads = {}
  for impl, fn in (
    ('auto', rdan._relation_cnn_kernel),
    ('xla', lambda s, m, p: rdan._relation_cnn_xla(s, m, p, 'float32')),
  ):
    vjp_fn = jax.jit(lambda s, p, fn=fn: jax.vjp(lambda s, p: fn(s, mask, p), s, p)[1](cotangent))
    assert (targets['RelationCnnGrad'] in vjp_fn.lower(sim, params).as_text()) == (impl == 'auto')
    grads[impl] = jax.tree.leaves(vjp_fn(sim, params))
  for got, want in zip(grads['auto'], grads['xla']):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  # The scores of eqs 7-11 (RdanScores): 8-float vectors over words and over regions.
  image = rdan.prepare_items(jnp.asarray(rng.normal(size=(b, k, 16)), jnp.float32))
  text = rdan.prepare_items(jnp.asarray(rng.normal(size=(c, n, 16)), jnp.float32), valid)
  scores = {}
  for impl in ('auto', 'xla'):
    head = jax.jit(
      lambda i, t, impl=impl: rdan.rdan_block_scores(
        i, t, params, lambda_=4.0, mu=0.2, use_residual=True, conv_impl=impl
      )
    )
    assert (targets['RdanScores'] in head.lower(image, text).as_text()) == (impl == 'auto')
    scores[impl] = head(image, text)
  np.testing.assert_allclose(scores['auto'], scores['xla'], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('head_dim', [8, 16])
def test_mmca_attention_avx2_build_equals_xla(avx2_build, head_dim):
  rng = np.random.default_rng(head_dim)
  b, c, k, n, heads = 3, 9, 18, 11, 2
  valid = jnp.asarray(np.arange(n)[None] < rng.integers(1, n + 1, size=c)[:, None])
  image = {x: jnp.asarray(rng.normal(size=(b, k, heads, head_dim)), jnp.float32) for x in 'qkv'}
  text = {x: jnp.asarray(rng.normal(size=(c, n, heads, head_dim)), jnp.float32) for x in 'qkv'}
  fns = {
    impl: jax.jit(lambda i, t, impl=impl: mmca.cross_attention(i, t, valid, 0.3, jnp.float32, impl))
    for impl in ('auto', 'xla')
  }
  target = kernels.mmca_attention_targets(head_dim)['MmcaCrossImageMajor']
  assert list(avx2_build.glob('mmca_attention_*.so'))
  assert target in fns['auto'].lower(image, text).as_text()
  for got, want in zip(fns['auto'](image, text), fns['xla'](image, text)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
