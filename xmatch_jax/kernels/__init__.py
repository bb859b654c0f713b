"""CPU kernels compiled on first use and registered with XLA as FFI targets.

XLA:CPU runs RDAN's small-channel relation convolutions far below the machine's matmul rate
(docs/architecture.md, "RDAN's relation CNN kernel"); `relation_cnn.c` runs them per pair in cache. It
is compiled here with the machine's C compiler (`$CC`, else `cc` / `gcc`) for this CPU
(`-march=native`) against jaxlib's FFI headers, once per channel count, into
`$XMATCH_KERNEL_DIR` (default `~/.cache/xmatch_jax/kernels`), keyed by the source, the flags, jax's
version and the CPU, so a home directory shared by different machines gets one build per CPU. Without a
compiler, or with `XMATCH_KERNELS=0`, `relation_cnn_target` returns None and callers use their XLA path
(same values to float32 rounding).
"""

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
from typing import Optional

import jax

_SOURCE = pathlib.Path(__file__).with_name('relation_cnn.c')
_FLAGS = ('-O3', '-march=native', '-shared', '-fPIC', '-std=gnu11')
_log = logging.getLogger(__name__)


def kernel_dir() -> pathlib.Path:
  """Where compiled kernels are kept: $XMATCH_KERNEL_DIR or ~/.cache/xmatch_jax/kernels."""
  default = pathlib.Path.home() / '.cache' / 'xmatch_jax' / 'kernels'
  return pathlib.Path(os.environ.get('XMATCH_KERNEL_DIR', default))


def _compiler() -> Optional[str]:
  names = [os.environ['CC']] if os.environ.get('CC') else ['cc', 'gcc']
  for name in names:
    path = shutil.which(name)
    if path:
      return path
  return None


def _cpu_id() -> str:
  """The CPU's model and feature flags (what -march=native compiles for)."""
  try:
    lines = pathlib.Path('/proc/cpuinfo').read_text().splitlines()
  except OSError:
    return platform.machine() + platform.processor()
  keep = [line for line in lines if line.startswith(('model name', 'flags', 'Features', 'CPU part'))]
  return '\n'.join(sorted(set(keep)))


def _build(compiler: str, channels: int) -> pathlib.Path:
  """Compiles relation_cnn.c for `channels` (cached); raises RuntimeError with the compiler's message."""
  flags = _FLAGS + (f'-DCHANNELS={channels}', f'-I{jax.ffi.include_dir()}')
  key = hashlib.sha256(
    '\0'.join([_SOURCE.read_text(), ' '.join(flags), compiler, jax.__version__, _cpu_id()]).encode()
  ).hexdigest()[:20]
  target = kernel_dir() / f'relation_cnn_c{channels}_{key}.so'
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  # Compile beside the target and rename: processes building at once each write their own file.
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=target.parent)
  os.close(fd)
  try:
    result = subprocess.run([compiler, *flags, str(_SOURCE), '-o', tmp], capture_output=True, text=True)
    if result.returncode != 0:
      first = (result.stderr.strip().splitlines() or ['no message'])[0]
      raise RuntimeError(f'{compiler} failed on {_SOURCE.name}: {first}')
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return target


@functools.cache
def relation_cnn_target(channels: int) -> Optional[str]:
  """The FFI target name of the relation CNN kernel for `channels`, or None when it is not available.

  Available for a power-of-two channel count from 4 to 128 on a machine with a C compiler, unless
  XMATCH_KERNELS=0. A failed build is logged once (warning) and the caller falls back to XLA.
  """
  if os.environ.get('XMATCH_KERNELS', '1') == '0' or channels < 4 or channels > 128 or channels & (channels - 1):
    return None
  compiler = _compiler()
  if compiler is None:
    _log.info('no C compiler found ($CC, cc, gcc): RDAN relation CNN runs on XLA')
    return None
  try:
    library = ctypes.CDLL(str(_build(compiler, channels)))
  except (RuntimeError, OSError) as exc:
    _log.warning('relation CNN kernel unavailable, using XLA: %s', exc)
    return None
  name = f'xmatch_relation_cnn_c{channels}'
  if name not in _REGISTERED:  # a target is registered once per process (the cache can be cleared)
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(library.RelationCnn), platform='cpu')
    _REGISTERED[name] = library  # the handler must outlive every compiled program that calls it
  return name


_REGISTERED: dict = {}
