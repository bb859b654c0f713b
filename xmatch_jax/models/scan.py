"""SCAN: Stacked Cross Attention for Image-Text Matching (Lee et al., ECCV 2018).

Scores follow the official code (github.com/kuanghuei/SCAN, model.py: func_attention,
xattn_score_t2i, xattn_score_i2t, cosine_similarity), which loops over captions truncated to their
lengths. Here all pairs of a block of images are scored at once from the batch-wide similarity
tensor S (laid out [I, k, C, n] for t2i, [C, n, I, k] for i2t), per-item Gram matrices and norms
(docs/architecture.md, "The batch-wide similarity tensor"), with padded words masked out of every
normalisation, softmax and aggregation exactly
as truncation would drop them. No per-pair context vectors are built: with attention weights w,
the attended vector a = sum w v has query . a = sum w S and |a|^2 = w^T G w.
"""

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from xmatch_jax import errors
from xmatch_jax import pairwise
from xmatch_jax.models import layers
from xmatch_jax.models import matcher

CROSS_ATTN = ('t2i', 'i2t')
RAW_FEATURE_NORMS = ('softmax', 'l2norm', 'clipped_l2norm', 'l1norm', 'clipped_l1norm', 'clipped', 'no_norm')
AGG_FUNCS = ('LogSumExp', 'Mean', 'Max', 'Sum')
_EPS = 1e-8


def _masked_softmax(x: jax.Array, axis: int, mask: Optional[jax.Array]) -> jax.Array:
  """Softmax along `axis` over the entries where `mask` (broadcastable bool) is True."""
  if mask is None:
    return jax.nn.softmax(x, axis=axis)
  x = jnp.where(mask, x, -jnp.inf)
  x = x - jax.lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True))
  e = jnp.exp(x)
  return e / jnp.sum(e, axis=axis, keepdims=True)


def normalize_raw_attention(attn: jax.Array, kind: str, axis: int, mask: Optional[jax.Array]) -> jax.Array:
  """SCAN's `raw_feature_norm` of the raw attention, along the query axis.

  The official l1 variants call an undefined `l1norm_d`; this uses SCAN's `l1norm`
  (x / (sum |x| + eps)), the evident intent.

  Args:
    attn: raw region-word dot products, e.g. [I, k, C, n] (t2i) or [C, n, I, k] (i2t).
    kind: one of RAW_FEATURE_NORMS.
    axis: the query axis (words for t2i, regions for i2t).
    mask: bool, broadcastable to attn, False at padded query positions; None if all are real.
  """
  if kind.startswith('clipped'):
    attn = jax.nn.leaky_relu(attn, negative_slope=0.1)
  if kind == 'softmax':
    return _masked_softmax(attn, axis, mask)
  if kind in ('clipped', 'no_norm'):
    return attn
  if mask is not None:
    attn = jnp.where(mask, attn, 0.0)
  if kind in ('l2norm', 'clipped_l2norm'):
    return layers.l2norm(attn, axis=axis)
  if kind in ('l1norm', 'clipped_l1norm'):
    return attn / (jnp.sum(jnp.abs(attn), axis=axis, keepdims=True) + _EPS)
  raise errors.UserError(f'raw_feature_norm must be one of {RAW_FEATURE_NORMS}, got {kind!r}')


def aggregate(sims: jax.Array, kind: str, lambda_lse: float, mask: Optional[jax.Array]) -> jax.Array:
  """Pools per-query cosines over the last axis (SCAN's agg_func), counting only `mask` entries.

  LogSumExp: log(sum exp(lambda_lse x)) / lambda_lse; Mean; Max; Sum.
  """
  if kind == 'LogSumExp':
    z = lambda_lse * sims
    if mask is not None:
      z = jnp.where(mask, z, -jnp.inf)
    return jax.nn.logsumexp(z, axis=-1) / lambda_lse
  if kind == 'Max':
    return jnp.max(sims if mask is None else jnp.where(mask, sims, -jnp.inf), axis=-1)
  total = jnp.sum(sims if mask is None else jnp.where(mask, sims, 0.0), axis=-1)
  if kind == 'Sum':
    return total
  if kind == 'Mean':
    count = sims.shape[-1] if mask is None else jnp.sum(mask, axis=-1)
    return total / count
  raise errors.UserError(f'agg_func must be one of {AGG_FUNCS}, got {kind!r}')


def prepare_text(words: jax.Array, mask: jax.Array, with_gram: bool, dtype: pairwise.DTypeLike = jnp.float32) -> dict:
  """Per-caption quantities shared by all image blocks.

  Args:
    words: [C, n, D]; values at padded positions are ignored.
    mask: [C, n], 1 for real tokens.
    with_gram: also compute the word Gram matrices (needed by i2t only).
    dtype: compute dtype of the Gram matrices' operands.

  Returns:
    dict with `words` [C, n, D] (padding zeroed), `valid` [C, n] bool, `norms` [C, n] and, if
    with_gram, `gram` [C, n, n] (E E^T).
  """
  if words.shape[:2] != mask.shape:
    raise errors.UserError(f'text_rep words {words.shape} and mask {mask.shape} disagree on [C, n]')
  valid = mask > 0
  words = jnp.where(valid[..., None], words, 0.0)
  text = {
    'words': words,
    'valid': valid,
    'norms': layers.safe_sqrt(jnp.sum(jnp.square(words), axis=-1)),
  }
  if with_gram:
    text['gram'] = pairwise.gram(words, dtype)
  return text


def t2i_similarity(regions: jax.Array, words: jax.Array, dtype: pairwise.DTypeLike = jnp.float32) -> jax.Array:
  """S laid out for t2i: regions [I, k, D], words [C, n, D] -> [I, k, C, n] (float32)."""
  return pairwise.einsum('ikd,cnd->ikcn', regions, words, dtype=dtype)


def i2t_layout(t2i_sim: jax.Array) -> jax.Array:
  """S [I, k, C, n] (t2i layout) -> [C, n, I, k] (the layout i2t_scores reads)."""
  return jnp.transpose(t2i_sim, (2, 3, 0, 1))


def t2i_scores(
  regions: jax.Array,
  text: dict,
  *,
  raw_feature_norm: str,
  lambda_softmax: float,
  agg_func: str,
  lambda_lse: float,
  max_attention_weight: float = 0.0,
  dtype: pairwise.DTypeLike = jnp.float32,
  sim: Optional[jax.Array] = None,
) -> jax.Array:
  """SCAN text-to-image scores: each word attends over the image's regions.

  Args:
    regions: [I, k, D].
    text: output of `prepare_text` for C captions.
    max_attention_weight: GLFN's official code adds this times the aggregate (same agg_func) over words of
      each word's largest attention weight; 0 is SCAN.
    dtype: compute dtype of the operands of S and the region Gram matrices (the rest is float32).
    sim: S [I, k, C, n] if the caller has it already (GLFN's fused score computes it once for both directions).

  Returns:
    [I, C].
  """
  # S laid out [I, k, C, n]: the plain matmul [I k, D] x [D, C n] needs no transpose, the softmax and sums over
  # regions run over a major axis (vectorised along C n), and G_img w is one [k, k] x [k, C n] matmul per image.
  if sim is None:
    sim = t2i_similarity(regions, text['words'], dtype)
  word_valid = text['valid'][None, None]  # [1, 1, C, n]
  attn = normalize_raw_attention(sim, raw_feature_norm, axis=-1, mask=word_valid)
  weights = jax.nn.softmax(lambda_softmax * attn, axis=1)  # over regions
  dots = jnp.sum(weights * sim, axis=1)  # e_j . a_j  [I, C, n]
  g_w = jnp.einsum('ikl,ilcn->ikcn', pairwise.gram(regions, dtype), weights)
  attended_sq = jnp.sum(weights * g_w, axis=1)  # |a_j|^2 = w_j^T G_img w_j
  denom = jnp.maximum(text['norms'][None] * layers.safe_sqrt(attended_sq), _EPS)
  scores = aggregate(dots / denom, agg_func, lambda_lse, mask=text['valid'][None])
  if max_attention_weight:
    max_attention = jnp.max(weights, axis=1)  # [I, C, n]
    scores = scores + max_attention_weight * aggregate(max_attention, agg_func, lambda_lse, mask=text['valid'][None])
  return scores


def i2t_scores(
  regions: jax.Array,
  text: dict,
  *,
  raw_feature_norm: str,
  lambda_softmax: float,
  agg_func: str,
  lambda_lse: float,
  dtype: pairwise.DTypeLike = jnp.float32,
  sim: Optional[jax.Array] = None,
) -> jax.Array:
  """SCAN image-to-text scores: each region attends over the caption's real words.

  Args:
    regions: [I, k, D].
    text: output of `prepare_text(..., with_gram=True)` for C captions.
    dtype: compute dtype of the operands of S (the rest is float32).
    sim: S [C, n, I, k] if the caller has it already (e.g. `i2t_layout` of t2i's S).

  Returns:
    [I, C].
  """
  # S laid out [C, n, I, k] (see t2i_scores): softmax and sums over words run over a major axis and
  # G_txt w is one [n, n] x [n, I k] matmul per caption.
  if sim is None:
    sim = pairwise.einsum('cnd,ikd->cnik', text['words'], regions, dtype=dtype)
  word_valid = text['valid'][:, :, None, None]  # [C, n, 1, 1]
  attn = normalize_raw_attention(sim, raw_feature_norm, axis=-1, mask=None)
  weights = _masked_softmax(lambda_softmax * attn, axis=1, mask=word_valid)  # over words
  dots = jnp.sum(weights * sim, axis=1)  # v_r . a_r  [C, I, k]
  g_w = jnp.einsum('cnm,cmik->cnik', text['gram'], weights)
  attended_sq = jnp.sum(weights * g_w, axis=1)  # |a_r|^2 = w_r^T G_txt w_r
  region_norms = layers.safe_sqrt(jnp.sum(jnp.square(regions), axis=-1))  # [I, k]
  denom = jnp.maximum(region_norms[None] * layers.safe_sqrt(attended_sq), _EPS)
  return aggregate(dots / denom, agg_func, lambda_lse, mask=None).T


class SCAN(matcher.Matcher):
  """SCAN matcher: region encoder + (bi)GRU word encoder, stacked cross attention scores.

  Attributes:
    vocab_size: number of token ids.
    img_dim: precomputed region feature size.
    embed_size: joint embedding size D.
    word_dim: word embedding size.
    num_layers: GRU layers.
    bidirectional: bidirectional GRU, directions averaged (SCAN's --bi_gru).
    no_imgnorm: skip l2norm of region features.
    no_txtnorm: skip l2norm of word features.
    cross_attn: 't2i' (words attend to regions) or 'i2t' (regions attend to words).
    raw_feature_norm: normalisation of the raw attention along the query axis.
    lambda_softmax: inverse temperature of the attention softmax.
    agg_func: pooling of per-query cosines: 'LogSumExp', 'Mean', 'Max' or 'Sum'.
    lambda_lse: LogSumExp temperature.
    block_size: images scored per block in `pair_scores` (bounds peak memory).
    remat: recompute each block in the backward pass instead of storing it.
    dtype: 'float32' or 'bfloat16': compute dtype of the encoders' matmuls and GRU gates and of
      the operands of S and the Gram matrices. Params, norms, softmaxes and the returned scores
      stay float32. bfloat16 scores are within 2e-3 of float32 ones for i2t (measured 4e-4 at
      D=64, tests/test_mixed_precision.py) and 5e-2 for t2i (measured 3e-2, median 4e-3):
      clipped_l2norm rescales a region's near-zero similarities to unit norm, so float32 t2i
      scores move as much when their inputs change by 2^-9.
  """

  vocab_size: int
  img_dim: int
  embed_size: int = 1024
  word_dim: int = 300
  num_layers: int = 1
  bidirectional: bool = True
  no_imgnorm: bool = False
  no_txtnorm: bool = False
  cross_attn: str = 't2i'
  raw_feature_norm: str = 'clipped_l2norm'
  lambda_softmax: float = 9.0
  agg_func: str = 'LogSumExp'
  lambda_lse: float = 6.0
  block_size: int = 32
  remat: bool = False
  dtype: str = 'float32'

  @classmethod
  def describe(cls, fields: dict, sizes: dict) -> str:
    return f'SCAN {fields.get("cross_attn", "t2i")}, D {sizes["embed_size"]}, n {sizes["n"]}'

  def __post_init__(self):
    choices_by_field = (
      ('cross_attn', self.cross_attn, CROSS_ATTN),
      ('raw_feature_norm', self.raw_feature_norm, RAW_FEATURE_NORMS),
      ('agg_func', self.agg_func, AGG_FUNCS),
    )
    for field, value, choices in choices_by_field:
      if value not in choices:
        raise errors.UserError(f'SCAN.{field} must be one of {choices}, got {value!r}')
    if self.block_size < 1:
      raise errors.UserError(f'SCAN.block_size must be >= 1, got {self.block_size}')
    layers.compute_dtype(self.dtype, 'SCAN')
    super().__post_init__()

  def setup(self):
    dtype = layers.DTYPES[self.dtype]
    self.image_encoder = layers.RegionEncoder(self.embed_size, no_imgnorm=self.no_imgnorm, dtype=dtype)
    self.text_encoder = layers.GRUTextEncoder(
      vocab_size=self.vocab_size,
      word_dim=self.word_dim,
      embed_size=self.embed_size,
      num_layers=self.num_layers,
      bidirectional=self.bidirectional,
      no_txtnorm=self.no_txtnorm,
      dtype=dtype,
    )

  def encode_image(self, images: dict) -> dict:
    """images['regions'] [I, k, img_dim] -> {'regions': [I, k, D]}."""
    layers.require_keys(images, ('regions',), 'SCAN.encode_image')
    return {'regions': self.image_encoder(images['regions'])}

  def encode_text(self, text: dict) -> dict:
    """text['tokens'], text['mask'] [C, n] -> {'words': [C, n, D], 'mask': [C, n]}."""
    layers.require_keys(text, ('tokens', 'mask'), 'SCAN.encode_text')
    words, _ = self.text_encoder(text['tokens'], text['mask'])
    return {'words': words, 'mask': text['mask']}

  def pair_scores(self, image_rep: dict, text_rep: dict) -> jax.Array:
    """Scores of every pair, [I, C], computed in blocks of `block_size` images."""
    head = t2i_scores if self.cross_attn == 't2i' else i2t_scores
    dtype = layers.DTYPES[self.dtype]
    head = functools.partial(
      head,
      raw_feature_norm=self.raw_feature_norm,
      lambda_softmax=self.lambda_softmax,
      agg_func=self.agg_func,
      lambda_lse=self.lambda_lse,
      dtype=dtype,
    )
    text = prepare_text(text_rep['words'], text_rep['mask'], with_gram=self.cross_attn == 'i2t', dtype=dtype)
    return pairwise.score_in_blocks(
      lambda image_block, text_: head(image_block['regions'], text_), image_rep, text, self.block_size, remat=self.remat
    )

  def pair_flops(self, regions: int, words: int) -> dict:
    return {
      'similarity': 2 * regions * words * self.embed_size,
      'attention': matcher.scan_attention_flops(self.cross_attn, regions, words),
    }

  def item_flops(self, regions: int, words: int) -> tuple[int, int]:
    d = self.embed_size
    return (2 * regions * regions * d, 0) if self.cross_attn == 't2i' else (0, 2 * words * words * d)
