"""Image fields read from disk on demand: `LazyRows` stands in for a stacked [N, ...] array that does not fit in RAM.

A split of SCAN precomp features is an array_record dataset (data/precomp.py);
`LazyRows(RowReader(source, where), field, row_shape, dtype)` exposes one field of it (e.g. `regions` [N, 36, 2048]
float32) with `shape`, `dtype`, `ndim`, `len()` and row indexing (`x[i]`, `x[a:b]`, `x[index_array]`), which is all
the training batcher and the chunked encoders use. Each read returns a numpy array of only the rows asked for; values
are checked as they are read (row shape, dtype, finite floats) and errors name the dataset, split, field and row.
A shard damaged since the split was loaded (truncated, corrupt record, gone) stops the read with
`array_record.CorruptDatasetError` naming the shard and the directory to delete: the loader gives a checked source
(`builder.open_split`), and RowReader wraps a plain TFDS array_record source in one.

`np.asarray(x)` reads every row, with a warning (code that still converts a whole field, e.g. GLFN's prepare_images,
keeps working where the field fits in memory); above `materialize_limit()` it is refused with a message instead of
exhausting memory.
"""

import os
import warnings

import numpy as np

from xmatch_jax import errors
from xmatch_jax import progress

# np.asarray of a LazyRows larger than this many bytes is refused; None: half the machine's physical memory (cgroup
# limits are not looked at).
MATERIALIZE_LIMIT_BYTES = None
# Rows decoded per source call (bounds the decoded examples held at once: 128 COCO rows are ~38 MB); a read of at most
# this many rows is kept for the next field of the same rows.
READ_CHUNK = 128
# Rows per call when scanning a whole split (e.g. for its captions).
SCAN_CHUNK = 32


def materialize_limit() -> int | None:
  """MATERIALIZE_LIMIT_BYTES, else half the physical memory; None when that is unknown (no limit)."""
  if MATERIALIZE_LIMIT_BYTES is not None:
    return MATERIALIZE_LIMIT_BYTES
  try:
    return os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') // 2
  except (AttributeError, ValueError, OSError):
    return None


def is_lazy(value) -> bool:
  """True for row-indexable arrays that are not in memory (LazyRows, h5py datasets ...): they have `shape`,
  `__len__` and `__getitem__` but are neither numpy arrays nor in-memory arrays of another library (jax, torch:
  those have `__dlpack__`)."""
  return (
    not isinstance(value, np.ndarray)
    and not hasattr(value, '__dlpack__')
    and all(hasattr(value, a) for a in ('shape', '__len__', '__getitem__'))
  )


def take_rows(value, index: np.ndarray) -> np.ndarray:
  """value[index] for an in-memory or lazy array; a lazy one is read once per distinct row, in increasing row
  order (what disk-backed sources prefer; h5py requires it), then put back in the order of `index`.

  index: integer array of any shape -> [*index.shape, *value.shape[1:]].
  """
  if not is_lazy(value) or isinstance(value, LazyRows):  # LazyRows reads that way itself
    return value[index]
  index = np.asarray(index)
  unique, inverse = np.unique(index.reshape(-1), return_inverse=True)
  rows = np.asarray(value[unique])
  if unique.size != index.size or (unique.size and not np.array_equal(unique, index.reshape(-1))):
    rows = rows[inverse]
  return rows.reshape(index.shape + rows.shape[1:])


def _is_tfds_array_record_source(source) -> bool:
  """A TFDS ArrayRecordDataSource (checked without importing tfds, which such a source has loaded)."""
  return type(source).__module__.startswith('tensorflow_datasets.') and all(
    hasattr(source, a) for a in ('dataset_info', 'data_source', 'split')
  )


class RowReader:
  """Random access to the examples of one split (a TFDS `as_data_source(split)` object or any sequence of example
  dicts), shared by the LazyRows of its fields: the last read of <= READ_CHUNK rows is kept, so the fields of one
  batch (`regions`, `pfan_blocks`, ...) decode each example once.

  Each distinct row is read once, one `source[i]` at a time, in increasing order. TFDS >= 4.9 sources also have
  `__getitems__` (array_record reads the rows of each shard in a thread, a new pool of up to 64 threads per call); with
  use_getitems=True it is used, but on a 200 MB split it read 128 rows 4x slower than the loop (0.37 s vs 0.09 s,
  on 2 busy cores) and left ~70 MB more resident memory (per-thread malloc arenas).
  """

  def __init__(self, source, where: str, use_getitems: bool = False):
    """source: len(source) = N, source[i] -> example dict; where: e.g. 'dataset xmatch_precomp/coco split train',
    named in every error. A TFDS array_record source (`as_data_source(split)`) is read through
    `array_record.CheckedSource`, so that a damaged shard is an error naming it, not Riegeli's RuntimeError."""
    if _is_tfds_array_record_source(source):
      from xmatch_jax.data import array_record  # pylint: disable=g-import-not-at-top (imports tfds, loaded already)

      source = array_record.CheckedSource(source)
    self.source = source
    self.where = where
    self.use_getitems = use_getitems and hasattr(source, '__getitems__')
    self._len = len(source)
    self._cache = (None, None)  # (row tuple, examples)

  def __len__(self) -> int:
    return self._len

  def read(self, rows: np.ndarray, cache: bool = True) -> list:
    """rows: 1-D int array, each in [0, N) -> the examples in that order (each distinct row read once, in increasing
    order); cache: keep them for the next call."""
    key = tuple(int(r) for r in rows)
    if self._cache[0] == key:
      return self._cache[1]
    self._cache = (None, None)
    unique, inverse = np.unique(np.asarray(key, np.int64), return_inverse=True)
    if self.use_getitems and unique.size:
      examples = list(self.source.__getitems__(unique.tolist()))
    else:
      examples = [self.source[r] for r in unique.tolist()]
    if len(examples) != unique.size:
      raise IndexError(f'{self.where}: asked for {unique.size} rows, the source returned {len(examples)}.')
    out = [examples[j] for j in inverse.reshape(-1)]
    if cache:
      self._cache = (key, out)
    return out


class LazyRows:
  """One field of a split, [N, *row_shape] `dtype`, read from a RowReader row by row on indexing.

  Indexing (on the leading axis only): an int -> [*row_shape]; a slice, an integer array of any shape or a boolean
  mask [N] -> [*index_shape, *row_shape]. Negative indices count from the end; out-of-range ones raise IndexError.
  """

  def __init__(self, reader: RowReader, field: str, row_shape: tuple, dtype, check_finite: bool | None = None):
    """reader: the split's rows; field: the example key; row_shape, dtype: what every row must be (checked on read);
    check_finite: refuse NaN / inf on read (default: for float dtypes)."""
    self.reader = reader
    self.field = field
    self.row_shape = tuple(int(s) for s in row_shape)
    self.dtype = np.dtype(dtype)
    self.check_finite = np.issubdtype(self.dtype, np.floating) if check_finite is None else bool(check_finite)

  @property
  def shape(self) -> tuple:
    return (len(self.reader),) + self.row_shape

  @property
  def ndim(self) -> int:
    return 1 + len(self.row_shape)

  @property
  def size(self) -> int:
    return int(np.prod(self.shape))

  @property
  def nbytes(self) -> int:
    return self.size * self.dtype.itemsize

  def __len__(self) -> int:
    return len(self.reader)

  def __repr__(self) -> str:
    return f'LazyRows({self.reader.where}, field {self.field!r}, shape {self.shape}, dtype {self.dtype})'

  def _rows(self, key) -> np.ndarray:
    """Key -> integer row array (any shape), bounds-checked and made non-negative."""
    n = len(self)
    if isinstance(key, slice):
      return np.arange(*key.indices(n))
    index = np.asarray(key)
    if index.dtype == bool:
      if index.shape != (n,):
        raise IndexError(
          f'{self.reader.where}: boolean index of field "{self.field}" has shape {index.shape}; expected ({n},).'
        )
      return np.flatnonzero(index)
    if index.size == 0:
      return index.astype(np.int64)  # e.g. [] -> no rows
    if not np.issubdtype(index.dtype, np.integer):
      raise IndexError(
        f'{self.reader.where}: field "{self.field}" is indexed by row only (an int, a slice or an '
        f'integer array); got {type(key).__name__} of dtype {index.dtype}.'
      )
    bad = (index < -n) | (index >= n)
    if bad.any():
      raise IndexError(
        f'{self.reader.where}: row {int(index[bad].reshape(-1)[0])} of field "{self.field}" is out '
        f'of range; the split has {n} rows (valid: -{n} .. {n - 1}).'
      )
    return np.where(index < 0, index + n, index)

  def __getitem__(self, key) -> np.ndarray:
    if isinstance(key, tuple):
      raise IndexError(
        f'{self.reader.where}: field "{self.field}" is indexed by row only; got a tuple key {key!r} '
        '(index the rows first, then the returned numpy array).'
      )
    scalar = isinstance(key, (int, np.integer))
    rows = self._rows(key)
    flat = rows.reshape(-1)
    out = np.empty((flat.size,) + self.row_shape, self.dtype)
    for start in range(0, flat.size, READ_CHUNK):  # bounds the decoded examples held at once
      part = flat[start : start + READ_CHUNK]
      for j, (row, example) in enumerate(zip(part, self.reader.read(part, cache=flat.size <= READ_CHUNK))):
        out[start + j] = self._check(example, int(row))
    return out[0] if scalar else out.reshape(rows.shape + self.row_shape)

  def _check(self, example: dict, row: int) -> np.ndarray:
    where = f'{self.reader.where}: field "{self.field}" row {row}'
    if self.field not in example:
      raise KeyError(f'{where}: missing from the example; it has fields {sorted(example)}.')
    value = np.asarray(example[self.field])
    if value.shape != self.row_shape:
      raise errors.UserError(f'{where}: shape {value.shape}; expected {self.row_shape} like the other rows.')
    if value.dtype != self.dtype:
      raise errors.UserError(f'{where}: dtype {value.dtype}; expected {self.dtype}.')
    if self.check_finite and not np.isfinite(value).all():
      raise errors.UserError(f'{where}: holds NaN or inf; features must be finite.')
    return value

  def __array__(self, dtype=None, copy=None):
    if copy is False:
      raise errors.UserError(f'{self!r}: an array without copying is impossible; its rows are on disk.')
    limit = materialize_limit()
    if limit is not None and self.nbytes > limit:
      raise MemoryError(
        f'{self!r}: np.asarray would read all {len(self)} rows ({self.nbytes / 2**30:.1f} GiB) '
        f'into memory, above the limit of {limit / 2**30:.1f} GiB '
        '(xmatch_jax.data.lazy.MATERIALIZE_LIMIT_BYTES, default half the physical memory); index '
        'rows instead (x[i:j], x[rows]).'
      )
    warnings.warn(
      f'{self!r}: np.asarray reads all {len(self)} rows ({self.nbytes / 2**20:.0f} MiB) into memory; '
      'index rows instead (x[i:j], x[rows]) to keep the field on disk.',
      stacklevel=2,
    )
    out = np.empty(self.shape, self.dtype)
    with progress.bar(total=len(self), desc=f'reading {self.reader.where} field {self.field}', unit='row') as bar:
      for start in range(0, len(self), READ_CHUNK):  # self[:], a chunk at a time to count the rows read
        part = self[start : start + READ_CHUNK]
        out[start : start + len(part)] = part
        bar.update(len(part))
    return out if dtype is None else out.astype(dtype, copy=False)
