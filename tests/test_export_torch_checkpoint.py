"""tools/export_torch_checkpoint.py and convert/torch_writer.py: official SCAN / VSE++ checkpoints imported into a
workdir, exported and imported again give the same params, config and scores; the exported file holds the
fixture's tensors (up to the documented GRU r/z bias split) and torch.load reads it (live check when torch is
installed)."""

import argparse
import collections
import json
import os
import shutil
import struct
import sys
import types
import zipfile

import ml_dtypes
import numpy as np
import pytest

from xmatch_jax import Retriever
from xmatch_jax import models
from xmatch_jax.convert import scan_checkpoint
from xmatch_jax.convert import torch_pickle
from xmatch_jax.convert import torch_writer

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures')
sys.path.insert(0, os.path.join(os.path.dirname(FIXTURES), '..', 'tools'))
import convert_torch_checkpoint  # pylint: disable=g-import-not-at-top
import export_torch_checkpoint  # pylint: disable=g-import-not-at-top

CASES = {'scan': 'scan_t2i', 'vsepp': 'vsepp'}
# Flags of the official train.py argparsers (kuanghuei/SCAN, fartashf/vsepp) plus the vocab_size they add.
SCAN_FLAGS = {
  'data_path',
  'data_name',
  'vocab_path',
  'margin',
  'num_epochs',
  'batch_size',
  'word_dim',
  'embed_size',
  'grad_clip',
  'num_layers',
  'learning_rate',
  'lr_update',
  'workers',
  'log_step',
  'val_step',
  'logger_name',
  'model_name',
  'resume',
  'max_violation',
  'img_dim',
  'no_imgnorm',
  'no_txtnorm',
  'raw_feature_norm',
  'agg_func',
  'cross_attn',
  'precomp_enc_type',
  'bi_gru',
  'lambda_lse',
  'lambda_softmax',
  'vocab_size',
}
VSEPP_FLAGS = {
  'data_path',
  'data_name',
  'vocab_path',
  'margin',
  'num_epochs',
  'batch_size',
  'word_dim',
  'embed_size',
  'grad_clip',
  'crop_size',
  'num_layers',
  'learning_rate',
  'lr_update',
  'workers',
  'log_step',
  'val_step',
  'logger_name',
  'resume',
  'max_violation',
  'img_dim',
  'finetune',
  'cnn_type',
  'use_restval',
  'measure',
  'use_abs',
  'no_imgnorm',
  'vocab_size',
}


@pytest.fixture(scope='module', params=sorted(CASES))
def round_trip(request, tmp_path_factory):
  """fixture .pth.tar -> workdir a -> exported .pth.tar (+ vocab) -> workdir b."""
  fmt, root = request.param, tmp_path_factory.mktemp(request.param)
  original = os.path.join(FIXTURES, f'{CASES[fmt]}.pth.tar')
  a, b, out, vocab = (str(root / n) for n in ('a', 'b', 'export.pth.tar', 'vocab.json'))
  convert_torch_checkpoint.convert(fmt, original, os.path.join(FIXTURES, 'vocab_small.json'), a)
  assert export_torch_checkpoint.main([f'--workdir={a}', f'--out={out}', f'--vocab_out={vocab}']) == 0
  convert_torch_checkpoint.convert(fmt, out, vocab, b)
  return types.SimpleNamespace(fmt=fmt, original=original, a=a, b=b, out=out, vocab=vocab)


@pytest.mark.slow
def test_import_export_import_gives_the_same_workdir(round_trip):
  ra, rb = Retriever.from_workdir(round_trip.a), Retriever.from_workdir(round_trip.b)
  leaves = lambda r: {'/'.join(p): np.asarray(v) for p, v in _flat(r.params)}
  pa, pb = leaves(ra), leaves(rb)
  assert sorted(pa) == sorted(pb)
  for key in pa:
    assert pa[key].dtype == pb[key].dtype and np.array_equal(pa[key], pb[key]), key
  assert ra.config.to_dict() == rb.config.to_dict()
  assert ra.vocab == rb.vocab
  with open(os.path.join(FIXTURES, 'vocab_small.json')) as f, open(round_trip.vocab) as g:
    assert f.read() == g.read()  # the workdir's vocab.json is SCAN's format, written back byte for byte
  expected = np.load(os.path.join(FIXTURES, 'scan_vsepp_expected.npz'))
  tokens, lengths = expected['tokens'], expected['lengths']
  captions = [' '.join(ra.vocab.decode(t[1 : n - 1])) for t, n in zip(tokens, lengths)]
  scores_a = ra.score({'regions': expected['regions']}, captions)
  scores_b = rb.score({'regions': expected['regions']}, captions)
  assert np.array_equal(scores_a, scores_b)
  np.testing.assert_allclose(scores_b, expected[f'{CASES[round_trip.fmt]}_scores'], atol=1e-5)


def _flat(tree, prefix=()):
  for key, value in tree.items():
    if hasattr(value, 'items'):
      yield from _flat(value, prefix + (key,))
    else:
      yield prefix + (key,), value


def _check_against_original(exported: dict, original: dict) -> None:
  """Same keys in the same order, float32, equal values; GRU r/z biases: equal sums, all in bias_ih."""
  assert list(exported) == list(original)
  for key, value in exported.items():
    value = np.asarray(value)
    assert value.dtype == np.float32 and value.shape == original[key].shape, key
    if '.bias_' not in key:
      assert np.array_equal(value, original[key]), key
  for key in [k for k in exported if '.bias_ih_' in k]:
    hh = key.replace('.bias_ih_', '.bias_hh_')
    rz = 2 * len(exported[key]) // 3
    assert np.array_equal(exported[key][rz:], original[key][rz:]) and np.array_equal(
      exported[hh][rz:], original[hh][rz:]
    ), key
    assert not exported[hh][:rz].any(), hh
    assert np.array_equal(exported[key][:rz] + exported[hh][:rz], original[key][:rz] + original[hh][:rz]), key


@pytest.mark.slow
def test_exported_file_holds_the_original_tensors_and_opt(round_trip):
  original, exported = torch_pickle.load(round_trip.original), torch_pickle.load(round_trip.out)
  assert sorted(exported) == ['Eiters', 'best_rsum', 'epoch', 'model', 'opt']
  assert isinstance(exported['model'], list) and len(exported['model']) == 2
  for ours, theirs in zip(exported['model'], original['model']):
    assert isinstance(ours, collections.OrderedDict)
    _check_against_original(ours, theirs)
  # SCAN saves the index of the last finished epoch, VSE++ the count; import and export both convert.
  assert exported['epoch'] == original['epoch']
  assert exported['best_rsum'] == 400.5 and exported['Eiters'] == 3000
  opt = vars(exported['opt'])
  assert set(opt) == (SCAN_FLAGS if round_trip.fmt == 'scan' else VSEPP_FLAGS)
  for key, value in vars(original['opt']).items():
    assert opt[key] == value and type(opt[key]) is type(value), key
  config_a = scan_checkpoint.config_from_opt(round_trip.fmt, original['opt'], 'a')
  config_b = scan_checkpoint.config_from_opt(round_trip.fmt, exported['opt'], 'b')
  assert config_a.to_dict() == config_b.to_dict()


def test_export_params_inverts_convert_params_with_stacked_bidirectional_layers():
  import jax  # pylint: disable=g-import-not-at-top

  model = models.build_model({'name': 'scan', 'embed_size': 5, 'word_dim': 3, 'num_layers': 2}, vocab_size=9, img_dim=4)
  shapes = jax.eval_shape(
    model.init,
    jax.random.PRNGKey(3),
    {'regions': np.ones((2, 3, 4), np.float32)},
    {'tokens': np.ones((2, 4), np.int32), 'mask': np.ones((2, 4), np.float32)},
  )['params']
  rng = np.random.default_rng(3)
  params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
  image, text = scan_checkpoint.export_params(params, 2, True)
  assert list(text)[:5] == ['embed.weight', 'rnn.weight_ih_l0', 'rnn.weight_hh_l0', 'rnn.bias_ih_l0', 'rnn.bias_hh_l0']
  assert text['rnn.weight_ih_l1'].shape == (15, 10) and text['rnn.weight_ih_l1_reverse'].shape == (15, 10)
  back = scan_checkpoint.convert_params(image, text, 2, True)
  got = {p: v for p, v in _flat(back)}
  want = {p: np.asarray(v) for p, v in _flat(params)}
  assert sorted(got) == sorted(want)
  for key in want:
    assert np.array_equal(got[key], want[key]), key
  with pytest.raises(ValueError, match='missing parameter text_encoder/backward_0'):
    scan_checkpoint.export_params(
      {**params, 'text_encoder': {k: v for k, v in params['text_encoder'].items() if k != 'backward_0'}}, 2, True
    )
  with pytest.raises(ValueError, match=r'unexpected text_encoder parameters \[.backward_1.\]'):
    scan_checkpoint.export_params(
      {**params, 'text_encoder': {k: v for k, v in params['text_encoder'].items() if k != 'backward_0'}}, 2, False
    )


WRITER_STATE = collections.OrderedDict(
  weight=np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
  transposed=np.arange(6, dtype=np.float32).reshape(2, 3).T,
  double=np.linspace(0, 1, 5),
  half=np.float16([1.5, -2.25]),
  bf16=np.array([0.5, -3], ml_dtypes.bfloat16),
  steps=np.arange(4),
  ints=np.int32([7, -8]),
  bytes_=np.uint8([0, 255]),
  flag=np.array(True),
  scalar=np.array(2.5, np.float32),
  empty=np.zeros((2, 0, 3), np.float32),
  big_endian=np.arange(4, dtype='>f4'),
)


def _writer_checkpoint():
  shared = np.ones((2, 2), np.float32)
  return {
    'model': [WRITER_STATE, {'a': shared, 'b': shared}],
    'epoch': 7,
    'best_rsum': np.float64(412.5),
    'opt': argparse.Namespace(margin=0.2, max_violation=True, data_name='f30k_precomp', ratio=np.float32(0.5)),
    'meta': types.SimpleNamespace(note='x'),
    'misc': (None, b'raw', [1, 2.0]),
  }


def test_writer_round_trips_through_our_reader_with_aligned_storages(tmp_path):
  path, again = str(tmp_path / 'w.pt'), str(tmp_path / 'w2.pt')
  torch_writer.save(_writer_checkpoint(), path)
  loaded = torch_pickle.load(path)
  state = loaded['model'][0]
  assert isinstance(state, collections.OrderedDict) and list(state) == list(WRITER_STATE)
  for key, value in WRITER_STATE.items():
    assert state[key].dtype == value.dtype.newbyteorder('=') and state[key].shape == value.shape, key
    assert np.array_equal(state[key], value), key
  assert np.array_equal(loaded['model'][1]['a'], np.ones((2, 2)))
  assert loaded['epoch'] == 7 and loaded['best_rsum'] == 412.5 and type(loaded['best_rsum']) is float
  assert vars(loaded['opt']) == {'margin': 0.2, 'max_violation': True, 'data_name': 'f30k_precomp', 'ratio': 0.5}
  assert vars(loaded['meta']) == {'note': 'x'} and loaded['misc'] == (None, b'raw', [1, 2.0])
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    assert names[0] == 'archive/data.pkl' and {
      'archive/byteorder',
      'archive/version',
      'archive/.data/serialization_id',
    } <= set(names)
    assert archive.read('archive/byteorder') == b'little' and archive.read('archive/version') == b'3\n'
    # One storage per distinct array (the shared one once); every record's data starts at a multiple of 64.
    assert len([n for n in names if n.startswith('archive/data/')]) == len(WRITER_STATE) + 1
    with open(path, 'rb') as f:
      raw = f.read()
    for info in archive.infolist():
      name_len, extra_len = struct.unpack('<HH', raw[info.header_offset + 26 : info.header_offset + 30])
      assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0, info.filename
  torch_writer.save(_writer_checkpoint(), again)
  with open(again, 'rb') as f:
    assert f.read() == raw  # deterministic
  assert sorted(os.listdir(tmp_path)) == ['w.pt', 'w2.pt']  # no temporary files left


def test_writer_refuses_what_torch_cannot_hold(tmp_path):
  with pytest.raises(ValueError, match=r"checkpoint\['model'\]\[0\]\['w'\]: arrays of dtype uint32"):
    torch_writer.save({'model': [{'w': np.zeros(2, np.uint32)}]}, str(tmp_path / 'a.pt'))
  with pytest.raises(ValueError, match=r"checkpoint\['opt'\]\.s: cannot write a set"):
    torch_writer.save({'opt': argparse.Namespace(s={1})}, str(tmp_path / 'b.pt'))
  assert not os.listdir(tmp_path)


def _fake_workdir(src: str, dst: str, **model_fields) -> str:
  os.makedirs(dst)
  shutil.copy(os.path.join(src, 'vocab.json'), dst)
  with open(os.path.join(src, 'config.json')) as f:
    config = json.load(f)
  config['model'].update(model_fields)
  with open(os.path.join(dst, 'config.json'), 'w') as f:
    json.dump(config, f)
  return dst


@pytest.mark.slow
def test_other_models_and_inexpressible_variants_are_refused(round_trip, tmp_path):
  out = str(tmp_path / 'x.pth.tar')
  with pytest.raises(ValueError, match="model 'rdan' cannot be exported: only .'scan', 'vsepp'."):
    export_torch_checkpoint.export(_fake_workdir(round_trip.a, str(tmp_path / 'rdan'), name='rdan'), out)
  if round_trip.fmt == 'scan':
    bad = _fake_workdir(round_trip.a, str(tmp_path / 'l1'), raw_feature_norm='clipped_l1norm')
    with pytest.raises(ValueError, match="config.json: model.raw_feature_norm is 'clipped_l1norm'; official SCAN"):
      export_torch_checkpoint.export(bad, out)
  else:
    bad = _fake_workdir(round_trip.a, str(tmp_path / 'bi'), bidirectional=True)
    with pytest.raises(ValueError, match='model.bidirectional is True; official VSE.. has only a unidirectional'):
      export_torch_checkpoint.export(bad, out)
    bad = _fake_workdir(round_trip.a, str(tmp_path / 'txt'), no_txtnorm=True)
    with pytest.raises(ValueError, match='model.no_txtnorm is True'):
      export_torch_checkpoint.export(bad, out)
  with pytest.raises(FileNotFoundError, match='config.json not found'):
    export_torch_checkpoint.export(str(tmp_path / 'nothing'), out)
  assert not os.path.exists(out)


@pytest.mark.torch
@pytest.mark.slow
def test_torch_loads_the_export_into_the_official_modules(round_trip):
  torch = pytest.importorskip('torch')
  loaded = torch.load(round_trip.out, weights_only=False)
  ours = torch_pickle.load(round_trip.out)
  original = torch_pickle.load(round_trip.original)
  assert isinstance(loaded['opt'], argparse.Namespace) and vars(loaded['opt']) == vars(ours['opt'])
  assert {k: loaded[k] for k in ('epoch', 'best_rsum', 'Eiters')} == {
    k: ours[k] for k in ('epoch', 'best_rsum', 'Eiters')
  }
  for theirs, mine in zip(loaded['model'], ours['model']):
    assert isinstance(theirs, collections.OrderedDict) and list(theirs) == list(mine)
    for key, tensor in theirs.items():
      assert tensor.dtype == torch.float32 and np.array_equal(tensor.numpy(), mine[key]), key
  # The official encoders' modules accept the state_dicts (strict), and the GRU computes what the original did.
  opt = loaded['opt']
  image = torch.nn.Module()
  image.fc = torch.nn.Linear(opt.img_dim, opt.embed_size)
  image.load_state_dict(loaded['model'][0])
  text = torch.nn.Module()
  text.embed = torch.nn.Embedding(opt.vocab_size, opt.word_dim)
  text.rnn = torch.nn.GRU(
    opt.word_dim, opt.embed_size, opt.num_layers, batch_first=True, bidirectional=bool(getattr(opt, 'bi_gru', False))
  )
  text.load_state_dict(loaded['model'][1])
  reference = torch.nn.GRU(
    opt.word_dim, opt.embed_size, opt.num_layers, batch_first=True, bidirectional=bool(getattr(opt, 'bi_gru', False))
  )
  reference.load_state_dict({k[4:]: torch.from_numpy(v) for k, v in original['model'][1].items() if k[:4] == 'rnn.'})
  x = torch.randn(3, 5, opt.word_dim, generator=torch.Generator().manual_seed(0))
  with torch.no_grad():
    np.testing.assert_allclose(text.rnn(x)[0].numpy(), reference(x)[0].numpy(), atol=1e-6)


@pytest.mark.torch
def test_torch_loads_what_the_writer_writes(tmp_path):
  torch = pytest.importorskip('torch')
  path = str(tmp_path / 'w.pt')
  torch_writer.save(_writer_checkpoint(), path)
  for kwargs in ({'weights_only': False}, {'weights_only': False, 'mmap': True}):
    loaded = torch.load(path, **kwargs)
    state = loaded['model'][0]
    assert isinstance(state, collections.OrderedDict) and list(state) == list(WRITER_STATE)
    for key, value in WRITER_STATE.items():
      tensor = state[key]
      assert tuple(tensor.shape) == value.shape and tensor.is_contiguous(), key
      got = tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
      assert np.array_equal(got, value.astype(got.dtype)), key
    assert state['steps'].dtype == torch.int64 and state['weight'].dtype == torch.float32
    assert state['bf16'].dtype == torch.bfloat16 and state['flag'].dtype == torch.bool
    a, b = loaded['model'][1]['a'], loaded['model'][1]['b']
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    assert isinstance(loaded['opt'], argparse.Namespace) and loaded['opt'].ratio == 0.5
    assert loaded['misc'] == (None, b'raw', [1, 2.0]) and loaded['best_rsum'] == 412.5
  # Only globals torch's weights_only unpickler allows (plus argparse.Namespace, as in the official checkpoints).
  with torch.serialization.safe_globals([argparse.Namespace]):
    torch.load(path, weights_only=True)
  state_only = str(tmp_path / 's.pt')
  torch_writer.save(WRITER_STATE, state_only)
  assert list(torch.load(state_only, weights_only=True)) == list(WRITER_STATE)


@pytest.mark.torch
def test_stacked_bidirectional_export_computes_the_flax_words_in_torch():
  torch = pytest.importorskip('torch')
  import jax  # pylint: disable=g-import-not-at-top

  model = models.build_model({'name': 'scan', 'embed_size': 5, 'word_dim': 3, 'num_layers': 2}, vocab_size=9, img_dim=4)
  tokens, mask = np.array([[1, 4, 7, 2], [1, 8, 5, 2]], np.int32), np.ones((2, 4), np.float32)
  shapes = jax.eval_shape(
    model.init, jax.random.PRNGKey(0), {'regions': np.ones((2, 3, 4), np.float32)}, {'tokens': tokens, 'mask': mask}
  )['params']
  rng = np.random.default_rng(5)
  params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
  words = model.apply({'params': params}, {'tokens': tokens, 'mask': mask}, method='encode_text')['words']
  _, text_state = scan_checkpoint.export_params(params, 2, True)
  text = torch.nn.Module()
  text.embed = torch.nn.Embedding(9, 3)
  text.rnn = torch.nn.GRU(3, 5, 2, batch_first=True, bidirectional=True)
  text.load_state_dict({k: torch.from_numpy(v) for k, v in text_state.items()})
  with torch.no_grad():  # SCAN's EncoderText: average the directions, l2norm each word
    out = text.rnn(text.embed(torch.from_numpy(tokens).long()))[0]
    out = (out[:, :, :5] + out[:, :, 5:]) / 2
    out = out / (out.pow(2).sum(-1, keepdim=True).sqrt() + 1e-8)
  np.testing.assert_allclose(np.asarray(words), out.numpy(), atol=1e-5)
