"""tools/convert_torch_checkpoint.py: official-layout SCAN and VSE++ checkpoints (legacy torch.save, made by
tests/fixtures/make_fixtures.py) become workdirs whose Retriever reproduces the official forward's scores."""

import argparse
import json
import os
import shutil
import sys
import types

import numpy as np
import pytest

from xmatch_jax import Retriever
from xmatch_jax import bundles
from xmatch_jax.convert import scan_checkpoint
from xmatch_jax.convert import torch_pickle
from xmatch_jax.convert import torch_writer

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures')
sys.path.insert(0, os.path.join(os.path.dirname(FIXTURES), '..', 'tools'))
import convert_torch_checkpoint  # pylint: disable=g-import-not-at-top


@pytest.mark.parametrize('fmt,name,dataset', [('scan', 'scan_t2i', 'f30k'), ('vsepp', 'vsepp', 'coco')])
@pytest.mark.slow
def test_converted_workdir_reproduces_the_official_scores(fmt, name, dataset, tmp_path):
  workdir = str(tmp_path / 'w')
  assert (
    convert_torch_checkpoint.main(
      [
        f'--format={fmt}',
        f'--checkpoint={FIXTURES}/{name}.pth.tar',
        f'--vocab={FIXTURES}/vocab_small.json',
        f'--workdir={workdir}',
      ]
    )
    == 0
  )
  expected = np.load(os.path.join(FIXTURES, 'scan_vsepp_expected.npz'))
  retriever = Retriever.from_workdir(workdir)
  assert retriever.config.dataset == dataset and retriever.config.model.name == fmt
  tokens, lengths = expected['tokens'], expected['lengths']
  mask = (np.arange(tokens.shape[1])[None] < lengths[:, None]).astype(np.float32)
  scores = retriever._scorer.score({'regions': expected['regions']}, tokens.astype(np.int32), mask)  # pylint: disable=protected-access
  np.testing.assert_allclose(scores, expected[f'{name}_scores'], atol=1e-5)
  # Captions as strings go through the imported vocabulary: <start> words <end>.
  words = [retriever.vocab.decode(t[1 : n - 1]) for t, n in zip(tokens, lengths)]
  by_string = retriever.score({'regions': expected['regions']}, [' '.join(w) for w in words])
  np.testing.assert_allclose(by_string, expected[f'{name}_scores'], atol=1e-5)
  meta = json.load(open(os.path.join(workdir, 'config.json')))
  assert meta['data_info']['img_dim'] == 10
  assert meta['loss']['mask_same_image'] is False  # the official ContrastiveLoss masks only the diagonal
  # A bundle of the imported checkpoint scores exactly as the workdir, with no workdir.
  bundle = bundles.from_workdir(workdir, str(tmp_path / 'bundle'))
  shutil.rmtree(workdir)
  from_bundle = Retriever.from_pretrained(bundle).score({'regions': expected['regions']}, [' '.join(w) for w in words])
  np.testing.assert_array_equal(from_bundle, by_string)


@pytest.mark.slow
def test_scan_weight_norm_image_encoder_scores_as_the_official(tmp_path):
  """opt.precomp_enc_type='weight_norm' (SCAN's EncoderImageWeightNormPrecomp: weight_norm(fc, dim=None)) stores
  fc.weight_g (a scalar) and fc.weight_v; the fixture's fc.weight W as v = 3.7 W, g = ||W|| computes the same W."""
  checkpoint = torch_pickle.load(f'{FIXTURES}/scan_t2i.pth.tar')
  image = checkpoint['model'][0]
  weight = image.pop('fc.weight')
  image['fc.weight_v'] = (3.7 * weight).astype(np.float32)
  image['fc.weight_g'] = np.array(np.linalg.norm(weight.astype(np.float64)), np.float32)
  checkpoint['opt'].precomp_enc_type = 'weight_norm'
  torch_writer.save({**checkpoint, 'opt': argparse.Namespace(**vars(checkpoint['opt']))}, str(tmp_path / 'wn.pth'))
  workdir = str(tmp_path / 'w')
  assert (
    convert_torch_checkpoint.main(
      [
        '--format=scan',
        f'--checkpoint={tmp_path}/wn.pth',
        f'--vocab={FIXTURES}/vocab_small.json',
        f'--workdir={workdir}',
      ]
    )
    == 0
  )
  expected = np.load(os.path.join(FIXTURES, 'scan_vsepp_expected.npz'))
  tokens, lengths = expected['tokens'], expected['lengths']
  mask = (np.arange(tokens.shape[1])[None] < lengths[:, None]).astype(np.float32)
  scores = Retriever.from_workdir(workdir)._scorer.score(  # pylint: disable=protected-access
    {'regions': expected['regions']}, tokens.astype(np.int32), mask
  )
  np.testing.assert_allclose(scores, expected['scan_t2i_scores'], atol=1e-5)


@pytest.mark.parametrize('dim', [None, 0, 1])
def test_weight_norm_fold_equals_torch(dim):
  torch = pytest.importorskip('torch', reason='pip install torch==2.13.0 to compare with torch.nn.utils.weight_norm')
  torch.manual_seed(0)
  layer = torch.nn.utils.weight_norm(torch.nn.Linear(10, 6), dim=dim)
  with torch.no_grad():
    layer.weight_g.mul_(torch.rand_like(layer.weight_g) + 0.5)
    layer(torch.zeros(1, 10))  # the forward pre-hook recomputes layer.weight from g and v
  state = {k: v.detach().numpy() for k, v in layer.state_dict().items()}
  folded = scan_checkpoint.weight_norm_weight(state['weight_g'], state['weight_v'], 'fc')
  np.testing.assert_allclose(folded, layer.weight.detach().numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_vsepp_pickled_vocab_converts_like_the_json(tmp_path):
  """VSE++ ships its vocabulary as vocab/<data_name>_vocab.pkl (a Python 2 pickle of vocab.Vocabulary)."""
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tools'))
  from fuzz_readers import vsepp_pickle_protocol2  # pylint: disable=g-import-not-at-top

  words = json.load(open(os.path.join(FIXTURES, 'vocab_small.json')))['idx2word']
  pkl = tmp_path / 'coco_precomp_vocab.pkl'
  pkl.write_bytes(vsepp_pickle_protocol2([words[str(i)] for i in range(len(words))]))
  for vocab, workdir in ((str(pkl), tmp_path / 'from_pkl'), (f'{FIXTURES}/vocab_small.json', tmp_path / 'from_json')):
    assert (
      convert_torch_checkpoint.main(
        ['--format=vsepp', f'--checkpoint={FIXTURES}/vsepp.pth.tar', f'--vocab={vocab}', f'--workdir={workdir}']
      )
      == 0
    )
  assert (tmp_path / 'from_pkl' / 'vocab.json').read_text() == (tmp_path / 'from_json' / 'vocab.json').read_text()
  expected = np.load(os.path.join(FIXTURES, 'scan_vsepp_expected.npz'))
  captions = ['a dog on the grass', 'two men']
  scores = [
    Retriever.from_workdir(str(w)).score({'regions': expected['regions']}, captions)
    for w in (tmp_path / 'from_pkl', tmp_path / 'from_json')
  ]
  np.testing.assert_array_equal(scores[0], scores[1])


def test_wrong_vocab_format_or_target_are_refused(tmp_path):
  vocab = json.load(open(os.path.join(FIXTURES, 'vocab_small.json')))
  del vocab['idx2word'][str(vocab['idx'] - 1)]
  vocab['word2idx'] = {w: int(i) for i, w in vocab['idx2word'].items()}
  vocab['idx'] -= 1
  (tmp_path / 'v.json').write_text(json.dumps(vocab))
  with pytest.raises(ValueError, match='11 words, but the checkpoint.s embedding has 12 rows'):
    convert_torch_checkpoint.convert(
      'scan', f'{FIXTURES}/scan_t2i.pth.tar', str(tmp_path / 'v.json'), str(tmp_path / 'a')
    )
  with pytest.raises(ValueError, match='unexpected weights .*_reverse'):
    convert_torch_checkpoint.convert(
      'vsepp', f'{FIXTURES}/scan_t2i.pth.tar', f'{FIXTURES}/vocab_small.json', str(tmp_path / 'b')
    )
  with pytest.raises(ValueError, match='opt has no field .cross_attn'):
    convert_torch_checkpoint.convert(
      'scan', f'{FIXTURES}/vsepp.pth.tar', f'{FIXTURES}/vocab_small.json', str(tmp_path / 'c')
    )
  convert_torch_checkpoint.convert(
    'scan', f'{FIXTURES}/scan_t2i.pth.tar', f'{FIXTURES}/vocab_small.json', str(tmp_path / 'd')
  )
  with pytest.raises(ValueError, match='already holds checkpoints'):
    convert_torch_checkpoint.convert(
      'scan', f'{FIXTURES}/scan_t2i.pth.tar', f'{FIXTURES}/vocab_small.json', str(tmp_path / 'd')
    )


@pytest.mark.parametrize('data_name', ['f8k_precomp', '10crop_precomp', 'precomp'])
def test_vsepp_data_names_import_as_dataset_precomp(data_name):
  """VSE++'s other data names have the same weight layout; their features are a custom precomp dataset."""
  opt = types.SimpleNamespace(
    data_name=data_name,
    embed_size=8,
    word_dim=4,
    num_layers=1,
    img_dim=16,
    margin=0.2,
    max_violation=True,
    learning_rate=2e-4,
    lr_update=15,
    num_epochs=30,
    batch_size=128,
    grad_clip=2.0,
  )
  config = scan_checkpoint.config_from_opt('vsepp', opt, 'model_best.pth.tar')
  assert config.dataset == 'precomp' and config.model.name == 'vsepp'
  assert scan_checkpoint.opt_from_config(config, 20, 16).data_name == 'precomp'
