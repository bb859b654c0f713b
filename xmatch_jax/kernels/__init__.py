"""CPU kernels compiled on first use and registered with XLA as FFI targets.

XLA:CPU runs RDAN's small-channel relation convolutions and MMCA's per-pair attention over 16-dimensional
heads far below the machine's matmul rate (docs/architecture.md, "Compiled CPU kernels"); `relation_cnn.c`
and `mmca_attention.c` run them per pair in cache. Each is compiled here with the machine's C compiler
(`$CC`, else `cc` / `gcc`) for this CPU (`-march=native`) against jaxlib's FFI headers, once per size
(channel count, head width), into `$XMATCH_KERNEL_DIR` (default `~/.cache/xmatch_jax/kernels`), keyed by the
sources, the flags, jax's version and the CPU, so a home directory shared by different machines gets one
build per CPU. `$XMATCH_KERNEL_MARCH` replaces `native` (e.g. `x86-64-v3`: AVX2 without AVX-512; the tests
build that way to run the AVX2 code paths). Without a compiler, or with `XMATCH_KERNELS=0`, the `*_target`
functions return None and callers use their XLA path (same values to float32 rounding).
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

_HERE = pathlib.Path(__file__).parent
_FLAGS = ('-O3', '-shared', '-fPIC', '-std=gnu11')
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


def _headers() -> str:
  """The text of the headers the kernels include (part of every build's cache key)."""
  return '\0'.join(path.read_text() for path in sorted(_HERE.glob('*.h')))


def _build(compiler: str, source: pathlib.Path, define: str, value: int) -> pathlib.Path:
  """Compiles `source` with -D<define>=<value> (cached); raises RuntimeError with the compiler's message."""
  march = os.environ.get('XMATCH_KERNEL_MARCH', 'native')
  flags = _FLAGS + (f'-march={march}', f'-D{define}={value}', f'-I{jax.ffi.include_dir()}', f'-I{_HERE}')
  key = hashlib.sha256(
    '\0'.join([source.read_text(), _headers(), ' '.join(flags), compiler, jax.__version__, _cpu_id()]).encode()
  ).hexdigest()[:20]
  target = kernel_dir() / f'{source.stem}_{define.lower()}{value}_{key}.so'
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  # Compile beside the target and rename: processes building at once each write their own file.
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=target.parent)
  os.close(fd)
  try:
    result = subprocess.run([compiler, *flags, str(source), '-o', tmp], capture_output=True, text=True)
    if result.returncode != 0:
      first = (result.stderr.strip().splitlines() or ['no message'])[0]
      raise RuntimeError(f'{compiler} failed on {source.name}: {first}')
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return target


def _target(source: str, define: str, value: int, largest: int, handlers: tuple) -> Optional[dict]:
  """Builds and registers `source`'s `handlers` for -D<define>=<value>: {handler: FFI target name}, or None when
  `value` is not a power of two from 4 to `largest` (the sizes the kernels are written for) or no build runs."""
  if value < 4 or value > largest or value & (value - 1) or os.environ.get('XMATCH_KERNELS', '1') == '0':
    return None
  compiler = _compiler()
  if compiler is None:
    _log.info('no C compiler found ($CC, cc, gcc): %s runs on XLA', source)
    return None
  try:
    path = _build(compiler, _HERE / source, define, value)
    library = ctypes.CDLL(str(path))
  except (RuntimeError, OSError) as exc:
    _log.warning('%s kernel unavailable, using XLA: %s', source, exc)
    return None
  names = {}
  for handler in handlers:
    name = f'xmatch_{handler}_{path.stem}'  # one per build (size, flags, CPU)
    if name not in _REGISTERED:  # a target is registered once per process (the caches can be cleared)
      jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, handler)), platform='cpu')
      _REGISTERED[name] = library  # the handler must outlive every compiled program that calls it
    names[handler] = name
  return names


@functools.cache
def relation_cnn_targets(channels: int) -> Optional[dict]:
  """FFI target names of RDAN's relation CNN kernel for `channels`: {'RelationCnn': the maps, 'RdanScores': the
  pair scores of eqs 7-11 from them, 'RelationCnnGrad': the maps' backward pass}, or None when it is not available.

  Available for a power-of-two channel count from 4 to 128 on a machine with a C compiler, unless
  XMATCH_KERNELS=0. A failed build is logged once (warning) and the caller falls back to XLA.
  """
  return _target('relation_cnn.c', 'CHANNELS', channels, 128, ('RelationCnn', 'RdanScores', 'RelationCnnGrad'))


@functools.cache
def mmca_attention_targets(head_dim: int) -> Optional[dict]:
  """FFI target names of MMCA's cross-attention kernel for heads of `head_dim` (a power of two from 4 to 64):
  {'MmcaCrossImageMajor': ..., 'MmcaCrossTextMajor': ...}, or None when it is not available (as above)."""
  return _target('mmca_attention.c', 'HEAD_DIM', head_dim, 64, ('MmcaCrossImageMajor', 'MmcaCrossTextMajor'))


_REGISTERED: dict = {}
