"""Flax MobileNetV3-large against torchvision's mobilenet_v3_large on converted weights: a stored reference
(tests/fixtures, made by make_fixtures.mobilenet with torchvision) in every run, and a live comparison at full width
when torchvision is installed."""

import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xmatch_jax.convert import torchvision_mobilenet
from xmatch_jax.models import daer
from xmatch_jax.models import mobilenet_v3
from xmatch_jax.models.mobilenet_v3 import MobileNetV3Large

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures')


def _convert(model, state, size=64):
  expected = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
  return jax.tree.map(jnp.asarray, torchvision_mobilenet.convert_state_dict(state, expected))


def test_equals_torchvision_reference_width_025():
  state = torchvision_mobilenet.read_state_dict(os.path.join(FIXTURES, 'mobilenet_v3_large_w025.safetensors'))
  expected = np.load(os.path.join(FIXTURES, 'mobilenet_v3_expected.npz'))
  model = MobileNetV3Large(num_classes=7, width_mult=0.25)
  variables = _convert(model, state)
  out = model.apply(variables, expected['images'].transpose(0, 2, 3, 1))
  np.testing.assert_allclose(out['features'], expected['features'], atol=1e-4, rtol=0)
  np.testing.assert_allclose(out['logits'], expected['logits'], atol=1e-4, rtol=0)


def test_bad_state_dicts_name_the_key():
  state = dict(torchvision_mobilenet.read_state_dict(os.path.join(FIXTURES, 'mobilenet_v3_large_w025.safetensors')))
  model = MobileNetV3Large(num_classes=7, width_mult=0.25)
  with pytest.raises(ValueError, match=r'classifier_3/bias has shape \(7,\); the model expects \(9,\)'):
    _convert(MobileNetV3Large(num_classes=9, width_mult=0.25), state)
  state['features.3.block.9.weight'] = np.zeros(3)
  with pytest.raises(ValueError, match="'features.3.block.9.weight' is not a mobilenet_v3_large weight"):
    _convert(model, state)


def test_dual_spatial_attention_goes_inside_every_bottleneck():
  model = MobileNetV3Large(num_classes=0, width_mult=0.25, block_attention=daer.DualSpatialAttention)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  with_attention = [
    name for name, block in variables['params'].items() if any(k.startswith('DualSpatialAttention') for k in block)
  ]
  assert len(with_attention) == 15 and 'classifier_0' not in variables['params']


class _ZeroGate(nn.Module):
  """Multiplies by a per-channel parameter initialised to zero: its shape shows which tensor it gates."""

  @nn.compact
  def __call__(self, x):
    return x * self.param('gate', nn.initializers.zeros, (x.shape[-1],))


@pytest.mark.parametrize(
  'place, channels, output_is_input', [('projection', 40, True), ('expanded', 120, True), ('residual', 40, False)]
)
def test_block_attention_places(place, channels, output_is_input):
  """docs/fidelity.md#daer-5: the gate sees the projected (40) or expanded (120) features, before or after the
  residual add (a zero gate leaves x, or zeroes the block)."""
  block = mobilenet_v3.InvertedResidual(
    40, 5, 120, 40, True, 'RE', 1, block_attention=_ZeroGate, block_attention_at=place
  )
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 40))
  variables = block.init(jax.random.key(1), x, train=False)
  gates = [v['gate'] for k, v in variables['params'].items() if k.startswith('_ZeroGate')]
  assert [g.shape for g in gates] == [(channels,)]
  out = block.apply(variables, x, train=False)
  np.testing.assert_allclose(out, x if output_is_input else np.zeros_like(x), atol=1e-6)
  with pytest.raises(ValueError, match='block_attention_at'):
    mobilenet_v3.InvertedResidual(
      40, 5, 120, 40, True, 'RE', 1, block_attention=_ZeroGate, block_attention_at='after'
    ).init(jax.random.key(1), x, train=False)


@pytest.mark.skipif(
  importlib.util.find_spec('torchvision') is None,
  reason='torchvision is not installed (pip install torch==2.13.0, then the torchvision built for it)',
)
def test_equals_torchvision_live_full_width():
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top

  torch.manual_seed(1)
  reference = torchvision.models.mobilenet_v3_large(num_classes=11).eval()
  images = torch.randn(1, 3, 96, 96)
  with torch.no_grad():
    logits = reference(images).numpy()
  state = {k: v.numpy() for k, v in reference.state_dict().items()}
  model = MobileNetV3Large(num_classes=11)
  out = model.apply(_convert(model, state, 96), images.numpy().transpose(0, 2, 3, 1))
  np.testing.assert_allclose(out['logits'], logits, atol=1e-4, rtol=0)
