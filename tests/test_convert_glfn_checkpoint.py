"""tools/convert_torch_checkpoint.py --format=glfn: an official-layout GLFN checkpoint (tests/fixtures/glfn_t2i.pth.tar,
made by make_fixtures.glfn with tiny_bert as the BERT of its features) becomes a workdir whose Retriever reproduces the
official forward's embeddings and scores; what the importer cannot express is refused, naming keys and fields."""

import json
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from xmatch_jax import Retriever
from xmatch_jax.convert import glfn_checkpoint
from xmatch_jax.convert import torch_pickle
from xmatch_jax.convert import torch_writer
from xmatch_jax.data import pfan

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures')
CHECKPOINT = os.path.join(FIXTURES, 'glfn_t2i.pth.tar')
TINY_BERT = os.path.join(FIXTURES, 'tiny_bert')
sys.path.insert(0, os.path.join(os.path.dirname(FIXTURES), '..', 'tools'))
import convert_torch_checkpoint  # pylint: disable=g-import-not-at-top


@pytest.fixture(scope='module')
def expected():
  return np.load(os.path.join(FIXTURES, 'glfn_expected.npz'))


def _images(expected):
  """Dataset-format images: PFAN block positions (the official boxes.npy rows) and per-region tag strings."""
  blocks, weights = pfan.from_pfan_layout(expected['boxes_npy'], grid=4)
  return {
    'regions': expected['regions'],
    'pfan_blocks': blocks,
    'pfan_weights': weights,
    'tags': expected['tags'].tolist(),
  }


def _rewritten(tmp_path, name, opt=None, image=None, text=None, model=None):
  """The fixture checkpoint with opt fields / state_dict entries replaced (None values delete), saved without torch."""
  checkpoint = torch_pickle.load(CHECKPOINT)
  image_state, text_state = dict(checkpoint['model'][0]), dict(checkpoint['model'][1])
  for state, changes in ((image_state, image), (text_state, text)):
    for key, value in (changes or {}).items():
      if value is None:
        del state[key]
      else:
        state[key] = value
  fields = {**vars(checkpoint['opt']), **(opt or {})}
  checkpoint['opt'] = type(checkpoint['opt'])(**{k: v for k, v in fields.items() if v is not None})
  checkpoint['model'] = model if model is not None else [image_state, text_state]
  path = str(tmp_path / f'{name}.pth.tar')
  torch_writer.save(checkpoint, path)
  return path


def _convert_and_score(checkpoint, workdir, expected):
  assert (
    convert_torch_checkpoint.main(
      ['--format=glfn', f'--checkpoint={checkpoint}', f'--bert_dir={TINY_BERT}', f'--workdir={workdir}']
    )
    == 0
  )
  retriever = Retriever.from_workdir(workdir)
  return retriever, retriever.score(_images(expected), expected['captions'].tolist())


@pytest.mark.slow
def test_converted_t2i_workdir_reproduces_the_official_forward(expected, tmp_path):
  workdir = str(tmp_path / 'w')
  retriever, scores = _convert_and_score(CHECKPOINT, workdir, expected)
  m = retriever.config.model
  assert (retriever.config.dataset, m.name, m.score, m.grid, m.top_l, m.num_layers) == ('f30k', 'glfn', 't2i', 4, 15, 2)
  assert (m.tag_in_fusion, m.train_position_attention, m.t2i_max_attention_weight) == ('once', False, 0.5)
  assert os.path.exists(os.path.join(workdir, 'bert', 'vocab.txt'))
  assert json.load(open(os.path.join(workdir, 'config.json')))['data_info']['img_dim'] == 10
  np.testing.assert_allclose(scores, expected['t2i_scores'], atol=1e-5)
  # The captions tokenise as the fixture's features were made (transformers' BertTokenizer: [CLS] ... [SEP]).
  for caption, ids, n in zip(expected['captions'], expected['caption_ids'], expected['caption_lengths']):
    np.testing.assert_array_equal(retriever.vocab.encode(str(caption)), ids[:n])
  # Each encoder on its own.
  model, variables = retriever.model, retriever.variables
  inputs = {k: jnp.asarray(v) for k, v in model.prepare_images(_images(expected)).items()}
  regions = model.apply(variables, inputs, method=model.encode_image)['regions']
  np.testing.assert_allclose(regions, expected['image_embeddings'], atol=1e-6)  # position_eps=1e-6 as official
  tokens = expected['caption_ids'].astype(np.int32)
  words = model.apply(variables, {'tokens': tokens, 'mask': (tokens > 0).astype(np.float32)}, method=model.encode_text)[
    'words'
  ]
  np.testing.assert_allclose(words, expected['word_embeddings'], atol=1e-5)


@pytest.mark.slow
def test_i2t_checkpoint_scores_as_the_official_i2t(expected, tmp_path):
  path = _rewritten(tmp_path, 'i2t', opt={'cross_attn': 'i2t', 'agg_func': 'Mean', 'lambda_softmax': 4.0})
  retriever, scores = _convert_and_score(path, str(tmp_path / 'w'), expected)
  m = retriever.config.model
  assert (m.score, m.i2t_agg_func, m.i2t_lambda_softmax) == ('i2t', 'Mean', 4.0)
  np.testing.assert_allclose(scores, expected['i2t_scores'], atol=1e-5)


def test_weights_that_do_not_fit_are_listed(tmp_path):
  checkpoint = torch_pickle.load(CHECKPOINT)
  image_state = checkpoint['model'][0]
  path = _rewritten(
    tmp_path,
    'keys',
    image={'extra.weight': np.zeros(3, np.float32), 'fc.bias': None},
    text={'rnn.bias_hh_l1_reverse': None},
  )
  with pytest.raises(
    ValueError,
    match=r"image encoder: missing \['fc.bias'\]; image encoder: unexpected "
    r"\['extra.weight'\]; text encoder: missing \['rnn.bias_hh_l1_reverse'\]",
  ):
    glfn_checkpoint.load(path, TINY_BERT)
  wide = np.zeros((6, 27), np.float32)  # posi_attn_matrix_add_tag on 11 + 16 inputs, fc still on 10 + 6 + 16
  path = _rewritten(tmp_path, 'shape', image={'posi_attn_matrix_add_tag.weight': wide})
  with pytest.raises(ValueError, match=r'image fc.weight is \[8, 32\], expected \[8, 33\]'):
    glfn_checkpoint.load(path, TINY_BERT)
  path = _rewritten(tmp_path, 'rows', image={'position_embedding.weight': np.zeros((18, 6), np.float32)})
  with pytest.raises(ValueError, match='position_embedding.weight has 18 rows, expected G.G . 1'):
    glfn_checkpoint.load(path, TINY_BERT)
  # 20-d BERT features throughout (consistent shapes), but tiny_bert is 16-d.
  path = _rewritten(
    tmp_path,
    'bert',
    image={
      'fc.weight': np.zeros((8, 36), np.float32),
      'posi_attn_matrix_add_tag.weight': np.zeros((6, 30), np.float32),
    },
    text={'fc.weight': np.zeros((5, 20), np.float32)},
  )
  with pytest.raises(ValueError, match='reads 20-d BERT features .* has hidden_size 16'):
    glfn_checkpoint.load(path, TINY_BERT)
  path = _rewritten(tmp_path, 'gat', model=[image_state, checkpoint['model'][1], {'W': np.zeros(2, np.float32)}])
  with pytest.raises(ValueError, match='got 3 .*GAT fork'):
    glfn_checkpoint.load(path, TINY_BERT)


@pytest.mark.parametrize(
  'opt,message',
  [
    ({'bi_gru': False}, 'opt.bi_gru is False'),
    ({'no_imgnorm': True, 'no_txtnorm': True}, 'opt.no_imgnorm is True.*opt.no_txtnorm is True'),
    ({'precomp_enc_type': 'weight_norm'}, "opt.precomp_enc_type is 'weight_norm'"),
    ({'agg_func': 'Median'}, "opt.agg_func is 'Median'"),
    ({'raw_feature_norm': 'l3norm'}, "opt.raw_feature_norm is 'l3norm'"),
    ({'embed_size': 1024}, 'opt.embed_size is 1024 but the weights have embed_size 8'),
    ({'bert_to_gru_size': 300}, 'opt.bert_to_gru_size is 300 but the weights have word_dim 5'),
    ({'use_GAT': True}, r"opt fields \['use_GAT'\] are not flags"),
    ({'cross_attn': None}, "opt has no field 'cross_attn'"),
    ({'data_name': 'precomp'}, "opt.data_name is 'precomp'.*--dataset"),
  ],
)
def test_opt_that_cannot_be_expressed_is_refused(opt, message, tmp_path):
  with pytest.raises(ValueError, match=message):
    glfn_checkpoint.load(_rewritten(tmp_path, 'opt', opt=opt), TINY_BERT)


def test_dataset_override_and_tool_arguments(tmp_path):
  config, params, meta = glfn_checkpoint.load(
    _rewritten(tmp_path, 'p', opt={'data_name': 'precomp'}), TINY_BERT, dataset='coco'
  )
  assert config.dataset == 'coco' and 'bert' in params and meta == {'epoch': 9, 'best_rsum': 500.25, 'Eiters': 1234}
  with pytest.raises(ValueError, match='hold no BERT; pass the BERT'):
    convert_torch_checkpoint.convert('glfn', CHECKPOINT, '', str(tmp_path / 'a'))
  with pytest.raises(ValueError, match='--vocab is not used by --format=glfn'):
    convert_torch_checkpoint.convert(
      'glfn', CHECKPOINT, f'{FIXTURES}/vocab_small.json', str(tmp_path / 'b'), bert_dir=TINY_BERT
    )
  with pytest.raises(ValueError, match='apply to --format=glfn only'):
    convert_torch_checkpoint.convert(
      'scan', f'{FIXTURES}/scan_t2i.pth.tar', f'{FIXTURES}/vocab_small.json', str(tmp_path / 'c'), bert_dir=TINY_BERT
    )
  assert not os.path.exists(tmp_path / 'a') and not os.path.exists(tmp_path / 'b')
