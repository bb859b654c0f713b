"""GLFN end to end on tiny shapes with a small BERT: block positions and tag tokens come from the dataset's boxes
and tags, it trains, and evaluation and the Retriever agree from the workdir alone."""

import os

import pytest

from configs import glfn as glfn_config
from xmatch_jax import Retriever
from xmatch_jax import evaluate
from xmatch_jax import metrics
from xmatch_jax import trainers
from xmatch_jax.data import load_split

TINY_BERT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'tiny_bert')


# A small random BERT stands in for MiniLM (too slow for a unit test here). Measured dev rsum after 6 epochs:
# 122.6 (fused, BERT + GRU) and 107.4 (only-GRU, t2i).
@pytest.mark.parametrize('variant', ['shapes_tiny', 'shapes_tiny,only_gru,t2i'])
@pytest.mark.slow
def test_glfn_trains_and_the_workdir_scores_alone(variant, data_dir, tmp_path):
  c = glfn_config.get_config(variant)
  c.data_dir = data_dir
  c.model.bert_dir = TINY_BERT
  c.model.embed_size = 256
  c.model.word_dim = 32
  c.batch_size = 32
  c.num_epochs = 6
  c.eval_every_epochs = c.num_epochs  # the dev evaluation (and checkpoint) the assertion reads: after the last epoch
  dev = trainers.train_and_evaluate(c, str(tmp_path))
  assert dev['rsum'] > 80, dev  # chance is ~32 on 100 images / 500 captions
  result = evaluate.evaluate_workdir(str(tmp_path), split='test')
  split = load_split('shapes_tiny', 'test', data_dir)
  scores = Retriever.from_workdir(str(tmp_path)).score(split.images, split.captions)
  assert metrics.recall_metrics(scores)['rsum'] == pytest.approx(result['rsum'])
