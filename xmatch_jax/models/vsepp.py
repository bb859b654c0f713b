"""VSE++: Improving Visual-Semantic Embeddings with Hard Negatives (Faghri et al., BMVC 2018).

One vector per image and per caption, score = cosine (dot product of l2-normalised vectors), as in
the official code (github.com/fartashf/vsepp, model.py). VSE++ encodes a whole-image CNN feature;
here the image vector is the projected mean of the precomputed regions, so it reads the same inputs
as the other models. The caption vector is the GRU output at the last real token (VSE++'s gather
at `lengths - 1`). Normalisation uses SCAN's l2norm (eps 1e-8; VSE++'s has none), and
`no_txtnorm` is an addition (VSE++ always normalises the caption vector).
"""

import jax
import jax.numpy as jnp

from xmatch_jax import pairwise
from xmatch_jax.models import layers
from xmatch_jax.models import matcher


class VSEPP(matcher.Matcher):
  """VSE++ matcher.

  Attributes:
    vocab_size: number of token ids.
    img_dim: precomputed region feature size.
    embed_size: joint embedding size D.
    word_dim: word embedding size.
    num_layers: GRU layers.
    bidirectional: bidirectional GRU (VSE++ uses a unidirectional one).
    no_imgnorm: skip l2norm of the image vector.
    no_txtnorm: skip l2norm of the caption vector.
    use_abs: take absolute values of both vectors (VSE++'s order-embedding option).
    dtype: 'float32' or 'bfloat16': compute dtype of the encoders' matmuls, the GRU gates and the
      score matmul's operands. Params, norms and the returned scores stay float32. bfloat16 scores
      are within 5e-3 of float32 ones (measured 1.5e-3 at D=64, tests/test_mixed_precision.py).
  """

  vocab_size: int
  img_dim: int
  embed_size: int = 1024
  word_dim: int = 300
  num_layers: int = 1
  bidirectional: bool = False
  no_imgnorm: bool = False
  no_txtnorm: bool = False
  use_abs: bool = False
  dtype: str = 'float32'

  def __post_init__(self):
    layers.compute_dtype(self.dtype, 'VSEPP')
    super().__post_init__()

  def setup(self):
    dtype = layers.DTYPES[self.dtype]
    self.image_encoder = layers.RegionEncoder(self.embed_size, no_imgnorm=True, dtype=dtype)
    # Per-word normalisation is SCAN's; VSE++ normalises the caption vector instead.
    self.text_encoder = layers.GRUTextEncoder(
      vocab_size=self.vocab_size,
      word_dim=self.word_dim,
      embed_size=self.embed_size,
      num_layers=self.num_layers,
      bidirectional=self.bidirectional,
      no_txtnorm=True,
      dtype=dtype,
    )

  def _finish(self, x: jax.Array, skip_norm: bool) -> jax.Array:
    if not skip_norm:
      x = layers.l2norm(x)
    return jnp.abs(x) if self.use_abs else x

  def encode_image(self, images: dict) -> dict:
    """images['regions'] [I, k, img_dim] -> {'embedding': [I, D]}."""
    layers.require_keys(images, ('regions',), 'VSEPP.encode_image')
    regions = self.image_encoder(images['regions'])
    return {'embedding': self._finish(jnp.mean(regions, axis=1), self.no_imgnorm)}

  def encode_text(self, text: dict) -> dict:
    """text['tokens'], text['mask'] [C, n] -> {'embedding': [C, D]}."""
    layers.require_keys(text, ('tokens', 'mask'), 'VSEPP.encode_text')
    _, final = self.text_encoder(text['tokens'], text['mask'])
    return {'embedding': self._finish(final, self.no_txtnorm)}

  def pair_scores(self, image_rep: dict, text_rep: dict) -> jax.Array:
    """[I, C] dot products of the image and caption vectors."""
    return pairwise.matmul(image_rep['embedding'], text_rep['embedding'].T, layers.DTYPES[self.dtype])

  def global_scores(self, image_rep: dict, text_rep: dict, block_size: int = 16) -> jax.Array:
    """The full score itself (one matmul): re-ranking has nothing to gain."""
    del block_size
    return image_rep['embedding'] @ text_rep['embedding'].T

  def example_reps(self, seed, n_images, n_captions, regions, words, min_len):
    """One random vector per item: {'embedding': [I, D]}, {'embedding': [C, D]}."""
    image_rep, text_rep = super().example_reps(seed, n_images, n_captions, regions, words, min_len)
    return {'embedding': image_rep['regions'][:, 0]}, {'embedding': text_rep['words'][:, 0]}

  def pair_flops(self, regions: int, words: int) -> dict:
    del regions, words
    return {'similarity': 2 * self.embed_size}
