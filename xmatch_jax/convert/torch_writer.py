"""Writes `torch.save`-format files (the zip archive torch.save writes by default) without torch.

  torch_writer.save({'model': [state_dict], 'opt': argparse.Namespace(...), 'epoch': 3}, 'model.pth.tar')

The archive holds `archive/data.pkl` (pickle protocol 2, as torch.save), `archive/byteorder` ("little"),
`archive/data/<key>` (one raw little-endian storage per tensor, its data aligned to 64 bytes in the file like
torch's writer, so `torch.load(..., mmap=True)` works too), `archive/version` and `archive/.data/serialization_id`
(deterministic here: a hash of the records). `.format_version` is left out on purpose: with it, torch may compute
storage offsets assuming miniz's data descriptors, which Python's zipfile does not write.

numpy arrays (and jax arrays) pickle as torch tensors: `torch._utils._rebuild_tensor_v2(storage, 0, size, stride,
False, OrderedDict())` with persistent id `('storage', torch.<Type>Storage, key, 'cpu', numel)`, the globals
torch's `weights_only` unpickler allows. dicts (an OrderedDict stays one, as state_dicts are), lists, tuples,
argparse.Namespace (or types.SimpleNamespace, written as argparse.Namespace), None, bool, int, float, str, bytes and
numpy scalars (written as Python scalars) are written as plain pickle. torch's names are emitted by stand-in objects
through pickle's pure-Python Pickler (the C Pickler insists on importing every global it writes); torch is never
imported.
"""

import argparse
import collections
import hashlib
import io
import os
import pickle
import struct
import sys
import types
from typing import Any
import zipfile

import numpy as np

from xmatch_jax import errors

ARCHIVE = 'archive'
_ALIGNMENT = 64  # torch's kFieldAlignment: storages start at multiples of 64 bytes in the file
_VERSION = b'3\n'  # the file format version torch.save writes
_DATE_TIME = (1980, 1, 1, 0, 0, 0)

# numpy dtype name -> torch legacy storage class (what the persistent id names).
_STORAGE_TYPES = {
  'float32': 'FloatStorage',
  'float64': 'DoubleStorage',
  'float16': 'HalfStorage',
  'bfloat16': 'BFloat16Storage',
  'int64': 'LongStorage',
  'int32': 'IntStorage',
  'int16': 'ShortStorage',
  'int8': 'CharStorage',
  'uint8': 'ByteStorage',
  'bool': 'BoolStorage',
}


class _Global:
  """Stands for the global `module.name` (written as a GLOBAL opcode, never imported)."""

  def __init__(self, module: str, name: str):
    self.module, self.name = module, name

  def __call__(self, *args):  # pickle's save_reduce insists on a callable; this one only names torch's
    raise TypeError(f'{self.module}.{self.name} is a stand-in for pickling; it cannot be called')


_REBUILD_TENSOR_V2 = _Global('torch._utils', '_rebuild_tensor_v2')
_STORAGE_GLOBALS = {name: _Global('torch', storage) for name, storage in _STORAGE_TYPES.items()}


class _Storage:
  def __init__(self, key: str, dtype_name: str, numel: int):
    self.key, self.dtype_name, self.numel = key, dtype_name, numel


class _Tensor:
  def __init__(self, storage: _Storage, size: tuple, stride: tuple):
    self.storage, self.size, self.stride = storage, size, stride


class _TorchPickler(pickle._Pickler):  # pylint: disable=protected-access
  """Pure-Python Pickler: writes stand-in globals verbatim, tensors as torch reduces them."""

  dispatch = dict(pickle._Pickler.dispatch)  # pylint: disable=protected-access

  def _save_global_stand_in(self, obj: _Global) -> None:
    self.write(pickle.GLOBAL + f'{obj.module}\n{obj.name}\n'.encode('ascii'))
    self.memoize(obj)

  dispatch[_Global] = _save_global_stand_in

  def persistent_id(self, obj):
    if isinstance(obj, _Storage):
      return ('storage', _STORAGE_GLOBALS[obj.dtype_name], obj.key, 'cpu', obj.numel)
    return None

  def reducer_override(self, obj):
    if isinstance(obj, _Tensor):
      return _REBUILD_TENSOR_V2, (obj.storage, 0, obj.size, obj.stride, False, collections.OrderedDict())
    return NotImplemented


class _Collector:
  """Turns the object tree into picklable values, tensors into _Tensor stand-ins with their storage bytes."""

  def __init__(self):
    self.storages = []  # (key, array) in key order
    self._seen = {}  # id(array) -> (array, _Tensor): an array met twice is one tensor

  def tensor(self, value, where: str) -> _Tensor:
    known = self._seen.get(id(value))
    if known is not None:
      return known[1]
    array = np.asarray(value)
    name = array.dtype.name
    if name not in _STORAGE_TYPES:
      raise errors.UserError(
        f'{where}: arrays of dtype {array.dtype} cannot be written; expected one of {sorted(_STORAGE_TYPES)}'
      )
    key = str(len(self.storages))
    self.storages.append((key, array))
    stride, step = [], 1
    for size in reversed(array.shape):  # torch's contiguous strides (a size-0 dim counts as 1)
      stride.insert(0, step)
      step *= max(int(size), 1)
    tensor = _Tensor(_Storage(key, name, int(array.size)), tuple(int(s) for s in array.shape), tuple(stride))
    self._seen[id(value)] = (value, tensor)
    return tensor

  def prepare(self, obj, where: str):
    if isinstance(obj, np.generic):  # first: np.float64 is also a float
      return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
      return obj
    if isinstance(obj, np.ndarray) or (hasattr(obj, '__array__') and hasattr(obj, 'shape') and hasattr(obj, 'dtype')):
      return self.tensor(obj, where)
    if isinstance(obj, dict):
      out = collections.OrderedDict() if isinstance(obj, collections.OrderedDict) else {}
      for key, value in obj.items():
        if not isinstance(key, (str, int, float, bool)) and key is not None:
          raise errors.UserError(
            f'{where}: dict key {key!r} of type {type(key).__name__} cannot be written; expected '
            'str, int, float, bool or None'
          )
        out[key] = self.prepare(value, f'{where}[{key!r}]')
      return out
    if isinstance(obj, (list, tuple)):
      items = [self.prepare(v, f'{where}[{i}]') for i, v in enumerate(obj)]
      return items if isinstance(obj, list) else tuple(items)
    if isinstance(obj, (argparse.Namespace, types.SimpleNamespace)):
      return argparse.Namespace(**{k: self.prepare(v, f'{where}.{k}') for k, v in vars(obj).items()})
    raise errors.UserError(
      f'{where}: cannot write a {type(obj).__name__}; expected arrays, dicts, lists, tuples, '
      'argparse.Namespace, None, bool, int, float, str or bytes'
    )


def _little_endian_bytes(array: np.ndarray) -> bytes:
  order = array.dtype.byteorder
  if order == '>' or (order == '=' and sys.byteorder == 'big'):
    array = array.byteswap()
  return array.tobytes(order='C')


def _write_record(archive: zipfile.ZipFile, name: str, data: bytes) -> None:
  """Adds one stored (uncompressed) record whose data starts at a multiple of 64 bytes (torch's 'FB' padding)."""
  info = zipfile.ZipInfo(f'{ARCHIVE}/{name}', date_time=_DATE_TIME)
  info.compress_type = zipfile.ZIP_STORED
  zip64 = len(data) * 1.05 > zipfile.ZIP64_LIMIT  # what ZipFile.writestr decides; adds a 20-byte extra field
  start = archive.fp.tell() + 30 + len(info.filename.encode('ascii')) + 4 + (20 if zip64 else 0)
  padding = -start % _ALIGNMENT
  info.extra = b'FB' + struct.pack('<H', padding) + b'Z' * padding
  with archive.open(info, 'w', force_zip64=zip64) as f:
    f.write(data)


def save(obj: Any, path: str) -> None:
  """Writes `obj` to `path` in torch.save's zip format (atomically: a temporary file renamed into place).

  Raises:
    ValueError: a value that cannot be written (the message names where in `obj` it is and what is expected).
  """
  collector = _Collector()
  prepared = collector.prepare(obj, 'checkpoint')
  buffer = io.BytesIO()
  _TorchPickler(buffer, protocol=2).dump(prepared)
  digest = hashlib.sha256(buffer.getvalue())
  tmp = f'{path}.tmp{os.getpid()}'
  try:
    with zipfile.ZipFile(tmp, 'w', zipfile.ZIP_STORED) as archive:
      _write_record(archive, 'data.pkl', buffer.getvalue())
      _write_record(archive, 'byteorder', b'little')
      for key, array in collector.storages:
        raw = _little_endian_bytes(array)
        digest.update(raw)
        _write_record(archive, f'data/{key}', raw)
      _write_record(archive, 'version', _VERSION)
      # torch writes 40 digits here (it only logs them); ours are derived from the content, so equal inputs give
      # byte-identical files.
      _write_record(archive, '.data/serialization_id', str(int(digest.hexdigest(), 16))[:40].zfill(40).encode())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
