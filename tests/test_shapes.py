"""Tests of the built-in `shapes` dataset: builder, scenes, captions, regions and the reference baselines."""

import collections
import importlib.util
import itertools
import json
import math
import pathlib
import tempfile

import numpy as np
import pytest

from xmatch_jax.data import category
from xmatch_jax.data import precomp
from xmatch_jax.data import shapes
from xmatch_jax.data import shapes_scenes as ss

_TOOL = pathlib.Path(__file__).resolve().parents[1] / 'tools' / 'shapes_baselines.py'
_spec = importlib.util.spec_from_file_location('shapes_baselines', _TOOL)
baselines = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(baselines)

TINY_SIZES = {'train': 300, 'dev': 100, 'test': 100}


def _text(value) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


@pytest.fixture(scope='module')
def builder(tmp_path_factory):
  return shapes.shapes_builder(str(tmp_path_factory.mktemp('tfds')), config='tiny')


@pytest.fixture(scope='module')
def test_split(builder):
  source = builder.as_data_source('test')
  return [source[i] for i in range(len(source))]


# --------------------------------------------------------------------------- independent references
def _relation(a, b):
  """Dominant-axis relation "a REL b", written out again from the definition in the module docstring."""
  dx, dy = b['x'] - a['x'], b['y'] - a['y']
  if abs(dx) >= abs(dy):
    return {True: 'left', False: 'right'}[dx > 0]
  return {True: 'above', False: 'below'}[dy > 0]


def _fits(mention, obj):
  return all(mention[k] in (None, obj[k]) for k in ('shape', 'colour', 'size'))


def _true_of(meaning, objects):
  """Brute force over all assignments of the "a ..." mentions to distinct objects."""
  for m in meaning['mentions']:
    if m['count'] is not None and sum(_fits(m, o) for o in objects) != m['count']:
      return False
  single = [i for i, m in enumerate(meaning['mentions']) if m['count'] is None]
  for chosen in itertools.permutations(objects, len(single)):
    pick = dict(zip(single, chosen))
    if all(_fits(meaning['mentions'][i], pick[i]) for i in single) and all(
      _relation(pick[i], pick[j]) == rel for i, rel, j in meaning['relations']
    ):
      return True
  return False


_WORD_KIND = {
  **{w: ('colour', c) for c, ws in ss.COLOUR_WORDS.items() for w in ws},
  **{w: ('size', s) for s, ws in ss.SIZE_WORDS.items() for w in ws},
  **{f: ('shape', s) for s, forms in ss.SHAPE_NOUNS.items() for pair in forms for f in pair},
}


def _words_exist(caption, objects):
  """Every colour, size and shape word of the caption names something in the scene (parser-free check)."""
  present = {(k, o[k]) for o in objects for k in ('shape', 'colour', 'size')}
  return all(_WORD_KIND[w] in present for w in caption.split() if w in _WORD_KIND)


# --------------------------------------------------------------------------- builder
def test_split_sizes(builder):
  assert {s: builder.info.splits[s].num_examples for s in shapes.SPLITS} == TINY_SIZES
  for split, size in TINY_SIZES.items():
    assert len(builder.as_data_source(split)) == size


def test_feature_shapes_and_dtypes(builder):
  for split in shapes.SPLITS:
    e = builder.as_data_source(split)[7]
    assert e['regions'].shape == (shapes.NUM_REGIONS, shapes.REGION_DIM) and e['regions'].dtype == np.float32
    assert e['boxes'].shape == (shapes.NUM_REGIONS, 4) and e['boxes'].dtype == np.float32
    assert e['pixels'].shape == (shapes.CANVAS, shapes.CANVAS, 3) and e['pixels'].dtype == np.uint8
    assert len(e['tags']) == shapes.NUM_REGIONS and all(isinstance(t, bytes) for t in e['tags'])
    assert len(e['captions']) == shapes.CAPTIONS_PER_IMAGE
    assert np.asarray(e['image_id']).dtype == np.int64 and int(e['image_id']) == 7
    assert np.asarray(e['label']).dtype == np.int64 and 0 <= int(e['label']) < shapes.NUM_LABELS
    assert json.loads(_text(e['scene']))['objects']
  assert builder.info.features['label'].num_classes == shapes.NUM_LABELS == 30


def test_data_source_order_is_image_id(builder):
  for split, size in TINY_SIZES.items():
    source = builder.as_data_source(split)
    assert [int(source[i]['image_id']) for i in range(size)] == list(range(size))


def test_dataset_equals_pure_function_of_split_and_index(builder):
  for split in shapes.SPLITS:
    source = builder.as_data_source(split)
    for i in (0, 13, 99):
      expected = ss.example_from_scene(ss.scene_for_index(split, i), ss.example_seed(split, i), image_id=i)
      got = source[i]
      for key in ('regions', 'boxes', 'pixels'):
        np.testing.assert_array_equal(got[key], expected[key])
      assert [_text(t) for t in got['tags']] == expected['tags']
      assert [_text(c) for c in got['captions']] == expected['captions']
      assert _text(got['scene']) == expected['scene'] and int(got['label']) == expected['label']
  # Splits use their own seeds.
  assert ss.scene_for_index('train', 0) != ss.scene_for_index('test', 0)


def test_second_build_is_identical(builder, test_split, tmp_path):
  again = shapes.shapes_builder(str(tmp_path), config='tiny').as_data_source('test')
  for i in range(0, 100, 9):
    np.testing.assert_array_equal(again[i]['regions'], test_split[i]['regions'])
    assert again[i]['captions'] == test_split[i]['captions'] and again[i]['tags'] == test_split[i]['tags']


def test_builder_rejects_unknown_config(tmp_path):
  with pytest.raises(ValueError, match='no config'):
    shapes.shapes_builder(str(tmp_path), config='huge')


@pytest.mark.parametrize(
  'builder_class, config',
  [(shapes.XmatchShapes, 'tiny'), (precomp.XmatchPrecomp, 'f30k'), (category.XmatchCategory, 'pascal')],
)
def test_a_builder_of_a_dataset_not_built_yet_leaves_no_temporary_directory(
  builder_class, config, tmp_path, monkeypatch
):
  # TFDS's DatasetInfo.initialize_from_bucket made an empty /tmp/tmp*tfds directory per such builder and kept it.
  temporary = tmp_path / 'tmp'
  temporary.mkdir()
  monkeypatch.setattr(tempfile, 'tempdir', str(temporary))
  builder = builder_class(config=config, data_dir=str(tmp_path / 'tfds'))
  assert builder.info.features is not None and list(temporary.iterdir()) == []


# --------------------------------------------------------------------------- scenes and examples
def test_example_from_scene_is_deterministic_and_seeded():
  scene = ss.sample_scene(np.random.default_rng(5))
  a, b = ss.example_from_scene(scene, seed=11), ss.example_from_scene(scene, seed=11)
  for key in a:
    np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))
  c = ss.example_from_scene(scene, seed=12)
  assert not np.array_equal(a['regions'], c['regions'])
  assert json.loads(a['scene']) == json.loads(c['scene']) == scene


def test_sampled_scenes_are_valid():
  rng = np.random.default_rng(0)
  counts = collections.Counter()
  for _ in range(300):
    objects = ss.sample_scene(rng)['objects']
    counts[len(objects)] += 1
    for a, b in itertools.combinations(objects, 2):  # boxes apart even if both were large
      assert max(abs(a['x'] - b['x']), abs(a['y'] - b['y'])) > 2 * ss.HALF_SIZE['large']
    for o in objects:
      assert ss.HALF_SIZE['large'] <= min(o['x'], o['y']) and max(o['x'], o['y']) <= 63 - ss.HALF_SIZE['large']
  assert set(counts) == {2, 3, 4}


@pytest.mark.parametrize(
  'bad, field',
  [
    (
      {
        'objects': [
          {'shape': 'star', 'colour': 'red', 'size': 'small', 'x': 20, 'y': 20},
          {'shape': 'circle', 'colour': 'red', 'size': 'small', 'x': 40, 'y': 40},
        ]
      },
      '"shape"',
    ),
    (
      {
        'objects': [
          {'shape': 'circle', 'colour': 'red', 'size': 'large', 'x': 3, 'y': 20},
          {'shape': 'circle', 'colour': 'red', 'size': 'small', 'x': 40, 'y': 40},
        ]
      },
      '"x"',
    ),
    (
      {
        'objects': [
          {'shape': 'circle', 'colour': 'red', 'size': 'large', 'x': 20, 'y': 20},
          {'shape': 'circle', 'colour': 'blue', 'size': 'small', 'x': 26, 'y': 22},
        ]
      },
      'overlap',
    ),
    ({'objects': [{'shape': 'circle', 'colour': 'red', 'size': 'large', 'x': 20, 'y': 20}]}, '2 to 4'),
    ({'things': []}, '"objects"'),
  ],
)
def test_bad_scene_raises(bad, field):
  with pytest.raises(ValueError, match=field):
    ss.example_from_scene(bad, seed=0)


def test_pixels_show_objects_in_their_colour():
  for i in range(40):
    scene = ss.scene_for_index('dev', i)
    pixels = ss.example_from_scene(scene, seed=i)['pixels'].astype(float)
    for o in scene['objects']:  # every shape covers its centre pixel
      assert np.abs(pixels[o['y'], o['x']] - ss.RGB[o['colour']]).max() < 40
    far = np.ones((64, 64), bool)
    for o in scene['objects']:
      far[max(o['y'] - 9, 0) : o['y'] + 10, max(o['x'] - 9, 0) : o['x'] + 10] = False
    assert np.abs(pixels[far] - ss.BACKGROUND_RGB).mean() < 8


def test_label_is_largest_object_colour_and_shape(test_split):
  for e in test_split:
    objects = json.loads(_text(e['scene']))['objects']
    large = [o for o in objects if o['size'] == 'large'] or objects
    leftmost = sorted(large, key=lambda o: (o['x'], o['y']))[0]
    assert ss.LABEL_NAMES[int(e['label'])] == f'{leftmost["colour"]} {leftmost["shape"]}'


def test_regions_boxes_and_tags(test_split):
  wrong, total = 0, 0
  for e in test_split:
    objects = json.loads(_text(e['scene']))['objects']
    n = len(objects)
    tags = [_text(t) for t in e['tags']]
    assert (e['regions'] >= 0).all() and (e['regions'] > 0).mean() > 0.2
    boxes = e['boxes']
    assert (boxes >= 0).all() and (boxes <= 1).all() and (boxes[:, 2:] > boxes[:, :2]).all()
    assert tags.count('background') == shapes.NUM_REGIONS - n - n * (n - 1) // 2
    assert [0, 0, 1, 1] in boxes.tolist()
    for o in objects:  # one region has exactly the object's box; its tag names the object (or a noisy one)
      h = ss.HALF_SIZE[o['size']]
      box = np.array([o['x'] - h, o['y'] - h, o['x'] + h + 1, o['y'] + h + 1]) / 64
      hits = np.nonzero(np.abs(boxes - box).max(1) < 1e-6)[0]
      assert len(hits) >= 1
      wrong += all(tags[k] != f'{o["colour"]} {o["shape"]}' for k in hits)
      total += 1
  assert 0.02 < wrong / total < 0.3  # ~TAG_NOISE of the object tags are wrong


def test_region_features_encode_attributes_not_just_noise():
  # Same scene, different seeds: features of a region type agree far better than across objects.
  scene = {
    'objects': [
      {'shape': 'circle', 'colour': 'red', 'size': 'small', 'x': 15, 'y': 15},
      {'shape': 'square', 'colour': 'blue', 'size': 'small', 'x': 45, 'y': 45},
    ]
  }

  def object_region(example, obj):
    box = np.array([obj['x'] - 5, obj['y'] - 5, obj['x'] + 6, obj['y'] + 6]) / 64
    return example['regions'][np.argmin(np.abs(example['boxes'] - box).max(1))]

  first, second = (ss.example_from_scene(scene, seed=s) for s in range(2))
  circle, square = scene['objects']
  same = np.linalg.norm(object_region(first, circle) - object_region(second, circle))
  other = np.linalg.norm(object_region(first, circle) - object_region(second, square))
  assert same < 0.5 * other


# --------------------------------------------------------------------------- captions
def test_captions_are_true_and_parse_back():
  for i in range(160):
    objects = ss.scene_for_index('train', i)['objects']
    captions = ss.generate_captions(objects, np.random.default_rng(i))
    assert len(captions) == ss.CAPTIONS_PER_IMAGE == len({t for t, _ in captions})
    for text, meaning in captions:
      assert 4 <= len(text.split()) <= 20 and text == text.lower()
      assert all(w.isalpha() for w in text.split())
      parsed = ss.parse_caption(text)
      assert parsed['mentions'] == meaning['mentions']
      assert [tuple(r) for r in parsed['relations']] == [tuple(r) for r in meaning['relations']]
      assert _true_of(parsed, objects), text
      assert _words_exist(text, objects), text


def test_relation_words_agree_with_geometry_and_flipping_them_fails(test_split):
  flip = {
    'left': 'right',
    'right': 'left',
    'above': 'below',
    'below': 'above',
    'over': 'under',
    'under': 'over',
    'beneath': 'over',
    'higher': 'lower',
    'lower': 'higher',
  }
  n_relational = 0
  for e in test_split:
    objects = json.loads(_text(e['scene']))['objects']
    for caption in map(_text, e['captions']):
      meaning = ss.parse_caption(caption)
      assert _true_of(meaning, objects) and _words_exist(caption, objects), caption
      if len(meaning['relations']) == 1 and len(objects) == 2:  # a single pair: flipping must make it false
        flipped = ' '.join(flip.get(w, w) for w in caption.split())
        assert not _true_of(ss.parse_caption(flipped), objects), flipped
        n_relational += 1
  assert n_relational > 20


def test_caption_holds_matches_reference():
  rng = np.random.default_rng(3)
  scenes_ = [ss.sample_scene(rng)['objects'] for _ in range(30)]
  for objects in scenes_[:10]:
    for text, _ in ss.generate_captions(objects, rng):
      meaning = ss.parse_caption(text)
      for other in scenes_:
        assert ss.caption_holds(meaning, other) == _true_of(meaning, other)


def test_caption_mix_has_relations_counts_and_synonyms(test_split):
  captions = [_text(c) for e in test_split for c in e['captions']]
  meanings = [ss.parse_caption(c) for c in captions]
  assert sum(bool(m['relations']) for m in meanings) >= 0.55 * len(captions)
  assert sum(any(x['count'] for x in m['mentions']) for m in meanings) >= 0.1 * len(captions)
  words = set(' '.join(captions).split())
  assert {'box', 'block', 'square', 'big', 'large', 'little', 'small'} <= words
  lengths = [len(c.split()) for c in captions]
  assert min(lengths) <= 6 and max(lengths) >= 16


# --------------------------------------------------------------------------- look-alikes and baselines
def test_look_alike_groups():
  bag = lambda objects: sorted((o['shape'], o['colour'], o['size']) for o in objects)
  words = lambda objects: (sorted(o['shape'] for o in objects), sorted(o['colour'] for o in objects))
  for g in range(12):
    group = [ss.scene_for_index('test', 8 * g + m)['objects'] for m in range(8)]
    for binding in (group[:4], group[4:]):
      assert all(bag(s) == bag(binding[0]) for s in binding)
      for a, b in itertools.combinations(binding, 2):  # every pairwise relation differs between layouts
        for i, j in itertools.combinations(range(len(a)), 2):
          assert _relation(a[i], a[j]) != _relation(b[i], b[j])
    assert bag(group[0]) != bag(group[4]) and words(group[0]) == words(group[4])


def test_look_alikes_in_built_test_split(test_split):
  bags = collections.Counter(
    tuple(sorted((o['shape'], o['colour'], o['size']) for o in json.loads(_text(e['scene']))['objects']))
    for e in test_split
  )
  assert sum(c for c in bags.values() if c >= 4) >= 80


def test_chance_formula():
  for n_img in (100, 1000):
    chance = baselines.chance_recalls(n_img)
    n_cap = 5 * n_img
    for k in (1, 5, 10):
      assert chance[f't2i_r{k}'] == pytest.approx(100 * k / n_img)
      miss = math.prod((n_cap - 5 - t) / (n_cap - t) for t in range(k))
      assert chance[f'i2t_r{k}'] == pytest.approx(100 * (1 - miss))
    flat = baselines.expected_recalls(np.zeros((n_img, n_cap)))
    for key, value in chance.items():
      assert flat[key] == pytest.approx(value)
  assert baselines.chance_recalls(1000)['i2t_r1'] == pytest.approx(0.1)  # 5 of 5000 captions


def test_expected_recalls_match_random_tie_breaking():
  rng = np.random.default_rng(0)
  scores = rng.integers(0, 3, size=(6, 30)).astype(float)
  trials = []
  for _ in range(4000):  # rank with random tie-breaking, as in SCAN's evaluation.py
    jitter = scores + 1e-3 * rng.random(scores.shape)
    i2t = [np.argsort(-jitter[i]).tolist() for i in range(6)]
    i2t_rank = [min(r.index(c) for c in range(5 * i, 5 * i + 5)) for i, r in enumerate(i2t)]
    t2i_rank = [np.argsort(-jitter[:, c]).tolist().index(c // 5) for c in range(30)]
    trials.append([np.mean(np.array(i2t_rank) < k) for k in (1, 5)] + [np.mean(np.array(t2i_rank) < k) for k in (1, 5)])
  simulated = 100 * np.mean(trials, axis=0)
  exact = baselines.expected_recalls(scores, ks=(1, 5))
  np.testing.assert_allclose([exact['i2t_r1'], exact['i2t_r5'], exact['t2i_r1'], exact['t2i_r5']], simulated, atol=2.5)


def test_bag_oracle(test_split):
  objects = [json.loads(_text(e['scene']))['objects'] for e in test_split]
  captions = [_text(c) for e in test_split for c in e['captions']]
  meanings = [ss.parse_caption(c) for c in captions]
  bag = baselines.bag_oracle_scores(objects, meanings)
  for i, c in itertools.product(range(0, 100, 7), range(0, 500, 11)):  # Hall's condition == brute force
    assert bag[i, c] == ss.caption_holds(meanings[c], objects[i], relations=False)
  assert all(bag[c // 5, c] == 1 for c in range(len(captions)))
  table = baselines.baseline_table(objects, captions)
  assert table['bag-of-objects oracle']['rsum'] < 500
  assert table['scene oracle (relations)']['rsum'] > table['bag-of-objects oracle']['rsum'] + 50
  assert table['chance']['rsum'] < table['bag-of-objects oracle']['rsum']
