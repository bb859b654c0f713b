"""Damaged builds: a truncated, bit-flipped, missing or foreign array_record shard, or a version directory of another
build, is a one-line `array_record.CorruptDatasetError` naming the file and the directory to delete to rebuild it,
when the split is loaded and when a lazy split reads the shard in the middle of training. Real files: a copy of the
session's `shapes_tiny` build, and a small `precomp` build from a manual dir, corrupted on disk."""

import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from xmatch_jax import data as data_lib
from xmatch_jax import errors
from xmatch_jax.data import array_record
from xmatch_jax.data import lazy
from xmatch_jax.data import precomp
from xmatch_jax.data import shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARD = 'xmatch_shapes-{}.array_record-00000-of-00001'


@pytest.fixture
def shapes_copy(data_dir, tmp_path):
  """A copy of the session's shapes_tiny build: (data dir, version dir)."""
  built = shapes.shapes_builder(data_dir, config='tiny').data_dir
  copy = tmp_path / 'tfds'
  shutil.copytree(built, copy / 'xmatch_shapes' / 'tiny' / '1.0.0')
  return str(copy), str(copy / 'xmatch_shapes' / 'tiny' / '1.0.0')


def _flip(path, offset, count=64):
  with open(path, 'r+b') as f:
    f.seek(offset)
    data = f.read(count)
    assert any(data), f'{path}: bytes {offset}..{offset + count} are padding; flip record bytes'
    f.seek(offset)
    f.write(bytes(b ^ 0xFF for b in data))


def _load_error(data_dir, split='test', dataset='shapes_tiny') -> str:
  with pytest.raises(array_record.CorruptDatasetError) as info:
    data_lib.load_split(dataset, split, data_dir)
  message = str(info.value)
  assert '\n' not in message
  return message


@pytest.mark.parametrize('keep', [0.5, 0.0, 'all but 1 byte'])
def test_truncated_shard_names_the_file_and_the_directory_to_delete(shapes_copy, keep):
  data_dir, version_dir = shapes_copy
  shard = os.path.join(version_dir, SHARD.format('test'))
  size = os.path.getsize(shard)
  os.truncate(shard, size - 1 if keep == 'all but 1 byte' else int(size * keep))
  message = _load_error(data_dir)
  assert message.startswith(f'{shard}: truncated or corrupt shard, not readable as array_record (')
  assert message.endswith(f'; delete {version_dir} and run again to rebuild it.')
  data_lib.load_split('shapes_tiny', 'dev', data_dir)  # the other splits' shards are intact


RIEGELI_BLOCK = 1 << 16


@pytest.mark.parametrize('where', ['block header', 'inside a block'])
def test_flipped_bytes_in_a_record_are_a_read_error_naming_the_shard_and_record(shapes_copy, where):
  """Riegeli hashes every block header, chunk header and chunk's data, so flipped record bytes are a read error naming
  the record (one in the middle of the shard: the records before it read), never changed values. Both places are
  flipped on purpose: which hash catches a flip depends on where the 64 KiB block boundaries fall in the shard (a CI
  build's shard was 64 KiB shorter than this machine's, and a third of it fell on a block header)."""
  data_dir, version_dir = shapes_copy
  shard = os.path.join(version_dir, SHARD.format('test'))
  block_start = os.path.getsize(shard) // 3 // RIEGELI_BLOCK * RIEGELI_BLOCK
  _flip(shard, block_start if where == 'block header' else block_start + RIEGELI_BLOCK // 3)
  message = _load_error(data_dir)
  match = re.match(
    rf'{re.escape(shard)}: record (\d+) \(row \1 of xmatch_shapes/tiny/1.0.0 split test\) cannot be read: the shard '
    r'is truncated or corrupt \(RuntimeError: Corrupted Riegeli/records file: '
    + ('block header' if where == 'block header' else '(chunk header|chunk data)')
    + ' hash mismatch ',
    message,
  )
  assert match and 10 < int(match[1]) < 90, message
  assert message.endswith(f'; delete {version_dir} and run again to rebuild it.')
  source = shapes.XmatchShapes(config='tiny', data_dir=data_dir).open_split('test')
  assert source[int(match[1]) - 1]['image_id'] == int(match[1]) - 1


def test_missing_shard_or_a_shard_of_another_split(shapes_copy):
  data_dir, version_dir = shapes_copy
  os.remove(os.path.join(version_dir, SHARD.format('dev')))
  assert _load_error(data_dir, 'dev') == (
    f'{version_dir}/{SHARD.format("dev")}: shard missing from the build of xmatch_shapes/tiny/1.0.0 split dev '
    f'(dataset_info.json lists 1 shard(s) of 100 records); delete {version_dir} and run again to rebuild it.'
  )
  test_shard = os.path.join(version_dir, SHARD.format('test'))
  shutil.copy(os.path.join(version_dir, SHARD.format('train')), test_shard)
  assert _load_error(data_dir, 'test') == (
    f'{test_shard}: holds 300 records; the dataset_info.json of xmatch_shapes/tiny/1.0.0 lists 100 for this shard '
    f'of split test (a file of another build?); delete {version_dir} and run again to rebuild it.'
  )


def _edit_version(info):
  info.write_text(info.read_text().replace('"version": "1.0.0"', '"version": "0.9.0"'))


@pytest.mark.parametrize(
  'damage, message',
  [
    (_edit_version, '{d}/dataset_info.json: a build of xmatch_shapes/tiny version 0.9.0; this library reads '),
    (
      lambda info: info.unlink(),
      '{d}: dataset_info.json missing, so this is not a complete build of xmatch_shapes/tiny',
    ),
    (lambda info: info.write_text('{"name": '), '{d}/dataset_info.json: not readable as TFDS dataset info (JSONDe'),
  ],
  ids=['another_version', 'no_info', 'info_not_json'],
)
def test_dataset_info_of_another_version_or_damaged(shapes_copy, damage, message):
  """Before, TFDS gave an AssertionError (versions differ), a protobuf ParseError and a build without splits."""
  data_dir, version_dir = shapes_copy
  damage(pathlib.Path(version_dir) / 'dataset_info.json')
  got = _load_error(data_dir)
  assert got.startswith(message.format(d=version_dir)), got
  assert got.endswith(f'; delete {version_dir} and run again to rebuild it.')


def _write_precomp(directory, sizes, k=36, d=512):
  """SCAN precomp files of the `custom` config; records of 36 x 512 float32 = 72 KiB (more than the 32 KiB a shard
  reader buffers, so a read after the damage goes to the file). Returns {split: regions}."""
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(0)
  arrays = {}
  for split, n in sizes.items():
    arrays[split] = rng.standard_normal((n, k, d), np.float32)
    np.save(os.path.join(directory, f'{split}_ims.npy'), arrays[split])
    with open(os.path.join(directory, f'{split}_caps.txt'), 'w') as f:
      f.write(''.join(f'caption {c} of image {c // 5}\n' for c in range(5 * n)))
  return arrays


def test_lazy_read_of_a_shard_damaged_in_the_middle_of_training(tmp_path, monkeypatch):
  """A lazy split (XMATCH_LAZY=1) loads and reads fine; a shard damaged afterwards stops the next read of its rows
  with the error naming it, while the other shards still read."""
  manual = tmp_path / 'manual'
  arrays = _write_precomp(manual / 'custom_precomp', {'train': 2, 'dev': 1, 'test': 8})
  monkeypatch.setattr(precomp.XmatchPrecomp, 'SHARD_BYTES', 3 * arrays['test'][0].nbytes)  # test: 3 + 3 + 2 rows
  monkeypatch.setenv('XMATCH_MANUAL_DIR', str(manual))
  monkeypatch.setenv('XMATCH_LAZY', '1')
  data_dir = str(tmp_path / 'tfds')
  regions = data_lib.load_split('precomp', 'test', data_dir).images['regions']
  assert isinstance(regions, lazy.LazyRows)
  version_dir = os.path.join(data_dir, 'xmatch_precomp', 'custom', '1.2.0')
  shard = os.path.join(version_dir, 'xmatch_precomp-test.array_record-00002-of-00003')
  way_out = f'; delete {version_dir} and run again to rebuild it from the files in {manual}/custom_precomp.'

  read = []
  with pytest.raises(array_record.CorruptDatasetError) as info:
    for start in range(0, 8, 2):  # the batches of an epoch
      np.testing.assert_array_equal(regions[start : start + 2], arrays['test'][start : start + 2])
      read.append(start)
      if start == 2:
        _flip(shard, 4096)  # in row 6, the first record of the third shard
  assert read == [0, 2, 4]
  assert str(info.value).startswith(
    f'{shard}: record 0 (row 6 of xmatch_precomp/custom/1.2.0 split test) cannot be read: the shard is truncated or '
    'corrupt (RuntimeError: Corrupted Riegeli/records file: chunk data hash mismatch'
  )
  assert str(info.value).endswith(way_out) and '\n' not in str(info.value)

  # The lazy API over a plain TFDS source names the shard too; a fresh load stops at once.
  builder = precomp.XmatchPrecomp(config='custom', data_dir=data_dir)
  rows = lazy.LazyRows(lazy.RowReader(builder.as_data_source('test'), 'test split'), 'regions', (36, 512), np.float32)
  np.testing.assert_array_equal(rows[np.array([5, 7])], arrays['test'][[5, 7]])  # row 7: the shard's next record
  with pytest.raises(errors.UserError, match=f'^{shard}: record 0 \\(row 6 of .* cannot be read'):
    rows[6]
  assert _load_error(data_dir, dataset='precomp').startswith(f'{shard}: record 0 (row 6 ')


def test_shard_of_another_dataset_does_not_decode(tmp_path, shapes_copy):
  """A shard with the right record count but written by another builder (or version) passes Riegeli's checks; its
  records then fail to decode as this builder's examples (TFDS raised a TypeError)."""
  manual = tmp_path / 'manual' / 'custom_precomp'
  _write_precomp(manual, {'train': 2, 'dev': 1, 'test': 100}, k=2, d=4)
  data_dir = str(tmp_path / 'precomp')
  precomp.build('custom', str(manual), data_dir)
  version_dir = os.path.join(data_dir, 'xmatch_precomp', 'custom', '1.2.0')
  shard = os.path.join(version_dir, 'xmatch_precomp-test.array_record-00000-of-00001')
  shutil.copy(os.path.join(shapes_copy[1], SHARD.format('dev')), shard)  # 100 records of xmatch_shapes
  with pytest.raises(array_record.CorruptDatasetError) as info:
    precomp.build('custom', str(manual), data_dir).open_split('test')[0]
  assert str(info.value).startswith(
    f'{shard}: record 0 (row 0 of xmatch_precomp/custom/1.2.0 split test) does not decode as an example of '
    'xmatch_precomp/custom/1.2.0 (a file of another builder version?) ('
  )
  assert str(info.value).endswith(f'; delete {version_dir} and run again to rebuild it from the files in {manual}.')


def test_only_another_version_built_is_named_with_the_one_expected(tmp_path, data_dir):
  """A precomp build of another version with its manual dir gone: the error says which versions were found and
  which is read. A generated dataset (shapes) just builds the version it reads."""
  manual = tmp_path / 'manual' / 'custom_precomp'
  _write_precomp(manual, {'train': 2, 'dev': 1, 'test': 3}, d=4)
  tfds_dir = tmp_path / 'tfds'
  precomp.build('custom', str(manual), str(tfds_dir))
  config_dir = tfds_dir / 'xmatch_precomp' / 'custom'
  os.rename(config_dir / '1.2.0', config_dir / '1.0.0')
  shutil.rmtree(manual)
  with pytest.raises(errors.MissingFileError) as info:
    precomp.build('custom', str(manual), str(tfds_dir))
  assert str(info.value).endswith(
    f'; {config_dir} holds a build of version 1.0.0 only, and this library reads version 1.2.0 or 1.1.0, so it '
    'rebuilds xmatch_precomp/custom from these files'
  )

  shapes_dir = tmp_path / 'shapes'
  shutil.copytree(shapes.shapes_builder(data_dir, config='tiny').data_dir, shapes_dir / 'xmatch_shapes/tiny/0.9.0')
  assert len(data_lib.load_split('shapes_tiny', 'dev', str(shapes_dir)).captions) == 500
  assert os.path.exists(shapes_dir / 'xmatch_shapes/tiny/1.0.0/dataset_info.json')


@pytest.mark.slow  # a subprocess importing jax
def test_command_line_prints_one_error_line_and_exits_2(shapes_copy, tmp_path):
  data_dir, version_dir = shapes_copy
  shard = os.path.join(version_dir, SHARD.format('train'))
  os.truncate(shard, os.path.getsize(shard) // 2)
  env = {**{k: v for k, v in os.environ.items() if k != 'XMATCH_DEBUG'}, 'XMATCH_DATA_DIR': data_dir}
  proc = subprocess.run(
    [sys.executable, '-m', 'xmatch_jax.train', '--config=configs/scan.py:shapes_tiny', '--config.max_steps=2']
    + [f'--workdir={tmp_path / "w"}'],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    env=env,
  )
  where = proc.stderr[-3000:]
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr, where
  lines = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
  assert lines == [proc.stderr.strip().splitlines()[-1]], where
  assert lines[0].startswith(f'error: {shard}: truncated or corrupt shard, not readable as array_record ('), where
  assert lines[0].endswith(f'; delete {version_dir} and run again to rebuild it.'), where
