"""All-pairs scoring: blocked evaluation of per-pair heads and batch-wide similarity helpers.

A cross-attention head scores every (image, caption) pair. Written naively it builds per-pair
D-dimensional context vectors; here it is written with the batch-wide region-word similarity tensor
`S = einsum('ikd,cnd->ickn')` (one large matmul), per-item Gram matrices and norms (see docs/architecture.md,
"The batch-wide similarity tensor"). `score_in_blocks` bounds peak memory by scoring blocks of
images against all captions with `lax.map`, optionally rematerialising each block in the backward
pass.

Mixed precision: `einsum` and `matmul` take their operands in a compute dtype (float32 or
bfloat16) and accumulate and return float32, so a head stays float32 outside its large
contractions.
"""

from typing import Any
from typing import Callable

import jax
import jax.numpy as jnp

from xmatch_jax import errors

PyTree = Any
DTypeLike = Any


def einsum(spec: str, *operands: jax.Array, dtype: DTypeLike = jnp.float32) -> jax.Array:
  """`jnp.einsum` of the operands cast to `dtype`, accumulated and returned in float32."""
  return jnp.einsum(spec, *(x.astype(dtype) for x in operands), preferred_element_type=jnp.float32)


def matmul(a: jax.Array, b: jax.Array, dtype: DTypeLike = jnp.float32) -> jax.Array:
  """`a @ b` of the operands cast to `dtype`, accumulated and returned in float32."""
  return jnp.matmul(a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def score_in_blocks(
  head_fn: Callable[[PyTree, PyTree], PyTree],
  image_rep: PyTree,
  text_rep: PyTree,
  block_size: int,
  remat: bool = False,
) -> PyTree:
  """Scores all images against all captions, `block_size` images at a time.

  Args:
    head_fn: pure function `(image_block_rep, text_rep) -> [b, n_txt]` (or a pytree of arrays with
      leading dim b) scoring a block of b images against every caption. Rows must depend only on
      their own image, so zero-padded rows can be dropped.
    image_rep: pytree of arrays, each with leading dim n_img.
    text_rep: pytree of arrays passed whole to every call of `head_fn`.
    block_size: images per block; a value >= n_img scores everything in one call.
    remat: wrap each block in `jax.checkpoint` (training: the backward pass recomputes a block's
      intermediates instead of storing those of all blocks).

  Returns:
    `head_fn`'s output for all images: [n_img, n_txt] (or the matching pytree).

  Raises:
    ValueError: block_size < 1, or image_rep leaves with different leading dims.
  """
  if block_size < 1:
    raise errors.UserError(f'block_size must be >= 1, got {block_size}')
  leaves = jax.tree_util.tree_leaves(image_rep)
  if not leaves:
    raise errors.UserError('image_rep has no arrays')
  n_img = leaves[0].shape[0]
  if any(leaf.shape[0] != n_img for leaf in leaves):
    shapes = [leaf.shape for leaf in leaves]
    raise errors.UserError(f'image_rep leaves must share the leading (image) dim, got shapes {shapes}')

  fn = jax.checkpoint(head_fn) if remat else head_fn
  if block_size >= n_img:
    return fn(image_rep, text_rep)

  n_blocks = -(-n_img // block_size)
  n_pad = n_blocks * block_size - n_img

  def to_blocks(x):
    x = jnp.pad(x, [(0, n_pad)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape((n_blocks, block_size) + x.shape[1:])

  blocks = jax.tree_util.tree_map(to_blocks, image_rep)
  out = jax.lax.map(lambda block: fn(block, text_rep), blocks)
  return jax.tree_util.tree_map(lambda y: y.reshape((n_blocks * block_size,) + y.shape[2:])[:n_img], out)


def score_by_caption_width(
  score_fn: Callable[[PyTree], jax.Array],
  trim_fn: Callable[[PyTree, int], PyTree],
  text_rep: PyTree,
  lengths: jax.Array,
  width: int,
  chunk: int,
  step: int,
) -> jax.Array:
  """All-pairs scores with the captions sorted by length and scored `chunk` at a time at their chunk's width.

  Inside `jit`, where widths must be static: each chunk of the length-sorted captions is cut to its longest
  caption's length rounded up to `step` (at most `width`) by one `lax.switch` branch per width, so a batch padded
  to its longest caption is not scored at that length (docs/architecture.md, "A training step"). Requires scores
  that do not depend on padding (every trimmable model's padding test).

  Args:
    score_fn: `text_rep` of `chunk` captions -> [I, chunk] scores against every image.
    trim_fn: `(text_rep, w)` -> the same captions' rep with its token axis cut to w (`Matcher.trim_text_rep`).
    text_rep: pytree of arrays with leading dim C (captions), token axis `width` long.
    lengths: [C] int, tokens up to each caption's last real one (traced).
    width: the rep's token axis length (static).
    chunk: captions per chunk; the last chunk is filled with copies of the longest caption, dropped afterwards.
    step: widths are multiples of `step`, and `width` itself.

  Returns:
    [I, C] scores, columns in the given caption order.
  """
  if chunk < 1 or step < 1:
    raise errors.UserError(f'chunk and step must be >= 1, got chunk={chunk}, step={step}')
  n_txt = lengths.shape[0]
  widths = tuple(range(step, width, step)) + (width,)
  n_chunks = -(-n_txt // chunk)
  order = jnp.argsort(lengths, stable=True)
  order = jnp.concatenate([order, jnp.full((n_chunks * chunk - n_txt,), order[-1])])
  longest = lengths[order].reshape(n_chunks, chunk)[:, -1]
  branch = jnp.minimum(jnp.searchsorted(jnp.asarray(widths), longest), len(widths) - 1)
  chunks = jax.tree_util.tree_map(lambda x: x[order].reshape((n_chunks, chunk) + x.shape[1:]), text_rep)
  branches = [lambda rep, w=w: score_fn(trim_fn(rep, w)) for w in widths]
  out = jax.lax.map(lambda args: jax.lax.switch(args[0], branches, args[1]), (branch, chunks))  # [chunks, I, chunk]
  scores = jnp.moveaxis(out, 0, 1).reshape(out.shape[1], n_chunks * chunk)
  return scores[:, jnp.argsort(order[:n_txt])]


def region_word_similarity(regions: jax.Array, words: jax.Array, dtype: DTypeLike = jnp.float32) -> jax.Array:
  """Dot products of every region of every image with every word of every caption.

  Args:
    regions: [I, k, D].
    words: [C, n, D].
    dtype: compute dtype of the operands (the result is float32).

  Returns:
    S: [I, C, k, n], S[i, c, r, j] = regions[i, r] . words[c, j].
  """
  return einsum('ikd,cnd->ickn', regions, words, dtype=dtype)


def gram(x: jax.Array, dtype: DTypeLike = jnp.float32) -> jax.Array:
  """Per-item Gram matrices.

  Args:
    x: [N, m, D] (regions of N images or words of N captions).
    dtype: compute dtype of the operands (the result is float32).

  Returns:
    [N, m, m], G[a, p, q] = x[a, p] . x[a, q].
  """
  return einsum('apd,aqd->apq', x, x, dtype=dtype)


def attended_region_sq_norms(weights: jax.Array, region_gram: jax.Array, paired: bool = False) -> jax.Array:
  """Squared norms of region-attended vectors a_j = sum_r w[r, j] v_r, without forming them.

  |a_j|^2 = w_j^T G_img w_j.

  Args:
    weights: [I, C, k, n], weights over regions r (axis 2) for each word j.
    region_gram: [I, k, k], G_img = V V^T per image; with `paired`, [C, k, k]: I = 1 and caption c's own image.
    paired: see region_gram.

  Returns:
    [I, C, n].
  """
  g_w = jnp.einsum('ckl,icln->ickn' if paired else 'ikl,icln->ickn', region_gram, weights)
  return jnp.sum(weights * g_w, axis=2)


def attended_word_sq_norms(weights: jax.Array, word_gram: jax.Array) -> jax.Array:
  """Squared norms of word-attended vectors a_r = sum_j w[r, j] e_j, without forming them.

  |a_r|^2 = w_r^T G_txt w_r.

  Args:
    weights: [I, C, k, n], weights over words j (axis 3) for each region r.
    word_gram: [C, n, n], G_txt = E E^T per caption.

  Returns:
    [I, C, k].
  """
  g_w = jnp.einsum('cnm,ickm->ickn', word_gram, weights)
  return jnp.sum(weights * g_w, axis=3)
