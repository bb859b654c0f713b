"""Size checks of .npz files before numpy reads them (a corrupt header would make numpy allocate any amount)."""

import math
import os
import zipfile

import numpy as np

from xmatch_jax import errors


def check_sizes(path: str, archive: zipfile.ZipFile) -> None:
  """Every array of an .npz must fit in its member, and every member in the file: numpy allocates the shape a .npy
  header claims before reading it, so a corrupt header or zip size would allocate any amount."""
  size = os.path.getsize(path)
  for info in archive.infolist():
    if info.compress_size > size or info.file_size > max(info.compress_size, 1) * (
      1 if info.compress_type == zipfile.ZIP_STORED else 1032  # deflate expands at most 1032-fold
    ):
      raise errors.UserError(f'{path}: member {info.filename} claims {info.file_size} bytes in a file of {size}')
    with archive.open(info) as f:
      version = np.lib.format.read_magic(f)
      read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
      shape, _, dtype = read_header(f)
      if math.prod(shape) * dtype.itemsize > info.file_size:
        raise errors.UserError(
          f'{path}: field {info.filename[: -len(".npy")]} claims shape {shape} of {dtype} in a member of '
          f'{info.file_size} bytes'
        )
