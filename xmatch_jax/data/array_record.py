"""The bases of xmatch's TFDS builders: array_record files (random access with `as_data_source`, no TensorFlow).

ArrayRecordBuilder is TFDS's GeneratorBasedBuilder: simple, but its writer gathers a whole split before writing it
(in memory up to 1 GB, then in temporary files written through TensorFlow, which is not installed here; with
shuffling disabled, as ours is, the split is also sorted in memory at the end). Fine for the small generated and
category datasets. StreamingArrayRecordBuilder is TFDS's ShardBasedBuilder: each shard's examples are written as
they are generated, so memory is bounded by one shard whatever the split's size (precomputed features: COCO's
train split is tens of GB).
"""

import sys

from etils import epath
import tensorflow_datasets as tfds
from tensorflow_datasets.core import dataset_builder


class _ModuleCodePath:
  """TFDS finds a builder's file through importlib.resources, which fails while `xmatch_jax` is a namespace package
  spread over several path entries (editable installs); the module file itself is what it needs."""

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(sys.modules[cls.__module__].__file__)

  def __init__(self, *, file_format: str = 'array_record', **kwargs):
    super().__init__(file_format=file_format, **kwargs)


class ArrayRecordBuilder(_ModuleCodePath, tfds.core.GeneratorBasedBuilder):
  """A GeneratorBasedBuilder writing array_record. Abstract (no _info / generators), so TFDS does not register it."""


class StreamingArrayRecordBuilder(_ModuleCodePath, dataset_builder.ShardBasedBuilder):
  """A ShardBasedBuilder writing array_record: subclasses give `_shard_iterators_per_split`, one example generator
  per shard in order. Abstract, so TFDS does not register it."""

  SHARD_BYTES = 256 << 20  # target size of one shard's examples (the most a build holds in memory at once)
