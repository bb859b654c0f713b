"""Blocked all-pairs scoring and the batch-wide similarity helpers against direct numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xmatch_jax import pairwise

N_IMG, N_TXT = 7, 5


def head(image_rep, text_rep):
  """A nonlinear head of a pytree image rep; rows depend only on their own image."""
  a = jnp.tanh(image_rep['a'] @ text_rep['t'].T)  # [b, C]
  b = jnp.sum(image_rep['b'], axis=(1, 2))[:, None] * text_rep['s']  # [b, C]
  return a * b + jnp.sin(a)


def reps(seed=0):
  rng = np.random.default_rng(seed)
  image_rep = {
    'a': jnp.asarray(rng.normal(size=(N_IMG, 3)), jnp.float32),
    'b': jnp.asarray(rng.normal(size=(N_IMG, 2, 4)), jnp.float32),
  }
  text_rep = {
    't': jnp.asarray(rng.normal(size=(N_TXT, 3)), jnp.float32),
    's': jnp.asarray(rng.normal(size=(N_TXT,)), jnp.float32),
  }
  return image_rep, text_rep


def test_blocked_scores_equal_direct_scores():
  image_rep, text_rep = reps()
  want = head(image_rep, text_rep)
  for block_size in (1, 2, 3, 4, 6, 7, 100):
    for remat in (False, True):
      got = pairwise.score_in_blocks(head, image_rep, text_rep, block_size, remat=remat)
      assert got.shape == (N_IMG, N_TXT)
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_blocked_gradients_equal_direct_gradients():
  image_rep, text_rep = reps(seed=1)
  weights = jnp.asarray(np.random.default_rng(2).normal(size=(N_IMG, N_TXT)), jnp.float32)

  def loss(image_rep, text_rep, block_size, remat):
    return jnp.sum(weights * pairwise.score_in_blocks(head, image_rep, text_rep, block_size, remat=remat))

  grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=(2, 3))
  want = grad(image_rep, text_rep, N_IMG, False)
  for block_size, remat in ((1, True), (3, False), (3, True), (4, True)):
    got = grad(image_rep, text_rep, block_size, remat)
    jax.tree_util.tree_map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6), got, want)


def test_single_call_when_block_covers_all_images():
  image_rep, text_rep = reps()
  calls = []

  def counting_head(image_block, text):
    calls.append(image_block['a'].shape[0])
    return head(image_block, text)

  pairwise.score_in_blocks(counting_head, image_rep, text_rep, N_IMG)
  pairwise.score_in_blocks(counting_head, image_rep, text_rep, N_IMG + 3)
  assert calls == [N_IMG, N_IMG]
  calls.clear()
  pairwise.score_in_blocks(counting_head, image_rep, text_rep, 3)
  assert calls == [3]  # traced once by lax.map, on blocks of 3 images


def test_pytree_outputs_are_blocked_too():
  image_rep, text_rep = reps()
  two = lambda i, t: {'x': head(i, t), 'y': i['a'][:, :1] + t['s'][None]}
  got = pairwise.score_in_blocks(two, image_rep, text_rep, 2)
  want = two(image_rep, text_rep)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('block_size', [0, -3])
def test_block_size_must_be_positive(block_size):
  image_rep, text_rep = reps()
  with pytest.raises(ValueError, match='block_size must be >= 1'):
    pairwise.score_in_blocks(head, image_rep, text_rep, block_size)


def test_image_leaves_must_share_leading_dim():
  image_rep, text_rep = reps()
  image_rep['b'] = image_rep['b'][:-1]
  with pytest.raises(ValueError, match='leading'):
    pairwise.score_in_blocks(head, image_rep, text_rep, 2)


def test_similarity_gram_and_attended_norms_match_explicit_vectors():
  rng = np.random.default_rng(3)
  n_img, n_txt, k, n, d = 3, 4, 5, 6, 8
  regions = rng.normal(size=(n_img, k, d))
  words = rng.normal(size=(n_txt, n, d))
  weights = rng.uniform(size=(n_img, n_txt, k, n))
  f32 = lambda x: jnp.asarray(x, jnp.float32)

  sim = pairwise.region_word_similarity(f32(regions), f32(words))
  want_sim = np.array(
    [[[[regions[i, r] @ words[c, j] for j in range(n)] for r in range(k)] for c in range(n_txt)] for i in range(n_img)]
  )
  np.testing.assert_allclose(sim, want_sim, rtol=1e-5, atol=1e-5)

  region_gram = pairwise.gram(f32(regions))
  word_gram = pairwise.gram(f32(words))
  np.testing.assert_allclose(region_gram, [v @ v.T for v in regions], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(word_gram, [e @ e.T for e in words], rtol=1e-5, atol=1e-5)

  # Explicit attended vectors per pair: a_j = sum_r w[r, j] v_r and a_r = sum_j w[r, j] e_j.
  over_regions = np.einsum('ickn,ikd->icnd', weights, regions)
  over_words = np.einsum('ickn,cnd->ickd', weights, words)
  np.testing.assert_allclose(
    pairwise.attended_region_sq_norms(f32(weights), region_gram), np.sum(over_regions**2, axis=-1), rtol=1e-4, atol=1e-4
  )
  np.testing.assert_allclose(
    pairwise.attended_word_sq_norms(f32(weights), word_gram), np.sum(over_words**2, axis=-1), rtol=1e-4, atol=1e-4
  )


def _width_marker(n_img):
  """A score that reveals its input's token width and caption order: 100 x width + the caption's id."""

  def score(text_rep):
    width = text_rep['mask'].shape[1]
    return jnp.broadcast_to(100.0 * width + text_rep['id'][None], (n_img, text_rep['id'].shape[0]))

  return score


def _trim(text_rep, width):
  return {'id': text_rep['id'], 'mask': text_rep['mask'][:, :width]}


@pytest.mark.parametrize('chunk', [1, 3, 4, 10, 16])
def test_caption_width_groups_score_each_caption_at_its_chunks_width_in_the_given_order(chunk):
  lengths = np.array([5, 1, 3, 9, 2, 6, 4, 8, 1, 2])  # the rep is 9 tokens wide
  mask = (np.arange(9)[None] < lengths[:, None]).astype(np.float32)
  text_rep = {'id': jnp.arange(10, dtype=jnp.float32), 'mask': jnp.asarray(mask)}
  got = jax.jit(
    lambda rep, lengths: pairwise.score_by_caption_width(_width_marker(3), _trim, rep, lengths, 9, chunk, 2)
  )(text_rep, jnp.asarray(lengths))
  # By hand: sort by length (stably), cut into chunks, each chunk's longest rounded up to a multiple of 2 (at most 9).
  order = np.argsort(lengths, kind='stable')
  width = np.empty(10)
  for start in range(0, 10, chunk):
    members = order[start : start + chunk]
    width[members] = min(-(-lengths[members].max() // 2) * 2, 9)
  np.testing.assert_array_equal(got, np.broadcast_to(100 * width + np.arange(10), (3, 10)))
  if chunk == 1:  # every caption at its own length rounded up, as evaluation scores it
    np.testing.assert_array_equal(width, [6, 2, 4, 9, 2, 6, 4, 8, 2, 2])


def test_caption_width_groups_equal_full_width_scores():
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 12, size=13)
  mask = jnp.asarray(np.arange(11)[None] < lengths[:, None], jnp.float32)
  words = jnp.asarray(rng.normal(size=(13, 11, 4)), jnp.float32) * mask[..., None]
  regions = jnp.asarray(rng.normal(size=(5, 3, 4)), jnp.float32)

  def score(text_rep):  # a padding-free head: mean over real words of the best region's dot product
    s = pairwise.region_word_similarity(regions, text_rep['words'])  # [I, C, k, n]
    m = text_rep['mask']
    return jnp.sum(jnp.max(s, axis=2) * m, axis=-1) / jnp.sum(m, axis=-1)

  def trim(text_rep, width):
    return jax.tree.map(lambda x: x[:, :width], text_rep)

  text_rep = {'words': words, 'mask': mask}
  want = score(text_rep)
  got = pairwise.score_by_caption_width(score, trim, text_rep, jnp.asarray(lengths), 11, 4, 4)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match='chunk and step must be >= 1'):
    pairwise.score_by_caption_width(score, trim, text_rep, jnp.asarray(lengths), 11, 0, 4)
