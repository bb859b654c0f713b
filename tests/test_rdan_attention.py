"""tools/rdan_attention.py: the most attended region per word equals the model's own attention argmax, the PNG
is written, and bad input is refused."""

import os
import sys

import numpy as np
from PIL import Image
import pytest

from configs import rdan as rdan_config
from xmatch_jax import Retriever
from xmatch_jax import trainers
from xmatch_jax.data import load_split

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tools'))
import rdan_attention  # pylint: disable=g-import-not-at-top
from test_train import tiny_config  # pylint: disable=g-import-not-at-top


@pytest.fixture(scope='module')
def rdan_workdir(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('rdan_run'))
  config = tiny_config(data_dir, module=rdan_config, num_epochs=1, **{'model.cnn_channels': 4, 'model.block_size': 8})
  trainers.train_and_evaluate(config, workdir)
  return workdir


@pytest.mark.slow
def test_words_point_at_the_argmax_of_the_models_column_attention(rdan_workdir, data_dir):
  retriever = Retriever.from_workdir(rdan_workdir)
  split = load_split('shapes_tiny', 'test', data_dir)
  image = {k: v[3:4] for k, v in split.images.items()}
  caption = split.captions[15]
  words, beta = rdan_attention.word_attention(retriever, image, caption)
  assert words[0] == '<start>' and words[-1] == '<end>' and len(words) == beta.shape[1]
  np.testing.assert_allclose(beta.sum(axis=0), 1.0, rtol=1e-5)  # eq 9: a distribution over regions
  # Independent path: the model's weights for a batch of two images and the caption padded to 24 tokens.
  model, params = retriever.model, retriever.params
  tokens = np.zeros((1, 24), np.int32)
  mask = np.zeros((1, 24), np.float32)
  encoded = retriever.vocab.encode(caption)
  tokens[0, : len(encoded)], mask[0, : len(encoded)] = encoded, 1
  image_rep = model.apply({'params': params}, {'regions': split.images['regions'][2:4]}, method=model.encode_image)
  text_rep = model.apply({'params': params}, {'tokens': tokens, 'mask': mask}, method=model.encode_text)
  expected = np.asarray(model.apply({'params': params}, image_rep, text_rep, method=model.attention_weights)['beta'])
  regions, weights = rdan_attention.most_attended_regions(beta)
  np.testing.assert_array_equal(regions, np.argmax(expected[1, 0, :, : len(encoded)], axis=0))
  np.testing.assert_allclose(weights, np.max(expected[1, 0, :, : len(encoded)], axis=0), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_cli_writes_a_png_grid_with_one_panel_per_word(rdan_workdir, data_dir, tmp_path, monkeypatch, capsys):
  monkeypatch.setenv('XMATCH_DATA_DIR', data_dir)
  out = str(tmp_path / 'fig' / 'attention.png')
  assert (
    rdan_attention.main([f'--workdir={rdan_workdir}', '--image_index=2', '--caption=a red circle', f'--out={out}']) == 0
  )
  printed = capsys.readouterr().out
  assert ' red -> region' in printed and ' circle -> region' in printed
  png = Image.open(out)
  panel_w = 64 * rdan_attention.SCALE
  assert png.size == (3 * panel_w, 64 * rdan_attention.SCALE + rdan_attention.TITLE_HEIGHT)  # a, red, circle
  pixels = np.asarray(png)
  assert pixels.std() > 10 and (pixels == [255, 160, 0]).all(axis=-1).any()  # the image and an orange box


def test_objects_in_box():
  scene = (
    '{"objects": [{"shape": "circle", "colour": "red", "size": "small", "x": 10, "y": 10}, '
    '{"shape": "square", "colour": "blue", "size": "large", "x": 50, "y": 40}]}'
  )
  assert rdan_attention.objects_in_box(scene, np.array([0, 0, 0.3, 0.3])) == ['small red circle']
  assert rdan_attention.objects_in_box(scene, np.array([0, 0, 1, 1])) == ['small red circle', 'large blue square']
  assert rdan_attention.objects_in_box(scene, np.array([0.5, 0, 0.6, 0.1])) == []


@pytest.mark.slow
def test_bad_input_is_refused(rdan_workdir, data_dir, tmp_path, monkeypatch):
  monkeypatch.setenv('XMATCH_DATA_DIR', data_dir)
  out = str(tmp_path / 'x.png')
  with pytest.raises(ValueError, match='image_index=100 is out of range: shapes_tiny/test has 100 images'):
    rdan_attention.main([f'--workdir={rdan_workdir}', '--image_index=100', f'--out={out}'])
  with pytest.raises(ValueError, match='no word in the model'):
    rdan_attention.main([f'--workdir={rdan_workdir}', '--caption=zebra xylophone', f'--out={out}'])
  with pytest.raises(FileNotFoundError, match='not a training workdir'):
    rdan_attention.main([f'--workdir={tmp_path}', f'--out={out}'])
  assert not os.path.exists(out)


def test_other_models_are_refused():
  from types import SimpleNamespace  # pylint: disable=g-import-not-at-top

  from xmatch_jax.models.scan import SCAN  # pylint: disable=g-import-not-at-top

  fake = SimpleNamespace(model=SCAN(vocab_size=10, img_dim=4))
  with pytest.raises(ValueError, match='holds a SCAN model; attention figures are for RDAN'):
    rdan_attention.word_attention(fake, {'regions': np.zeros((1, 2, 4), np.float32)}, 'a red circle')
