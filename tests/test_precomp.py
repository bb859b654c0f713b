"""The SCAN precomp builder: a build from a manual dir reads back exactly (features, captions, PFAN positions from
the real fixture), the repeated-rows layout is de-duplicated, and every integrity check names file and expectation."""

import os
import shutil

import numpy as np
import pytest

from xmatch_jax import data as data_lib
from xmatch_jax.data import precomp
from xmatch_jax.data import vocab as vocab_lib

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures')
CAPTIONS = [f'caption number {i} of a test image' for i in range(60)]


def _write(directory, sizes, k=36, d=6, repeat=1, seed=0):
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(seed)
  arrays = {}
  for split, n in sizes.items():
    ims = rng.normal(size=(n, k, d)).astype(np.float32)
    arrays[split] = ims
    np.save(os.path.join(directory, f'{split}_ims.npy'), np.repeat(ims, repeat, axis=0))
    with open(os.path.join(directory, f'{split}_caps.txt'), 'w') as f:
      f.write('\n'.join(CAPTIONS[: 5 * n]) + '\n')
  return arrays


def test_build_and_load_round_trip_with_pfan_positions(tmp_path, monkeypatch):
  manual = tmp_path / 'manual'
  arrays = _write(manual / 'custom_precomp', {'train': 3, 'dev': 2, 'test': 8})
  shutil.copy(os.path.join(FIXTURES, 'f30k_sample_train_boxes_8.npy'), manual / 'custom_precomp' / 'test_boxes.npy')
  monkeypatch.setenv('XMATCH_MANUAL_DIR', str(manual))
  split = data_lib.load_split('precomp', 'test', str(tmp_path / 'tfds'))
  np.testing.assert_array_equal(split.images['regions'], arrays['test'])
  assert split.captions == CAPTIONS[:40] and list(split.caption_to_image[:6]) == [0, 0, 0, 0, 0, 1]
  blocks, weights = data_lib.pfan.from_pfan_layout(np.load(os.path.join(FIXTURES, 'f30k_sample_train_boxes_8.npy')))
  np.testing.assert_array_equal(split.images['pfan_blocks'], blocks)
  np.testing.assert_allclose(split.images['pfan_weights'], weights)
  dev = data_lib.load_split('precomp', 'dev', str(tmp_path / 'tfds'))
  assert 'pfan_blocks' not in dev.images and len(dev.captions) == 10


def test_one_feature_row_per_caption_is_deduplicated(tmp_path):
  arrays = _write(tmp_path / 'm', {'train': 2, 'dev': 1, 'test': 3}, repeat=5)
  builder = precomp.build('custom', str(tmp_path / 'm'), str(tmp_path / 'tfds'))
  source = builder.as_data_source('test')
  assert len(source) == 3
  np.testing.assert_array_equal(source[2]['regions'], arrays['test'][2])


@pytest.mark.parametrize(
  'edit,message',
  [
    (lambda d: os.remove(d / 'dev_caps.txt'), r'dev_caps.txt: missing'),
    (
      lambda d: open(d / 'test_caps.txt', 'a').write('one caption too many\n'),
      r'test_caps.txt: 16 captions for 3 images .* expected 5 x 3 = 15',
    ),
    (lambda d: np.save(d / 'train_ims.npy', np.zeros((2, 36, 6))), r'train_ims.npy: dtype float64; expected float32'),
    (lambda d: open(d / 'dev_caps.txt', 'w').write('a\n\nb\nc\nd\n'), r'dev_caps.txt: line 2 is empty'),
    (lambda d: np.save(d / 'test_boxes.npy', np.zeros((3, 35, 30))), r'test_boxes.npy: shape \(3, 35, 30\)'),
  ],
)
def test_integrity_errors_name_the_file(edit, message, tmp_path):
  directory = tmp_path / 'm'
  _write(directory, {'train': 2, 'dev': 1, 'test': 3})
  edit(directory)
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    precomp.build('custom', str(directory), str(tmp_path / 'tfds'))


def test_nan_features_name_the_image(tmp_path):
  _write(tmp_path / 'm', {'train': 2, 'dev': 1, 'test': 3})
  ims = np.load(tmp_path / 'm' / 'test_ims.npy')
  ims[1, 4, 2] = np.nan
  np.save(tmp_path / 'm' / 'test_ims.npy', ims)
  with pytest.raises(ValueError, match='test_ims.npy: image 1 holds NaN'):
    precomp.build('custom', str(tmp_path / 'm'), str(tmp_path / 'tfds'))


def test_flickr30k_counts_and_feature_size_are_checked(tmp_path):
  _write(tmp_path / 'f', {'train': 2, 'dev': 1, 'test': 3}, d=2048)
  with pytest.raises(ValueError, match=r'dev_ims.npy: 1 images; f30k dev has 1000 \(5000 captions\)'):
    precomp.build('f30k', str(tmp_path / 'f'), str(tmp_path / 'tfds'))
  _write(tmp_path / 'g', {'train': 2, 'dev': 1, 'test': 3}, d=6)
  with pytest.raises(ValueError, match='train_ims.npy: feature size 6; expected 2048'):
    precomp.build('f30k', str(tmp_path / 'g'), str(tmp_path / 'tfds'))
  with pytest.raises(FileNotFoundError, match='manual dir not found'):
    precomp.build('coco', str(tmp_path / 'none'), str(tmp_path / 'tfds'))


def test_real_flickr30k_captions_load_through_the_builder(tmp_path, monkeypatch):
  """The Flickr30K fixture (SCAN's train_caps.txt, first 250 lines = 50 images; shipped in
  tests/fixtures/f30k_sample) goes through the precomp caption reader and SCAN's vocabulary unchanged."""
  sample = os.path.join(FIXTURES, 'f30k_sample')
  manual = tmp_path / 'manual' / 'custom_precomp'
  _write(manual, {'train': 50, 'dev': 1, 'test': 1})
  shutil.copy(os.path.join(sample, 'train_caps.txt'), manual / 'train_caps.txt')
  monkeypatch.setenv('XMATCH_MANUAL_DIR', str(tmp_path / 'manual'))
  split = data_lib.load_split('precomp', 'train', str(tmp_path / 'tfds'))
  with open(os.path.join(sample, 'train_caps.txt'), encoding='utf-8') as f:
    lines = [line.strip() for line in f]  # SCAN's PrecompDataset
  assert len(split.captions) == 250 and [c.strip() for c in split.captions] == lines
  assert list(split.caption_to_image) == [i // 5 for i in range(250)]
  assert split.captions[0].startswith('Two young guys with shaggy hair')
  vocab = vocab_lib.Vocabulary.from_json(os.path.join(sample, 'f30k_vocab.json'))
  ids = [vocab.encode(c) for c in split.captions]
  unknown = sum(int((t == vocab_lib.UNK_ID).sum()) for t in ids)
  assert unknown / sum(len(t) - 2 for t in ids) < 0.01  # SCAN's train vocabulary covers its own train captions


def test_one_vector_per_image_is_read_as_one_region(tmp_path):
  """VSE++'s precomp releases hold [n_images, d] (e.g. ResNet features): dataset precomp reads them as k = 1."""
  arrays = _write(tmp_path / 'm', {'train': 2, 'dev': 1, 'test': 3}, k=1, d=8)
  for split in ('train', 'dev', 'test'):
    np.save(tmp_path / 'm' / f'{split}_ims.npy', arrays[split][:, 0])  # 2-D
  source = precomp.build('custom', str(tmp_path / 'm'), str(tmp_path / 'tfds')).as_data_source('test')
  np.testing.assert_array_equal(np.stack([source[i]['regions'] for i in range(3)]), arrays['test'])
  _write(tmp_path / 'f', {'train': 2, 'dev': 1, 'test': 3}, k=1, d=2048)
  np.save(tmp_path / 'f' / 'train_ims.npy', np.zeros((2, 2048), np.float32))
  with pytest.raises(
    ValueError, match=r'train_ims.npy: shape \(2, 2048\), one vector per image .* use dataset precomp'
  ):
    precomp.build('f30k', str(tmp_path / 'f'), str(tmp_path / 'tfds'))


def test_ids_file_becomes_the_image_id_per_image_or_per_caption(tmp_path, monkeypatch):
  manual = tmp_path / 'manual' / 'custom_precomp'
  _write(manual, {'train': 2, 'dev': 1, 'test': 3})
  (manual / 'test_ids.txt').write_text('391895\n522418\n184613\n')  # one per image (COCO-style ids)
  (manual / 'train_ids.txt').write_text(''.join(f'{i}\n' for i in (7, 7, 7, 7, 7, 9, 9, 9, 9, 9)))  # per caption
  monkeypatch.setenv('XMATCH_MANUAL_DIR', str(tmp_path / 'manual'))
  test = data_lib.load_split('precomp', 'test', str(tmp_path / 'tfds'))
  assert list(test.images['image_id']) == [391895, 522418, 184613]
  assert list(data_lib.load_split('precomp', 'train', str(tmp_path / 'tfds')).images['image_id']) == [7, 9]
  assert list(data_lib.load_split('precomp', 'dev', str(tmp_path / 'tfds')).images['image_id']) == [0]  # no file


@pytest.mark.parametrize(
  'text,message',
  [
    ('1\n2\n1\n', r'test_ids.txt: id 1 is given to images 0 and 2; expected unique ids'),
    ('1\nfoo\n3\n', r"test_ids.txt: line 2 is 'foo'; expected one integer per line"),
    ('1\n2\n', r'test_ids.txt: 2 lines; expected one id per image \(3\) or per caption \(15\)'),
    ('1\n' * 4 + '2\n' + '3\n' * 5 + '4\n' * 5, r'test_ids.txt: line 5 \(a caption of image 0\) has id 2, another'),
  ],
)
def test_bad_ids_files_name_the_line(text, message, tmp_path):
  _write(tmp_path / 'm', {'train': 2, 'dev': 1, 'test': 3})
  (tmp_path / 'm' / 'test_ids.txt').write_text(text)
  with pytest.raises(ValueError, match=message):
    precomp.build('custom', str(tmp_path / 'm'), str(tmp_path / 'tfds'))


def test_any_number_of_captions_per_image_with_a_caption_index(tmp_path, monkeypatch):
  manual = tmp_path / 'manual' / 'custom_precomp'
  arrays = _write(manual, {'train': 2, 'dev': 1, 'test': 3})
  owner = [2, 0, 2, 1, 2]  # image 0: 1 caption, image 1: 1, image 2: 3, listed out of order
  (manual / 'test_caps.txt').write_text(''.join(f'caption {c} of image {i}\n' for c, i in enumerate(owner)))
  (manual / 'test_caption_images.txt').write_text(''.join(f'{i}\n' for i in owner))
  monkeypatch.setenv('XMATCH_MANUAL_DIR', str(tmp_path / 'manual'))
  split = data_lib.load_split('precomp', 'test', str(tmp_path / 'tfds'))
  np.testing.assert_array_equal(split.images['regions'], arrays['test'])
  assert split.captions == [
    'caption 1 of image 0',
    'caption 3 of image 1',
    'caption 0 of image 2',
    'caption 2 of image 2',
    'caption 4 of image 2',
  ]  # grouped by image, file order within an image
  assert list(split.caption_to_image) == [0, 1, 2, 2, 2]
  assert len(data_lib.load_split('precomp', 'train', str(tmp_path / 'tfds')).captions) == 10  # 5 each, no index


@pytest.mark.parametrize(
  'owner,message',
  [
    ('0\n0\n2\n2\n2\n', r'test_caption_images.txt: image row 1 has no caption'),
    ('0\n1\n2\n3\n2\n', r'test_caption_images.txt: line 4 names image row 3; expected a row in \[0, 3\)'),
    ('0\n1\n2\n', r'test_caption_images.txt: 3 lines for 5 captions'),
  ],
)
def test_caption_index_errors_name_the_file(owner, message, tmp_path):
  _write(tmp_path / 'm', {'train': 2, 'dev': 1, 'test': 3})
  (tmp_path / 'm' / 'test_caps.txt').write_text('a\nb\nc\nd\ne\n')
  (tmp_path / 'm' / 'test_caption_images.txt').write_text(owner)
  with pytest.raises(ValueError, match=message):
    precomp.build('custom', str(tmp_path / 'm'), str(tmp_path / 'tfds'))
  _write(tmp_path / 'f', {'train': 2, 'dev': 1, 'test': 3}, d=2048)
  (tmp_path / 'f' / 'train_caption_images.txt').write_text('0\n')
  with pytest.raises(ValueError, match='caption index is read for dataset precomp .* only'):
    precomp.build('f30k', str(tmp_path / 'f'), str(tmp_path / 'tfds'))


def test_a_1_1_0_build_is_reused_until_an_ids_file_appears(tmp_path):
  """Version 1.2.0 only adds what the new files give: a 1.1.0 build of a manual dir without them holds the same
  data and is read as it is (no rebuild of a large dataset); adding an ids file builds 1.2.0."""
  _write(tmp_path / 'm', {'train': 2, 'dev': 1, 'test': 3})

  class Release110(precomp.XmatchPrecomp, skip_registration=True):  # the code of 1.1.0 wrote these same examples
    name = 'xmatch_precomp'
    VERSION = precomp.tfds.core.Version('1.1.0')
    SUPPORTED_VERSIONS = []

  old = Release110(config='custom', data_dir=str(tmp_path / 'tfds'), file_format='array_record')
  old.download_and_prepare(download_config=precomp.tfds.download.DownloadConfig(manual_dir=str(tmp_path / 'm')))
  assert os.path.exists(tmp_path / 'tfds' / 'xmatch_precomp' / 'custom' / '1.1.0' / 'dataset_info.json')
  builder = precomp.build('custom', str(tmp_path / 'm'), str(tmp_path / 'tfds'))
  assert str(builder.version) == '1.1.0'
  (tmp_path / 'm' / 'test_ids.txt').write_text('5\n6\n7\n')
  builder = precomp.build('custom', str(tmp_path / 'm'), str(tmp_path / 'tfds'))
  assert str(builder.version) == '1.2.0' and builder.as_data_source('test')[2]['image_id'] == 7


def test_build_defaults_to_the_librarys_data_dir(tmp_path, monkeypatch):
  _write(tmp_path / 'm', {'train': 2, 'dev': 1, 'test': 3})
  monkeypatch.setenv('XMATCH_DATA_DIR', str(tmp_path / 'lib'))
  builder = precomp.build('custom', str(tmp_path / 'm'))
  assert builder.data_dir.startswith(str(tmp_path / 'lib' / 'xmatch_precomp' / 'custom'))
