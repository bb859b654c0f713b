"""MMCA end to end on tiny shapes: with all-MiniLM-L6-v2 it learns; with a small BERT the BERT stays frozen, the
workdir is self-contained (W/bert + checkpoint) and evaluation and the Retriever agree."""

import os

import jax
import numpy as np
import pytest

from configs import mmca as mmca_config
from xmatch_jax import Retriever
from xmatch_jax import evaluate
from xmatch_jax import metrics
from xmatch_jax import trainers
from xmatch_jax.checkpoints import RunCheckpoints
from xmatch_jax.convert import hf_bert
from xmatch_jax.data import load_split

TINY_BERT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'tiny_bert')


def _config(data_dir, **model):
  c = mmca_config.get_config('shapes_tiny')
  c.data_dir = data_dir
  c.batch_size = 32
  c.log_every_steps = 10
  c.model.update(model)
  return c


@pytest.fixture(scope='module')
def tiny_run(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('mmca_tiny'))
  c = _config(data_dir, bert_dir=TINY_BERT, embed_size=32, num_heads=4, cnn_filters=16)
  c.num_epochs = 1
  trainers.train_and_evaluate(c, workdir)
  return workdir


@pytest.mark.minilm
@pytest.mark.slow
def test_mmca_with_minilm_learns_far_above_chance(data_dir, tmp_path):
  c = _config(data_dir)  # the shapes config: MiniLM, d=128, 16 heads
  c.num_epochs = 2
  dev = trainers.train_and_evaluate(c, str(tmp_path))
  assert dev['rsum'] > 150, dev  # chance is ~32 on 100 images / 500 captions (measured: ~200 after 2 epochs)


@pytest.mark.slow
def test_bert_stays_frozen_and_the_workdir_holds_its_tokenizer(tiny_run):
  state, _, _ = RunCheckpoints(tiny_run).restore_for_eval()
  _, bert, _ = hf_bert.load_checkpoint(TINY_BERT)
  bert.pop('pooler_dense')
  jax.tree.map(np.testing.assert_array_equal, state['params']['bert'], bert)
  assert sorted(os.listdir(os.path.join(tiny_run, 'bert'))) == ['config.json', 'tokenizer_config.json', 'vocab.txt']


@pytest.mark.slow
def test_evaluation_and_retriever_agree_from_the_workdir_alone(tiny_run, data_dir):
  result = evaluate.evaluate_workdir(tiny_run, split='test')
  retriever = Retriever.from_workdir(tiny_run)
  assert retriever.model.bert_dir == os.path.join(tiny_run, 'bert')
  split = load_split('shapes_tiny', 'test', data_dir)
  scores = retriever.score(split.images, split.captions)
  assert metrics.recall_metrics(scores)['rsum'] == pytest.approx(result['rsum'])
  assert list(retriever.vocab.encode('a red circle')[[0, -1]]) == [2, 3]  # [CLS] ... [SEP] of tiny_bert
