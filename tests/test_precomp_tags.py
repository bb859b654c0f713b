"""Per-region tags of the SCAN precomp builder ({split}_tags.txt): a build reads back exactly (in memory and with lazy
features), every integrity check names file, line and expectation, a build whose tags disagree with the manual dir
is refused, converter output builds, and GLFN's prepare_images tokenises the loaded tags or names the missing file."""

import json
import os
import shutil
import sys

import numpy as np
import pytest
from test_precomp import _write  # pylint: disable=g-import-not-at-top

from xmatch_jax import data as data_lib
from xmatch_jax.data import lazy
from xmatch_jax.data import precomp
from xmatch_jax.data import wordpiece
from xmatch_jax.models import build_model
from xmatch_jax.models import glfn as glfn_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, 'tests', 'fixtures')
TINY_BERT = os.path.join(FIXTURES, 'tiny_bert')
SIZES = {'train': 2, 'dev': 1, 'test': 8}
K = 36
WORDS = ['red circle', 'blue square', 'big yellow cross', 'café table', 'green items', 'small red triangles']


def _tags(split, n, k=K):
  """n x k tags, distinct per split and image, some with spaces and non-ASCII."""
  return [[WORDS[(i + r) % len(WORDS)] if r % 3 else f'{split} {i} {r}' for r in range(k)] for i in range(n)]


def _write_tags(directory, sizes, k=K):
  for split, n in sizes.items():
    with open(os.path.join(directory, f'{split}_tags.txt'), 'w', encoding='utf-8') as f:
      f.write(''.join('\t'.join(row) + '\n' for row in _tags(split, n, k)))


def _dataset(directory, tags=True):
  arrays = _write(directory, SIZES, k=K)
  shutil.copy(os.path.join(FIXTURES, 'f30k_sample_train_boxes_8.npy'), os.path.join(directory, 'test_boxes.npy'))
  if tags:
    _write_tags(directory, SIZES)
  return arrays


def _load(tmp_path, monkeypatch, split='test', mode='0'):
  monkeypatch.setenv('XMATCH_MANUAL_DIR', str(tmp_path / 'manual'))
  monkeypatch.setenv('XMATCH_LAZY', mode)
  return data_lib.load_split('precomp', split, str(tmp_path / 'tfds'))


def _glfn(**fields):
  config = {
    'name': 'glfn',
    'bert_dir': TINY_BERT,
    'embed_size': 16,
    'word_dim': 8,
    'position_dim': 6,
    'block_size': 3,
    **fields,
  }
  return build_model(config, vocab_size=34, img_dim=6)


def test_tags_round_trip_in_memory_and_lazy_and_glfn_tokenises_them(tmp_path, monkeypatch):
  manual = tmp_path / 'manual' / 'custom_precomp'
  _dataset(manual)
  # CRLF line ends and spaces around a tag are dropped.
  lines = (manual / 'dev_tags.txt').read_text(encoding='utf-8').splitlines()
  (manual / 'dev_tags.txt').write_bytes(b''.join((' ' + line + '\r\n').encode() for line in lines) + b'\n')
  split = _load(tmp_path, monkeypatch)
  tags = split.images['tags']
  assert tags.dtype == object and tags.shape == (8, K)
  assert tags.tolist() == _tags('test', 8) and isinstance(tags[0, 0], str)
  assert _load(tmp_path, monkeypatch, 'dev').images['tags'].tolist() == _tags('dev', 1)
  lazy_split = _load(tmp_path, monkeypatch, mode='1')
  assert isinstance(lazy_split.images['regions'], lazy.LazyRows)
  assert isinstance(lazy_split.images['tags'], np.ndarray)
  np.testing.assert_array_equal(lazy_split.images['tags'], tags)
  assert tags[0, 1] == tags[6, 1] and tags[0, 1] is tags[6, 1]  # equal tags share one str

  tokenizer = wordpiece.WordPieceVocab(TINY_BERT)
  for images in (split.images, lazy_split.images):
    inputs = _glfn().prepare_images(images)
    assert inputs['tag_tokens'].shape[:2] == (8, K)
    for i, r in ((0, 1), (3, 0), (7, 35)):
      ids = tokenizer.encode(tags[i, r])
      np.testing.assert_array_equal(inputs['tag_tokens'][i, r, : len(ids)], ids)
      assert inputs['tag_mask'][i, r].sum() == len(ids)
    assert isinstance(inputs['regions'], type(images['regions']))  # lazy features stay lazy

  # A dataset without tags files: no field, and GLFN names the file to add and the way out.
  monkeypatch.setenv('XMATCH_MANUAL_DIR', str(tmp_path / 'bare'))
  _dataset(tmp_path / 'bare' / 'custom_precomp', tags=False)
  bare = data_lib.load_split('precomp', 'test', str(tmp_path / 'tfds2'))
  assert 'tags' not in bare.images
  with pytest.raises(ValueError, match=r'has no \{split\}_tags.txt .*--config.model.use_tags=False'):
    _glfn().prepare_images(bare.images)
  assert sorted(_glfn(use_tags=False).prepare_images(bare.images)) == ['pfan_blocks', 'pfan_weights', 'regions']

  # Tags added after the build: the reused build is refused, naming the directory to delete; then it rebuilds.
  _write_tags(tmp_path / 'bare' / 'custom_precomp', SIZES)
  built = tmp_path / 'tfds2' / 'xmatch_precomp' / 'custom' / str(precomp.XmatchPrecomp.VERSION)
  with pytest.raises(ValueError, match=rf'{built}: this build .* has no tags, but .* now holds train_tags.txt'):
    data_lib.load_split('precomp', 'test', str(tmp_path / 'tfds2'))
  shutil.rmtree(built)
  assert data_lib.load_split('precomp', 'test', str(tmp_path / 'tfds2')).images['tags'].tolist() == _tags('test', 8)


@pytest.mark.minilm
def test_minilm_tokenises_loaded_tags(tmp_path, monkeypatch):
  _dataset(tmp_path / 'manual' / 'custom_precomp')
  images = _load(tmp_path, monkeypatch).images
  tokenizer = wordpiece.WordPieceVocab('minilm')
  inputs = glfn_lib.prepare_images(images, tokenizer)
  assert images['tags'][1, 2] == 'café table' and images['tags'][0, 4] == 'green items'
  for (i, r), words in {(1, 2): ['cafe', 'table'], (0, 4): ['green', 'items'], (2, 0): ['test', '2', '0']}.items():
    n = len(words) + 2
    assert tokenizer.decode(inputs['tag_tokens'][i, r, :n]) == ['[CLS]', *words, '[SEP]']
    assert inputs['tag_mask'][i, r].sum() == n


def _edit_line(path, lineno, text):
  lines = open(path, encoding='utf-8').read().split('\n')
  lines[lineno - 1] = text
  open(path, 'w', encoding='utf-8').write('\n'.join(lines))


@pytest.mark.parametrize(
  'edit,error,message',
  [
    (
      lambda d: os.remove(d / 'dev_tags.txt'),
      FileNotFoundError,
      r'dev_tags.txt: missing, but train_tags.txt, test_tags.txt exist\(s\) .*expected a \{split\}_tags.txt for every '
      r'split \(train, dev, test\) or for none',
    ),
    (
      lambda d: _edit_line(d / 'test_tags.txt', 9, 'one\ttoo\tmany'),
      ValueError,
      r'test_tags.txt: line 9: more lines than images; expected 8 lines, one per image of .*test_ims.npy',
    ),
    (
      lambda d: open(d / 'test_tags.txt', 'w').write('\t'.join(['x'] * K) + '\n'),
      ValueError,
      r'test_tags.txt: ends after 1 line\(s\): line 2 is missing; expected 8 lines',
    ),
    (
      lambda d: _edit_line(d / 'train_tags.txt', 2, '\t'.join(['x'] * (K - 1))),
      ValueError,
      r'train_tags.txt: line 2 has 35 tag\(s\); expected 36 \(one per region of train_ims.npy\), separated by TAB',
    ),
    (
      lambda d: _edit_line(d / 'train_tags.txt', 1, ' '.join(['x'] * K)),
      ValueError,
      r'train_tags.txt: line 1 has 1 tag\(s\); expected 36 .*this line has no TAB',
    ),
    (
      lambda d: _edit_line(d / 'test_tags.txt', 4, '\t'.join(['x'] * 5 + ['  '] + ['y'] * (K - 6))),
      ValueError,
      r'test_tags.txt: line 4: tag 6 is empty \(1 empty\); expected 36 non-empty tags',
    ),
    (
      lambda d: open(d / 'dev_tags.txt', 'wb').write('\t'.join(['caf\xe9'] * K).encode('latin-1') + b'\n'),
      ValueError,
      r'dev_tags.txt: line 1 is not UTF-8 .*expected UTF-8 text',
    ),
  ],
)
def test_tags_integrity_errors_name_file_and_line(edit, error, message, tmp_path):
  directory = tmp_path / 'm'
  _write(directory, SIZES, k=K)
  _write_tags(directory, SIZES)
  edit(directory)
  with pytest.raises(error, match=message):
    precomp.build('custom', str(directory), str(tmp_path / 'tfds'))


def test_converter_tags_build(tmp_path, monkeypatch):
  """tools/convert_features.py output (features + tags from class / attribute ids) builds and loads."""
  sys.path.insert(0, os.path.join(ROOT, 'tools'))
  import convert_features  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  manual = tmp_path / 'manual' / 'custom_precomp'
  os.makedirs(manual)
  (tmp_path / 'objects.txt').write_text('car,auto\nplate\nstop sign,stopsign\n')
  (tmp_path / 'attrs.txt').write_text('white\nred\n')
  for split, n in SIZES.items():
    for i in range(n):
      boxes = np.tile(np.array([[1, 2, 30, 40]], np.float32), (3, 1))
      np.savez(
        tmp_path / f'{split}{i}.npz',
        x=rng.normal(size=(3, 6)).astype(np.float32),
        bbox=boxes,
        image_w=50,
        image_h=60,
        objects_id=np.array([i % 3, 2, 0]),
        attrs_id=np.array([1, 0, 1]),
        attrs_conf=np.array([0.9, 0.05, 0.5], np.float32),
      )
    (tmp_path / f'{split}_ids.txt').write_text(''.join(f'{split}{i}\n' for i in range(n)))
    convert_features.main(
      [
        'npz',
        f'--input={tmp_path}',
        f'--image_ids={tmp_path / f"{split}_ids.txt"}',
        f'--out_dir={manual}',
        f'--split={split}',
        f'--objects_vocab={tmp_path / "objects.txt"}',
        f'--attributes_vocab={tmp_path / "attrs.txt"}',
        '--attr_threshold=0.1',
      ]
    )
    (manual / f'{split}_caps.txt').write_text(''.join(f'caption {c}\n' for c in range(5 * n)))
  images = _load(tmp_path, monkeypatch).images
  assert images['tags'].tolist()[:2] == [['red car', 'stop sign', 'red car'], ['red plate', 'stop sign', 'red car']]
  assert _glfn().prepare_images(images)['tag_tokens'].shape[:2] == (8, 3)


def test_build_streams_shard_by_shard_and_keeps_order(tmp_path, monkeypatch):
  """With shards of 3 images, the 8 test images (features, PFAN positions, tags) span 3 shards and read back in
  order; the build writes each shard as it is generated (StreamingArrayRecordBuilder, no whole-split buffer)."""
  manual = tmp_path / 'manual' / 'custom_precomp'
  arrays = _dataset(manual)
  monkeypatch.setattr(precomp.XmatchPrecomp, 'SHARD_BYTES', 3 * K * 6 * 4)
  split = _load(tmp_path, monkeypatch)
  builder = precomp.XmatchPrecomp(config='custom', data_dir=str(tmp_path / 'tfds'))
  assert builder.info.splits['test'].shard_lengths == [3, 3, 2]
  assert builder.info.splits['train'].shard_lengths == [2]
  np.testing.assert_array_equal(split.images['regions'], arrays['test'])
  assert split.images['tags'].tolist() == _tags('test', 8)
  blocks, _ = data_lib.pfan.from_pfan_layout(np.load(os.path.join(FIXTURES, 'f30k_sample_train_boxes_8.npy')))
  np.testing.assert_array_equal(split.images['pfan_blocks'], blocks)
  assert len(split.captions) == 40 and list(split.caption_to_image[-6:]) == [6, 7, 7, 7, 7, 7]
  lazy_regions = _load(tmp_path, monkeypatch, mode='1').images['regions']
  assert isinstance(lazy_regions, lazy.LazyRows)
  np.testing.assert_array_equal(lazy_regions[np.array([7, 2, 3, 0])], arrays['test'][[7, 2, 3, 0]])


def test_build_memory_tool_checks_its_build(tmp_path):
  """tools/precomp_build_memory.py on a small synthetic split: the build is read back and compared, and the
  sampled peaks are reported."""
  sys.path.insert(0, os.path.join(ROOT, 'tools'))
  import precomp_build_memory  # pylint: disable=g-import-not-at-top

  out = tmp_path / 'mem.json'
  assert (
    precomp_build_memory.main(
      ['--images=40', '--regions=4', '--dim=8', f'--dir={tmp_path / "scratch"}', f'--json={out}']
    )
    == 0
  )
  result = json.loads(out.read_text())
  assert result['input_bytes'] == 40 * 4 * 8 * 4 and result['peak_anon_bytes'] > 0
  assert not (tmp_path / 'scratch').exists()
