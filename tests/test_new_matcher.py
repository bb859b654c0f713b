"""The matcher contract is the whole interface: a new matcher written in this one file (a subclass of
`models.matcher.Matcher`, registered by name) trains, evaluates, re-ranks, scores through the Retriever, is
benchmarked and exported with no change anywhere else."""

import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from xmatch_jax import Retriever
from xmatch_jax import api
from xmatch_jax import evaluate
from xmatch_jax import models
from xmatch_jax import trainers
from xmatch_jax.data import load_split
from xmatch_jax.models import matcher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tools'))
import benchmark  # noqa: E402  pylint: disable=g-import-not-at-top
import export_params  # noqa: E402  pylint: disable=g-import-not-at-top


class BestRegion(matcher.Matcher):
  """Projected regions and embedded words; a caption's score is the mean of its words' best region cosines."""

  vocab_size: int
  img_dim: int
  embed_size: int = 16

  @nn.compact
  def encode_image(self, images: dict) -> dict:
    return {'regions': nn.Dense(self.embed_size, name='region_fc')(images['regions'])}

  @nn.compact
  def encode_text(self, text: dict) -> dict:
    return {'words': nn.Embed(self.vocab_size, self.embed_size, name='embed')(text['tokens']), 'mask': text['mask']}

  def pair_scores(self, image_rep: dict, text_rep: dict) -> jax.Array:
    return matcher.best_region_cosine(image_rep['regions'], text_rep['words'], text_rep['mask'])

  def pair_flops(self, regions: int, words: int) -> dict:
    return {'similarity': 2 * regions * words * self.embed_size}


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  models.register('best_region', BestRegion)
  config = common.base_config('shapes_tiny')
  config.model = {'name': 'best_region', 'embed_size': 16}
  config.update(num_epochs=2, batch_size=32, data_dir=str(tmp_path_factory.mktemp('tfds')))
  config.optim.learning_rate = 1e-2
  path = str(tmp_path_factory.mktemp('best_region'))
  trainers.train_and_evaluate(config, path)
  yield path, config
  del models.MODELS['best_region']  # the registry is global: other tests list its names


@pytest.mark.slow
def test_trains_evaluates_reranks_and_serves(workdir):
  path, config = workdir
  result = evaluate.evaluate_workdir(path, 'test')
  assert result['model'] == 'best_region' and result['rsum'] > 60  # chance: ~ 6 x 0.1 x k, under 10 here
  reranked = evaluate.evaluate_workdir(path, 'test', rerank_k=1000)  # every candidate: the exhaustive ranking
  assert reranked['rsum'] == pytest.approx(result['rsum'])
  test = load_split('shapes_tiny', 'test', config.data_dir)
  scores = Retriever.from_workdir(path).score(test.images, test.captions[:7])
  assert scores.shape == (len(test.images['regions']), 7) and np.isfinite(scores).all()


@pytest.mark.slow
def test_gallery_encoded_once_and_saved_scores_as_score(workdir, tmp_path):
  path, config = workdir
  retriever = Retriever.from_workdir(path)
  test = load_split('shapes_tiny', 'test', config.data_dir)
  captions = test.captions[:9]
  api.save_reps(str(tmp_path / 'gallery.npz'), retriever.encode_images(test.images))
  gallery = api.load_reps(str(tmp_path / 'gallery.npz'))
  queries = retriever.encode_texts(captions)
  np.testing.assert_allclose(
    retriever.score_encoded(gallery, queries), retriever.score(test.images, captions), rtol=1e-6, atol=1e-6
  )
  np.testing.assert_allclose(
    retriever.score_encoded(gallery, queries, rerank_k=3),
    retriever.score(test.images, captions, rerank_k=3),
    rtol=1e-6,
    atol=1e-6,
  )
  with pytest.raises(ValueError, match='not one string'):
    retriever.encode_texts('a red circle')
  with pytest.raises(FileNotFoundError, match='save_reps'):
    api.load_reps(str(tmp_path / 'none.npz'))


@pytest.mark.slow
def test_benchmark_and_export(workdir, tmp_path):
  path, _ = workdir
  model = BestRegion(vocab_size=20, img_dim=8)
  image_rep, text_rep = model.example_reps(0, 3, 4, 5, 6, 2)
  variables = benchmark.init_pair_head(model, 0, image_rep, text_rep)
  scores = model.apply(variables, image_rep, text_rep, method=model.pair_scores)
  assert scores.shape == (3, 4)
  assert benchmark.scoring_flops(model, 3, 4, 5, 6) == {
    'similarity': 12 * 2 * 5 * 6 * 16,
    'item_gram': 0,
    'total': 12 * 2 * 5 * 6 * 16,
  }
  out = str(tmp_path / 'p.npz')
  assert export_params.main([f'--workdir={path}', f'--out={out}']) == 0
  assert {'params/region_fc/kernel', 'params/embed/embedding'} <= set(np.load(out))
  np.testing.assert_allclose(jnp.asarray(model.global_scores(image_rep, text_rep)), scores, rtol=1e-6)


def test_register_refuses_what_is_not_a_matcher():
  with pytest.raises(ValueError, match='not a matcher.Matcher subclass'):
    models.register('dense', nn.Dense)
  with pytest.raises(ValueError, match="'scan' is already SCAN"):
    models.register('scan', BestRegion)
