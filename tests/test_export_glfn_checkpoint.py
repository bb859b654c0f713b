"""tools/export_torch_checkpoint.py for GLFN: the official-layout fixture imported into a workdir, exported and
imported again gives the same params, config and scores; the export holds the fixture's tensors (up to the GRU r/z
bias split) and opt; non-official GLFN configs are refused, naming the field."""

import collections
import os
import sys

import numpy as np
import pytest

from xmatch_jax import Retriever
from xmatch_jax import workdirs
from xmatch_jax.convert import glfn_checkpoint
from xmatch_jax.convert import torch_pickle
from xmatch_jax.data import pfan

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures')
CHECKPOINT = os.path.join(FIXTURES, 'glfn_t2i.pth.tar')
TINY_BERT = os.path.join(FIXTURES, 'tiny_bert')
sys.path.insert(0, os.path.join(os.path.dirname(FIXTURES), '..', 'tools'))
import convert_torch_checkpoint  # pylint: disable=g-import-not-at-top
import export_torch_checkpoint  # pylint: disable=g-import-not-at-top


def _import(checkpoint, workdir):
  assert (
    convert_torch_checkpoint.main(
      ['--format=glfn', f'--checkpoint={checkpoint}', f'--bert_dir={TINY_BERT}', f'--workdir={workdir}']
    )
    == 0
  )


@pytest.fixture(scope='module')
def trip(tmp_path_factory):
  """fixture .pth.tar -> workdir a -> exported .pth.tar -> workdir b."""
  root = tmp_path_factory.mktemp('glfn')
  a, b, out = str(root / 'a'), str(root / 'b'), str(root / 'export.pth.tar')
  _import(CHECKPOINT, a)
  assert export_torch_checkpoint.main([f'--workdir={a}', f'--out={out}']) == 0
  _import(out, b)
  return a, b, out


def _flat(tree, prefix=()):
  for key, value in tree.items():
    if hasattr(value, 'items'):
      yield from _flat(value, prefix + (key,))
    else:
      yield '/'.join(prefix + (key,)), np.asarray(value)


@pytest.mark.slow
def test_import_export_import_gives_the_same_params_config_and_scores(trip):
  ra, rb = Retriever.from_workdir(trip[0]), Retriever.from_workdir(trip[1])
  pa, pb = dict(_flat(ra.params)), dict(_flat(rb.params))
  assert sorted(pa) == sorted(pb) and any(k.startswith('bert/') for k in pa)
  for key in pa:
    assert pa[key].dtype == pb[key].dtype and np.array_equal(pa[key], pb[key]), key
  assert ra.config.to_dict() == rb.config.to_dict()
  expected = np.load(os.path.join(FIXTURES, 'glfn_expected.npz'))
  blocks, weights = pfan.from_pfan_layout(expected['boxes_npy'], grid=4)
  images = {
    'regions': expected['regions'],
    'pfan_blocks': blocks,
    'pfan_weights': weights,
    'tags': expected['tags'].tolist(),
  }
  captions = expected['captions'].tolist()
  scores_a, scores_b = ra.score(images, captions), rb.score(images, captions)
  assert np.array_equal(scores_a, scores_b)
  np.testing.assert_allclose(scores_b, expected['t2i_scores'], atol=1e-5)


@pytest.mark.slow
def test_export_holds_the_original_tensors_and_opt(trip):
  original, exported = torch_pickle.load(CHECKPOINT), torch_pickle.load(trip[2])
  assert sorted(exported) == ['Eiters', 'best_rsum', 'epoch', 'model', 'opt']
  assert (exported['epoch'], exported['best_rsum'], exported['Eiters']) == (9, 500.25, 1234)
  assert isinstance(exported['model'], list) and len(exported['model']) == 2
  for ours, theirs in zip(exported['model'], original['model']):
    assert isinstance(ours, collections.OrderedDict) and list(ours) == list(theirs)
    for key, value in ours.items():
      assert value.dtype == np.float32 and value.shape == theirs[key].shape, key
      if '.bias_' not in key:
        assert np.array_equal(value, theirs[key]), key
    for key in [k for k in ours if '.bias_ih_' in k]:
      hh, rz = key.replace('.bias_ih_', '.bias_hh_'), 2 * len(ours[key]) // 3
      assert np.array_equal(ours[key][rz:], theirs[key][rz:]) and np.array_equal(ours[hh][rz:], theirs[hh][rz:])
      assert not ours[hh][:rz].any(), hh
      np.testing.assert_array_equal(ours[key][:rz] + ours[hh][:rz], theirs[key][:rz] + theirs[hh][:rz])
  opt, theirs = vars(exported['opt']), vars(original['opt'])
  assert set(opt) == set(theirs) - {'vocab_size'}
  for key in (
    'data_name',
    'margin',
    'embed_size',
    'num_layers',
    'max_violation',
    'img_dim',
    'raw_feature_norm',
    'agg_func',
    'cross_attn',
    'bi_gru',
    'lambda_lse',
    'lambda_softmax',
    'bert_to_gru_size',
    'precomp_enc_type',
    'no_imgnorm',
    'no_txtnorm',
  ):
    assert opt[key] == theirs[key] and type(opt[key]) is type(theirs[key]), key
  sizes = glfn_checkpoint.sizes_of(*exported['model'])
  config_a = glfn_checkpoint.config_from_opt(original['opt'], sizes, TINY_BERT)
  config_b = glfn_checkpoint.config_from_opt(exported['opt'], sizes, TINY_BERT)
  assert config_a.to_dict() == config_b.to_dict()


@pytest.mark.slow
def test_opt_round_trip_of_i2t_and_export_params_inverts_convert_params(trip):
  config = workdirs.load_config(trip[0])
  config.model.score, config.model.i2t_lambda_softmax = 'i2t', 4.0
  config.model.t2i_agg_func = config.model.i2t_agg_func = 'Mean'  # official opt: one agg_func for both
  sizes = glfn_checkpoint.sizes_of(*torch_pickle.load(CHECKPOINT)['model'])
  back = glfn_checkpoint.config_from_opt(glfn_checkpoint.opt_from_config(config), sizes, config.model.bert_dir)
  for part in ('model', 'loss'):
    assert back[part].to_dict() == config[part].to_dict(), part
  assert back.dataset == config.dataset
  params = Retriever.from_workdir(trip[0]).params
  converted, _ = glfn_checkpoint.convert_params(*glfn_checkpoint.export_params(params, config))
  got, want = dict(_flat(converted)), {k: v for k, v in _flat(params) if not k.startswith('bert/')}
  assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize(
  'field,value,message',
  [
    ('score', 'fused', "model.score is 'fused'; official GLFN scores one direction"),
    ('tag_in_fusion', 'twice', "model.tag_in_fusion is 'twice'; official GLFN has 'once'"),
    ('train_position_attention', True, 'model.train_position_attention is True; official GLFN has False'),
    ('t2i_max_attention_weight', 0.0, 'model.t2i_max_attention_weight is 0.0; official GLFN has 0.5'),
    ('position_eps', 0.0, 'model.position_eps is 0.0; official GLFN has 1e-06'),
    ('use_tags', False, 'model.use_tags is False; official GLFN has True'),  # no_tag
    ('text_encoder', 'gru', "model.text_encoder is 'gru'; official GLFN has 'bert_gru'"),  # only_gru
    ('top_l', 8, 'model.top_l is 8; official GLFN has 15'),
  ],
)
@pytest.mark.slow
def test_non_official_configs_are_refused(trip, tmp_path, field, value, message):
  config = workdirs.load_config(trip[0])
  config.model[field] = value
  with pytest.raises(ValueError, match=message):
    glfn_checkpoint.opt_from_config(config)
  out = str(tmp_path / 'x.pth.tar')
  with pytest.raises(ValueError, match='--vocab_out does not apply to GLFN'):
    export_torch_checkpoint.export(trip[0], out, str(tmp_path / 'v.json'))
  assert not os.path.exists(out)


@pytest.mark.slow
def test_tool_says_the_bert_is_not_exported_and_refuses_non_official_workdirs(trip, tmp_path, capsys):
  out = str(tmp_path / 'again.pth.tar')
  assert export_torch_checkpoint.main([f'--workdir={trip[0]}', f'--out={out}']) == 0
  assert 'BERT weights are not part of official GLFN checkpoints' in capsys.readouterr().out
  fused = str(tmp_path / 'fused')
  os.makedirs(fused)
  config = workdirs.load_config(trip[0])
  config.model.score = 'fused'
  workdirs.save_config(config, fused, int(config.data_info.img_dim))
  with pytest.raises(ValueError, match="config.json: cannot export .*model.score is 'fused'"):
    export_torch_checkpoint.export(fused, str(tmp_path / 'x.pth.tar'))
  assert not os.path.exists(tmp_path / 'x.pth.tar')
