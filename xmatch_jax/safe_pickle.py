"""The package's one unpickler: it builds only the globals its caller allows, so no pickled code ever runs.

Callers pass their allow-list: PyTorch checkpoints (convert/torch_pickle.py), VSE++'s pickled vocabularies
(data/vocab.py) and the object arrays of bottom-up-attention .npz files (tools/convert_features.py).
"""

import codecs
import importlib
import pickle
from typing import Any
from typing import Callable
from typing import Optional

import numpy as np

# Plain numpy values: arrays, dtypes, and the latin-1 text numpy scalars pickled by Python 3 carry.
NUMPY_VALUES = {('numpy', 'ndarray'): np.ndarray, ('numpy', 'dtype'): np.dtype, ('_codecs', 'encode'): codecs.encode}
# numpy's pickled scalars and arrays; numpy 2 renamed numpy.core to numpy._core.
_NUMPY_MULTIARRAY = {
  (m, n) for m in ('numpy.core.multiarray', 'numpy._core.multiarray') for n in ('scalar', '_reconstruct')
}


def _multiarray():
  try:
    return importlib.import_module('numpy._core.multiarray')
  except ImportError:
    return importlib.import_module('numpy.core.multiarray')


class AllowListUnpickler(pickle.Unpickler):
  """Resolves a global only if (module, name) is in `allowed` (or, with `numpy_values`, is numpy's scalar /
  array reconstructor); anything else raises pickle.UnpicklingError naming it.

  Args:
    file: the binary stream.
    allowed: {(module, name): the object to return}.
    refusal: what the message says is read, e.g. 'only a pickled vocab.Vocabulary is read'.
    where: the file (and field) named first in the message, if given.
    numpy_values: also allow numpy's pickled scalars and arrays.
    persistent_load: the callable for persistent ids (PyTorch storages), if the format has them.
    encoding: for Python 2 byte strings.
  """

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
    super().__init__(file, encoding=encoding)
    self._allowed, self._refusal, self._where, self._numpy = allowed, refusal, where, numpy_values
    self._persistent = persistent_load

  def find_class(self, module: str, name: str) -> Any:
    if self._numpy and (module, name) in _NUMPY_MULTIARRAY:
      return getattr(_multiarray(), name)
    target = self._allowed.get((module, name))
    if target is None:
      prefix = f'{self._where}: ' if self._where else ''
      raise pickle.UnpicklingError(f'{prefix}refusing to load global {module}.{name}: {self._refusal}')
    return target

  def persistent_load(self, pid):
    if self._persistent is None:
      raise pickle.UnpicklingError(f'{self._where}: unexpected persistent id {pid!r:.80}')
    return self._persistent(pid)
