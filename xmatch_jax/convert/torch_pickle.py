"""Reads PyTorch checkpoints (`torch.save` files) into numpy without torch and without executing pickled code.

Both of torch.save's formats are read: the zip archive (torch >= 1.6: `archive/data.pkl` + `archive/data/<key>`)
and the legacy stream (magic number, protocol, sys info, pickle, storage keys, raw storages; older checkpoints
such as SCAN's and VSE++'s). The unpickler resolves only an allow-list of globals (tensor rebuild functions,
storage types, OrderedDict, argparse.Namespace, numpy scalars/arrays); any other global (os.system, a model
class, ...) is refused with an error naming it, so a malicious or full-model pickle cannot run code.

Tensors become numpy arrays (bfloat16 as ml_dtypes.bfloat16); nn.Parameter becomes its array; argparse.Namespace
becomes a `types.SimpleNamespace`.
"""

import collections
import io
import math
import os
import pickle
import struct
import types
from typing import Any
import zipfile
import zlib

import ml_dtypes
import numpy as np

from xmatch_jax import errors
from xmatch_jax import progress
from xmatch_jax import safe_pickle

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
# A tensor may repeat its storage (zero strides) only up to this size: a corrupt stride would allocate any amount.
_MAX_EXPANDED_BYTES = 2**30

_STORAGE_DTYPES = {
  'DoubleStorage': np.float64,
  'FloatStorage': np.float32,
  'HalfStorage': np.float16,
  'BFloat16Storage': ml_dtypes.bfloat16,
  'LongStorage': np.int64,
  'IntStorage': np.int32,
  'ShortStorage': np.int16,
  'CharStorage': np.int8,
  'ByteStorage': np.uint8,
  'BoolStorage': np.bool_,
}


class _StorageType:
  def __init__(self, name: str):
    self.name = name
    self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Storage:
  """A storage whose bytes are known now (zip) or filled in after the main pickle (legacy)."""

  def __init__(self, dtype: np.dtype, numel: int, data: np.ndarray | None = None):
    self.dtype, self.numel, self.data = dtype, numel, data

  def __setstate__(self, state):  # a pickle BUILD on it: never part of torch.save's format
    raise pickle.UnpicklingError('a storage does not take a pickled state')


class _Tensor:
  """A tensor to build once its storage has data (legacy files store the data after the pickle)."""

  def __init__(self, storage, offset, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

  def __setstate__(self, state):  # a pickle BUILD on it: never part of torch.save's format
    raise pickle.UnpicklingError('a tensor does not take a pickled state')

  def materialise(self, where: str) -> np.ndarray:
    storage = self.storage
    if not isinstance(storage, _Storage) or storage.data is None:
      raise errors.UserError(f'{where}: a tensor refers to a storage that the file does not contain')
    ints = lambda values: all(type(v) is int and v >= 0 for v in values)  # noqa: E731
    if type(self.offset) is not int or not ints((self.offset, *self.size, *self.stride)):
      raise errors.UserError(
        f'{where}: tensor with storage offset {self.offset!r:.40}, shape {self.size!r:.60} and strides '
        f'{self.stride!r:.60}; expected integers >= 0 (corrupt checkpoint?)'
      )
    if len(self.stride) != len(self.size):
      raise errors.UserError(f'{where}: tensor of shape {self.size} has {len(self.stride)} strides')
    if not self.size:
      if self.offset >= storage.data.size:
        raise errors.UserError(f'{where}: scalar tensor at offset {self.offset} of a storage of {storage.data.size}')
      return storage.data[self.offset].copy()
    extent = self.offset + sum((s - 1) * st for s, st in zip(self.size, self.stride)) + 1
    if min(self.size) > 0 and extent > storage.data.size:
      raise errors.UserError(
        f'{where}: tensor of shape {self.size} runs past the end of its storage ({storage.data.size} elements)'
      )
    count = math.prod(self.size)
    if count > storage.data.size and count * storage.data.itemsize > _MAX_EXPANDED_BYTES:
      raise errors.UserError(
        f'{where}: tensor of shape {self.size} repeats its storage of {storage.data.size} elements (zero or '
        f'overlapping strides {self.stride}) into {count * storage.data.itemsize / 2**30:.1f} GiB; refusing more than '
        f'{_MAX_EXPANDED_BYTES / 2**30:.0f} GiB (corrupt checkpoint?)'
      )
    item = storage.data.itemsize
    return np.lib.stride_tricks.as_strided(
      storage.data[self.offset :], self.size, [s * item for s in self.stride]
    ).copy()


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  return _Tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, *unused):
  return data


def _rebuild_from_type_v2(func, new_type, args, state):
  del new_type, state
  return func(*args)


class _Namespace(types.SimpleNamespace):
  """argparse.Namespace stand-in: pickle restores its __dict__ through __setstate__ / attribute updates."""

  def __setstate__(self, state):
    self.__dict__.update(state)


_ALLOWED = {
  ('collections', 'OrderedDict'): collections.OrderedDict,
  ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
  ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
  ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
  ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
  ('torch._tensor', '_rebuild_from_type_v2'): _rebuild_from_type_v2,
  # Only ever the `new_type` argument of _rebuild_from_type_v2, which is ignored.
  ('torch', 'Tensor'): _rebuild_parameter,
  ('torch.nn.parameter', 'Parameter'): _rebuild_parameter,
  ('argparse', 'Namespace'): _Namespace,
  **safe_pickle.NUMPY_VALUES,
  **{('torch', name): _StorageType(name) for name in _STORAGE_DTYPES},
}
_REFUSAL = (
  'only tensors, state_dicts and plain values are read (the file may hold a whole pickled model or code; save its '
  'state_dict instead)'
)


def _unpickler(file, where: str, storage_loader) -> safe_pickle.AllowListUnpickler:
  def persistent_load(saved_id):
    if not isinstance(saved_id, tuple) or not saved_id or saved_id[0] != 'storage':
      raise pickle.UnpicklingError(f'{where}: unknown persistent id {saved_id!r:.80}')
    return storage_loader(saved_id[1:])

  return safe_pickle.AllowListUnpickler(
    file, _ALLOWED, _REFUSAL, where, numpy_values=True, persistent_load=persistent_load
  )


def _materialise(obj, where: str):
  if isinstance(obj, _Tensor):
    return obj.materialise(where)
  if isinstance(obj, dict):
    return type(obj)((k, _materialise(v, where)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialise(v, where) for v in obj)
  if isinstance(obj, types.SimpleNamespace):
    for k, v in vars(obj).items():
      setattr(obj, k, _materialise(v, where))
    return types.SimpleNamespace(**vars(obj))
  return obj


def _check_members(path: str, archive: zipfile.ZipFile) -> None:
  """Every member's sizes must fit in the file: a corrupt size would make zipfile allocate it before reading."""
  size = os.path.getsize(path)
  for info in archive.infolist():
    stored = info.compress_type == zipfile.ZIP_STORED
    if info.compress_size > size or (stored and info.file_size != info.compress_size):
      raise errors.UserError(
        f'{path}: zip member {info.filename} claims {info.compress_size} bytes ({info.file_size} unpacked) in a '
        f'file of {size}; expected a complete torch.save archive (corrupt or truncated?)'
      )


def _load_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as archive:
    _check_members(path, archive)
    names = archive.namelist()
    pickles = [n for n in names if n.endswith('/data.pkl') or n == 'data.pkl']
    if len(pickles) != 1:
      raise errors.UserError(f'{path}: a torch zip checkpoint has one data.pkl; found {pickles}')
    prefix = pickles[0][: -len('data.pkl')]
    byteorder = 'little'
    if prefix + 'byteorder' in names:
      byteorder = archive.read(prefix + 'byteorder').decode('ascii', 'replace').strip()
      if byteorder not in ('little', 'big'):
        raise errors.UserError(f'{path}: {prefix}byteorder is {byteorder!r:.40}; expected "little" or "big"')
    storages = {}
    data_bytes = sum(archive.getinfo(n).file_size for n in names if n.startswith(f'{prefix}data/'))
    bar = progress.bar(total=data_bytes, desc=f'reading {path}', unit='B', unit_scale=True)

    def load_storage(saved):
      if len(saved) < 4 or not isinstance(saved[0], _StorageType):
        raise pickle.UnpicklingError(f'storage id {saved!r:.80}; expected (storage type, key, location, numel)')
      storage_type, key, _, numel = saved[:4]
      if key not in storages:
        entry = f'{prefix}data/{key}'
        if entry not in names:
          raise errors.UserError(f'{path}: storage {key} ({entry}) is missing from the archive')
        dtype = storage_type.dtype.newbyteorder('<' if byteorder == 'little' else '>')
        size = archive.getinfo(entry).file_size
        if type(numel) is not int or size != numel * dtype.itemsize:
          raise errors.UserError(f'{path}: storage {entry} has {size} bytes; expected {numel!r:.20} x {dtype.itemsize}')
        raw = archive.read(entry)
        storages[key] = _Storage(dtype, numel, np.frombuffer(raw, dtype).astype(dtype.newbyteorder('=')))
        bar.update(len(raw))
      return storages[key]

    with bar, archive.open(pickles[0]) as f:  # the storages are read as the pickle refers to them
      result = _unpickler(io.BytesIO(f.read()), path, load_storage).load()
  return _materialise(result, path)


def _plain_pickle(f, path: str, what: str):
  """One of the legacy format's pickles of plain values (magic number, protocol, sys info, storage keys)."""
  unpickler = safe_pickle.AllowListUnpickler(f, {}, f'the {what} of a legacy checkpoint is a plain value', path)
  return unpickler.load()


def _load_legacy(path: str) -> Any:
  with open(path, 'rb') as f:
    try:
      magic = _plain_pickle(f, path, 'magic number')
    except (errors.UserError, *safe_pickle.LOAD_ERRORS) as e:
      raise errors.UserError(
        f'{path}: not a PyTorch checkpoint (neither a zip archive nor the legacy format): {e}'
      ) from None
    if magic != _LEGACY_MAGIC:
      raise errors.UserError(f'{path}: not a PyTorch checkpoint (wrong magic number)')
    protocol = _plain_pickle(f, path, 'protocol')
    if protocol != _LEGACY_PROTOCOL:
      raise errors.UserError(f'{path}: legacy checkpoint protocol {protocol!r:.40}; expected {_LEGACY_PROTOCOL}')
    sys_info = _plain_pickle(f, path, 'sys info')
    if not isinstance(sys_info, dict):
      raise errors.UserError(f'{path}: legacy checkpoint sys info is a {type(sys_info).__name__}; expected a dict')
    if not sys_info.get('little_endian', True):
      raise errors.UserError(f'{path}: big-endian legacy checkpoints are not supported')
    storages, views = {}, []

    def load_storage(saved):
      if not isinstance(saved, tuple) or len(saved) != 5 or not isinstance(saved[0], _StorageType):
        raise pickle.UnpicklingError(f'storage id {saved!r:.80}; expected (type, key, location, numel, view)')
      storage_type, root_key, _, numel, view = saved
      if root_key not in storages:
        storages[root_key] = _Storage(storage_type.dtype, numel)
      if view is None:
        return storages[root_key]
      _, offset, view_size = view
      storage = _Storage(storage_type.dtype, view_size)
      views.append((storage, root_key, offset))
      return storage

    result = _unpickler(f, path, load_storage).load()
    keys = _plain_pickle(f, path, 'storage keys')
    if not isinstance(keys, list):
      raise errors.UserError(f'{path}: legacy checkpoint storage keys are a {type(keys).__name__}; expected a list')
    # The raw storages fill the rest of the file.
    end = os.path.getsize(path)
    with progress.bar(total=end - f.tell(), desc=f'reading {path}', unit='B', unit_scale=True) as bar:
      for key in keys:
        storage = storages.get(key) if isinstance(key, str) else None
        if storage is None:
          raise errors.UserError(f'{path}: storage key {key!r:.40} is not used by the pickle')
        header = f.read(8)
        numel = struct.unpack('<q', header)[0] if len(header) == 8 else -1
        nbytes = numel * storage.dtype.itemsize
        if numel < 0 or nbytes > end - f.tell():
          raise errors.UserError(f'{path}: file ends inside storage {key} (truncated checkpoint)')
        raw = f.read(nbytes)
        storage.data = np.frombuffer(raw, storage.dtype)
        bar.update(8 + len(raw))
    for storage, root_key, offset in views:
      root = storages[root_key].data
      if root is None or type(offset) is not int or type(storage.numel) is not int or offset < 0:
        raise errors.UserError(f'{path}: a storage view of {root_key!r:.40} at {offset!r:.20} (corrupt checkpoint?)')
      storage.data = root[offset : offset + storage.numel]
  return _materialise(result, path)


# What a corrupt file makes the readers above raise, besides UserErrors (zipfile: NotImplementedError for an unknown
# compression, RuntimeError for an encrypted member, OSError without a file name for a seek before the start).
_CORRUPT = (
  *safe_pickle.LOAD_ERRORS,
  zipfile.BadZipFile,
  zipfile.LargeZipFile,
  zlib.error,
  NotImplementedError,
  RuntimeError,
)


def load(path: str) -> Any:
  """Loads a torch.save file: state_dicts become dicts of numpy arrays.

  Raises:
    errors.MissingFileError: no such file.
    errors.UserError: not a PyTorch checkpoint, truncated or corrupt (the message names the file), or holding
      globals outside the allow-list (`safe_pickle.RefusedPickleError`, also a pickle.UnpicklingError, naming the
      file and the global).
  """
  if not os.path.exists(path):
    raise errors.MissingFileError(f'{path}: no such checkpoint file')
  try:
    return _load_zip(path) if zipfile.is_zipfile(path) else _load_legacy(path)
  except errors.UserError:
    raise
  except (*_CORRUPT, OSError) as e:
    if isinstance(e, OSError) and e.filename:  # the file itself cannot be opened: not a corrupt checkpoint
      raise
    raise errors.UserError(
      f'{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e}); expected a complete torch.save file '
      '(truncated or corrupt?)'
    ) from None
