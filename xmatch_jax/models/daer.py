"""DAER (Huang, Hu and Su, Entropy 2023, 25, 1216): dual attention and the enhanced relation network, secs 3.1-3.3.

  (1-3) text, dual region attention over word positions: X^ts = sigma(f(W_0 avg_s(X) + W_0 max_s(X))),
        X^tb = sigma(f(W_1 avg_b(X) + W_1 max_b(X))), X^tf = X^ts * X^tb * X  (kernels s = 3, b = 7; f an MLP with
        hidden layers 512, 1024, 512, shared by both)
  (4-6) image, dual spatial attention inside every MobileNetV3 bottleneck: X^is = sigma(conv_nxn([avg_c; max_c])),
        X^ib = sigma(conv_mxm([avg_c; max_c])), X^if = X^is * X^ib * X  (n = 3, m = 7; channel-wise pools)
  (7-10) relation network on every (text, image) pair: R = [R^t; R^i], R^e = sign(R) |R|^k (k = 0.6),
        S = MLP 600-1024-512-1 (sigmoid output: trained towards T in {0, 1}, eq 11)

Readings where the paper is silent: pooling windows over words are 'same' sized, stride 1, over real words only;
W_0 / W_1 are d x d linear maps; f ends in a d-wide layer so the weights are per position and feature; the text
vector is the mean of X^tf over real words. The relation MLP's first layer acts on the concatenation, so it splits
into per-item projections W_t R^e_t + W_i R^e_i computed once per text and per image (the pair-wise work is then the
1024 -> 512 -> 1 layers only).
"""

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xmatch_jax import errors
from xmatch_jax import pairwise
from xmatch_jax.models import matcher
from xmatch_jax.models import mobilenet_v3
from xmatch_jax.models.layers import symmetric_uniform
from xmatch_jax.models.mobilenet_v3 import MobileNetV3Large

POWER = 0.6
# torchvision's ImageNet normalisation, which the MobileNetV3 weights a user converts were trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
KERAS_EMBEDDING_LIMIT = 0.05  # tf.keras.layers.Embedding: uniform(-0.05, 0.05)


def kernel_init(keras: bool) -> nn.initializers.Initializer:
  """Dense / conv kernels: Keras' glorot_uniform (the paper's TensorFlow 2.4) or Flax's lecun_normal (DAER-12)."""
  return nn.initializers.glorot_uniform() if keras else nn.initializers.lecun_normal()


def glorot_of_whole(fan_in: int, fan_out: int) -> nn.initializers.Initializer:
  """glorot_uniform for a piece of a larger Keras kernel: U(+-sqrt(6 / (fan_in + fan_out))), fans of the whole."""
  return symmetric_uniform((6.0 / (fan_in + fan_out)) ** 0.5)


@jax.custom_jvp
def signed_power(x: jax.Array, k: float = POWER) -> jax.Array:
  """Eqs 8-9: sign(x) |x|^k. The derivative k |x|^(k-1) is infinite at 0 for k < 1; it is defined as 0 there."""
  return jnp.sign(x) * jnp.abs(x) ** k


@signed_power.defjvp
def _signed_power_jvp(primals, tangents):
  x, k = primals
  dx, _ = tangents
  nonzero = x != 0
  slope = jnp.where(nonzero, k * jnp.abs(jnp.where(nonzero, x, 1.0)) ** (k - 1), 0.0)
  return signed_power(x, k), slope * dx


def _masked_window_pool(x: jax.Array, valid: jax.Array, window: int) -> tuple[jax.Array, jax.Array]:
  """Average and max over a centred window of `window` positions along axis 1, real positions only.

  x [N, n, d], valid [N, n] bool -> (avg, max) [N, n, d]; padded positions get 0.
  """
  half = window // 2
  n = x.shape[1]
  padded = jnp.pad(jnp.where(valid[..., None], x, 0.0), ((0, 0), (half, half), (0, 0)))
  mask = jnp.pad(valid, ((0, 0), (half, half)))
  windows = jnp.stack([padded[:, j : j + n] for j in range(window)], axis=2)  # [N, n, window, d]
  window_mask = jnp.stack([mask[:, j : j + n] for j in range(window)], axis=2)[..., None]
  count = jnp.maximum(jnp.sum(window_mask, axis=2), 1)
  avg = jnp.sum(windows * window_mask, axis=2) / count
  mx = jnp.max(jnp.where(window_mask, windows, -jnp.inf), axis=2)
  keep = valid[..., None]
  return jnp.where(keep, avg, 0.0), jnp.where(keep, mx, 0.0)


class DualRegionAttention(nn.Module):
  """Eqs 1-3 on word features x [N, n, d] with valid [N, n] -> X^tf [N, n, d] (zero at padding)."""

  small: int = 3
  large: int = 7
  hidden: Sequence[int] = (512, 1024, 512)
  keras_init: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, valid: jax.Array) -> jax.Array:
    d = x.shape[-1]
    dense = functools.partial(nn.Dense, kernel_init=kernel_init(self.keras_init))
    layers = [dense(h, name=f'mlp_{i}') for i, h in enumerate(self.hidden)] + [dense(d, name='mlp_out')]

    def f(h):  # f_theta, shared by both kernel sizes
      for layer in layers[:-1]:
        h = jax.nn.relu(layer(h))
      return layers[-1](h)

    weights = []
    for window, name in ((self.small, 'w0'), (self.large, 'w1')):
      avg, mx = _masked_window_pool(x, valid, window)
      shared = dense(d, use_bias=False, name=name)  # W_0 / W_1, shared by the avg and max pools
      weights.append(jax.nn.sigmoid(f(shared(avg) + shared(mx))))
    return jnp.where(valid[..., None], weights[0] * weights[1] * x, 0.0)


class DualSpatialAttention(nn.Module):
  """Eqs 4-6 on a feature map x [B, H, W, C] -> X^if [B, H, W, C]."""

  small: int = 3
  large: int = 7
  keras_init: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pooled = jnp.concatenate([jnp.mean(x, axis=-1, keepdims=True), jnp.max(x, axis=-1, keepdims=True)], axis=-1)
    out = x
    for size, name in ((self.small, 'conv_small'), (self.large, 'conv_large')):
      pad = size // 2
      conv = nn.Conv(
        1, (size, size), padding=[(pad, pad), (pad, pad)], kernel_init=kernel_init(self.keras_init), name=name
      )
      out = out * jax.nn.sigmoid(conv(pooled))
    return out


class DenseParams(nn.Module):
  """The params of an nn.Dense (same names; Flax's initialisers by default), returned for use inside jax transforms
  or fused matmuls. in_features -> {'kernel': [in, features], 'bias': [features] (with use_bias)}."""

  features: int
  use_bias: bool = True
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, in_features: int) -> dict:
    params = {'kernel': self.param('kernel', self.kernel_init, (in_features, self.features))}
    if self.use_bias:
      params['bias'] = self.param('bias', self.bias_init, (self.features,))
    return params


class KerasLSTMCell(nn.LSTMCell):
  """nn.LSTMCell's equations and parameter names, initialised as tf.keras.layers.LSTM (DAER-12): glorot_uniform
  over the stacked [in, 4H] input kernel, zero biases except the forget gate's 1 (`unit_forget_bias`), and each
  gate's recurrent [H, H] block drawn as a block of an orthogonal [H, 4H] (Keras draws one stacked matrix, so its
  blocks are also orthogonal jointly; here each gate draws its own). The cell's initialiser fields are not used.

  carry (c, h) [..., H], inputs [..., in] -> ((c', h'), h').
  """

  @nn.compact
  def __call__(self, carry, inputs):
    c, h = carry
    hidden, fan_in = h.shape[-1], inputs.shape[-1]

    def recurrent_block(key, shape, dtype=jnp.float32):
      return nn.initializers.orthogonal()(key, (shape[0], 4 * shape[1]), dtype)[:, : shape[1]]

    input_init = glorot_of_whole(fan_in, 4 * hidden)
    input_kernels, recurrent_kernels, biases = [], [], []
    for gate in 'ifgo':
      inputs_part = DenseParams(hidden, use_bias=False, kernel_init=input_init, name=f'i{gate}')(fan_in)
      input_kernels.append(inputs_part['kernel'])
      bias_init = nn.initializers.ones_init() if gate == 'f' else nn.initializers.zeros_init()
      recurrent = DenseParams(hidden, kernel_init=recurrent_block, bias_init=bias_init, name=f'h{gate}')(hidden)
      recurrent_kernels.append(recurrent['kernel'])
      biases.append(recurrent['bias'])
    y = (
      inputs @ jnp.concatenate(input_kernels, axis=-1)
      + h @ jnp.concatenate(recurrent_kernels, axis=-1)
      + jnp.concatenate(biases)
    )
    i, f, g, o = jnp.split(y, 4, axis=-1)
    new_c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    new_h = jax.nn.sigmoid(o) * jnp.tanh(new_c)
    return (new_c, new_h), new_h


def _relation_head(first_image: jax.Array, first_text: jax.Array, layers: list) -> jax.Array:
  """first_image [b, h0], first_text [T, h0] (first layer, per item) -> similarities [b, T]."""
  h = jax.nn.relu(first_image[:, None, :] + first_text[None, :, :])  # [b, T, h0]
  for p in layers[:-1]:
    h = jax.nn.relu(h @ p['kernel'] + p['bias'])
  return jax.nn.sigmoid((h @ layers[-1]['kernel'] + layers[-1]['bias'])[..., 0])


class RelationNetwork(nn.Module):
  """Eqs 7-10 for every (text, image) pair: text [T, d_t], image [I, d_i] -> similarities [T, I] in (0, 1).

  The pair-wise layers run in blocks of `block_size` images (0: all at once), so memory is bounded by
  block_size x T x hidden[0].
  """

  hidden: Sequence[int] = (1024, 512)
  power: float = POWER
  block_size: int = 0
  keras_init: bool = False

  @nn.compact
  def __call__(self, text: jax.Array, image: jax.Array) -> jax.Array:
    # First layer on [R^e_t; R^e_i] = W_t R^e_t + W_i R^e_i + b: per item, then broadcast over pairs. Keras would
    # initialise the one [d_t + d_i, h0] kernel, so each half takes the whole kernel's glorot bound.
    first_init = (
      glorot_of_whole(text.shape[-1] + image.shape[-1], self.hidden[0]) if self.keras_init else kernel_init(False)
    )
    first_t = nn.Dense(self.hidden[0], kernel_init=first_init, name='fc0_text')(signed_power(text, self.power))
    first_i = nn.Dense(self.hidden[0], use_bias=False, kernel_init=first_init, name='fc0_image')(
      signed_power(image, self.power)
    )
    widths = list(self.hidden) + [1]
    layers = [
      DenseParams(
        widths[i + 1],
        kernel_init=kernel_init(self.keras_init),
        name=f'fc{i + 1}' if i + 1 < len(self.hidden) else 'out',
      )(widths[i])
      for i in range(len(self.hidden))
    ]
    block = self.block_size or image.shape[0]
    scores = pairwise.score_in_blocks(
      lambda image_block, shared: _relation_head(image_block, *shared), first_i, (first_t, layers), block
    )
    return scores.T


def relation_loss(similarities: jax.Array, text_labels: jax.Array, image_labels: jax.Array) -> jax.Array:
  """Eq 11: ||T - P||_F^2 with T[q, p] = 1 when text q and image p share a category."""
  target = (text_labels[:, None] == image_labels[None, :]).astype(similarities.dtype)
  return jnp.sum(jnp.square(target - similarities))


class DAERText(nn.Module):
  """Sec 3.1: word embedding -> LSTM -> dual region attention (eqs 1-3) -> mean over real words -> FC.

  tokens, mask [C, n] -> [C, embed_size]. Without `region_attention` (DAER-C, DAER-I) the LSTM states are pooled
  directly.
  """

  vocab_size: int
  word_dim: int = 300
  lstm_size: int = 300
  embed_size: int = 300
  region_attention: bool = True
  attention_hidden: Sequence[int] = (512, 1024, 512)
  keras_init: bool = False  # DAER-12

  @nn.compact
  def __call__(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    valid = mask > 0
    embedding_init = symmetric_uniform(KERAS_EMBEDDING_LIMIT) if self.keras_init else nn.linear.default_embed_init
    x = nn.Embed(self.vocab_size, self.word_dim, embedding_init=embedding_init, name='embed')(tokens)
    lengths = jnp.sum(valid, axis=1).astype(jnp.int32)
    # Padding is at the end, so a forward LSTM's states at real words do not see it.
    cell = KerasLSTMCell if self.keras_init else nn.OptimizedLSTMCell
    x = nn.RNN(cell(self.lstm_size, name='lstm'))(x, seq_lengths=lengths)
    if self.region_attention:
      x = DualRegionAttention(hidden=self.attention_hidden, keras_init=self.keras_init, name='region_attention')(
        x, valid
      )
    pooled = jnp.sum(jnp.where(valid[..., None], x, 0.0), axis=1) / jnp.maximum(lengths, 1)[:, None]
    return nn.Dense(self.embed_size, kernel_init=kernel_init(self.keras_init), name='fc')(pooled)


class DAERImage(nn.Module):
  """Sec 3.2 / 4.4: MobileNetV3-large (dual spatial attention in every bottleneck, eqs 4-6) with its head (FC 1280,
  hard-swish, dropout 0.2) and, in place of its classification layer, an FC to the 1 x 300 representation. Stage 2
  trains a classification layer on that representation and removes it (docs/fidelity.md#daer-2).
  `head_hidden=0` removes MobileNetV3's head with its classifier: dropout, then the FC to 300 on the pooled features.

  pixels [B, H, W, 3] uint8 -> (representation [B, embed_size], pooled CNN features [B, 960 x width]).
  `train=True` needs a 'dropout' rng.
  """

  embed_size: int = 300
  spatial_attention: bool = True
  width_mult: float = 1.0
  head_hidden: int = mobilenet_v3.LAST_CHANNEL
  dropout: float = 0.2
  spatial_attention_at: str = 'projection'  # place in each bottleneck (docs/fidelity.md#daer-5)
  keras_init: bool = False  # the attention convs, head and FC (DAER-12); MobileNetV3 itself as torchvision

  @nn.compact
  def __call__(self, pixels: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    x = (pixels.astype(jnp.float32) / 255.0 - jnp.array(IMAGENET_MEAN)) / jnp.array(IMAGENET_STD)
    cnn = MobileNetV3Large(
      num_classes=0,
      width_mult=self.width_mult,
      name='mobilenet',
      block_attention=(
        functools.partial(DualSpatialAttention, keras_init=self.keras_init) if self.spatial_attention else None
      ),
      block_attention_at=self.spatial_attention_at,
    )
    features = cnn(x, train=train)['features']
    dense = functools.partial(nn.Dense, kernel_init=kernel_init(self.keras_init))
    head = features
    if self.head_hidden:
      width = mobilenet_v3.make_divisible(self.head_hidden * self.width_mult)  # torchvision's last_channel
      head = jax.nn.hard_swish(dense(width, name='head')(features))
    head = nn.Dropout(self.dropout, deterministic=not train)(head)
    return dense(self.embed_size, name='fc')(head), features


class DAER(matcher.Matcher):
  """DAER (Huang, Hu and Su, Entropy 2023): text and image modules, the enhanced relation network on all pairs.

  The matcher interface scores pairs with the relation network (eq 10, a probability of "same category");
  `classify_text` and `classify_image` are the heads of training stages 1 and 2 (Algorithm 1), which stage 3
  drops. Variants (Table 3): DAER-C = neither attention and power 1, DAER-I = spatial attention only, DAER-T =
  region attention only, DAER-I-T = both attentions with power 1, DAER = both with power k = 0.6.

  Inputs: images {'pixels': [B, H, W, 3] uint8}; text {'tokens', 'mask': [C, n]}. BatchNorm statistics live in
  the `batch_stats` collection; `train=True` uses batch statistics and updates them.
  """

  vocab_size: int
  img_dim: int = 0  # unused: DAER reads pixels, not region features
  num_classes: int = 0  # categories of the dataset (stage 1-2 heads)
  word_dim: int = 300
  lstm_size: int = 300
  embed_size: int = 300
  region_attention: bool = True  # text, eqs 1-3
  spatial_attention: bool = True  # image, eqs 4-6
  spatial_attention_at: str = 'projection'  # its place in a bottleneck: mobilenet_v3.ATTENTION_PLACES
  attention_hidden: Sequence[int] = (512, 1024, 512)
  width_mult: float = 1.0
  power: float = POWER  # eqs 8-9; 1.0 = plain relation network
  relation_hidden: Sequence[int] = (1024, 512)
  image_head_hidden: int = 1280  # MobileNetV3's head width (x width_mult, as torchvision); 0: no head (DAER-2)
  image_dropout: float = 0.2  # MobileNetV3's head dropout
  block_size: int = 256  # images per block of the all-pairs relation MLP
  keras_init: bool = False  # TensorFlow 2's Keras initialisers (DAER-12); the config's default is True

  image_keys = ('pixels',)
  item_flops_key = 'item_first_layer'
  example_canvas = 32  # height and width of `example_images` (any size works: the CNN pools globally)

  @classmethod
  def describe(cls, fields: dict, sizes: dict) -> str:
    hidden = '-'.join(str(h) for h in fields.get('relation_hidden', cls.relation_hidden))
    return f'DAER relation network, D {sizes["embed_size"]}, MLP {2 * sizes["embed_size"]}-{hidden}-1'

  @classmethod
  def upgrade_fields(cls, fields: dict) -> None:
    fields.setdefault('spatial_attention_at', 'projection')  # the only place before the field existed
    fields.setdefault('keras_init', False)  # Flax's initialisers before the field existed

  def setup(self):
    self.text = DAERText(
      self.vocab_size,
      self.word_dim,
      self.lstm_size,
      self.embed_size,
      self.region_attention,
      self.attention_hidden,
      self.keras_init,
    )
    self.image = DAERImage(
      self.embed_size,
      self.spatial_attention,
      self.width_mult,
      self.image_head_hidden,
      self.image_dropout,
      self.spatial_attention_at,
      self.keras_init,
    )
    self.relation = RelationNetwork(
      hidden=self.relation_hidden, power=self.power, block_size=self.block_size, keras_init=self.keras_init
    )
    self.text_classifier = nn.Dense(max(self.num_classes, 1), kernel_init=kernel_init(self.keras_init))
    self.image_classifier = nn.Dense(max(self.num_classes, 1), kernel_init=kernel_init(self.keras_init))

  def encode_image(self, images: dict, train: bool = False) -> jax.Array:
    """{'pixels': [B, H, W, 3]} -> [B, embed_size]."""
    return self.image(images['pixels'], train)[0]

  def encode_text(self, text: dict) -> jax.Array:
    """{'tokens', 'mask': [C, n]} -> [C, embed_size]."""
    return self.text(text['tokens'], text['mask'])

  def pair_scores(self, image_rep: jax.Array, text_rep: jax.Array) -> jax.Array:
    """Eqs 7-10 on every pair -> [I, C] in (0, 1), in blocks of `block_size` images."""
    return self.relation(text_rep, image_rep).T

  def classify_text(self, text: dict) -> jax.Array:
    """Stage 1 logits [C, num_classes]."""
    return self.text_classifier(self.encode_text(text))

  def classify_image(self, images: dict, train: bool = False) -> jax.Array:
    """Stage 2 logits [B, num_classes]: a classification layer on the 1 x 300 representation, removed after this
    stage (sec 4.4), so stage 2 trains the whole image module, its FC to 300 included."""
    return self.image_classifier(self.encode_image(images, train))

  def __call__(self, images: dict, text: dict, train: bool = False) -> jax.Array:
    return self.pair_scores(self.encode_image(images, train), self.encode_text(text))

  def example_images(self, rng: np.random.Generator, batch: int, regions: int) -> dict:
    del regions
    size = self.example_canvas
    return {'pixels': rng.integers(0, 256, (batch, size, size, 3)).astype(np.uint8)}

  def example_reps(self, seed, n_images, n_captions, regions, words, min_len):
    """One random 1 x embed_size representation per item: [I, D], [C, D]."""
    image_rep, text_rep = super().example_reps(seed, n_images, n_captions, regions, words, min_len)
    return image_rep['regions'][:, 0], text_rep['words'][:, 0]

  def global_scores(self, image_rep, text_rep, block_size: int = 16) -> jax.Array:
    raise errors.UserError('DAER scores by mAP over categories; two-stage retrieval (--rerank_k) does not apply')

  def _relation_widths(self) -> list:
    return list(self.relation_hidden) + [1]

  def pair_flops(self, regions: int, words: int) -> dict:
    # The first layer is split per item (item_flops); per pair only its sum, then h0 -> h1 -> ... -> 1.
    del regions, words
    widths = self._relation_widths()
    return {'relation_mlp': sum(2 * a * b for a, b in zip(widths, widths[1:]))}

  def item_flops(self, regions: int, words: int) -> tuple[int, int]:
    """The relation network's first layer, W_i R^e_i per image and W_t R^e_t per caption."""
    del regions, words
    h0 = self._relation_widths()[0]
    return 2 * self.embed_size * h0, 2 * self.embed_size * h0
