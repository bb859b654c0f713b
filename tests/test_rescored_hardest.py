"""The train step's hardest-negative loss rescored on 3 B pairs (trainers/contrastive.rescored_hardest_loss) against
the dense loss over all B^2 scores: equal value and gradients for every contrastive matcher, and equal train steps."""

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from xmatch_jax import losses
from xmatch_jax.models import build_model
from xmatch_jax.trainers import contrastive

TINY_BERT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'tiny_bert')
B, K, N, IMG_DIM = 10, 6, 7, 12

CASES = {
  'vsepp': ({'name': 'vsepp', 'word_dim': 8}, 40),
  'scan_t2i': ({'name': 'scan', 'word_dim': 8, 'block_size': 3, 'remat': True}, 40),
  'scan_i2t': ({'name': 'scan', 'word_dim': 8, 'cross_attn': 'i2t', 'lambda_softmax': 4.0, 'lambda_lse': 5.0}, 40),
  'rdan': ({'name': 'rdan', 'word_dim': 8, 'cnn_channels': 4, 'block_size': 3, 'remat': True}, 40),
  'mmca': ({'name': 'mmca', 'bert_dir': TINY_BERT, 'num_heads': 2, 'cnn_filters': 16, 'block_size': 3}, 34),
  'glfn': ({'name': 'glfn', 'bert_dir': TINY_BERT, 'word_dim': 8, 'position_dim': 6, 'block_size': 3}, 34),
}


def _setup(name, seed=0):
  fields, vocab = CASES[name]
  model = build_model({**fields, 'embed_size': 16}, vocab_size=vocab, img_dim=IMG_DIM)
  images, text = model.example_inputs(batch=B, regions=K, words=N, min_len=2, seed=seed)
  params = model.init(jax.random.key(seed), images, text)['params']
  # Pairs of rows share an image (the same-image mask), and rows 8 and 9 repeat the first caption of the batch (an
  # exact tie between two negatives of every other image).
  text = jax.tree.map(lambda x: np.concatenate([x[:8], x[:1], x[:1]]), text)
  return model, params, {'images': images, 'text': text, 'image_ids': np.arange(B) // 2}


@functools.cache
def _dense_loss_and_gradients(name):
  """`_setup(name)` and the dense loss's value and gradients, the reference of every (width_chunk, pair_block) case of
  the model: computed (and compiled) once per model."""
  model, params, batch = _setup(name)
  ids = batch['image_ids']

  def dense(p):
    scores = model.apply({'params': p}, batch['images'], batch['text'])
    return losses.contrastive_loss(scores, 0.2, True, image_ids=ids)

  want_loss, want = jax.jit(jax.value_and_grad(dense))(params)
  return model, params, batch, want_loss, want


def _max_abs(tree):
  return max(float(jnp.max(jnp.abs(leaf))) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize('width_chunk,pair_block', [(0, 0), (3, 4)])
@pytest.mark.parametrize('name', list(CASES))
def test_rescored_loss_and_gradients_equal_the_dense_loss(name, width_chunk, pair_block):
  """width_chunk 3: the all-pairs forward that picks the negatives scores the captions (2-7 tokens) three at a time
  at their chunk's width, a multiple of 2 (`pairwise.score_by_caption_width`); pair_block 4: the 30 rescored pairs
  are scored in blocks of 4 (the last one 2)."""
  model, params, batch, want_loss, want = _dense_loss_and_gradients(name)
  ids = batch['image_ids']

  def rescored(p):
    return contrastive.rescored_hardest_loss(model, {'params': p}, batch, 0.2, ids, width_chunk, 2, pair_block)

  got_loss, got = jax.jit(jax.value_and_grad(rescored))(params)
  assert float(want_loss) > 0
  np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-5)
  scale = _max_abs(want)
  assert scale > 0
  # The tie (rows 8, 9) sends the dense loss's gradient half to each caption and the rescored one all to the first;
  # their summed effect on the parameters is the same because both captions are the same input.
  for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(g, w, atol=1e-5 * scale)


def test_train_steps_with_and_without_rescoring_are_equal():
  model, params, batch = _setup('rdan', seed=1)
  # SGD, not Adam: Adam turns the float noise of a zero gradient (the relation CNN's output bias, which a softmax
  # ignores) into full-size updates of either sign.
  tx, schedule = optax.sgd(0.5), lambda step: 0.5
  states = {}
  for rescore in (False, True):
    loss_cfg = ml_collections.ConfigDict(
      {'margin': 0.2, 'max_violation': True, 'mask_same_image': True, 'rescore_hardest': rescore}
    )
    step = jax.jit(functools.partial(contrastive.train_step, model=model, tx=tx, schedule=schedule, loss_cfg=loss_cfg))
    state = {'params': params, 'opt_state': tx.init(params), 'step': jnp.zeros((), jnp.int32)}
    for _ in range(3):
      state, metrics = step(state, batch)
    states[rescore] = (state, metrics)
  (want, want_metrics), (got, got_metrics) = states[False], states[True]
  np.testing.assert_allclose(float(got_metrics['loss']), float(want_metrics['loss']), rtol=1e-5)
  for w, g in zip(jax.tree.leaves(want['params']), jax.tree.leaves(got['params'])):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_hardest_negatives_first_index_on_ties_and_rows_without_negatives():
  scores = jnp.asarray([[1.0, 0.5, 0.5, 0.2], [0.1, 1.0, 0.3, 0.3], [0.4, 0.4, 1.0, 0.0], [0.9, 0.9, 0.9, 1.0]])
  hard_caption, row_ok, hard_image, column_ok = losses.hardest_negatives(scores)
  np.testing.assert_array_equal(hard_caption, [1, 2, 0, 0])
  np.testing.assert_array_equal(hard_image, [3, 3, 3, 1])
  assert np.all(row_ok) and np.all(column_ok)
  # One image's captions only: no negatives anywhere, no loss.
  hard_caption, row_ok, hard_image, column_ok = losses.hardest_negatives(scores, image_ids=np.zeros(4, int))
  assert not np.any(row_ok) and not np.any(column_ok)
  diagonal = jnp.diagonal(scores)
  loss = losses.hardest_negative_loss(diagonal, scores[0, hard_caption], scores[hard_image, 0], row_ok, column_ok, 0.2)
  assert float(loss) == 0.0 == float(losses.contrastive_loss(scores, 0.2, True, image_ids=np.zeros(4, int)))
