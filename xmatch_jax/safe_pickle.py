"""The package's one unpickler: it builds only the globals its caller allows, so no pickled code ever runs.

Callers pass their allow-list: PyTorch checkpoints (convert/torch_pickle.py), VSE++'s pickled vocabularies
(data/vocab.py) and the object arrays of bottom-up-attention .npz files (tools/convert_features.py).

A corrupt or malicious pickle can do no more than fail: the unpickler is pickle's pure-Python one (the C one grows
its memo table to whatever index a pickle names: 10 bytes can make it allocate gigabytes), reads a length a pickle
claims in chunks (so it never allocates more than the file holds), refuses to set the state of the allowed globals
themselves (which would change them for later loads), and builds numpy values only in the form numpy itself
pickles them: a dtype or array state numpy would not write (fields, object items read from raw bytes, fewer items
than the shape) can make numpy read memory at an address the pickle chose.

`LOAD_ERRORS` are what `AllowListUnpickler.load` raises on a corrupt pickle; callers catch them and name the file.
A global outside the allow-list raises `RefusedPickleError`, already a `errors.UserError`.
"""

import codecs
import importlib
import math
import pickle
import struct
from typing import Any
from typing import Callable
from typing import Optional

import numpy as np

from xmatch_jax import errors

# What a corrupt pickle makes `AllowListUnpickler.load` raise (besides RefusedPickleError, a UserError).
LOAD_ERRORS = (
  pickle.UnpicklingError,
  EOFError,
  ValueError,
  TypeError,
  LookupError,
  AttributeError,
  struct.error,
  OverflowError,
  RecursionError,
)
_CHUNK = 1 << 20  # bytes read at a time when a pickle names a length


class RefusedPickleError(errors.UserError, pickle.UnpicklingError):
  """A pickle names a global outside the caller's allow-list, or asks for what the unpickler never builds."""


class _ArrayClass:
  """numpy.ndarray as a pickle names it: only numpy's array reconstructor takes it (calling numpy.ndarray itself
  would allocate an array of any shape the pickle asks for)."""

  def __new__(cls, *args, **kwargs):
    del args, kwargs
    raise RefusedPickleError("numpy.ndarray is only built through numpy's pickled-array reconstructor")


def _multiarray():
  try:
    return importlib.import_module('numpy._core.multiarray')
  except ImportError:
    return importlib.import_module('numpy.core.multiarray')


def _dtype(spec, align=False, copy=True) -> np.dtype:
  """numpy.dtype as pickled: a new plain dtype (no fields, no subarray) from its type string."""
  del copy  # always a new dtype object: its BUILD must not change numpy's shared ones
  if not isinstance(spec, str):
    raise pickle.UnpicklingError(f'a pickled numpy dtype of {type(spec).__name__} {spec!r:.40}; expected a type string')
  dtype = np.dtype(spec, align=bool(align), copy=True)
  if dtype.fields is not None or dtype.subdtype is not None:
    raise RefusedPickleError(f'numpy dtype {spec!r:.40} has fields or a subarray; only plain dtypes are read')
  return dtype


def _reconstruct(cls, shape, dtype):
  """numpy's `_reconstruct(ndarray, (0,), b'b')`: the empty array that BUILD then fills."""
  if cls is not _ArrayClass or not isinstance(shape, tuple) or shape != (0,) or not isinstance(dtype, (bytes, str)):
    raise pickle.UnpicklingError(f'numpy _reconstruct({cls!r:.40}, {shape!r:.40}, ...); numpy pickles ndarray, (0,)')
  return np.ndarray((0,), _dtype(dtype.decode('latin1') if isinstance(dtype, bytes) else dtype))


def _scalar(dtype, obj=None):
  """numpy's pickled scalar: a plain dtype and its bytes."""
  if not isinstance(dtype, np.dtype) or dtype.hasobject:
    raise pickle.UnpicklingError(f'a pickled numpy scalar of dtype {dtype!r:.40}; expected a plain numeric dtype')
  if obj is not None and (not isinstance(obj, (bytes, str)) or len(obj) != dtype.itemsize):
    raise pickle.UnpicklingError(f'a pickled numpy {dtype} scalar holds {obj!r:.40}; expected {dtype.itemsize} bytes')
  return _multiarray().scalar(dtype, obj) if obj is not None else _multiarray().scalar(dtype)


# Plain numpy values: arrays, dtypes, and the latin-1 text numpy scalars pickled by Python 3 carry.
NUMPY_VALUES = {('numpy', 'ndarray'): _ArrayClass, ('numpy', 'dtype'): _dtype, ('_codecs', 'encode'): codecs.encode}
# numpy's pickled scalars and arrays; numpy 2 renamed numpy.core to numpy._core.
_NUMPY_MULTIARRAY = {
  (m, n): f
  for m in ('numpy.core.multiarray', 'numpy._core.multiarray')
  for n, f in (('scalar', _scalar), ('_reconstruct', _reconstruct))
}


def _check_dtype_state(dtype: np.dtype, state) -> None:
  """A dtype's BUILD state must be one numpy writes for it (in either byte order)."""
  expected = {dtype.newbyteorder(order).__reduce__()[2] for order in ('<', '>')}
  if not isinstance(state, tuple) or state not in expected:
    raise pickle.UnpicklingError(f'numpy dtype {dtype} with state {state!r:.80}; expected one of {sorted(expected)}')


def _check_array_state(array: np.ndarray, state) -> None:
  """An ndarray's BUILD state (version, shape, dtype, fortran order, data) must describe as many items as it holds."""
  if not isinstance(state, tuple) or len(state) not in (4, 5):
    raise pickle.UnpicklingError(f'numpy array state {state!r:.60}; expected (version, shape, dtype, fortran, data)')
  shape, dtype, fortran, data = state[-4:]
  if array.size or not isinstance(dtype, np.dtype) or not isinstance(fortran, bool):
    raise pickle.UnpicklingError(f'numpy array state {state!r:.60}; expected a new array, a dtype and a bool')
  if not isinstance(shape, tuple) or not all(type(n) is int and n >= 0 for n in shape):
    raise pickle.UnpicklingError(f'numpy array shape {shape!r:.60}; expected a tuple of ints >= 0')
  count = math.prod(shape)
  if dtype.hasobject:
    ok = dtype.kind == 'O' and isinstance(data, list) and len(data) == count
  else:
    ok = isinstance(data, (bytes, str)) and len(data) == count * dtype.itemsize
  if not ok:
    raise pickle.UnpicklingError(
      f'numpy array of shape {shape} and dtype {dtype} with {type(data).__name__} data of {len(data)} items or bytes'
      if hasattr(data, '__len__')
      else f'numpy array data is a {type(data).__name__}'
    )


class _ChunkedReads:
  """A binary file whose large reads go chunk by chunk: a corrupt length makes the unpickler read what the file
  holds instead of allocating the length first."""

  def __init__(self, file):
    self._file = file

  def read(self, n: int = -1) -> bytes:
    if n is None or n < 0 or n <= _CHUNK:
      return self._file.read(n)
    parts = []
    while n > 0:
      part = self._file.read(min(n, _CHUNK))
      if not part:
        break
      parts.append(part)
      n -= len(part)
    return b''.join(parts)

  def readline(self, *args) -> bytes:
    return self._file.readline(*args)


def _load_bytearray8(self):
  (size,) = struct.unpack('<Q', self.read(8))
  data = self.read(size)  # chunked: never more than the pickle holds
  if len(data) != size:
    raise pickle.UnpicklingError(f'BYTEARRAY8 of {size} bytes runs past the end of the pickle')
  self.append(bytearray(data))


class AllowListUnpickler(pickle._Unpickler):  # pylint: disable=protected-access  (pure Python: see the module doc)
  """Resolves a global only if (module, name) is in `allowed` (or, with `numpy_values`, is numpy's scalar /
  array reconstructor); anything else raises RefusedPickleError naming it.

  Args:
    file: the binary stream.
    allowed: {(module, name): the object to return}.
    refusal: what the message says is read, e.g. 'only a pickled vocab.Vocabulary is read'.
    where: the file (and field) named first in the message, if given.
    numpy_values: also allow numpy's pickled scalars and arrays.
    persistent_load: the callable for persistent ids (PyTorch storages), if the format has them.
    encoding: for Python 2 byte strings.
  """

  dispatch = dict(pickle._Unpickler.dispatch)  # pylint: disable=protected-access

  def __init__(
    self,
    file,
    allowed: dict,
    refusal: str,
    where: str = '',
    numpy_values: bool = False,
    persistent_load: Optional[Callable[[Any], Any]] = None,
    encoding: str = 'ASCII',
  ):
    super().__init__(_ChunkedReads(file), encoding=encoding)
    self._allowed, self._refusal, self._where, self._numpy = allowed, refusal, where, numpy_values
    self._persistent = persistent_load

  def _prefix(self) -> str:
    return f'{self._where}: ' if self._where else ''

  def load(self) -> Any:
    try:
      return super().load()
    except RefusedPickleError as e:  # raised by a numpy stand-in, which does not know the file
      if self._where and not str(e).startswith(self._prefix()):
        raise RefusedPickleError(f'{self._prefix()}{e}') from None
      raise

  def find_class(self, module: str, name: str) -> Any:
    if self._numpy and (module, name) in _NUMPY_MULTIARRAY:
      return _NUMPY_MULTIARRAY[(module, name)]
    target = self._allowed.get((module, name))
    if target is None:
      raise RefusedPickleError(f'{self._prefix()}refusing to load global {module}.{name}: {self._refusal}')
    return target

  def persistent_load(self, pid):
    if self._persistent is None:
      raise RefusedPickleError(f'{self._prefix()}unexpected persistent id {pid!r:.80}')
    return self._persistent(pid)

  def load_build(self):
    """BUILD sets the state of a new object only; numpy dtypes and arrays get only states numpy writes."""
    state, inst = self.stack[-1], self.stack[-2]
    allowed = list(self._allowed.values()) + (list(_NUMPY_MULTIARRAY.values()) if self._numpy else [])
    if isinstance(inst, type) or any(inst is a for a in allowed):
      raise RefusedPickleError(f'{self._prefix()}refusing to set the state of global {inst!r:.60}')
    if isinstance(inst, np.dtype):
      _check_dtype_state(inst, state)
    elif isinstance(inst, np.ndarray):
      _check_array_state(inst, state)
    super().load_build()

  dispatch[pickle.BUILD[0]] = load_build
  dispatch[pickle.BYTEARRAY8[0]] = _load_bytearray8
