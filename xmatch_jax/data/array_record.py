"""The base of xmatch's TFDS builders: array_record files (random access with `as_data_source`, no TensorFlow)."""

import sys

from etils import epath
import tensorflow_datasets as tfds


class ArrayRecordBuilder(tfds.core.GeneratorBasedBuilder):
  """A GeneratorBasedBuilder writing array_record. Abstract (no _info / generators), so TFDS does not register it."""

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS finds the builder's file through importlib.resources, which fails while `xmatch_jax` is a namespace
    # package spread over several path entries (editable installs); the module file itself is what it needs.
    return epath.Path(sys.modules[cls.__module__].__file__)

  def __init__(self, *, file_format: str = 'array_record', **kwargs):
    super().__init__(file_format=file_format, **kwargs)
