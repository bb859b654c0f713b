"""RDAN: relation-wise dual attention network (Hu et al., IJCAI 2019), sections 3.1-3.5.

No official code was released; this follows the paper's equations:
  (1) v_i = W_v r_i + b_v                        region features, D-dim
  (2-4) e_j = (fwd GRU_j + bwd GRU_j) / 2         word features, D-dim
  (5) s_ij = cos(v_i, e_j)                        S [k, n] of every pair
  (6) conv layers 3x1, 1x3, 3x3 (32 channels, ReLU, 'same' size, no pooling), then a 1x1 conv to
      two maps S1, S2
  (7) S^1 = S1 + S, S^2 = S2 + S                  S as residual
  (8) a_i = sum_j alpha_ij e_j, alpha = softmax_j(lambda S^2_ij)   row-wise: over words
  (9) b_j = sum_i beta_ij v_i,  beta = softmax_i(lambda S^1_ij)    column-wise: over regions
  (10) R_r(i) = cos(v_i, a_i), R_w(j) = cos(e_j, b_j)
  (11) F = (1 - mu) mean_i R_r + mu mean_j R_w

Reading of the paper where it is not explicit (see also the module fields):
- Features are NOT l2-normalised: eqs 1 and 4 define v_i and e_j without it, and eqs 5 and 10
  take cosines explicitly. (SCAN-family code normalises in the encoders; `l2norm_features=True`
  does that.) The choice matters only for the attended vectors a_i, b_j of eqs 8-9, which sum the
  raw v / e.
- The 1x1 output conv has no ReLU (eq 6 applies ReLU to the three relation layers; S1, S2 are then
  added to S and used as logits). Every conv has a bias and PyTorch's default init
  U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (the paper's code is PyTorch). Channel 0 is S1, channel 1 S2.
- Typos read as intended: eq 5 and eq 10 denominators ||e_i||, ||b_i|| mean ||e_j||, ||b_j||;
  eq 9's sum over s_ii means the sum over regions l of exp(lambda s^1_lj).
- Ablations (Table 3): mu=0 / mu=1 are values of mu; one-path = a single 1x1 output map used by both
  attentions; no-cnn = both attentions use S itself; no-res = S^1 = S1, S^2 = S2.

Padded words (mask 0) are removed everywhere, so scores equal those of the caption truncated to its
real words: S is zero in padded columns, and the CNN's activations are re-zeroed there after every
layer, so with 'same' zero padding a real position sees exactly what it would see at the border of
the truncated k x n_c map; the row-wise softmax and the word mean run over real words only.

All pairs of a block of images are scored together from the batch-wide cosine tensor S
[b, C, k, n] (docs/architecture.md, "The batch-wide similarity tensor"): the relation CNN runs over
the b * C pair maps at once (on a CPU, forward and backward, in the compiled kernel of
xmatch_jax/kernels; docs/architecture.md, "Compiled CPU kernels"), and the cosines of eq 10
use S, the weights and per-item Gram matrices, never per-pair D-dim vectors:
v_i . a_i = |v_i| sum_j alpha_ij S_ij |e_j| and |a_i|^2 = alpha_i^T (E E^T) alpha_i (same for b_j).

With `dtype='bfloat16'` the operands of S, of the Gram matrices and of the relation convolutions
(forward and backward) are bfloat16; they accumulate in float32 and everything else is float32.
"""

import functools
import itertools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from xmatch_jax import errors
from xmatch_jax import kernels
from xmatch_jax import pairwise
from xmatch_jax.models import layers
from xmatch_jax.models import matcher

_EPS = 1e-8
# (name, kernel height over regions, kernel width over words) of the relation layers, eq 6.
RELATION_LAYERS = (('conv1', 3, 1), ('conv2', 1, 3), ('conv3', 3, 3))
_CONV_DIMS = ('NHWC', 'HWIO', 'NHWC')
CONV_IMPLS = ('auto', 'xla')


def _torch_conv_init(fan_in: int) -> nn.initializers.Initializer:
  """PyTorch's Conv2d default for weight and bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  return layers.symmetric_uniform(fan_in**-0.5)


class RelationCNN(nn.Module):
  """Creates the parameters of the visual-semantic relation CNN (eqs 6-7) and returns them.

  The convolution itself is the pure function `relation_maps`, so that it can run inside the
  `lax.map` of the blocked scorer (a linen submodule cannot be called there).

  Attributes:
    channels: channels of the three relation layers (32 in the paper).
    out_channels: 2 (S1, S2) or 1 (one-path).
  """

  channels: int
  out_channels: int

  @nn.compact
  def __call__(self) -> dict:
    """Returns {'<layer>_kernel': [h, w, in, out] (HWIO), '<layer>_bias': [out]}."""
    params = {}
    in_channels = 1
    shapes = RELATION_LAYERS + (('out', 1, 1),)
    for name, height, width in shapes:
      out = self.out_channels if name == 'out' else self.channels
      init = _torch_conv_init(in_channels * height * width)
      params[f'{name}_kernel'] = self.param(f'{name}_kernel', init, (height, width, in_channels, out))
      params[f'{name}_bias'] = self.param(f'{name}_bias', init, (out,))
      in_channels = out
    return params


def _lax_same_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return jax.lax.conv_general_dilated(
    x, kernel, window_strides=(1, 1), padding='SAME', dimension_numbers=_CONV_DIMS, preferred_element_type=jnp.float32
  )


@jax.custom_vjp
def same_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Stride-1 'same' cross-correlation (PyTorch's Conv2d): x [P, H, W, I], kernel [h, w, I, O].

  x and kernel share a dtype (float32 or bfloat16); the result is accumulated and returned in
  float32, and the gradients are computed in the operands' dtype the same way.
  Kernel sizes must be odd. The backward pass is written out because XLA:CPU runs the autodiff
  kernel-gradient convolution inside `lax.map` (the blocked scorer) with a non-canonical layout
  ~40x slower than this: dx is the 'same' convolution of the cotangent with the flipped, in/out
  swapped kernel; dk[a, b] = (x shifted by (a, b))^T cotangent over all pairs and positions, one
  [I, rows] @ [rows, O] matmul per tap (tools/benchmark.py at k 12, 16 channels: 1.3x faster than
  one matmul per kernel row over the concatenated taps, which copies kw shifted maps first).
  Reverse mode only (no jvp).
  """
  return _lax_same_conv(x, kernel)


def _same_conv_fwd(x, kernel):
  return _lax_same_conv(x, kernel), (x, kernel)


def _shifted_maps(x: jax.Array, kh: int, kw: int) -> list:
  """The kh * kw windows of the zero-padded x [P, H, W, C] seen by a 'same' kernel's taps, in (row, column) order,
  each [P, H, W, C]: window (a, b) at (h, w) is x[h + a - kh // 2, w + b - kw // 2] (zero outside)."""
  height, width = x.shape[1:3]
  padded = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  return [padded[:, a : a + height, b : b + width] for a in range(kh) for b in range(kw)]


def _same_conv_bwd(residuals, grad):
  x, kernel = residuals
  kh, kw, in_channels, out_channels = kernel.shape
  grad = grad.astype(x.dtype)
  dx = _lax_same_conv(grad, jnp.flip(kernel, (0, 1)).swapaxes(2, 3)).astype(x.dtype)
  grad = grad.reshape(-1, out_channels)
  taps = [pairwise.matmul(tap.reshape(-1, in_channels).T, grad, x.dtype) for tap in _shifted_maps(x, kh, kw)]
  return dx, jnp.stack(taps).reshape(kernel.shape).astype(kernel.dtype)


same_conv.defvjp(_same_conv_fwd, _same_conv_bwd)


def _conv(x: jax.Array, kernel: jax.Array, bias: jax.Array, dtype: pairwise.DTypeLike = jnp.float32) -> jax.Array:
  """'Same' convolution of x and kernel cast to `dtype`, plus bias, on NHWC maps (float32 result).

  A single input channel (the first relation layer, over S) is a weighted sum of kh * kw shifted
  maps, which XLA fuses into one element-wise pass (7x faster on CPU than a 1-channel convolution
  at k 12, n 16, 16 channels); more channels go through `same_conv`.
  """
  kh, kw, in_channels, _ = kernel.shape
  if kh % 2 == 0 or kw % 2 == 0:
    raise errors.UserError(f'relation conv kernels must have odd sizes, got {kernel.shape[:2]}')
  if in_channels > 1:
    return same_conv(x.astype(dtype), kernel.astype(dtype)) + bias
  # bfloat16 operands multiply exactly in float32, so this equals same_conv's float32 accumulation.
  x = x.astype(dtype).astype(jnp.float32)
  weights = kernel.astype(dtype).astype(jnp.float32).reshape(kh * kw, -1)  # [taps, O]
  out = bias
  for tap, weight in zip(_shifted_maps(x, kh, kw), weights):
    out = out + tap * weight
  return out


def _relation_cnn_xla(sim: jax.Array, column_mask: jax.Array, cnn_params: dict, dtype: pairwise.DTypeLike) -> jax.Array:
  """The relation CNN's output maps (eq 6, before eq 7's residual) with XLA's convolutions.

  Args:
    sim: cosine maps S [b, C, k, n].
    column_mask: [C, n] float, 1 for real words and 0 for padding.
    cnn_params: output of `RelationCNN`.
    dtype: compute dtype of the convolutions' operands.

  Returns:
    [out_channels, b, C, k, n].
  """
  b, c, k, n = sim.shape
  # One batched convolution over the b * C pair maps, NHWC = [pairs, regions, words, channels].
  mask = jnp.broadcast_to(column_mask[None, :, None, :], (b, c, 1, n)).reshape(b * c, 1, n, 1).astype(sim.dtype)
  x = sim.reshape(b * c, k, n, 1) * mask
  for name, _, _ in RELATION_LAYERS:
    x = jax.nn.relu(_conv(x, cnn_params[f'{name}_kernel'], cnn_params[f'{name}_bias'], dtype))
    # Re-zero padded columns: the next layer's 'same' padding sees zeros past the real words.
    x = x * mask
  out = _conv(x, cnn_params['out_kernel'], cnn_params['out_bias'], dtype)  # [pairs, k, n, 1|2]
  return jnp.moveaxis(out, -1, 0).reshape(out.shape[-1], b, c, k, n)


_KERNEL_ARGS = ('conv1_kernel', 'conv1_bias', 'conv2_kernel', 'conv2_bias', 'conv3_kernel', 'conv3_bias')
_KERNEL_ARGS += ('out_kernel', 'out_bias')


def _relation_cnn_kernel_call(handler: str, results, *args) -> jax.Array:
  """Calls the kernel's `handler` with `args` = (sim, column_mask, the 8 _KERNEL_ARGS weights, ...)."""
  target = kernels.relation_cnn_targets(args[2].shape[-1])[handler]
  return jax.ffi.ffi_call(target, results, vmap_method='sequential')(*args)


@jax.custom_vjp
def _relation_cnn_kernel(sim: jax.Array, column_mask: jax.Array, cnn_params: dict) -> jax.Array:
  """`_relation_cnn_xla` in float32, run on CPUs by the compiled kernel (xmatch_jax/kernels/relation_cnn.c), forward
  (its RelationCnn handler) and backward (RelationCnnGrad). Other platforms lower the XLA path."""
  shape = (cnn_params['out_kernel'].shape[-1],) + sim.shape
  return jax.lax.platform_dependent(
    sim,
    column_mask,
    *(cnn_params[name] for name in _KERNEL_ARGS),
    cpu=functools.partial(_relation_cnn_kernel_call, 'RelationCnn', jax.ShapeDtypeStruct(shape, jnp.float32)),
    default=lambda sim, mask, *weights: _relation_cnn_xla(sim, mask, dict(zip(_KERNEL_ARGS, weights)), jnp.float32),
  )


def _relation_cnn_kernel_fwd(sim, column_mask, cnn_params):
  return _relation_cnn_kernel(sim, column_mask, cnn_params), (sim, column_mask, cnn_params)


# Pairs per row of RelationCnnGrad's weight-gradient sums (CHUNK in relation_cnn.c; the kernel checks the shape).
_GRAD_CHUNK = 8


def _relation_cnn_grad_kernel(sim, column_mask, *args):
  """RelationCnnGrad: (dsim, the 8 weight gradients) for the cotangent args[-1] of the maps."""
  weights = args[:-1]
  rows = -(-sim.shape[0] * sim.shape[1] // _GRAD_CHUNK)
  size = sum(w.size for w in weights)
  results = (jax.ShapeDtypeStruct(sim.shape, jnp.float32), jax.ShapeDtypeStruct((rows, size), jnp.float32))
  dsim, sums = _relation_cnn_kernel_call('RelationCnnGrad', results, sim, column_mask, *args)
  flat = jnp.sum(sums, axis=0)
  offsets = list(itertools.accumulate(w.size for w in weights))[:-1]
  return (dsim, *(part.reshape(w.shape) for part, w in zip(jnp.split(flat, offsets), weights)))


def _relation_cnn_xla_grad(sim, column_mask, *args):
  weights, grad = args[:-1], args[-1]
  _, vjp = jax.vjp(
    lambda sim, *weights: _relation_cnn_xla(sim, column_mask, dict(zip(_KERNEL_ARGS, weights)), jnp.float32),
    sim,
    *weights,
  )
  return vjp(grad)


def _relation_cnn_kernel_bwd(residuals, grad):
  sim, column_mask, cnn_params = residuals
  grads = jax.lax.platform_dependent(
    sim,
    column_mask,
    *(cnn_params[name] for name in _KERNEL_ARGS),
    grad,
    cpu=_relation_cnn_grad_kernel,
    default=_relation_cnn_xla_grad,
  )
  return grads[0], jnp.zeros_like(column_mask), dict(zip(_KERNEL_ARGS, grads[1:]))


_relation_cnn_kernel.defvjp(_relation_cnn_kernel_fwd, _relation_cnn_kernel_bwd)


def _check_conv_impl(conv_impl: str) -> None:
  if conv_impl not in CONV_IMPLS:
    raise errors.UserError(f'RDAN.conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}')


def uses_kernel(channels: Optional[int], dtype: pairwise.DTypeLike, conv_impl: str) -> bool:
  """Whether `relation_maps` runs the compiled CPU kernel for a relation CNN of `channels` (None: no CNN):
  `conv_impl='auto'`, float32, and a kernel built for that channel count (xmatch_jax/kernels)."""
  _check_conv_impl(conv_impl)
  if channels is None or conv_impl == 'xla' or jnp.dtype(dtype) != jnp.float32:
    return False
  return kernels.relation_cnn_targets(channels) is not None


def relation_maps(
  sim: jax.Array,
  word_valid: jax.Array,
  cnn_params: Optional[dict],
  *,
  use_residual: bool,
  dtype: pairwise.DTypeLike = jnp.float32,
  conv_impl: str = 'auto',
) -> tuple[jax.Array, jax.Array]:
  """The attention logit maps S^1 (column-wise) and S^2 (row-wise) of eqs 6-7.

  Args:
    sim: cosine maps S [b, C, k, n], zero in padded word columns.
    word_valid: [C, n] bool, True for real words.
    cnn_params: output of `RelationCNN` (1 or 2 output channels), or None for no-cnn
      (S^1 = S^2 = S).
    use_residual: add S to the CNN outputs (eq 7); False is the no-res ablation.
    dtype: compute dtype of the convolutions' operands.
    conv_impl: 'auto' (the compiled CPU kernel where `uses_kernel`, else XLA) or 'xla'.

  Returns:
    (S^1, S^2), each [b, C, k, n]; the same array twice for one-path and no-cnn.
  """
  if cnn_params is None:
    return sim, sim
  column_mask = word_valid.astype(sim.dtype)
  if uses_kernel(cnn_params['conv1_kernel'].shape[-1], dtype, conv_impl):
    out = _relation_cnn_kernel(sim.astype(jnp.float32), column_mask, cnn_params)
  else:
    out = _relation_cnn_xla(sim, column_mask, cnn_params, dtype)
  if use_residual:
    out = out + sim[None]
  return out[0], out[-1]


def _masked_softmax(x: jax.Array, axis: int, mask: jax.Array) -> jax.Array:
  """Softmax along `axis` over the entries where `mask` (broadcastable bool) is True."""
  x = jnp.where(mask, x, -jnp.inf)
  x = x - jax.lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True))
  e = jnp.exp(x)
  return e / jnp.sum(e, axis=axis, keepdims=True)


def prepare_items(
  features: jax.Array, valid: Optional[jax.Array] = None, dtype: pairwise.DTypeLike = jnp.float32
) -> dict:
  """Per-item quantities (computed once, outside the blocked pair loop).

  Args:
    features: [N, m, D] regions of N images or words of N captions.
    valid: optional [N, m] bool; invalid positions are zeroed (padding is ignored).
    dtype: compute dtype of the Gram matrices' operands.

  Returns:
    dict with `unit` [N, m, D] (l2-normalised, zero where invalid), `norms` [N, m], `gram`
    [N, m, m] (features features^T) and, if given, `valid`.
  """
  if valid is not None:
    features = jnp.where(valid[..., None], features, 0.0)
  items = {
    'unit': layers.l2norm(features),
    'norms': layers.safe_sqrt(jnp.sum(jnp.square(features), axis=-1)),
    'gram': pairwise.gram(features, dtype),
  }
  if valid is not None:
    items['valid'] = valid
  return items


def dual_attention_weights(
  image: dict,
  text: dict,
  cnn_params: Optional[dict],
  *,
  lambda_: float,
  use_residual: bool,
  dtype: pairwise.DTypeLike = jnp.float32,
  conv_impl: str = 'auto',
) -> dict:
  """The attention weights of eqs 8-9 (e.g. for a figure like the paper's Figure 3).

  Args: as `rdan_block_scores`.

  Returns:
    {'alpha': [b, C, k, n] weights over words for each region (eq 8, zero at padded words),
     'beta': [b, C, k, n] weights over regions for each word (eq 9)}.
  """
  sim = pairwise.region_word_similarity(image['unit'], text['unit'], dtype)
  valid = text['valid']
  s1, s2 = relation_maps(sim, valid, cnn_params, use_residual=use_residual, dtype=dtype, conv_impl=conv_impl)
  return {
    'alpha': _masked_softmax(lambda_ * s2, axis=-1, mask=valid[None, :, None, :]),
    'beta': jax.nn.softmax(lambda_ * s1, axis=-2),
  }


def _cosine(dots: jax.Array, norms_a: jax.Array, sq_norms_b: jax.Array) -> jax.Array:
  """dots / max(|a| |b|, eps) (PyTorch's cosine_similarity clamp)."""
  return dots / jnp.maximum(norms_a * layers.safe_sqrt(sq_norms_b), _EPS)


def _dual_scores(
  sim: jax.Array,
  s1: jax.Array,
  s2: jax.Array,
  image: dict,
  text: dict,
  *,
  lambda_: float,
  mu: float,
  paired: bool = False,
) -> jax.Array:
  """Eqs 8-11 from S [b, C, k, n] and the logit maps S^1, S^2 [b, C, k, n]: scores [b, C] (arguments as
  `rdan_block_scores`; `image` and `text` need `norms` and `gram`, `text` also `valid`). With `paired`, b = 1 and
  `image` holds C images, caption c's own (as `rdan_paired_scores`)."""
  valid = text['valid']  # [C, n]
  region_norms = image['norms'][None] if paired else image['norms'][:, None]  # [1, C, k] or [b, 1, k]
  word_norms = text['norms'][None]  # [1, C, n]
  score = 0.0
  if mu != 1:
    # Row-wise pathway, eq 8: each region attends over the caption's real words.
    alpha = _masked_softmax(lambda_ * s2, axis=-1, mask=valid[None, :, None, :])
    # v_i . a_i = |v_i| sum_j alpha_ij S_ij |e_j|
    dots = region_norms * jnp.sum(alpha * sim * word_norms[:, :, None, :], axis=-1)
    attended_sq = pairwise.attended_word_sq_norms(alpha, text['gram'])
    region_relevance = _cosine(dots, region_norms, attended_sq)  # R_r [b, C, k]
    score = score + (1 - mu) * jnp.mean(region_relevance, axis=-1)
  if mu != 0:
    # Column-wise pathway, eq 9: each word attends over the image's regions.
    beta = jax.nn.softmax(lambda_ * s1, axis=-2)
    # e_j . b_j = |e_j| sum_i beta_ij S_ij |v_i|
    dots = word_norms * jnp.sum(beta * sim * region_norms[..., None], axis=-2)
    attended_sq = pairwise.attended_region_sq_norms(beta, image['gram'], paired)
    word_relevance = _cosine(dots, word_norms, attended_sq)  # R_w [b, C, n]
    word_relevance = jnp.where(valid[None], word_relevance, 0.0)
    score = score + mu * jnp.sum(word_relevance, axis=-1) / jnp.sum(valid, axis=-1)[None]
  return score


def _scores_xla(sim, column_mask, cnn_params, region_norms, word_norms, image_gram, text_gram, opts, conv_impl='xla'):
  """`_scores_kernel`'s computation on XLA (float32); with conv_impl 'auto', the maps from `_relation_cnn_kernel`."""
  lambda_, mu, use_residual = opts
  valid = column_mask > 0
  s1, s2 = relation_maps(sim, valid, cnn_params, use_residual=use_residual, conv_impl=conv_impl)
  image = {'norms': region_norms, 'gram': image_gram}
  text = {'norms': word_norms, 'gram': text_gram, 'valid': valid}
  return _dual_scores(sim, s1, s2, image, text, lambda_=lambda_, mu=mu)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _scores_kernel(sim, column_mask, cnn_params, region_norms, word_norms, image_gram, text_gram, opts):
  """Eqs 6-11 of a block in float32, run on CPUs by the compiled kernel's RdanScores handler
  (xmatch_jax/kernels/relation_cnn.c): each pair's maps, softmaxes and cosines stay in the thread's cache.

  opts: (lambda_, mu, use_residual). Other platforms run `_scores_xla`; differentiated calls run it with the maps
  (forward and backward) from the kernel's RelationCnn and RelationCnnGrad handlers and eqs 7-11 on XLA.
  """
  lambda_, mu, use_residual = opts
  channels = cnn_params['conv1_kernel'].shape[-1]
  target = kernels.relation_cnn_targets(channels)['RdanScores']
  params = jnp.asarray([lambda_, 1 - mu, mu, float(use_residual), float(mu != 1), float(mu != 0)], jnp.float32)
  on_cpu = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(sim.shape[:2], jnp.float32), vmap_method='sequential')
  weights = [cnn_params[name] for name in _KERNEL_ARGS]
  return jax.lax.platform_dependent(
    sim,
    column_mask,
    *weights,
    region_norms,
    word_norms,
    image_gram,
    text_gram,
    cpu=lambda *args: on_cpu(*args, params),
    default=lambda sim, mask, *rest: _scores_xla(sim, mask, dict(zip(_KERNEL_ARGS, rest[:8])), *rest[8:], opts),
  )


def _scores_kernel_fwd(sim, column_mask, cnn_params, region_norms, word_norms, image_gram, text_gram, opts):
  return jax.vjp(
    lambda *args: _scores_xla(*args, opts, conv_impl='auto'),
    sim,
    column_mask,
    cnn_params,
    region_norms,
    word_norms,
    image_gram,
    text_gram,
  )


def _scores_kernel_bwd(opts, vjp, grad):
  return vjp(grad)


_scores_kernel.defvjp(_scores_kernel_fwd, _scores_kernel_bwd)


def rdan_block_scores(
  image: dict,
  text: dict,
  cnn_params: Optional[dict],
  *,
  lambda_: float,
  mu: float,
  use_residual: bool,
  dtype: pairwise.DTypeLike = jnp.float32,
  conv_impl: str = 'auto',
) -> jax.Array:
  """RDAN scores F (eqs 5-11) of a block of images against all captions.

  Args:
    image: `prepare_items(regions)` for b images: unit [b, k, D], norms [b, k], gram [b, k, k].
    text: `prepare_items(words, valid)` for C captions: unit [C, n, D], norms [C, n],
      gram [C, n, n], valid [C, n].
    cnn_params: `RelationCNN` output, or None for no-cnn.
    lambda_: inverse softmax temperature.
    mu: weight of the word relevance (eq 11).
    use_residual: add S to the CNN maps (eq 7).
    dtype: compute dtype of the operands of S and of the relation convolutions.
    conv_impl: how the relation CNN runs, as in `relation_maps`; where the compiled kernel runs, it also
      computes eqs 7-11 (its RdanScores handler).

  Returns:
    [b, C] scores.
  """
  sim = pairwise.region_word_similarity(image['unit'], text['unit'], dtype)  # S [b, C, k, n]
  valid = text['valid']  # [C, n]
  if cnn_params is not None and uses_kernel(cnn_params['conv1_kernel'].shape[-1], dtype, conv_impl):
    return _scores_kernel(
      sim,
      valid.astype(jnp.float32),
      cnn_params,
      image['norms'],
      text['norms'],
      image['gram'],
      text['gram'],
      (float(lambda_), float(mu), bool(use_residual)),
    )
  s1, s2 = relation_maps(sim, valid, cnn_params, use_residual=use_residual, dtype=dtype, conv_impl=conv_impl)
  return _dual_scores(sim, s1, s2, image, text, lambda_=lambda_, mu=mu)


def rdan_paired_scores(
  image: dict,
  text: dict,
  cnn_params: Optional[dict],
  *,
  lambda_: float,
  mu: float,
  use_residual: bool,
  dtype: pairwise.DTypeLike = jnp.float32,
  conv_impl: str = 'auto',
) -> jax.Array:
  """RDAN scores F of image p against caption p only, [P] (the training step's rescored pairs).

  Arguments as `rdan_block_scores`, with P images and P captions. The P maps are one block [1, P, k, n] (the
  caption axis carries the pairs), so on a CPU the relation CNN runs forward and backward in the compiled kernel,
  each pair's maps cut at its caption's last real word; eqs 7-11 run on XLA.
  """
  sim = pairwise.einsum('pkd,pnd->pkn', image['unit'], text['unit'], dtype=dtype)[None]  # [1, P, k, n]
  s1, s2 = relation_maps(sim, text['valid'], cnn_params, use_residual=use_residual, dtype=dtype, conv_impl=conv_impl)
  return _dual_scores(sim, s1, s2, image, text, lambda_=lambda_, mu=mu, paired=True)[0]


class RDAN(matcher.Matcher):
  """RDAN matcher: region FC + bi-GRU words, relation CNN over S, dual pathway attention.

  Attributes:
    vocab_size: number of token ids.
    img_dim: precomputed region feature size.
    embed_size: joint space D (1024).
    word_dim: word embedding size (300).
    num_layers: GRU layers.
    bidirectional: bi-GRU with the directions averaged (eq 4).
    l2norm_features: l2-normalise region and word features as SCAN-family code does; the paper's
      eqs 1 and 4 do not (default False).
    lambda_: inverse temperature of both attention softmaxes (4).
    mu: weight of the word relevance in eq 11 (0.1); 0 and 1 are Table 3's single-pathway
      ablations.
    cnn_channels: channels of the three relation conv layers (32).
    use_cnn: False is the no-cnn ablation (attend with S directly).
    use_residual: False is the no-res ablation (attend with the CNN maps only).
    one_path: one learned map used by both attentions (one-path ablation).
    block_size: images scored per block in `pair_scores` (bounds peak memory).
    remat: recompute each block in the backward pass instead of storing it.
    dtype: 'float32' or 'bfloat16': compute dtype of the encoders' matmuls and GRU gates and of
      the operands of S, the Gram matrices and the relation convolutions. Params, norms,
      softmaxes and the returned scores stay float32. bfloat16 scores are within 2e-3 of float32
      ones (measured 5e-4 at D=64, tests/test_mixed_precision.py).
    conv_impl: 'auto' runs the relation CNN, forward and backward, on CPUs with the compiled
      kernel of xmatch_jax/kernels (float32, power-of-two channels, a C compiler present), else
      XLA; 'xla' always XLA. Both give the same scores to float32 rounding.
  """

  vocab_size: int
  img_dim: int
  embed_size: int = 1024
  word_dim: int = 300
  num_layers: int = 1
  bidirectional: bool = True
  l2norm_features: bool = False
  lambda_: float = 4.0
  mu: float = 0.1
  cnn_channels: int = 32
  use_cnn: bool = True
  use_residual: bool = True
  one_path: bool = False
  block_size: int = 16
  remat: bool = False
  dtype: str = 'float32'
  conv_impl: str = 'auto'

  has_paired_scores = True

  @classmethod
  def describe(cls, fields: dict, sizes: dict) -> str:
    kernel = ', compiled relation CNN' if sizes.get('relation_cnn') == 'compiled kernel' else ''
    return (
      f'RDAN, D {sizes["embed_size"]}, {fields["cnn_channels"]} channels{kernel}, n {sizes["min_len"]}-{sizes["n"]}'
    )

  def __post_init__(self):
    if not 0 <= self.mu <= 1:
      raise errors.UserError(f'RDAN.mu must be in [0, 1], got {self.mu}')
    if self.cnn_channels < 1:
      raise errors.UserError(f'RDAN.cnn_channels must be >= 1, got {self.cnn_channels}')
    if self.block_size < 1:
      raise errors.UserError(f'RDAN.block_size must be >= 1, got {self.block_size}')
    if not self.use_cnn and (self.one_path or not self.use_residual):
      raise errors.UserError(
        'RDAN.use_cnn=False (no-cnn: both attentions use S) cannot be combined with '
        f'one_path=True or use_residual=False; got one_path={self.one_path}, '
        f'use_residual={self.use_residual}'
      )
    layers.compute_dtype(self.dtype, 'RDAN')
    _check_conv_impl(self.conv_impl)
    super().__post_init__()

  def setup(self):
    dtype = layers.DTYPES[self.dtype]
    self.image_encoder = layers.RegionEncoder(self.embed_size, no_imgnorm=not self.l2norm_features, dtype=dtype)
    self.text_encoder = layers.GRUTextEncoder(
      vocab_size=self.vocab_size,
      word_dim=self.word_dim,
      embed_size=self.embed_size,
      num_layers=self.num_layers,
      bidirectional=self.bidirectional,
      no_txtnorm=not self.l2norm_features,
      dtype=dtype,
    )
    if self.use_cnn:
      self.relation_cnn = RelationCNN(self.cnn_channels, 1 if self.one_path else 2)

  def encode_image(self, images: dict) -> dict:
    """images['regions'] [I, k, img_dim] -> {'regions': [I, k, D]} (eq 1)."""
    layers.require_keys(images, ('regions',), 'RDAN.encode_image')
    return {'regions': self.image_encoder(images['regions'])}

  def encode_text(self, text: dict) -> dict:
    """text['tokens'], text['mask'] [C, n] -> {'words': [C, n, D], 'mask': [C, n]} (eqs 2-4)."""
    layers.require_keys(text, ('tokens', 'mask'), 'RDAN.encode_text')
    words, _ = self.text_encoder(text['tokens'], text['mask'])
    return {'words': words, 'mask': text['mask']}

  def pair_scores(self, image_rep: dict, text_rep: dict) -> jax.Array:
    """Scores F of every pair, [I, C], computed in blocks of `block_size` images."""
    words, mask = text_rep['words'], text_rep['mask']
    if words.shape[:2] != mask.shape:
      raise errors.UserError(f'text_rep words {words.shape} and mask {mask.shape} disagree on [C, n]')
    dtype = layers.DTYPES[self.dtype]
    image = prepare_items(image_rep['regions'], dtype=dtype)
    text = prepare_items(words, mask > 0, dtype)
    cnn_params = self.relation_cnn() if self.use_cnn else None
    head = functools.partial(
      rdan_block_scores,
      lambda_=self.lambda_,
      mu=self.mu,
      use_residual=self.use_residual,
      dtype=dtype,
      conv_impl=self.conv_impl,
    )
    # The CNN params go with the (unblocked) text argument: jax.checkpoint sees them as inputs.
    return pairwise.score_in_blocks(
      lambda image_block, shared: head(image_block, shared[0], shared[1]),
      image,
      (text, cnn_params),
      self.block_size,
      remat=self.remat,
    )

  def paired_scores(self, image_rep: dict, text_rep: dict) -> jax.Array:
    """Scores F of image p against caption p, [P] (`rdan_paired_scores`)."""
    dtype = layers.DTYPES[self.dtype]
    return rdan_paired_scores(
      prepare_items(image_rep['regions'], dtype=dtype),
      prepare_items(text_rep['words'], text_rep['mask'] > 0, dtype),
      self.relation_cnn() if self.use_cnn else None,
      lambda_=self.lambda_,
      mu=self.mu,
      use_residual=self.use_residual,
      dtype=dtype,
      conv_impl=self.conv_impl,
    )

  def attention_weights(self, image_rep: dict, text_rep: dict) -> dict:
    """`dual_attention_weights` of every pair (unblocked: for a few images and captions)."""
    dtype = layers.DTYPES[self.dtype]
    image = prepare_items(image_rep['regions'], dtype=dtype)
    text = prepare_items(text_rep['words'], text_rep['mask'] > 0, dtype)
    return dual_attention_weights(
      image,
      text,
      self.relation_cnn() if self.use_cnn else None,
      lambda_=self.lambda_,
      use_residual=self.use_residual,
      dtype=dtype,
      conv_impl=self.conv_impl,
    )

  def pair_flops(self, regions: int, words: int) -> dict:
    k, n = regions, words
    flops = {'similarity': 2 * k * n * self.embed_size}
    if self.use_cnn:
      c, out = self.cnn_channels, 1 if self.one_path else 2
      # 3x1 (1 -> c), 1x3 (c -> c), 3x3 (c -> c), 1x1 (c -> out) at every one of the k x n positions.
      flops['convolution'] = 2 * k * n * (3 * c + 3 * c * c + 9 * c * c + c * out)
    attention = 0
    if self.mu != 1:  # row-wise: alpha . (S |e|), alpha^T G_txt alpha
      attention += 2 * k * n + 2 * k * n * n + 2 * k * n
    if self.mu != 0:  # column-wise: beta . (S |v|), beta^T G_img beta
      attention += 2 * k * n + 2 * k * k * n + 2 * k * n
    flops['attention'] = attention
    return flops

  def item_flops(self, regions: int, words: int) -> tuple[int, int]:
    return 2 * regions * regions * self.embed_size, 2 * words * words * self.embed_size
