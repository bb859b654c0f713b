"""Shared layers: SCAN's normalisation, region encoder and GRU text encoder; the compute dtypes.

Follows the official SCAN code (github.com/kuanghuei/SCAN, model.py: l2norm, EncoderImagePrecomp,
EncoderText), which VSE++ shares up to how it reads the caption vector.
"""

from typing import Any
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from xmatch_jax import errors

# Values of a matcher's `dtype` field (config.model.dtype): the dtype of its matmuls' operands.
# Params, norms, softmaxes, the returned scores and the loss stay float32 either way.
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def compute_dtype(name: str, model: str) -> Any:
  """The jnp dtype named by a matcher's `dtype` field; unknown names are a ValueError."""
  if name not in DTYPES:
    raise errors.UserError(f'config.model.dtype ({model}.dtype) must be one of {tuple(DTYPES)}, got {name!r}')
  return DTYPES[name]


def mixed_dot_general(dtype: Any):
  """A `dot_general` for nn.Dense: operands cast to `dtype`, accumulated and returned in float32.

  Unlike nn.Dense(dtype=...), the bias and the output stay float32.
  """

  def dot_general(x, y, dimension_numbers, precision=None, preferred_element_type=None):
    del preferred_element_type
    return jax.lax.dot_general(
      x.astype(dtype), y.astype(dtype), dimension_numbers, precision=precision, preferred_element_type=jnp.float32
    )

  return dot_general


def safe_sqrt(x: jax.Array) -> jax.Array:
  """sqrt(max(x, 0)) with a zero (not infinite or NaN) gradient where x <= 0.

  Squared norms computed as quadratic forms can round slightly below zero, and zero vectors
  (padding) must not turn the backward pass into NaN.
  """
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def l2norm(x: jax.Array, axis: int = -1, eps: float = 1e-8) -> jax.Array:
  """SCAN's l2norm: x / (sqrt(sum x^2) + eps) along `axis` (zero vectors stay zero)."""
  norm = safe_sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
  return x * (1.0 / (norm + eps))  # one reciprocal per vector, not a division per element


def symmetric_uniform(limit: float) -> nn.initializers.Initializer:
  """Initializer drawing from uniform(-limit, limit) (PyTorch's `uniform_(-limit, limit)`)."""

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, minval=-limit, maxval=limit)

  return init


class RegionEncoder(nn.Module):
  """SCAN's EncoderImagePrecomp: a linear map of each precomputed region feature, then l2norm.

  The kernel is drawn from uniform(-r, r), r = sqrt(6 / (in + out)) (SCAN's Xavier init, identical
  to Flax's glorot_uniform), the bias is zero.

  Attributes:
    embed_size: joint embedding size D.
    no_imgnorm: skip the final l2 normalisation.
    dtype: compute dtype of the linear map's operands (output float32).
  """

  embed_size: int
  no_imgnorm: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, regions: jax.Array) -> jax.Array:
    """Maps regions [..., d_img] to [..., embed_size]."""
    features = nn.Dense(
      self.embed_size,
      kernel_init=nn.initializers.glorot_uniform(),
      bias_init=nn.initializers.zeros_init(),
      dot_general=mixed_dot_general(self.dtype),
      name='fc',
    )(regions)
    return features if self.no_imgnorm else l2norm(features)


def _gru(hidden: int, name: str, dtype: Any = jnp.float32) -> nn.RNN:
  """A GRU over time, initialised like PyTorch's nn.GRU: all weights and biases ~ U(+-1/sqrt(H)).

  Flax's GRUCell computes the same equations as PyTorch's GRU
      r = sigmoid(W_ir x + b_ir + W_hr h + b_hr), z = sigmoid(W_iz x + b_iz + W_hz h + b_hz),
      n = tanh(W_in x + b_in + r * (W_hn h + b_hn)), h' = (1 - z) * n + z * h,
  but keeps one bias per gate for r and z: Flax `ir.bias` = b_ir + b_hr, `iz.bias` = b_iz + b_hz,
  `hr`/`hz` have no bias, `in.bias` = b_in and `hn.bias` = b_hn. Flax kernels are the transposed
  PyTorch row blocks (PyTorch stacks the gates in the order r, z, n in weight_ih / weight_hh).
  With a `dtype` other than float32 the gates are computed in it (flax's GRUCell `dtype`); params
  and the carried hidden state stay float32.
  """
  init = symmetric_uniform(hidden**-0.5)
  # The cell is created in the caller's scope, so its name is the parameter path.
  cell = nn.GRUCell(
    hidden,
    kernel_init=init,
    recurrent_kernel_init=init,
    bias_init=init,
    dtype=dtype,
    param_dtype=jnp.float32,
    name=name,
  )
  return nn.RNN(cell)


class GRUTextEncoder(nn.Module):
  """SCAN's EncoderText: word embedding, (bi)GRU over the real tokens, per-word l2norm.

  As with PyTorch's pack_padded_sequence, each direction only sees the caption's real tokens: the
  backward direction starts at the last real token. With `bidirectional`, every layer after the
  first reads the concatenated [forward, backward] outputs (as nn.GRU does) and the last layer's
  two directions are averaged, (h_fwd + h_bwd) / 2, as in SCAN.

  Attributes:
    vocab_size: number of token ids.
    word_dim: word embedding size.
    embed_size: GRU hidden size = joint embedding size D.
    num_layers: stacked GRU layers.
    bidirectional: run a backward GRU too and average the directions.
    no_txtnorm: skip the per-word l2 normalisation.
    dtype: compute dtype of the GRU gates (outputs float32).
  """

  vocab_size: int
  word_dim: int
  embed_size: int
  num_layers: int = 1
  bidirectional: bool = False
  no_txtnorm: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
    self, tokens: jax.Array, mask: jax.Array, embedded: jax.Array | None = None
  ) -> tuple[jax.Array, jax.Array]:
    """Encodes captions.

    Args:
      tokens: [C, n] int token ids.
      mask: [C, n], 1 for real tokens (a non-empty prefix of each row), 0 for padding.
      embedded: optional [C, n, word_dim] word vectors to run the GRU on instead of the embedding table
        (GLFN feeds projected BERT features); no embedding table is created then.

    Returns:
      words: [C, n, embed_size], per-word features (l2-normalised unless no_txtnorm), exactly
        zero at padded positions.
      final: [C, embed_size], the caption vector VSE++ reads: the output at the last real token
        (bidirectional: the average of the forward output there and the backward output at the
        first token, i.e. each direction's final state). Not normalised.
    """
    if tokens.shape != mask.shape:
      raise errors.UserError(f'tokens {tokens.shape} and mask {mask.shape} must have the same shape')
    valid = mask > 0
    lengths = jnp.sum(valid, axis=-1).astype(jnp.int32)
    if embedded is not None:
      x = embedded
    else:
      x = nn.Embed(self.vocab_size, self.word_dim, embedding_init=symmetric_uniform(0.1), name='embed')(tokens)

    for layer in range(self.num_layers):
      forward = _gru(self.embed_size, f'forward_{layer}', self.dtype)(x, seq_lengths=lengths)
      if not self.bidirectional:
        x = forward
        continue
      backward = _gru(self.embed_size, f'backward_{layer}', self.dtype)(
        x, seq_lengths=lengths, reverse=True, keep_order=True
      )
      x = jnp.concatenate([forward, backward], axis=-1)

    if self.bidirectional:
      out = (forward + backward) / 2
      last_forward = _take_positions(forward, lengths - 1)
      final = (last_forward + backward[:, 0]) / 2
    else:
      out = forward
      final = _take_positions(forward, lengths - 1)

    if not self.no_txtnorm:
      out = l2norm(out)
    words = jnp.where(valid[..., None], out, 0.0)
    return words, final


def _take_positions(x: jax.Array, positions: jax.Array) -> jax.Array:
  """x[c, positions[c]] for x [C, n, D], positions [C] -> [C, D]."""
  return jnp.take_along_axis(x, positions[:, None, None], axis=1)[:, 0]


def require_keys(inputs: dict, keys: Sequence[str], where: str) -> None:
  """Raises a ValueError naming `where` if `inputs` lacks any of `keys`."""
  missing = [key for key in keys if key not in inputs]
  if missing:
    raise errors.UserError(f'{where}: input dict lacks {missing}; got keys {sorted(inputs)}')
