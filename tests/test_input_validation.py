"""Every input a user can give is refused with an error naming the source (file, field, config key) and what was
expected: config, data files, vocabularies and word vectors, checkpoints, captions, and queries. Cases already
covered elsewhere are listed in the README's "Input validation" table with their tests; these are the rest."""

import argparse
import base64
import json
import os
import shutil
import sys
import zipfile

from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
import pytest

from configs import scan as scan_config
from configs import vsepp as vsepp_config
from xmatch_jax import api
from xmatch_jax import checkpoints
from xmatch_jax import retrieve
from xmatch_jax import run_setup
from xmatch_jax import workdirs
from xmatch_jax.convert import hf_bert
from xmatch_jax.convert import scan_checkpoint
from xmatch_jax.convert import torch_pickle
from xmatch_jax.convert import torch_writer
from xmatch_jax.convert import torchvision_mobilenet
from xmatch_jax.data import precomp
from xmatch_jax.data import validation
from xmatch_jax.data import vocab as vocab_lib
from xmatch_jax.data import word_vectors
from xmatch_jax.models.mobilenet_v3 import MobileNetV3Large
from xmatch_jax.trainers import contrastive

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, 'tests', 'fixtures')
sys.path.insert(0, os.path.join(ROOT, 'tools'))
import convert_features  # pylint: disable=g-import-not-at-top


def _set(config, key, value):
  *parents, leaf = key.split('.')
  for p in parents:
    config = config[p]
  config[leaf] = value


# --- config ----------------------------------------------------------------------------------------------------


def _parse_config_flags(*overrides, spec='configs/scan.py:shapes_tiny'):
  """--config and --config.* parsed as xmatch_jax.train parses them (ml_collections config_flags, locked)."""
  argv = ['train', f'--config={os.path.join(ROOT, spec)}', *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=values, lock_config=True, sys_argv=argv)
  values(argv)
  return values.config


@pytest.mark.parametrize(
  'override, message',
  [
    ('--config.batch_size=abc', r'flag --config.batch_size=abc: invalid literal for int\(\)'),
    ('--config.batch_size=2.5', r'flag --config.batch_size=2.5: invalid literal for int\(\)'),
    ('--config.loss.margin=x', r'flag --config.loss.margin=x: could not convert string to float'),
    ('--config.truncate_captions=maybe', r'flag --config.truncate_captions=maybe: .*Non-boolean argument'),
  ],
)
def test_config_override_of_wrong_type(override, message):
  assert _parse_config_flags().batch_size == 128
  with pytest.raises(flags.IllegalFlagValueError, match=message):
    _parse_config_flags(override)


def test_config_field_assigned_a_wrong_type():
  config = scan_config.get_config('shapes_tiny')
  with pytest.raises(TypeError, match=r"Could not override field 'batch_size'.*cannot be casted to type <class 'int'>"):
    config.batch_size = 2.5
  with pytest.raises(TypeError, match=r"Could not override field 'dataset'"):
    config.dataset = 3


def test_missing_config_file():
  config = _parse_config_flags(spec='configs/no_such_model.py')
  with pytest.raises(OSError, match=r'(?s)Failed loading config file.*configs/no_such_model.py.*No such file'):
    config.batch_size  # pylint: disable=pointless-statement


@pytest.mark.parametrize(
  'key, value, expected',
  [
    ('num_epochs', 0, 'an int >= 1'),
    ('max_steps', -1, 'an int >= 0'),
    ('optim.learning_rate', 0.0, 'a float > 0'),
    ('optim.grad_clip', -1.0, 'a float >= 0'),
    ('optim.lr_decay_factor', 0.0, 'a float > 0'),
    ('optim.lr_decay_epochs', -1, 'an int >= 0'),
    ('optim.warmup_steps', -5, 'an int >= 0'),
    ('log_every_steps', 0, 'an int >= 1'),
    ('eval_every_epochs', 0, 'an int >= 1'),
    ('checkpoint_every_steps', 0, 'an int >= 1'),
    ('checkpoint_every_minutes', -1.0, 'a float >= 0 (0: no saves by wall time)'),
    ('keep_checkpoints', 0, 'an int >= 1'),
    ('caption_buckets', (), 'a non-empty tuple of ints >= 1'),
    ('caption_buckets', (0, 16), 'a non-empty tuple of ints >= 1'),
    ('vocab_min_count', 0, 'an int >= 1'),
    (
      'vocab_path',
      '/no/such/vocab.json',
      "'' (build the vocabulary from the training captions) or an existing SCAN vocab json or VSE++ vocab .pkl file",
    ),
    ('eval_image_chunk', 0, 'an int >= 1'),
    ('eval_text_batch', 0, 'an int >= 1'),
    ('eval_metric', 'bleu', "'recall' or 'map'"),
  ],
)
def test_impossible_config_value_is_named(key, value, expected):
  config = scan_config.get_config('shapes_tiny')
  contrastive.check_config(config)
  _set(config, key, value)
  with pytest.raises(ValueError) as error:
    contrastive.check_config(config)
  assert f'config.{key} = {value!r} is impossible; expected {expected}' in str(error.value)


@pytest.mark.parametrize(
  'field, value, diff',
  [
    ('model.embed_size', 512, "differing model fields: ['embed_size']"),
    ('dataset', 'shapes', "the config asks for model 'scan' on 'shapes'"),
  ],
)
def test_resume_with_another_model_setting_or_dataset(field, value, diff):
  saved = scan_config.get_config('shapes_tiny')
  config = scan_config.get_config('shapes_tiny')
  _set(config, field, value)
  with pytest.raises(ValueError, match='Use a new --workdir') as error:
    workdirs.check_same_model(saved, config, '/runs/w')
  assert "/runs/w holds a checkpoint of model 'scan' on dataset 'shapes_tiny'" in str(error.value)
  assert diff in str(error.value)


@pytest.mark.parametrize(
  'text, message',
  [
    ('{"model": ', r'config.json: not valid JSON .*; expected the config.json that training writes'),
    ('[1, 2]', r'config.json: no "model" object; expected the config.json that training writes'),
  ],
)
def test_corrupt_workdir_config_json(tmp_path, text, message):
  (tmp_path / 'config.json').write_text(text)
  with pytest.raises(ValueError, match=message):
    workdirs.load_config(str(tmp_path))


# --- data files ------------------------------------------------------------------------------------------------


def _write_precomp(directory, n=2, k=36, dim=6):
  os.makedirs(directory, exist_ok=True)
  for split in ('train', 'dev', 'test'):
    np.save(directory / f'{split}_ims.npy', np.zeros((n, k, dim), np.float32))
    (directory / f'{split}_caps.txt').write_text(''.join(f'caption {i} of {split}\n' for i in range(5 * n)))


def _truncate(path, keep):
  data = open(path, 'rb').read()
  open(path, 'wb').write(data[: keep(len(data))])


@pytest.mark.parametrize(
  'edit, message',
  [
    (lambda d: _truncate(d / 'test_ims.npy', lambda n: n - 20), r'test_ims.npy: not a readable .npy array'),
    (lambda d: _truncate(d / 'dev_ims.npy', lambda n: 0), r'dev_ims.npy: not a readable .npy array \(EOFError'),
    (lambda d: (d / 'train_ims.npy').write_text('regions as text\n'), r'train_ims.npy: not a readable .npy array'),
    (
      lambda d: (
        np.save(d / 'test_boxes.npy', np.zeros((2, 36, 30))),
        _truncate(d / 'test_boxes.npy', lambda n: n // 2),
      ),
      r'test_boxes.npy: not a readable .npy array .*expected a complete .npy file of PFAN block positions',
    ),
  ],
)
def test_truncated_or_foreign_npy_file(tmp_path, edit, message):
  directory = tmp_path / 'm'
  _write_precomp(directory)
  edit(directory)
  with pytest.raises(ValueError, match=message):
    precomp.build('custom', str(directory), str(tmp_path / 'tfds'))


@pytest.mark.parametrize(
  'name, edit, message',
  [
    (
      'custom',
      lambda d: np.save(d / 'dev_ims.npy', np.zeros((2, 36, 1, 1), np.float32)),
      r'dev_ims.npy: shape \(2, 36, 1, 1\); expected \[n_images, k, d\] \(or \[n_images, d\]: k = 1\)',
    ),
    ('f30k', lambda d: _write_precomp(d, k=35, dim=2048), r'train_ims.npy: 35 regions per image; expected 36'),
  ],
)
def test_precomp_features_of_wrong_shape(tmp_path, name, edit, message):
  directory = tmp_path / 'm'
  _write_precomp(directory)
  edit(directory)
  with pytest.raises(ValueError, match=message):
    precomp.build(name, str(directory), str(tmp_path / 'tfds'))


def test_precomp_captions_not_utf8(tmp_path):
  directory = tmp_path / 'm'
  _write_precomp(directory)
  (directory / 'dev_caps.txt').write_bytes(b'a caf\xe9 table\n' * 10)
  with pytest.raises(ValueError, match=r'dev_caps.txt: not UTF-8 text .*expected one caption per line in UTF-8'):
    precomp.build('custom', str(directory), str(tmp_path / 'tfds'))


@pytest.mark.parametrize(
  'images, caption_to_image, message',
  [
    (
      {'regions': np.zeros((2, 6), np.float32)},
      np.arange(10) // 5,
      r'src: field "regions" must be \[n_images, k, d\]; got shape \(2, 6\)',
    ),
    (
      {'regions': np.zeros((2, 3, 6), np.float32)},
      np.arange(9) // 5,
      r'src: caption_to_image has shape \(9,\); expected \(10,\)',
    ),
    (
      {'regions': np.zeros((2, 3, 6), np.float32)},
      np.arange(10) // 4,
      r'src: caption_to_image must index images in \[0, 2\)',
    ),
  ],
)
def test_loaded_split_of_wrong_shape(images, caption_to_image, message):
  with pytest.raises(ValueError, match=message):
    validation.check_split(images, ['a red circle'] * 10, caption_to_image, 'src')


def _tsv_row(image_id='img0', count='2', boxes=None, features=None, width='100', height='80'):
  boxes = np.float32([[0, 0, 10, 10], [5, 5, 50, 40]]) if boxes is None else boxes
  features = np.ones((2, 6), np.float32) if features is None else features
  encode = lambda a: base64.b64encode(np.asarray(a, np.float32).tobytes()).decode()
  return '\t'.join([image_id, width, height, count, encode(boxes), encode(features)]) + '\n'


@pytest.mark.parametrize(
  'row, message',
  [
    (_tsv_row(features=np.full((2, 6), np.nan)), r'image img0 features hold NaN or inf'),
    (_tsv_row(features=np.ones(5)), r':1: field features holds 20 bytes; expected a multiple of 4 x num_boxes \(2\)'),
    (_tsv_row(boxes=np.ones((2, 3))), r':1: field boxes has 3 values per box; expected 4'),
    (_tsv_row(count='two'), r':1: num_boxes / image_w / image_h must be numbers'),
  ],
)
def test_bad_detector_tsv_row(tmp_path, row, message):
  (tmp_path / 'f.tsv').write_text(row)
  with pytest.raises(ValueError, match=message):
    convert_features.main(['tsv', f'--input={tmp_path / "f.tsv"}', f'--out_dir={tmp_path / "o"}', '--split=test'])


def _npz(path, **fields):
  values = {
    'x': np.ones((2, 6), np.float32),
    'bbox': np.float32([[0, 0, 10, 10], [5, 5, 50, 40]]),
    'image_w': 100,
    'image_h': 80,
  }
  values.update(fields)
  np.savez(path, **{k: v for k, v in values.items() if v is not None})


@pytest.mark.parametrize(
  'edit, message',
  [
    (lambda d: os.remove(d / 'img1.npz'), (FileNotFoundError, r'img1.npz: missing \(image img1 of --image_ids\)')),
    (
      lambda d: _npz(d / 'img1.npz', image_w=None, image_h=None),
      (ValueError, r"img1.npz: missing field\(s\) \['image_w', 'image_h'\]"),
    ),
    (
      lambda d: _npz(d / 'img1.npz', x=np.ones((3, 6), np.float32)),
      (ValueError, r'image img1 has 3 feature rows but 2 boxes'),
    ),
    (
      lambda d: _truncate(d / 'img1.npz', lambda n: n - 40),
      (ValueError, r'img1.npz: not a readable .npz file .*expected an .npz with x \(or features\)'),
    ),
    (
      lambda d: (d.parent / 'ids.txt').write_text('img0\nimg1\nimg0\n'),
      (ValueError, r"--image_ids lists image\(s\) \['img0'\] more than once"),
    ),
  ],
)
def test_bad_per_image_npz(tmp_path, edit, message):
  directory = tmp_path / 'npz'
  os.makedirs(directory)
  for image_id in ('img0', 'img1'):
    _npz(directory / f'{image_id}.npz')
  (tmp_path / 'ids.txt').write_text('img0\nimg1\n')
  edit(directory)
  error, pattern = message
  with pytest.raises(error, match=pattern):
    convert_features.main(
      [
        'npz',
        f'--input={directory}',
        f'--image_ids={tmp_path / "ids.txt"}',
        f'--out_dir={tmp_path / "o"}',
        '--split=test',
      ]
    )


# --- vocabulary and word vectors --------------------------------------------------------------------------------


def _vocab_data(words=('a', 'dog')):
  words = list(vocab_lib.SPECIAL_TOKENS) + list(words)
  return {
    'idx2word': {str(i): w for i, w in enumerate(words)},
    'word2idx': {w: i for i, w in enumerate(words)},
    'idx': len(words),
  }


def test_vocab_file_missing_or_not_utf8(tmp_path):
  with pytest.raises(FileNotFoundError, match=r'nope.json: vocabulary file not found; expected a SCAN vocabulary'):
    vocab_lib.Vocabulary.from_json(str(tmp_path / 'nope.json'))
  (tmp_path / 'latin1.json').write_bytes(
    json.dumps(_vocab_data(['caf\xe9'])).replace('\\u00e9', '\xe9').encode('latin-1')
  )
  with pytest.raises(ValueError, match=r'latin1.json: not UTF-8 text .*expected a SCAN vocabulary json'):
    vocab_lib.Vocabulary.from_json(str(tmp_path / 'latin1.json'))


@pytest.mark.parametrize(
  'corrupt, message',
  [
    (lambda d: d.update(idx2word=list(d['idx2word'].values())), r'fields "idx2word" and "word2idx" must be json'),
    (
      lambda d: (d['idx2word'].update({'4': ''}), d['word2idx'].update({'': 4}), d['word2idx'].pop('a')),
      r'field "idx2word" must map to non-empty strings',
    ),
  ],
)
def test_vocab_fields_of_wrong_type(tmp_path, corrupt, message):
  data = _vocab_data()
  corrupt(data)
  (tmp_path / 'v.json').write_text(json.dumps(data))
  with pytest.raises(ValueError, match=message):
    vocab_lib.Vocabulary.from_json(str(tmp_path / 'v.json'))


@pytest.mark.parametrize(
  'content, message',
  [
    (
      b'2 5\nred 1 2 3 4 5\n',
      (
        ValueError,
        r'glove.txt: header says 5-d vectors; the model embeds words in 3 '
        r'dimensions \(config.model.word_dim\)',
      ),
    ),
    (b'red 1 x 3\n', (ValueError, r"glove.txt, line 1: word 'red' has a value that is not a number")),
    (b'red 1 2 3\ncaf\xe9 1 2 3\n', (ValueError, r'glove.txt: not UTF-8 text .*expected a UTF-8 GloVe')),
    (None, (FileNotFoundError, r'glove.txt: word vectors file not found \(config.word_vectors\)')),
  ],
)
def test_bad_word_vectors_file(tmp_path, content, message):
  vocab = vocab_lib.Vocabulary(list(vocab_lib.SPECIAL_TOKENS) + ['red', 'circle'])
  if content is not None:
    (tmp_path / 'glove.txt').write_bytes(content)
  error, pattern = message
  with pytest.raises(error, match=pattern):
    word_vectors.load_for_vocab(str(tmp_path / 'glove.txt'), vocab, np.zeros((len(vocab), 3), np.float32))


# --- checkpoints -----------------------------------------------------------------------------------------------


def _params(**shapes):
  return {'encoder': {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}}


def test_checkpoint_params_of_another_model():
  expected = _params(kernel=(4, 3), bias=(3,))
  checkpoints.check_params_match(_params(kernel=(4, 3), bias=(3,)), expected, 'runs/w/best')
  with pytest.raises(
    ValueError,
    match=r'runs/w/best: checkpoint parameters do not fit the model: missing '
    r"\[\"\['encoder'\]\['bias'\]\"\], unknown \[\"\['encoder'\]\['scale'\]\"\] \(is this a "
    'checkpoint of another model',
  ):
    checkpoints.check_params_match(_params(kernel=(4, 3), scale=(3,)), expected, 'runs/w/best')


def test_checkpoint_param_of_wrong_shape():
  with pytest.raises(
    ValueError,
    match=r"runs/w/best: parameter \['encoder'\]\['kernel'\] has shape \(5, 3\) in the "
    r'checkpoint; the model expects \(4, 3\)',
  ):
    checkpoints.check_params_match(_params(kernel=(5, 3)), _params(kernel=(4, 3)), 'runs/w/best')


def test_workdir_without_checkpoint(tmp_path):
  ckpts = checkpoints.RunCheckpoints(str(tmp_path))
  try:
    with pytest.raises(FileNotFoundError, match=r'no checkpoint in best/ or checkpoints/; train first'):
      ckpts.restore_for_eval()
    assert ckpts.restore_latest({'w': jnp.zeros(3)}) is None
  finally:
    ckpts.close()


def test_every_checkpoint_unreadable(tmp_path):
  state = {'w': jnp.arange(4096, dtype=jnp.float32), 'step': jnp.zeros((), jnp.int32)}
  ckpts = checkpoints.RunCheckpoints(str(tmp_path), keep=2)
  for step in (1, 2):
    ckpts.save(step, state, {'step': step}, is_best=step == 2)
  ckpts.close()
  for root, _, files in os.walk(tmp_path):  # cut every array file of every step, as a copy that stopped early
    for name in files:
      path = os.path.join(root, name)
      if '/state/' in path and not name.endswith('.json') and not name.startswith('_') and os.path.getsize(path) > 16:
        _truncate(path, lambda n: n // 3)
  ckpts = checkpoints.RunCheckpoints(str(tmp_path), keep=2)
  try:
    with pytest.raises(
      checkpoints.UnreadableCheckpoints,
      match=r'checkpoints: none of the checkpoint steps \[1, 2\] can be read .*expected a complete '
      'orbax checkpoint of this model and optimiser',
    ):
      ckpts.restore_latest(state)
    with pytest.raises(checkpoints.UnreadableCheckpoints, match=r'best: none of the checkpoint steps \[2\]'):
      ckpts.restore_for_eval()
  finally:
    ckpts.close()


def test_resume_into_a_state_of_another_structure(tmp_path):
  # e.g. --config.optim.grad_clip=0 on a run saved with clipping: the optimiser state has one part fewer.
  saved = {'params': {'w': jnp.zeros(8)}, 'opt_state': (jnp.zeros(()), {'mu': jnp.zeros(8)})}
  ckpts = checkpoints.RunCheckpoints(str(tmp_path))
  ckpts.save(3, saved, {'step': 3})
  ckpts.close()
  ckpts = checkpoints.RunCheckpoints(str(tmp_path))
  try:
    with pytest.raises(
      checkpoints.UnreadableCheckpoints,
      match=r'(?s)checkpoints: none of the checkpoint steps \[3\] can be read \(the newest failed '
      'with ValueError: .*tree structures do not match',
    ):
      ckpts.restore_latest({'params': {'w': jnp.zeros(8)}, 'opt_state': ({'mu': jnp.zeros(8)},)})
  finally:
    ckpts.close()


def _scan_opt(**fields):
  opt = {
    'data_name': 'f30k_precomp',
    'cross_attn': 't2i',
    'raw_feature_norm': 'clipped_l2norm',
    'lambda_softmax': 9.0,
    'agg_func': 'LogSumExp',
    'embed_size': 8,
    'word_dim': 4,
  }
  opt.update(fields)
  return argparse.Namespace(**opt)


@pytest.mark.parametrize(
  'checkpoint, message',
  [
    (
      {'model': [{}, {}]},
      r'official.pth: expected a dict with "model" \(\[image state_dict, text state_dict\]\) and '
      '"opt"',
    ),
    (
      {'model': [{}], 'opt': _scan_opt()},
      r'official.pth: "model" must be \[image encoder state_dict, text encoder state_dict\]',
    ),
    (
      {'model': [{}, {}], 'opt': _scan_opt(data_name='flickr8k_precomp')},
      r"official.pth: opt.data_name is 'flickr8k_precomp'; expected one of",
    ),
    (
      {'model': [{}, {}], 'opt': _scan_opt(precomp_enc_type='backbone')},
      r"official.pth: opt.precomp_enc_type is 'backbone'; expected one of \('basic', 'weight_norm'\)",
    ),
    (
      {
        'model': [
          {'fc.weight': np.zeros((8, 10), np.float32), 'fc.bias': np.zeros(8, np.float32)},
          {'embed.weight': np.zeros((12, 4), np.float32)},
        ],
        'opt': _scan_opt(precomp_enc_type='weight_norm', num_layers=0),
      },
      r"official.pth \(image encoder\): unexpected weights \['fc.weight'\]; opt.precomp_enc_type weight_norm has "
      r"\['fc.bias', 'fc.weight_g', 'fc.weight_v'\]",
    ),
    (
      {'model': [{'fc.weight': np.zeros((8, 10), np.float32)}, {}], 'opt': _scan_opt()},
      r"official.pth \(text encoder\): missing weight 'embed.weight'",
    ),
    (
      {
        'model': [
          {},
          {
            'embed.weight': np.zeros((12, 4), np.float32),
            'rnn.weight_ih_l0': np.zeros((24, 4), np.float32),
            'rnn.weight_hh_l0': np.zeros((24, 4), np.float32),
            'rnn.bias_ih_l0': np.zeros(24, np.float32),
            'rnn.bias_hh_l0': np.zeros(24, np.float32),
          },
        ],
        'opt': _scan_opt(),
      },
      r'official.pth \(text encoder\): rnn.weight_\*_l0 shapes \(24, 4\), \(24, 4\) are not a GRU of hidden size 4',
    ),
  ],
)
def test_official_checkpoint_of_wrong_layout(tmp_path, checkpoint, message):
  path = str(tmp_path / 'official.pth')
  torch_writer.save(checkpoint, path)
  with pytest.raises(ValueError, match=message):
    scan_checkpoint.load(path, 'scan')


def test_torch_zip_without_data_pkl(tmp_path):
  with zipfile.ZipFile(tmp_path / 'weights.pt', 'w') as archive:
    archive.writestr('weights/notes.txt', 'no pickle here')
  with pytest.raises(ValueError, match=r'weights.pt: a torch zip checkpoint has one data.pkl; found \[\]'):
    torch_pickle.load(str(tmp_path / 'weights.pt'))


def test_bert_weights_unreadable_or_of_another_config(tmp_path):
  shutil.copy(os.path.join(FIXTURES, 'tiny_bert', 'config.json'), tmp_path / 'config.json')
  (tmp_path / 'model.safetensors').write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": 1')
  with pytest.raises(ValueError, match=r'model.safetensors: cannot read safetensors file'):
    hf_bert.load_checkpoint(str(tmp_path))
  _, params, _ = hf_bert.load_checkpoint(os.path.join(FIXTURES, 'tiny_bert'))
  del params['pooler_dense']
  hf_bert.write_flax_params(params, str(tmp_path / hf_bert.FLAX_WEIGHTS))
  with pytest.raises(
    ValueError,
    match=r'flax_model.safetensors: params do not match config.json: unknown \[\], '
    r"missing \['pooler_dense/bias', 'pooler_dense/kernel'\]",
  ):
    hf_bert.load_checkpoint(str(tmp_path))


def test_mobilenet_weights_missing_a_key_or_unreadable(tmp_path):
  state = dict(torchvision_mobilenet.read_state_dict(os.path.join(FIXTURES, 'mobilenet_v3_large_w025.safetensors')))
  del state['classifier.3.bias']
  model = MobileNetV3Large(num_classes=7, width_mult=0.25)
  expected = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  with pytest.raises(
    ValueError,
    match=r"w025: does not fit the model: missing \['params/classifier_3/bias'\], "
    r'unexpected \[\] \(a different num_classes or width\?\)',
  ):
    torchvision_mobilenet.convert_state_dict(state, expected, 'w025')
  (tmp_path / 'w.safetensors').write_bytes(b'not safetensors')
  with pytest.raises(
    ValueError,
    match=r'w.safetensors: cannot read safetensors file .*expected a torchvision '
    'mobilenet_v3_large state_dict',
  ):
    torchvision_mobilenet.read_state_dict(str(tmp_path / 'w.safetensors'))
  with pytest.raises(FileNotFoundError, match=r'none.safetensors: no such weights file \(config.mobilenet_weights\)'):
    torchvision_mobilenet.read_state_dict(str(tmp_path / 'none.safetensors'))


# --- captions --------------------------------------------------------------------------------------------------


def _caption_setup(truncate):
  vocab = vocab_lib.Vocabulary(list(vocab_lib.SPECIAL_TOKENS) + ['a', 'red', 'circle'])
  config = ml_collections.ConfigDict({'caption_buckets': (4, 6), 'truncate_captions': truncate})
  return vocab, config


def test_caption_that_is_not_a_string():
  vocab, config = _caption_setup(False)
  with pytest.raises(ValueError, match=r"caption 1 is a bytes \(b'a red circle'\); expected a str"):
    run_setup.encode_captions(vocab, ['a red circle', b'a red circle'], config)


def test_too_long_caption_without_truncation():
  vocab, config = _caption_setup(False)
  with pytest.raises(
    ValueError,
    match=r'caption 1 has 7 tokens, longer than the largest bucket \(6\) of '
    r'config.caption_buckets; add a larger bucket or set config.truncate_captions=True',
  ):
    run_setup.encode_captions(vocab, ['a red circle', 'a red circle a red'], config)


def test_too_long_caption_truncated_and_counted(capsys):
  vocab, config = _caption_setup(True)
  tokens, mask = run_setup.encode_captions(
    vocab, ['a red circle', 'a red circle a red', 'a red circle red a a'], config
  )
  assert tokens.shape == (3, 6) and mask.sum() == 5 + 6 + 6
  assert (
    'note: 2 caption(s) longer than 6 tokens were truncated (config.truncate_captions=True)' in capsys.readouterr().out
  )


# --- queries: Retriever and the retrieve CLI --------------------------------------------------------------------


@pytest.fixture(scope='module')
def retriever():
  """An untrained tiny VSE++ (query checks run before any scoring)."""
  config = vsepp_config.get_config('shapes_tiny')
  config.model.embed_size, config.model.word_dim = 8, 4
  config.data_info = {'img_dim': 6}
  vocab = vocab_lib.Vocabulary(list(vocab_lib.SPECIAL_TOKENS) + ['a', 'red', 'circle'])
  model = run_setup.build_model(config, len(vocab), 6)
  variables = model.init(
    jax.random.PRNGKey(0),
    {'regions': np.zeros((2, 3, 6), np.float32)},
    {'tokens': np.ones((2, 4), np.int32), 'mask': np.ones((2, 4), np.float32)},
  )
  r = api.Retriever(config, vocab, model, variables)
  assert r.score({'regions': np.zeros((2, 3, 6), np.float32)}, ['a red circle']).shape == (2, 1)  # valid input
  return r


REGIONS = np.zeros((2, 3, 6), np.float32)


@pytest.mark.parametrize(
  'images, captions, kwargs, message',
  [
    ({'regions': REGIONS}, 'a red circle', {}, 'captions must be a list of strings, not one string'),
    ({'regions': REGIONS}, [], {}, 'captions is empty; pass at least one caption string'),
    ({'regions': REGIONS}, ['a red circle', None], {}, r'caption 1 is a NoneType \(None\); expected a str'),
    (
      REGIONS,
      ['a red circle'],
      {},
      r'images must be a dict of dataset fields such as \{"regions": \[n_images, k, '
      r'd\]\}; got ndarray',
    ),
    (
      {'pixels': np.zeros((2, 8, 8, 3), np.uint8)},
      ['a red circle'],
      {},
      r"image inputs lack field\(s\) \['regions'\] that model VSEPP needs; got \['pixels'\]",
    ),
    ({'regions': REGIONS[:0]}, ['a red circle'], {}, r"images hold no image \(fields \{'regions': 0\}\)"),
    (
      {'regions': REGIONS},
      ['a red circle'],
      {'rerank_k': -1},
      r'rerank_k must be an int >= 0 \(0: score every pair\); got -1',
    ),
  ],
)
def test_bad_retriever_query(retriever, images, captions, kwargs, message):
  with pytest.raises(ValueError, match=message):
    retriever.score(images, captions, **kwargs)


def test_retrieve_cli_bad_k_or_workdir(tmp_path):
  with pytest.raises(ValueError, match='-k must be >= 1, got 0'):
    retrieve.run(str(tmp_path), 'test', 'a red circle', None, 0)
  with pytest.raises(FileNotFoundError, match=r'config.json not found: .* is not a training workdir'):
    retrieve.run(str(tmp_path), 'test', 'a red circle', None, 5)
