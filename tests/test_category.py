"""The category-dataset builder (Wikipedia, Pascal Sentence, XMediaNet, manifest): tiny fake trees in each release
layout build and load back exactly (pixels, labels, texts, split order), splits are the documented seeded 80/10/10
or splits.json, and every integrity check names the file and what was expected."""

import json
import os

import numpy as np
from PIL import Image
import pytest

from xmatch_jax import data as data_lib
from xmatch_jax.data import category
from xmatch_jax.data import validation

CATEGORIES = ['art', 'biology', 'sport']
N_PAIRS = 10  # 8 / 1 / 1 under the 80/10/10 split


def _colour(i):
  return (20 * i + 10, 200 - 15 * i, (70 * i) % 256)


def _jpeg(path, i):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new('RGB', (24, 18), _colour(i)).save(path, quality=95)


@pytest.fixture(autouse=True)
def _tiny_counts(monkeypatch):
  monkeypatch.setitem(category.EXPECTED_PAIRS, 'wikipedia', N_PAIRS)
  monkeypatch.setitem(category.EXPECTED_PAIRS, 'pascal', N_PAIRS)
  monkeypatch.setitem(category.EXPECTED_PAIRS, 'xmedianet', N_PAIRS)
  monkeypatch.setitem(category.EXPECTED_CLASSES, 'wikipedia', 3)
  monkeypatch.setitem(category.EXPECTED_CLASSES, 'pascal', 3)
  monkeypatch.setitem(category.EXPECTED_CLASSES, 'xmedianet', 4)


def _wikipedia(root):
  """Pairs 0-6 in the train list, 7-9 in the test list; returns [(text, label)] in pooled order."""
  expected = []
  os.makedirs(root / 'texts')
  (root / 'categories.list').write_text('\n'.join(CATEGORIES) + '\n')
  lines = {'trainset_txt_img_cat.list': [], 'testset_txt_img_cat.list': []}
  for i in range(N_PAIRS):
    label = i % 3
    _jpeg(str(root / 'images' / CATEGORIES[label] / f'img{i:02d}.jpg'), i)
    if i == 4:  # as some release files: an unescaped '&', so not well-formed XML
      body = f'<document><title>t</title><text>Article {i} on R&B\n  and more</text></document>'
      text = f'Article {i} on R&B and more'
    else:
      body = (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<document><title>t{i}</title>\n'
        f'<text>Article   {i} about &amp; {CATEGORIES[label]}\n</text></document>'
      )
      text = f'Article {i} about & {CATEGORIES[label]}'
    (root / 'texts' / f'doc{i:02d}-1.xml').write_text(body)
    list_name = 'trainset_txt_img_cat.list' if i < 7 else 'testset_txt_img_cat.list'
    lines[list_name].append(f'doc{i:02d}-1\timg{i:02d}\t{label + 1}')
    expected.append((text, label))
  for name, content in lines.items():
    (root / name).write_text('\n'.join(content) + '\n')
  return expected


def _pascal(root):
  """Image names are chosen so that sorted (category, image) order differs from creation order."""
  expected = []
  names = {'art': ['b', 'a', 'c', 'd'], 'biology': ['z', 'y', 'x'], 'sport': ['m', 'n', 'o']}
  i = 0
  for label, cat in enumerate(CATEGORIES):
    for name in sorted(names[cat]):
      _jpeg(str(root / 'dataset' / cat / f'2008_{name}.jpg'), i)
      sentences = [f'{cat} {name} sentence {k}.' for k in range(5)]
      os.makedirs(root / 'sentence' / cat, exist_ok=True)
      (root / 'sentence' / cat / f'2008_{name}.txt').write_text('\n'.join(sentences) + '\n\n')
      expected.append((' '.join(sentences), label))
      i += 1
  (root / 'dataset' / 'sport' / 'notes.db').write_text('not an image')  # ignored: not a .jpg
  return expected


def _manifest(root, n=N_PAIRS, num_labels=4):
  """Even pairs have an inline text, odd ones a .txt file."""
  expected, rows = [], ['image\ttext\tlabel']
  for i in range(n):
    label = (3 * i) % num_labels
    _jpeg(str(root / 'img' / f'{i}.jpg'), i)
    text = f'text of pair {i} in class {label}'
    if i % 2:
      os.makedirs(root / 'txt', exist_ok=True)
      (root / 'txt' / f'{i}.txt').write_text(text + '\n')
      rows.append(f'img/{i}.jpg\ttxt/{i}.txt\t{label}')
    else:
      rows.append(f'img/{i}.jpg\t{text}\t{label}')
    expected.append((text, label))
  (root / 'pairs.tsv').write_text('\n'.join(rows) + '\n')
  return expected


WRITERS = {'wikipedia': _wikipedia, 'pascal': _pascal, 'xmedianet': _manifest, 'category': _manifest}


def _check_loaded(split_data, indices, expected, size):
  images, captions, caption_to_image = split_data
  n = len(indices)
  assert images['pixels'].shape == (n, size, size, 3) and images['pixels'].dtype == np.uint8
  assert images['label'].dtype == np.int64 and images['image_id'].dtype == np.int64
  np.testing.assert_array_equal(images['image_id'], indices)
  np.testing.assert_array_equal(images['label'], [expected[i][1] for i in indices])
  assert captions == [expected[i][0] for i in indices]
  np.testing.assert_array_equal(caption_to_image, np.arange(n))
  for pixels, i in zip(images['pixels'], indices):  # each image is its pair's solid colour
    np.testing.assert_allclose(pixels.reshape(-1, 3).mean(0), _colour(i), atol=6)


@pytest.mark.parametrize('name', ['wikipedia', 'pascal', 'xmedianet'])
def test_load_split_reads_every_split_back_in_permutation_order(name, tmp_path, monkeypatch):
  expected = WRITERS[name](tmp_path / 'manual' / name)
  monkeypatch.setenv('XMATCH_MANUAL_DIR', str(tmp_path / 'manual'))
  order = np.random.default_rng(0).permutation(N_PAIRS)
  for split, indices in [('train', order[:8]), ('dev', order[8:9]), ('test', order[9:])]:
    loaded = data_lib.load_split(name, split, str(tmp_path / 'tfds'))
    _check_loaded(loaded, indices, expected, category.IMAGE_SIZE)
  with pytest.raises(ValueError, match=r"xmatch_category/.*no split 'testall'"):
    data_lib.load_split(name, 'testall', str(tmp_path / 'tfds'))


def test_manual_dir_defaults_to_data_dir_and_custom_image_size(tmp_path, monkeypatch):
  monkeypatch.delenv('XMATCH_MANUAL_DIR', raising=False)
  data_dir = tmp_path / 'tfds'
  assert data_lib.category_manual_dir('category', str(data_dir)) == str(data_dir / 'manual' / 'category')
  expected = _manifest(data_dir / 'manual' / 'category', n=12, num_labels=5)
  builder = category.build('category', str(data_dir / 'manual' / 'category'), str(data_dir), image_size=16)
  assert builder.builder_config.name == 'category_16px'
  order = np.random.default_rng(0).permutation(12)
  source = builder.as_data_source('dev')
  assert [source[i]['image_id'] for i in range(len(source))] == list(order[10:11])  # round(1.2) = 1
  assert source[0]['pixels'].shape == (16, 16, 3)
  # the default-size build lives next to it, not over it
  loaded = data_lib.load_split('category', 'train', str(data_dir))
  _check_loaded(loaded, order[:10], expected, category.IMAGE_SIZE)


def test_split_sizes_of_the_paper_datasets(tmp_path):
  sizes = {n: [len(category.split_indices(n, str(tmp_path))[s]) for s in category.SPLITS] for n in (2866, 1000, 40000)}
  assert sizes == {2866: [2293, 287, 286], 1000: [800, 100, 100], 40000: [32000, 4000, 4000]}
  again = category.split_indices(2866, str(tmp_path))
  np.testing.assert_array_equal(again['test'], np.random.default_rng(0).permutation(2866)[2580:])
  assert sorted(np.concatenate(list(again.values()))) == list(range(2866))


def test_splits_json_is_honoured(tmp_path):
  manual = tmp_path / 'pascal'
  expected = _pascal(manual)
  splits = {'train': [9, 0, 3, 4, 5], 'dev': [2, 1], 'test': [8, 7]}  # pair 6 left out
  (manual / 'splits.json').write_text(json.dumps(splits))
  builder = category.build('pascal', str(manual), str(tmp_path / 'tfds'), image_size=8)
  for split, indices in splits.items():
    source = builder.as_data_source(split)
    examples = [source[i] for i in range(len(source))]
    assert [e['image_id'] for e in examples] == indices
    assert [e['text'].decode() for e in examples] == [expected[i][0] for i in indices]
    assert [e['label'] for e in examples] == [expected[i][1] for i in indices]


@pytest.mark.parametrize(
  'splits,message',
  [
    ({'train': [0, 1], 'dev': [1], 'test': [2]}, r'index 1 is in both "train" and "dev"'),
    ({'train': [0, 0], 'dev': [1], 'test': [2]}, r'index 0 appears twice in "train"'),
    ({'train': [0, 10], 'dev': [1], 'test': [2]}, r'"train" holds index 10; expected pair indices in \[0, 10\)'),
    (
      {'train': [0], 'dev': [1]},
      r"keys \['dev', 'train'\]; expected an object with exactly the keys \['train', 'dev', 'test'\]",
    ),
    ({'train': [0], 'dev': [], 'test': [2]}, r'"dev" must be a non-empty list of integer'),
    ({'train': [0], 'dev': [True], 'test': [2]}, r'"dev" must be a non-empty list of integer'),
  ],
)
def test_bad_splits_json(splits, message, tmp_path):
  (tmp_path / 'splits.json').write_text(json.dumps(splits))
  with pytest.raises(ValueError, match=r'splits.json: ' + message):
    category.split_indices(N_PAIRS, str(tmp_path))


def _write_text(path, text):
  path.write_text(text)


@pytest.mark.parametrize(
  'name,edit,message',
  [
    (
      'wikipedia',
      lambda r: os.remove(r / 'images' / 'biology' / 'img04.jpg'),
      r'images/biology/img04.jpg: missing; listed in trainset_txt_img_cat.list line 5',
    ),
    (
      'wikipedia',
      lambda r: os.remove(r / 'texts' / 'doc08-1.xml'),
      r'texts/doc08-1.xml: missing; listed in testset_txt_img_cat.list line 2',
    ),
    (
      'wikipedia',
      lambda r: _write_text(r / 'testset_txt_img_cat.list', 'doc07-1\timg07\t4\n'),
      r'testset_txt_img_cat.list: line 1: category 4 out of range; expected 1..3',
    ),
    (
      'wikipedia',
      lambda r: _write_text(r / 'testset_txt_img_cat.list', 'doc07-1\timg07\n'),
      r"testset_txt_img_cat.list: line 1 is 'doc07-1\\timg07'; expected <text_id>",
    ),
    (
      'wikipedia',
      lambda r: _write_text(r / 'testset_txt_img_cat.list', 'doc07-1\timg07\t2\n'),
      r'wikipedia: 8 pairs found; wikipedia has 10',
    ),
    (
      'wikipedia',
      lambda r: _write_text(r / 'categories.list', 'art\nbiology\nsport\nmusic\n'),
      r'categories.list: 4 categories; wikipedia has 3',
    ),
    (
      'wikipedia',
      lambda r: _write_text(r / 'texts' / 'doc03-1.xml', '<document><title>x</title></document>'),
      r'doc03-1.xml: no <text> element or an empty one',
    ),
    (
      'wikipedia',
      lambda r: _write_text(r / 'texts' / 'doc05-1.xml', '<document><text lang="en"> </text>'),
      r'doc05-1.xml: no <text> element or an empty one',
    ),
    ('wikipedia', lambda r: os.remove(r / 'categories.list'), r'categories.list: missing'),
    (
      'pascal',
      lambda r: os.remove(r / 'sentence' / 'sport' / '2008_n.txt'),
      r'sentence/sport/2008_n.txt: missing; the sentences of dataset/sport/2008_n.jpg',
    ),
    (
      'pascal',
      lambda r: _write_text(r / 'sentence' / 'art' / '2008_b.txt', 'one\ntwo\n'),
      r'2008_b.txt: 2 non-empty lines; expected 5 sentences',
    ),
    (
      'pascal',
      lambda r: _write_text(r / 'dataset' / 'art' / '2008_c.jpg', 'not a jpeg'),
      r'dataset/art/2008_c.jpg: unreadable image',
    ),
    ('pascal', lambda r: os.makedirs(r / 'dataset' / 'music'), r'dataset: 4 categories; pascal has 3'),
    ('xmedianet', lambda r: os.remove(r / 'txt' / '3.txt'), r'txt/3.txt: missing; listed in pairs.tsv line 5'),
    ('xmedianet', lambda r: (r / 'txt' / '5.txt').write_bytes(b'caf\xe9\n'), r'txt/5.txt: not UTF-8 text'),
    ('xmedianet', lambda r: os.remove(r / 'img' / '6.jpg'), r'img/6.jpg: missing; listed in pairs.tsv line 8'),
    (
      'xmedianet',
      lambda r: _write_text(r / 'pairs.tsv', 'image\ttext\tlabel\nimg/0.jpg\tsome text\t4\n'),
      r'pairs.tsv: line 2: label 4 out of range; expected 0..3',
    ),
    (
      'xmedianet',
      lambda r: _write_text(r / 'pairs.tsv', 'image\ttext\tlabel\nimg/0.jpg\tsome text\n'),
      r"pairs.tsv: line 2 has 2 tab-separated field\(s\) \['img/0.jpg', 'some text'\]; expected",
    ),
    (
      'xmedianet',
      lambda r: _write_text(r / 'pairs.tsv', 'image\ttext\tlabel\nimg/0.jpg\tsome text\tart\n'),
      r'pairs.tsv: line 2 has 3 tab-separated field.*expected image path, text, integer label',
    ),
    (
      'xmedianet',
      lambda r: _write_text(r / 'pairs.tsv', 'image,text,label\n'),
      r"pairs.tsv: line 1 is 'image,text,label'; expected the header",
    ),
    (
      'xmedianet',
      lambda r: _write_text(r / 'pairs.tsv', 'image\ttext\tlabel\nimg/0.jpg\t \t1\n'),
      r'pairs.tsv: line 2: empty text',
    ),
    (
      'xmedianet',
      lambda r: _write_text(r / 'pairs.tsv', 'image\ttext\tlabel\nimg/0.jpg\tsome text\t1\n'),
      r'xmedianet: 1 pairs found; xmedianet has 10',
    ),
    (
      'category',
      lambda r: _write_text(r / 'pairs.tsv', 'image\ttext\tlabel\nimg/0.jpg\tsome text\t-1\n'),
      r'pairs.tsv: line 2: label -1 out of range; expected 0..',
    ),
    (
      'category',
      lambda r: _write_text(r / 'pairs.tsv', 'image\ttext\tlabel\n' + 'img/0.jpg\tx\t1\n' * 5),
      r'5 pairs give an empty dev split',
    ),
  ],
)
def test_integrity_errors_name_the_file(name, edit, message, tmp_path):
  root = tmp_path / name
  WRITERS[name](root)
  edit(root)
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    category.build(name, str(root), str(tmp_path / 'tfds'), image_size=8)


def test_missing_manual_dir_shows_the_layout(tmp_path, monkeypatch):
  monkeypatch.setenv('XMATCH_MANUAL_DIR', str(tmp_path / 'nowhere'))
  with pytest.raises(FileNotFoundError, match=r'nowhere/wikipedia: manual dir not found; .*categories.list'):
    data_lib.load_split('wikipedia', 'test', str(tmp_path / 'tfds'))
  with pytest.raises(ValueError, match=r"no config 'flickr'"):
    category.build('flickr', str(tmp_path), str(tmp_path / 'tfds'))


def test_check_split_accepts_one_text_per_image_only_when_told():
  images = {'pixels': np.zeros((3, 4, 4, 3), np.uint8), 'label': np.arange(3)}
  validation.check_split(images, ['a', 'b', 'c'], np.arange(3), 'src', captions_per_image=1)
  with pytest.raises(ValueError, match=r'3 captions for 3 images; expected 5 x 3 = 15'):
    validation.check_split(images, ['a', 'b', 'c'], np.arange(3), 'src')
  with pytest.raises(
    ValueError,
    match=r'"pixels" must be \[n_images, H, W, 3\] uint8; got shape \(3, 4, 4, 3\), '
    'dtype float32',
  ):
    validation.check_split(
      {'pixels': np.zeros((3, 4, 4, 3), np.float32)}, ['a'] * 3, np.arange(3), 'src', captions_per_image=1
    )
  with pytest.raises(ValueError, match=r'field "label" has 2 entries; expected one per image \(3\)'):
    validation.check_split({**images, 'label': np.arange(2)}, ['a'] * 3, np.arange(3), 'src', captions_per_image=1)
  with pytest.raises(ValueError, match=r'neither field "regions" nor "pixels"'):
    validation.check_split({'label': np.arange(3)}, ['a'] * 3, np.arange(3), 'src', captions_per_image=1)
