"""MobileNetV3-large (Howard et al. 2019) in Flax, laid out like torchvision's `mobilenet_v3_large`.

Inverted-residual bottlenecks (1x1 expand, k x k depthwise, optional squeeze-excitation, 1x1 project; residual when
stride 1 and widths match), hard-swish / ReLU, BatchNorm (eps 1e-3), PyTorch's symmetric padding (k - 1) // 2.
`block_attention` inserts a module into every bottleneck (DAER's dual spatial attention, eqs 4-6), by default after
the projection, before the residual add (`block_attention_at`). Module names follow torchvision's indices
(`features_3`, `block_0`, ...) so `xmatch_jax.convert.torchvision_mobilenet` maps a torchvision state_dict key by
key. Inputs are NHWC.
"""

from typing import Callable
from typing import Optional
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# torchvision's bneck_conf for mobilenet_v3_large: (in, kernel, expanded, out, use_se, activation, stride).
LARGE = (
  (16, 3, 16, 16, False, 'RE', 1),
  (16, 3, 64, 24, False, 'RE', 2),
  (24, 3, 72, 24, False, 'RE', 1),
  (24, 5, 72, 40, True, 'RE', 2),
  (40, 5, 120, 40, True, 'RE', 1),
  (40, 5, 120, 40, True, 'RE', 1),
  (40, 3, 240, 80, False, 'HS', 2),
  (80, 3, 200, 80, False, 'HS', 1),
  (80, 3, 184, 80, False, 'HS', 1),
  (80, 3, 184, 80, False, 'HS', 1),
  (80, 3, 480, 112, True, 'HS', 1),
  (112, 3, 672, 112, True, 'HS', 1),
  (112, 5, 672, 160, True, 'HS', 2),
  (160, 5, 960, 160, True, 'HS', 1),
  (160, 5, 960, 160, True, 'HS', 1),
)
LAST_CHANNEL = 1280
BN_EPS = 1e-3
ATTENTION_PLACES = ('projection', 'expanded', 'residual')
_ACT = {'RE': jax.nn.relu, 'HS': jax.nn.hard_swish}


def make_divisible(value: float, divisor: int = 8) -> int:
  """torchvision's _make_divisible."""
  new = max(divisor, int(value + divisor / 2) // divisor * divisor)
  return new + divisor if new < 0.9 * value else new


class ConvBN(nn.Module):
  """Conv2d (no bias, symmetric padding) + BatchNorm + optional activation (torchvision's Conv2dNormActivation)."""

  features: int
  kernel: int
  stride: int = 1
  groups: int = 1
  activation: Optional[Callable] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    pad = (self.kernel - 1) // 2
    x = nn.Conv(
      self.features,
      (self.kernel, self.kernel),
      strides=self.stride,
      padding=[(pad, pad), (pad, pad)],
      feature_group_count=self.groups,
      use_bias=False,
      name='conv',
    )(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.99, epsilon=BN_EPS, name='bn')(x)
    return self.activation(x) if self.activation is not None else x


class SqueezeExcitation(nn.Module):
  channels: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    squeeze = make_divisible(self.channels // 4)
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = jax.nn.relu(nn.Conv(squeeze, (1, 1), name='fc1')(s))
    s = jax.nn.hard_sigmoid(nn.Conv(self.channels, (1, 1), name='fc2')(s))
    return x * s


class InvertedResidual(nn.Module):
  in_channels: int
  kernel: int
  expanded: int
  out_channels: int
  use_se: bool
  activation: str
  stride: int
  block_attention: Optional[Callable[[], nn.Module]] = None
  block_attention_at: str = 'projection'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if self.block_attention_at not in ATTENTION_PLACES:
      raise ValueError(f'block_attention_at must be one of {ATTENTION_PLACES}, got {self.block_attention_at!r}')
    attend = self.block_attention is not None
    act = _ACT[self.activation]
    y, index = x, 0
    if self.expanded != self.in_channels:
      y = ConvBN(self.expanded, 1, activation=act, name=f'block_{index}')(y, train)
      index += 1
    y = ConvBN(self.expanded, self.kernel, self.stride, groups=self.expanded, activation=act, name=f'block_{index}')(
      y, train
    )
    index += 1
    if self.use_se:
      y = SqueezeExcitation(self.expanded, name=f'block_{index}')(y)
      index += 1
    if attend and self.block_attention_at == 'expanded':
      y = self.block_attention()(y)
    y = ConvBN(self.out_channels, 1, name=f'block_{index}')(y, train)
    if attend and self.block_attention_at == 'projection':
      y = self.block_attention()(y)
    if self.stride == 1 and self.in_channels == self.out_channels:
      y = y + x
    if attend and self.block_attention_at == 'residual':
      y = self.block_attention()(y)
    return y


class MobileNetV3Large(nn.Module):
  """Returns the 960-channel pooled features and, with `num_classes`, the classifier logits.

  Attributes:
    num_classes: classifier outputs (0: no classifier head, as DAER after stage 1-2 training).
    block_attention: factory of a module applied inside every bottleneck (None: the standard network).
    block_attention_at: where in the bottleneck (ATTENTION_PLACES): 'projection' (after the 1x1 projection, before
      the residual add), 'expanded' (on the expanded features after the SE, before the projection: CBAM's
      channel-then-spatial order) or 'residual' (after the residual add). docs/fidelity.md#daer-5.
    config: the bottleneck table (default: LARGE).
  """

  num_classes: int = 1000
  block_attention: Optional[Callable[[], nn.Module]] = None
  block_attention_at: str = 'projection'
  width_mult: float = 1.0
  config: Sequence[tuple] = LARGE

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> dict:
    """images [B, H, W, 3] (normalised as torchvision: ImageNet mean / std) -> {'features': [B, 960 (x width)],
    'logits': [B, num_classes] if num_classes}."""
    adjust = lambda c: make_divisible(c * self.width_mult)  # torchvision's InvertedResidualConfig
    config = [(adjust(i), k, adjust(e), adjust(o), se, act, s) for i, k, e, o, se, act, s in self.config]
    x = ConvBN(config[0][0], 3, 2, activation=jax.nn.hard_swish, name='features_0')(images, train)
    for i, conf in enumerate(config, 1):
      x = InvertedResidual(
        *conf, block_attention=self.block_attention, block_attention_at=self.block_attention_at, name=f'features_{i}'
      )(x, train)
    x = ConvBN(6 * config[-1][3], 1, activation=jax.nn.hard_swish, name=f'features_{len(config) + 1}')(x, train)
    features = jnp.mean(x, axis=(1, 2))
    out = {'features': features}
    if self.num_classes:
      h = jax.nn.hard_swish(nn.Dense(adjust(LAST_CHANNEL), name='classifier_0')(features))
      out['logits'] = nn.Dense(self.num_classes, name='classifier_3')(h)  # dropout (classifier_2) omitted
    return out
