"""Large precomp splits read on demand: LazyRows indexing and read checks, XMATCH_LAZY, the batcher giving the same
batches over lazy and in-memory regions (each row read once per batch), image_inputs keeping fields lazy, check_split
reading no rows, and the resident memory of a ~200 MB split loaded lazily staying bounded."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from xmatch_jax import data as data_lib
from xmatch_jax import inference
from xmatch_jax.data import batching
from xmatch_jax.data import lazy
from xmatch_jax.data import validation
from xmatch_jax.models import matcher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, 'tests', 'fixtures')
SIZES = {'train': 3, 'dev': 2, 'test': 8}


def write_precomp(directory, sizes, k=36, d=6, seed=0):
  """SCAN precomp files for the `custom` config; returns {split: regions [n, k, d]}."""
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(seed)
  arrays = {}
  for split, n in sizes.items():
    ims = np.lib.format.open_memmap(os.path.join(directory, f'{split}_ims.npy'), 'w+', np.float32, (n, k, d))
    for start in range(0, n, 64):
      ims[start : start + 64] = rng.standard_normal((min(64, n - start), k, d), np.float32)
    ims.flush()
    arrays[split] = np.asarray(ims) if n * k * d < 1e6 else None
    del ims
    with open(os.path.join(directory, f'{split}_caps.txt'), 'w') as f:
      f.write(''.join(f'caption {c} of image {c // 5} {"long " * (c % 7)}\n' for c in range(5 * n)))
  return arrays


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  """A built `precomp` dataset with PFAN positions on its test split: (data_dir, manual_base, arrays)."""
  root = tmp_path_factory.mktemp('lazy')
  manual = root / 'manual' / 'custom_precomp'
  arrays = write_precomp(manual, SIZES)
  shutil.copy(os.path.join(FIXTURES, 'f30k_sample_train_boxes_8.npy'), manual / 'test_boxes.npy')
  return str(root / 'tfds'), str(root / 'manual'), arrays


def load(built, monkeypatch, split, mode):
  data_dir, manual, _ = built
  monkeypatch.setenv('XMATCH_MANUAL_DIR', manual)
  monkeypatch.setenv('XMATCH_LAZY', mode)
  return data_lib.load_split('precomp', split, data_dir)


def test_env_var_and_threshold_choose_lazy_or_memory(built, monkeypatch):
  lazy_split = load(built, monkeypatch, 'test', '1')
  memory = load(built, monkeypatch, 'test', '0')
  for key in ('regions', 'pfan_blocks', 'pfan_weights'):
    value = lazy_split.images[key]
    assert isinstance(value, lazy.LazyRows) and isinstance(memory.images[key], np.ndarray)
    assert (value.shape, value.dtype, value.ndim, len(value)) == (
      memory.images[key].shape,
      memory.images[key].dtype,
      memory.images[key].ndim,
      8,
    )
    np.testing.assert_array_equal(value[:], memory.images[key])
  np.testing.assert_array_equal(memory.images['regions'], built[2]['test'])
  assert isinstance(lazy_split.images['image_id'], np.ndarray)
  np.testing.assert_array_equal(lazy_split.images['image_id'], memory.images['image_id'])
  assert lazy_split.captions == memory.captions and len(lazy_split.captions) == 40
  np.testing.assert_array_equal(lazy_split.caption_to_image, memory.caption_to_image)
  assert 'pfan_blocks' not in load(built, monkeypatch, 'dev', '1').images

  assert isinstance(load(built, monkeypatch, 'test', '').images['regions'], np.ndarray)  # 8 x 36 x 6 floats
  monkeypatch.setattr(data_lib, 'LAZY_THRESHOLD_BYTES', 1000)
  assert isinstance(load(built, monkeypatch, 'test', '').images['regions'], lazy.LazyRows)
  with pytest.raises(ValueError, match=r"XMATCH_LAZY='yes' .*expected 1 .* 0 .* or unset"):
    load(built, monkeypatch, 'test', 'yes')


def test_lazy_rows_indexing(built, monkeypatch):
  regions = load(built, monkeypatch, 'test', '1').images['regions']
  expected = built[2]['test']
  keys = [
    3,
    -1,
    np.int64(5),
    slice(2, 7, 2),
    slice(None, None, -3),
    slice(5, 2),
    [],
    [4, 0],
    np.array([5, 1, 5, 0, 7]),
    np.array([[1, 2], [7, 0]]),
    np.arange(8) % 3 == 0,
  ]
  for key in keys:
    got = regions[key]
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    assert got.shape == expected[key].shape
    np.testing.assert_array_equal(got, expected[key])
  for key in (8, -9, np.array([0, 8])):
    with pytest.raises(
      IndexError,
      match=r'xmatch_precomp/custom split test: row (8|-9) of field "regions" is out '
      r'of range; the split has 8 rows',
    ):
      regions[key]
  with pytest.raises(IndexError, match='indexed by row only'):
    regions[1.5]
  with pytest.raises(IndexError, match='indexed by row only; got a tuple'):
    regions[0, 1]
  with pytest.raises(IndexError, match=r'boolean index .* expected \(8,\)'):
    regions[np.ones(3, bool)]
  with pytest.warns(UserWarning, match=r'field .regions.*np.asarray reads all 8 rows'):
    np.testing.assert_array_equal(np.asarray(regions, np.float64), expected)
  monkeypatch.setattr(lazy, 'MATERIALIZE_LIMIT_BYTES', 1000)
  with pytest.raises(MemoryError, match=r"field 'regions'.*np.asarray would read all 8 rows .* above the limit"):
    np.asarray(regions)


class CountingSource:
  """A list of example dicts that counts the rows read."""

  def __init__(self, examples):
    self.examples, self.reads = examples, []

  def __len__(self):
    return len(self.examples)

  def __getitem__(self, i):
    self.reads.append(i)
    return self.examples[i]


def test_values_are_checked_on_read_naming_the_row():
  rows = [np.zeros((2, 3), np.float32) for _ in range(4)]
  rows[2] = rows[2].copy()
  rows[2][1, 1] = np.inf
  rows[3] = np.zeros((2, 4), np.float32)
  source = CountingSource([{'regions': r, 'ints': np.zeros(2, np.int64)} for r in rows])
  reader = lazy.RowReader(source, 'dataset d split s')
  regions = lazy.LazyRows(reader, 'regions', (2, 3), np.float32)
  np.testing.assert_array_equal(regions[:2], np.zeros((2, 2, 3)))
  with pytest.raises(ValueError, match='dataset d split s: field "regions" row 2: holds NaN or inf'):
    regions[[0, 2]]
  with pytest.raises(ValueError, match=r'field "regions" row 3: shape \(2, 4\); expected \(2, 3\)'):
    regions[-1]
  with pytest.raises(ValueError, match='field "ints" row 0: dtype int64; expected int32'):
    lazy.LazyRows(reader, 'ints', (2,), np.int32)[0]
  with pytest.raises(KeyError, match='field "boxes" row 1: missing'):
    lazy.LazyRows(reader, 'boxes', (2,), np.float32)[1]


def test_check_split_reads_no_rows_of_a_lazy_field():
  source = CountingSource([{'regions': np.full((2, 3), np.nan, np.float32)} for _ in range(4)])
  regions = lazy.LazyRows(lazy.RowReader(source, 'dataset d split s'), 'regions', (2, 3), np.float32)
  validation.check_split({'regions': regions}, ['a caption'] * 20, np.repeat(np.arange(4), 5), source='d/s')
  assert source.reads == []  # the NaNs are not seen: the builder refuses them, and every read checks them
  with pytest.raises(ValueError, match='d/s: field "regions" has dtype float64; expected float32'):
    validation.check_split(
      {'regions': lazy.LazyRows(regions.reader, 'regions', (2, 3), np.float64)},
      ['a caption'] * 20,
      np.repeat(np.arange(4), 5),
      source='d/s',
    )
  with pytest.raises(ValueError, match='d/s: field "regions" has feature size 3; expected 2048'):
    validation.check_split(
      {'regions': regions}, ['a caption'] * 20, np.repeat(np.arange(4), 5), source='d/s', region_dim=2048
    )


def test_train_batcher_gives_the_same_batches_reading_each_row_once(built, monkeypatch):
  lazy_split = load(built, monkeypatch, 'test', '1')
  memory = load(built, monkeypatch, 'test', '0')
  keys = ('regions', 'pfan_blocks', 'pfan_weights')
  captions = [np.array([len(w) + 4 for w in c.split()], np.int32) for c in memory.captions]

  def batcher(split):
    return batching.TrainBatcher(
      split.images, captions, split.caption_to_image, batch_size=7, seed=1, buckets=(4, 8, 16), image_keys=keys
    )

  reader = lazy_split.images['regions'].reader
  reader.source = CountingSource(reader.source)
  lazy_batcher, memory_batcher = batcher(lazy_split), batcher(memory)
  assert all(lazy_batcher._images[k] is lazy_split.images[k] for k in keys)  # pylint: disable=protected-access
  for step in range(12):  # 5 steps per epoch: crosses two epoch boundaries
    got, want = lazy_batcher.batch(step), memory_batcher.batch(step)
    assert sorted(got['images']) == sorted(keys)
    for k in keys:
      assert got['images'][k].dtype == want['images'][k].dtype
      np.testing.assert_array_equal(got['images'][k], want['images'][k])
    for k in ('tokens', 'mask'):
      np.testing.assert_array_equal(got['text'][k], want['text'][k])
    np.testing.assert_array_equal(got['image_ids'], want['image_ids'])
    # 3 fields, one sorted read of each distinct image (the reader keeps the rows for the next field).
    assert reader.source.reads == sorted(set(want['image_ids'].tolist())), step
    reader.source.reads = []


def test_image_inputs_keeps_lazy_fields_and_chunks_read_them(built, monkeypatch):
  lazy_split = load(built, monkeypatch, 'test', '1')
  memory = load(built, monkeypatch, 'test', '0')

  class Model(matcher.Matcher):
    image_keys = ('regions', 'pfan_blocks')

  inputs = Model().image_inputs(lazy_split.images)
  assert all(inputs[k] is lazy_split.images[k] for k in Model.image_keys)
  assert matcher.Matcher().image_inputs(lazy_split.images)['regions'] is lazy_split.images['regions']
  got = inference.map_chunks(lambda x: x, inputs, 3)
  for k in Model.image_keys:
    np.testing.assert_array_equal(got[k], memory.images[k])
  assert isinstance(matcher.Matcher().image_inputs(memory.images)['regions'], np.ndarray)


_MEMORY_SCRIPT = r"""
import json, os, resource, sys
import numpy as np
from xmatch_jax import data as data_lib, inference
from xmatch_jax.data import batching
from xmatch_jax.models import matcher


def reset_peak():
  try:   # Linux: resets VmHWM, the peak resident set, to the current one
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
  except OSError:
    pass


def peak_mb():
  try:
    with open('/proc/self/status') as f:
      return next(int(l.split()[1]) for l in f if l.startswith('VmHWM:')) / 1024
  except OSError:   # no /proc: the peak of the whole process (can only hide growth, never invent it)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


encode = lambda x: x['regions'].sum(axis=(1, 2))   # stands in for encode_image: one chunk in memory at a time
warm = data_lib.load_split('precomp', 'dev', sys.argv[1])   # imports, TFDS reader, jax: before the baseline
inference.map_chunks(encode, matcher.Matcher().image_inputs(warm.images), 32)
reset_peak()
base = peak_mb()
split = data_lib.load_split('precomp', 'train', sys.argv[1])
loaded = peak_mb()
inputs = matcher.Matcher().image_inputs(split.images)
batcher = batching.TrainBatcher(inputs, [np.ones(3, np.int32)] * len(split.captions), split.caption_to_image,
                                batch_size=32, seed=0, buckets=(4,))
for step in range(10):
  batcher.batch(step)
sums = np.asarray(inference.map_chunks(encode, inputs, 32))
result = {'type': type(split.images['regions']).__name__, 'nbytes': split.images['regions'].nbytes,
          'load_mb': loaded - base, 'total_mb': peak_mb() - base, 'rows': len(sums)}
del split, inputs, batcher
os.environ['XMATCH_LAZY'] = '0'   # the same split in memory, to show what the measurement sees
reset_peak()
base = peak_mb()
data_lib.load_split('precomp', 'train', sys.argv[1])
print(json.dumps({**result, 'in_memory_load_mb': peak_mb() - base}))
"""


@pytest.mark.slow
def test_lazy_split_of_200_mb_adds_little_resident_memory(tmp_path):
  n, k, d = 700, 36, 2048  # 206 MB of float32 regions
  write_precomp(tmp_path / 'manual' / 'custom_precomp', {'train': n, 'dev': 2, 'test': 1}, k=k, d=d)
  env = {**os.environ, 'XMATCH_MANUAL_DIR': str(tmp_path / 'manual'), 'XMATCH_LAZY': '1', 'JAX_PLATFORMS': 'cpu'}
  # Built in a process of its own: building holds the features in memory (a one-off), and ru_maxrss is a peak.
  build = (
    'import sys; from xmatch_jax.data import precomp; '
    'precomp.build("custom", sys.argv[1] + "/custom_precomp", sys.argv[2])'
  )
  for script, args in (
    (build, [str(tmp_path / 'manual'), str(tmp_path / 'tfds')]),
    (_MEMORY_SCRIPT, [str(tmp_path / 'tfds')]),
  ):
    proc = subprocess.run(
      [sys.executable, '-c', script, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  print(result)
  assert result['type'] == 'LazyRows' and result['rows'] == n and result['nbytes'] == n * k * d * 4
  # In memory the split alone would be 206 MB; lazily: captions, one batch / chunk of 32 rows (9 MB) and its copy.
  assert result['load_mb'] < 25 and result['total_mb'] < 50, result
  assert result['in_memory_load_mb'] > 180, result


def test_glfn_inputs_keep_lazy_region_and_position_fields():
  from xmatch_jax.models import glfn  # pylint: disable=g-import-not-at-top

  source = CountingSource(
    [
      {
        'regions': np.ones((2, 3), np.float32),
        'pfan_blocks': np.zeros((2, 15), np.int32),
        'pfan_weights': np.full((2, 15), 1 / 15, np.float32),
      }
      for _ in range(4)
    ]
  )
  reader = lazy.RowReader(source, 'dataset d split s')
  images = {
    'regions': lazy.LazyRows(reader, 'regions', (2, 3), np.float32),
    'pfan_blocks': lazy.LazyRows(reader, 'pfan_blocks', (2, 15), np.int32),
    'pfan_weights': lazy.LazyRows(reader, 'pfan_weights', (2, 15), np.float32),
  }
  out = glfn.prepare_images(images, tokenizer=None, use_tags=False)
  assert all(out[k] is images[k] for k in images) and source.reads == []
