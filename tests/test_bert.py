"""Flax BERT and the Hugging Face checkpoint reader against transformers' BertModel: stored references
(tests/fixtures, made by make_fixtures.py) in every run, and a live comparison when torch is installed."""

import json
import os
import shutil
import sys

import jax
import numpy as np
import pytest

from xmatch_jax.convert import hf_bert
from xmatch_jax.data import wordpiece
from xmatch_jax.models.bert import BertConfig
from xmatch_jax.models.bert import BertModel

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures')
TINY = os.path.join(FIXTURES, 'tiny_bert')
SENTENCES = ['a small red circle to the left of a blue square', 'Two green items, and a BIG yellow cross!', 'circles']


def _pad(tokenizer, sentences):
  ids = [e.ids for e in tokenizer.encode_batch(sentences)]
  tokens = np.zeros((len(ids), max(map(len, ids))), np.int32)
  for i, row in enumerate(ids):
    tokens[i, : len(row)] = row
  return tokens, (tokens > 0).astype(np.float32)


def test_tiny_bert_equals_transformers_reference_at_every_layer_padding_included():
  expected = np.load(os.path.join(FIXTURES, 'tiny_bert_expected.npz'))
  config, params, skipped = hf_bert.load_checkpoint(TINY)
  assert config.num_hidden_layers == 2 and config.hidden_size == 16 and skipped == []
  tokens, mask = _pad(wordpiece.load_tokenizer(TINY), SENTENCES)
  np.testing.assert_array_equal(tokens, expected['input_ids'])  # WordPiece from vocab.txt as BertTokenizer
  assert mask.min() == 0  # the batch has padding
  out = BertModel(config).apply({'params': params}, tokens, mask, output_hidden_states=True)
  np.testing.assert_allclose(np.stack(out['hidden_states']), expected['hidden_states'], atol=1e-4, rtol=0)
  np.testing.assert_allclose(out['pooler_output'], expected['pooler_output'], atol=1e-4, rtol=0)


minilm_installed = pytest.mark.minilm


@minilm_installed
def test_minilm_tokens_and_hidden_states_equal_transformers_reference():
  expected = np.load(os.path.join(FIXTURES, 'minilm_expected.npz'))
  config, params, _ = hf_bert.load_checkpoint('minilm')
  assert (config.num_hidden_layers, config.hidden_size) == (6, 384)
  tokens, mask = _pad(wordpiece.load_tokenizer('minilm'), SENTENCES)
  np.testing.assert_array_equal(tokens, expected['input_ids'])
  out = jax.jit(lambda t, m: BertModel(config).apply({'params': params}, t, m))(tokens, mask)
  np.testing.assert_allclose(out['last_hidden_state'], expected['last_hidden_state'], atol=1e-4, rtol=0)


@minilm_installed
def test_minilm_tokenizer_keeps_long_captions_whole():
  tokenizer = wordpiece.load_tokenizer('minilm')  # tokenizer.json asks for truncation and padding to 128
  ids = tokenizer.encode(' '.join(['circle'] * 200)).ids
  assert len(ids) == 202


@pytest.mark.slow
def test_convert_bert_cli_writes_a_directory_that_loads_the_same(tmp_path, capsys):
  sys.path.insert(0, os.path.join(os.path.dirname(FIXTURES), '..', 'tools'))
  import convert_bert  # pylint: disable=g-import-not-at-top

  out = str(tmp_path / 'converted')
  assert convert_bert.main([f'--checkpoint={TINY}', f'--out={out}']) == 0
  assert sorted(os.listdir(out)) == ['config.json', hf_bert.FLAX_WEIGHTS, 'tokenizer_config.json', 'vocab.txt']
  _, direct, _ = hf_bert.load_checkpoint(TINY)
  _, converted, _ = hf_bert.load_checkpoint(out)
  jax.tree.map(np.testing.assert_array_equal, direct, converted)
  assert '2 layers, hidden 16' in capsys.readouterr().out


def _state():
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

  return load_file(os.path.join(TINY, 'model.safetensors'))


def test_pretraining_checkpoint_keys_prefix_and_heads_and_old_layernorm_names():
  config = BertConfig.from_json(os.path.join(TINY, 'config.json'))
  reference, _ = hf_bert.convert_state_dict(_state(), config)
  state = {
    'bert.' + k.replace('LayerNorm.weight', 'LayerNorm.gamma').replace('LayerNorm.bias', 'LayerNorm.beta'): v
    for k, v in _state().items()
  }
  state['cls.predictions.bias'] = np.zeros(config.vocab_size, np.float32)
  state['bert.embeddings.position_ids'] = np.arange(32)[None]
  params, skipped = hf_bert.convert_state_dict(state, config)
  assert sorted(skipped) == ['bert.embeddings.position_ids', 'cls.predictions.bias']
  jax.tree.map(np.testing.assert_array_equal, reference, params)


@pytest.mark.parametrize(
  'edit,message',
  [
    (lambda s: s.pop('encoder.layer.1.output.dense.weight'), 'missing BERT weight'),
    (lambda s: s.update({'encoder.layer.0.attention.self.rotary.weight': np.zeros(2)}), 'not a BERT encoder weight'),
    (lambda s: s.update({'pooler.dense.bias': np.zeros(3, np.float32)}), r'pooler.dense.bias has shape \(3,\)'),
  ],
)
def test_bad_state_dicts_are_refused_naming_the_key(edit, message):
  state = _state()
  edit(state)
  with pytest.raises(ValueError, match=message):
    hf_bert.convert_state_dict(state, BertConfig.from_json(os.path.join(TINY, 'config.json')), 'model.safetensors')


def test_bad_directories_and_configs_are_refused(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    hf_bert.load_checkpoint(str(tmp_path / 'nope'))
  with pytest.raises(FileNotFoundError, match='no config.json'):
    hf_bert.load_checkpoint(str(tmp_path))
  shutil.copy(os.path.join(TINY, 'config.json'), tmp_path / 'config.json')
  with pytest.raises(FileNotFoundError, match='no BERT weights'):
    hf_bert.load_checkpoint(str(tmp_path))
  raw = json.loads((tmp_path / 'config.json').read_text())
  (tmp_path / 'config.json').write_text(json.dumps({**raw, 'model_type': 'roberta'}))
  with pytest.raises(ValueError, match='model_type is .roberta'):
    hf_bert.load_checkpoint(str(tmp_path))
  (tmp_path / 'config.json').write_text(json.dumps({**raw, 'num_attention_heads': 5}))
  with pytest.raises(ValueError, match='multiple of num_attention_heads'):
    BertConfig.from_json(str(tmp_path / 'config.json'))


def test_too_long_input_is_an_error():
  config = BertConfig.from_json(os.path.join(TINY, 'config.json'))
  _, params, _ = hf_bert.load_checkpoint(TINY)
  with pytest.raises(ValueError, match='at most 32'):
    BertModel(config).apply({'params': params}, np.ones((1, 33), np.int32), np.ones((1, 33)))


@pytest.mark.torch
@pytest.mark.parametrize('weights', ['safetensors', 'zip', 'legacy'])
def test_random_bert_equals_transformers_live(weights, tmp_path):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  config = transformers.BertConfig(
    vocab_size=50,
    hidden_size=24,
    num_hidden_layers=3,
    num_attention_heads=3,
    intermediate_size=40,
    max_position_embeddings=20,
    type_vocab_size=3,
  )
  torch.manual_seed(1)
  model = transformers.BertModel(config).eval()
  if weights == 'safetensors':
    model.save_pretrained(tmp_path, safe_serialization=True)
  else:
    config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / 'pytorch_model.bin', _use_new_zipfile_serialization=weights == 'zip')
  ours_config, params, _ = hf_bert.load_checkpoint(str(tmp_path))
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 50, (4, 11))
  mask = (np.arange(11)[None] < np.array([[11], [7], [3], [1]])).astype(np.int64)
  segments = rng.integers(0, 3, (4, 11))
  with torch.no_grad():
    theirs = model(
      input_ids=torch.from_numpy(tokens),
      attention_mask=torch.from_numpy(mask),
      token_type_ids=torch.from_numpy(segments),
      output_hidden_states=True,
    )
  ours = BertModel(ours_config).apply(
    {'params': params},
    tokens.astype(np.int32),
    mask.astype(np.float32),
    segments.astype(np.int32),
    output_hidden_states=True,
  )
  for a, b in zip(ours['hidden_states'], theirs.hidden_states):
    np.testing.assert_allclose(a, b.numpy(), atol=1e-4, rtol=0)
  np.testing.assert_allclose(ours['pooler_output'], theirs.pooler_output.numpy(), atol=1e-4, rtol=0)
