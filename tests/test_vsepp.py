"""VSE++ against a numpy port of the official encoders (fartashf/vsepp model.py)."""

import config_tables  # pylint: disable=g-bad-import-order (tests/)
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from xmatch_jax.models import build_model
from xmatch_jax.models.vsepp import VSEPP

VOCAB, IMG_DIM, EMBED, WORD_DIM, K = 25, 9, 7, 5, 4
LENS = (6, 1, 3, 4)
N_TOKENS = 8


def np_l2norm(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_gru(x, p):
  """PyTorch nn.GRU equations over one sequence x [T, in]; p holds Flax GRUCell params."""
  sigmoid = lambda v: 1 / (1 + np.exp(-v))
  h = np.zeros(p['hn']['kernel'].shape[0])
  outputs = []
  for x_t in x:
    r = sigmoid(x_t @ p['ir']['kernel'] + p['ir']['bias'] + h @ p['hr']['kernel'])
    z = sigmoid(x_t @ p['iz']['kernel'] + p['iz']['bias'] + h @ p['hz']['kernel'])
    n = np.tanh(x_t @ p['in']['kernel'] + p['in']['bias'] + r * (h @ p['hn']['kernel'] + p['hn']['bias']))
    h = (1 - z) * n + z * h
    outputs.append(h)
  return np.stack(outputs)


def random_batch(seed, pad_token=0, n_tokens=N_TOKENS):
  """Captions of lengths LENS padded to n_tokens (>= max(LENS)) with pad_token, and 3 images."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, VOCAB, size=(len(LENS), max(LENS)))
  tokens = np.pad(tokens, [(0, 0), (0, n_tokens - max(LENS))])
  mask = (np.arange(n_tokens)[None] < np.asarray(LENS)[:, None]).astype(np.float32)
  tokens = np.where(mask > 0, tokens, pad_token).astype(np.int32)
  images = {'regions': jnp.asarray(rng.normal(size=(3, K, IMG_DIM)), jnp.float32)}
  return images, {'tokens': jnp.asarray(tokens), 'mask': jnp.asarray(mask)}


@pytest.fixture(scope='module')
def model_and_variables():
  model = VSEPP(vocab_size=VOCAB, img_dim=IMG_DIM, embed_size=EMBED, word_dim=WORD_DIM, num_layers=2)
  images, text = random_batch(seed=0)
  return model, jax.jit(model.init)(jax.random.key(0), images, text)


def test_embeddings_match_numpy_reference_and_scores_are_cosines(model_and_variables):
  model, variables = model_and_variables
  images, text = random_batch(seed=1)
  image_rep = model.apply(variables, images, method=model.encode_image)
  text_rep = jax.jit(lambda v, t: model.apply(v, t, method=model.encode_text))(variables, text)
  params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables['params'])

  fc = params['image_encoder']['fc']
  regions = np.asarray(images['regions'], np.float64)
  want_images = np_l2norm((regions @ fc['kernel'] + fc['bias']).mean(axis=1))
  np.testing.assert_allclose(image_rep['embedding'], want_images, rtol=1e-5, atol=1e-6)

  # VSE++ EncoderText: unidirectional GRU over the real tokens, output at lengths - 1, l2norm.
  text_encoder = params['text_encoder']
  for c, length in enumerate(LENS):
    x = text_encoder['embed']['embedding'][np.asarray(text['tokens'][c, :length])]
    for layer in range(2):
      x = np_gru(x, text_encoder[f'forward_{layer}'])
    np.testing.assert_allclose(text_rep['embedding'][c], np_l2norm(x[-1]), rtol=1e-5, atol=1e-6)

  scores = model.apply(variables, image_rep, text_rep, method=model.pair_scores)
  img = np.asarray(image_rep['embedding'], np.float64)
  txt = np.asarray(text_rep['embedding'], np.float64)
  cosines = (img @ txt.T) / np.outer(np.linalg.norm(img, axis=1), np.linalg.norm(txt, axis=1))
  np.testing.assert_allclose(scores, cosines, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jax.jit(model.apply)(variables, images, text), scores, rtol=1e-5, atol=1e-6)


def test_padding_invariance(model_and_variables):
  model, variables = model_and_variables
  encode_text = jax.jit(lambda v, t: model.apply(v, t, method=model.encode_text))
  _, text = random_batch(seed=2)
  _, other_pads = random_batch(seed=2, pad_token=13)
  _, longer = random_batch(seed=2, n_tokens=N_TOKENS + 5)
  want = encode_text(variables, text)['embedding']
  np.testing.assert_array_equal(encode_text(variables, other_pads)['embedding'], want)
  np.testing.assert_allclose(encode_text(variables, longer)['embedding'], want, rtol=1e-6, atol=1e-7)


def test_bidirectional_and_use_abs_options():
  model = build_model(
    ml_collections.ConfigDict(
      {'name': 'vsepp', 'embed_size': EMBED, 'word_dim': WORD_DIM, 'bidirectional': True, 'use_abs': True}
    ),
    vocab_size=VOCAB,
    img_dim=IMG_DIM,
  )
  images, text = random_batch(seed=3)
  variables = jax.jit(model.init)(jax.random.key(1), images, text)
  image_rep = model.apply(variables, images, method=model.encode_image)
  text_rep = jax.jit(lambda v, t: model.apply(v, t, method=model.encode_text))(variables, text)
  params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables['params']['text_encoder'])
  for c, length in enumerate(LENS):
    x = params['embed']['embedding'][np.asarray(text['tokens'][c, :length])]
    final = (np_gru(x, params['forward_0'])[-1] + np_gru(x[::-1], params['backward_0'])[-1]) / 2
    np.testing.assert_allclose(text_rep['embedding'][c], np.abs(np_l2norm(final)), rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(image_rep['embedding']) >= 0)


# VSE++'s train.py defaults, the same on every dataset (its README's VSE++ row adds --max_violation).
OFFICIAL = {
  'optim.learning_rate': 2e-4,
  'num_epochs': 30,
  'optim.lr_decay_epochs': 15,
  'batch_size': 128,
  'loss.margin': 0.2,
  'loss.max_violation': True,
  'optim.grad_clip': 2.0,
  'model.embed_size': 1024,
  'model.word_dim': 300,
  'model.num_layers': 1,
  'model.bidirectional': False,
}


@pytest.mark.parametrize('dataset', ['f30k', 'coco'])
def test_paper_configs_follow_the_official_defaults(dataset):
  from configs import vsepp as vsepp_config  # pylint: disable=g-import-not-at-top

  config = vsepp_config.get_config(dataset)
  wrong = config_tables.mismatches(config, OFFICIAL)
  assert not wrong, f'config field: (config, official): {wrong}'
