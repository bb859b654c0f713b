"""The bases of xmatch's TFDS builders: array_record files (random access with `as_data_source`, no TensorFlow).

ArrayRecordBuilder is TFDS's GeneratorBasedBuilder: simple, but its writer gathers a whole split before writing it
(in memory up to 1 GB, then in temporary files written through TensorFlow, which is not installed here; with
shuffling disabled, as ours is, the split is also sorted in memory at the end). Fine for the small generated and
category datasets. StreamingArrayRecordBuilder is TFDS's ShardBasedBuilder: each shard's examples are written as
they are generated, so memory is bounded by one shard whatever the split's size (precomputed features: COCO's
train split is tens of GB).

A build is opened through `Builder.prepare(...)` (checks the version directory's dataset_info.json before TFDS reads
it, then builds when the directory is missing) and its splits through `builder.open_split(split)` (checks that every
shard is there, readable and holds the records dataset_info.json lists; returns a CheckedSource). Damaged or foreign
files are a CorruptDatasetError naming the file and the directory to delete, at load and on every later read (lazy
splits read their shards during training). array_record (Riegeli) stores a hash of every chunk header and chunk's
data, so a flipped bit in a record is a read error, never a silently changed value.
"""

import bisect
import json
import operator
import os
import re
import sys

from etils import epath
import tensorflow_datasets as tfds
from tensorflow_datasets.core import dataset_builder
from tensorflow_datasets.core.utils import file_utils

from xmatch_jax import errors

# What TFDS's ArrayRecordDataSource opens its shards with (random access).
_READER_OPTIONS = 'readahead_buffer_size:0'
_READER_BUFFER = 32768


class CorruptDatasetError(errors.UserError):
  """Files of a built dataset are damaged (a shard truncated, missing or holding a corrupt record) or belong to
  another build or version of its builder; the message names the file and the directory to delete to rebuild."""


def rebuild_hint(version_dir: str, manual_dir: str | None = None) -> str:
  """The way out of a damaged build in `version_dir`, e.g. 'delete D and run again to rebuild it'."""
  source = f' from the files in {manual_dir}' if manual_dir else ''
  return f'delete {version_dir} and run again to rebuild it{source}'


def built_versions(config_dir: str) -> list:
  """The version directories (complete builds: with a dataset_info.json) in <data_dir>/<name>/<config>, sorted."""
  try:
    names = os.listdir(config_dir)
  except OSError:
    return []
  versions = [n for n in names if re.fullmatch(r'\d+\.\d+\.\d+', n)]
  versions = [v for v in versions if os.path.exists(os.path.join(config_dir, v, 'dataset_info.json'))]
  return sorted(versions, key=lambda v: tuple(int(p) for p in v.split('.')))


def other_versions_note(builder_cls, config_name: str, data_dir: str) -> str:
  """'' or, when <data_dir>/<name>/<config> holds builds of other versions only (none this library reads: VERSION
  or SUPPORTED_VERSIONS), a clause for an error that stops the rebuild: which versions were found, which is read."""
  config_dir = os.path.join(data_dir, builder_cls.name, config_name)
  found = built_versions(config_dir)
  readable = [str(builder_cls.VERSION)] + [str(v) for v in getattr(builder_cls, 'SUPPORTED_VERSIONS', None) or []]
  if not found or set(found) & set(readable):
    return ''
  return (
    f'; {config_dir} holds a build of version{"s" * (len(found) > 1)} {" and ".join(found)} only, and this library '
    f'reads version {" or ".join(readable)}, so it rebuilds {builder_cls.name}/{config_name} from these files'
  )


def _one_line(error: BaseException) -> str:
  return f'{type(error).__name__}: {" ".join(str(error).split())}'


def check_version_dir(version_dir: str, full_name: str, version: str, rebuild: str) -> None:
  """An existing build in `version_dir` (<data_dir>/<name>/<config>/<version>) has a readable dataset_info.json of
  `full_name` (<name>/<config>) at `version`; raises CorruptDatasetError otherwise. TFDS takes any existing version
  directory as built and would report an empty or foreign one as an AssertionError or a missing split."""
  info_path = os.path.join(version_dir, 'dataset_info.json')
  if not os.path.exists(info_path):
    raise CorruptDatasetError(
      f'{version_dir}: dataset_info.json missing, so this is not a complete build of {full_name} {version} '
      f'(interrupted, or partly deleted or copied); {rebuild}.'
    )
  try:
    with open(info_path, encoding='utf-8') as f:
      info = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CorruptDatasetError(
      f'{info_path}: not readable as TFDS dataset info ({_one_line(e)}); expected the JSON file TFDS writes with a '
      f'build of {full_name} {version}; {rebuild}.'
    ) from e
  if not isinstance(info, dict):
    raise CorruptDatasetError(f'{info_path}: holds a JSON {type(info).__name__}; expected an object; {rebuild}.')
  name, config = full_name.split('/')
  found = (info.get('name'), info.get('configName', config), info.get('version'))
  if found != (name, config, version):
    raise CorruptDatasetError(
      f'{info_path}: a build of {found[0]}/{found[1]} version {found[2]}; this library reads {full_name} version '
      f'{version} from {version_dir} (files of another build or builder version); {rebuild}.'
    )


class CheckedSource:
  """A TFDS array_record data source (`builder.as_data_source(split)`) whose read and decode errors are
  CorruptDatasetErrors naming the shard, the record, the split and the way out, instead of Riegeli's RuntimeError or a
  protobuf / TFDS decoding error. Otherwise the same: `len(s)`, `s[i]` -> the decoded example i, `s.__getitems__`.
  Nothing is skipped or replaced: a damaged record stops the read."""

  def __init__(self, source, rebuild: str | None = None):
    """source: a TFDS ArrayRecordDataSource; rebuild: the way out named in errors (default: delete the directory of
    the shards and run again)."""
    self.source = source
    self.info = source.dataset_info
    self.split = str(source.split)
    self.files = list(self.info.splits[self.split].file_instructions)
    self.version_dir = os.path.dirname(self.files[0].filename) if self.files else str(self.info.data_dir)
    self.rebuild = rebuild or rebuild_hint(self.version_dir)
    self.where = f'{self.info.full_name} split {self.split}'
    self._ends = [0]
    for file in self.files:
      self._ends.append(self._ends[-1] + file.take)

  def __len__(self) -> int:
    return len(self.source)

  def __repr__(self) -> str:
    return f'CheckedSource({self.where}, {len(self.files)} shard(s) in {self.version_dir})'

  def shard_of(self, index: int) -> tuple:
    """Row `index` of the split -> (shard path, record position in that shard)."""
    j = bisect.bisect_right(self._ends, index) - 1
    j = min(max(j, 0), len(self.files) - 1)
    return self.files[j].filename, self.files[j].skip + index - self._ends[j]

  def _error(self, index: int, what: str, error: BaseException) -> CorruptDatasetError:
    path, position = self.shard_of(index)
    return CorruptDatasetError(
      f'{path}: record {position} (row {index} of {self.where}) {what} ({_one_line(error)}); {self.rebuild}.'
    )

  def _decode(self, index: int, record: bytes):
    try:
      return self.info.features.deserialize_example_np(record, decoders=self.source.decoders)
    except Exception as e:  # the bytes passed Riegeli's hashes: written by another feature spec
      raise self._error(
        index, f'does not decode as an example of {self.info.full_name} (a file of another builder version?)', e
      ) from e

  def __getitem__(self, index):
    index = operator.index(index)
    if not 0 <= index < len(self):
      raise IndexError(f'{self.where}: row {index} is out of range; the split has {len(self)} rows.')
    try:
      record = self.source.data_source[index]
    except (RuntimeError, OSError) as e:  # Riegeli's hash / framing checks, a shard cut or gone since it was opened
      raise self._error(index, 'cannot be read: the shard is truncated or corrupt', e) from e
    return self._decode(index, record)

  def __getitems__(self, indices) -> list:
    indices = [operator.index(i) for i in indices]
    try:
      records = self.source.data_source.__getitems__(indices)
    except (RuntimeError, OSError):
      return [self[i] for i in indices]  # one at a time, to name the damaged record
    return [self._decode(i, r) for i, r in zip(indices, records)]

  def check_shards(self) -> None:
    """Every shard of the split exists, opens as array_record and holds the number of records dataset_info.json
    lists (its footer is read, not its records: cheap). Raises CorruptDatasetError naming the first that does not."""
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

    for file in self.files:
      path = os.fspath(file.filename)
      if not os.path.exists(path):
        raise CorruptDatasetError(
          f'{path}: shard missing from the build of {self.where} (dataset_info.json lists {len(self.files)} '
          f'shard(s) of {sum(f.take for f in self.files)} records); {self.rebuild}.'
        )
      try:
        reader = array_record_module.ArrayRecordReader(
          path, options=_READER_OPTIONS, file_reader_buffer_size=_READER_BUFFER
        )
        problem, count = (None, reader.num_records()) if reader.ok() else (_reason(reader, path), None)
      except (RuntimeError, OSError) as e:
        problem, reader = _one_line(e), None
      if reader is not None:
        try:
          reader.close()
        except RuntimeError:  # a reader that failed to open reports its error again
          pass
      if problem is not None:
        raise CorruptDatasetError(
          f'{path}: truncated or corrupt shard, not readable as array_record ({problem}); {self.rebuild}.'
        )
      if count != file.examples_in_shard:
        raise CorruptDatasetError(
          f'{path}: holds {count} records; the dataset_info.json of {self.info.full_name} lists '
          f'{file.examples_in_shard} for this shard of split {self.split} (a file of another build?); '
          f'{self.rebuild}.'
        )


def _reason(reader, path: str) -> str:
  """Why a reader that is not ok() failed, as Riegeli says it (its status is only seen through a read)."""
  if os.path.getsize(path) < 65536:
    return f'{os.path.getsize(path)} bytes; an array_record file has at least 64 KiB'
  try:
    reader.read([0])
  except Exception as e:  # noqa: BLE001 (whatever Riegeli reports)
    return _one_line(e)
  return 'its footer does not read'


class LocalDatasetInfo(tfds.core.DatasetInfo):
  """The DatasetInfo of every xmatch builder: its datasets are built on this machine, never fetched. A builder whose
  dataset is not built yet asks `initialize_from_bucket` for TFDS's pre-computed info on GCS; TFDS's version makes a
  temporary directory first and never removes it (GCS access is off, so that is all it does), which left one empty
  /tmp/tmp*tfds per build and per test that builds."""

  def initialize_from_bucket(self) -> None:
    pass


class _ModuleCodePath:
  """TFDS finds a builder's file through importlib.resources, which fails while `xmatch_jax` is a namespace package
  spread over several path entries (editable installs); the module file itself is what it needs.

  Also how xmatch opens builds: `prepare` and `open_split` (module docstring)."""

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(sys.modules[cls.__module__].__file__)

  def __init__(self, *, file_format: str = 'array_record', **kwargs):
    super().__init__(file_format=file_format, **kwargs)
    self.rebuild_from = None  # the manual dir a build reads (set by `prepare`), named in the way out of errors

  @classmethod
  def prepare(cls, *, config, data_dir: str | None, version: str | None = None, manual_dir: str | None = None):
    """The builder of `config` (a name or a BuilderConfig) at `version` (default: VERSION) in data_dir, built there
    first (from manual_dir, when given) unless its version directory exists. An existing directory is checked
    first (check_version_dir), so that an incomplete or foreign build is a CorruptDatasetError naming the directory
    to delete rather than a TFDS traceback or a dataset without splits."""
    config_name = config if isinstance(config, str) else config.name
    expected = str(version or cls.VERSION)
    # As TFDS places it (data_dir None: TFDS's own default, or the data dir of its others that holds this version).
    version_dir = os.fspath(file_utils.get_data_dir_and_dataset_dir(data_dir, cls.name, config_name, expected)[1])
    rebuild = rebuild_hint(version_dir, manual_dir)
    exists = os.path.isdir(version_dir)
    if exists:
      check_version_dir(version_dir, f'{cls.name}/{config_name}', expected, rebuild)
    try:
      builder = cls(config=config, data_dir=data_dir, version=version)
    except Exception as e:  # only an existing build is read here
      if not exists:
        raise
      raise CorruptDatasetError(f'{version_dir}: TFDS cannot read this build ({_one_line(e)}); {rebuild}.') from e
    builder.rebuild_from = manual_dir
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
    builder.download_and_prepare(download_config=download_config)  # a no-op when the data is already there
    return builder

  @property
  def rebuild(self) -> str:
    """The way out of a damaged build of this builder, named in errors."""
    return rebuild_hint(self.data_dir, self.rebuild_from)

  def open_split(self, split: str) -> CheckedSource:
    """`as_data_source(split)` with its shards checked (CheckedSource.check_shards) and its reads too."""
    source = CheckedSource(self.as_data_source(split), self.rebuild)
    source.check_shards()
    return source


class ArrayRecordBuilder(_ModuleCodePath, tfds.core.GeneratorBasedBuilder):
  """A GeneratorBasedBuilder writing array_record. Abstract (no _info / generators), so TFDS does not register it."""


class StreamingArrayRecordBuilder(_ModuleCodePath, dataset_builder.ShardBasedBuilder):
  """A ShardBasedBuilder writing array_record: subclasses give `_shard_iterators_per_split`, one example generator
  per shard in order. Abstract, so TFDS does not register it."""

  SHARD_BYTES = 256 << 20  # target size of one shard's examples (the most a build holds in memory at once)
