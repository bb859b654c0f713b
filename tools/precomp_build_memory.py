"""Peak memory of building `xmatch_precomp` from a large manual dir (can COCO's ~17 GB train split be built?).

  python tools/precomp_build_memory.py --images=20000 --dir=/tmp/precomp_mem      # 5.9 GB of train features

Writes a synthetic SCAN precomp manual dir (`train_ims.npy` [images, 36, 2048] float32 written chunk by chunk
through a memory map, small dev / test splits, 5 captions per image), then builds it (config `custom`) in a child
process while sampling the child's /proc/<pid>/status every 0.1 s:
  RssAnon  heap and buffers: the memory the build needs;
  RssFile  pages of the memory-mapped input (and written files) that the kernel keeps mapped while memory is free;
           reclaimable under pressure, so not a requirement;
  VmHWM    the peak of both together, as the kernel counted it.
Afterwards it checks the built train split (image count, first and last image equal to the input) and deletes the
directory unless --keep. Linux only (/proc). --json writes the figures.
"""

import os
import shutil
import subprocess
import sys
import time

from absl import flags
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from xmatch_jax import cli
from xmatch_jax.data import precomp  # pylint: disable=g-import-not-at-top

_CHUNK_BYTES = 256 << 20
_BUILD = 'import sys; from xmatch_jax.data import precomp; precomp.build("custom", sys.argv[1], sys.argv[2])'


def write_features(path: str, n: int, regions: int, dim: int, rng: np.random.Generator) -> int:
  """Random [n, regions, dim] float32 features in [0, 1) written to the .npy file `path` through a memory map,
  _CHUNK_BYTES at a time (memory stays bounded whatever n); returns the features' bytes."""
  ims = np.lib.format.open_memmap(path, mode='w+', dtype=np.float32, shape=(n, regions, dim))
  step = max(1, _CHUNK_BYTES // (regions * dim * 4))
  for start in range(0, n, step):
    ims[start : start + step] = rng.random((min(step, n - start), regions, dim), dtype=np.float32)
  ims.flush()
  del ims
  return n * regions * dim * 4


def write_manual_dir(manual: str, images: int, regions: int, dim: int, seed: int = 0) -> int:
  """SCAN precomp files for splits train (`images`), dev and test (5 each); returns the train features' bytes."""
  os.makedirs(manual, exist_ok=True)
  rng = np.random.default_rng(seed)
  for split, n in (('train', images), ('dev', 5), ('test', 5)):
    write_features(os.path.join(manual, f'{split}_ims.npy'), n, regions, dim, rng)
    with open(os.path.join(manual, f'{split}_caps.txt'), 'w') as f:
      f.writelines(f'a synthetic caption {c} of image {c // 5}\n' for c in range(5 * n))
  return images * regions * dim * 4


def _status_kb(pid: int) -> dict:
  out = {}
  try:
    with open(f'/proc/{pid}/status') as f:
      for line in f:
        key, _, value = line.partition(':')
        if key in ('RssAnon', 'RssFile', 'VmHWM'):
          out[key] = int(value.split()[0])
  except (FileNotFoundError, ProcessLookupError):
    pass
  return out


def build_and_sample(manual: str, data_dir: str, interval: float = 0.1) -> dict:
  """Builds in a child process; returns peak RssAnon / RssFile / VmHWM (bytes) and the wall time."""
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  start = time.time()
  child = subprocess.Popen(
    [sys.executable, '-c', _BUILD, manual, data_dir],
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  peaks = {'RssAnon': 0, 'RssFile': 0, 'VmHWM': 0}
  while child.poll() is None:
    for key, kb in _status_kb(child.pid).items():
      peaks[key] = max(peaks[key], kb)
    time.sleep(interval)
  stderr = child.stderr.read()
  if child.returncode:
    raise RuntimeError(f'the build failed (exit {child.returncode}):\n{stderr[-3000:]}')
  return {
    'peak_anon_bytes': peaks['RssAnon'] * 1024,
    'peak_file_bytes': peaks['RssFile'] * 1024,
    'peak_rss_bytes': peaks['VmHWM'] * 1024,
    'build_seconds': time.time() - start,
  }


def check_build(manual: str, data_dir: str, images: int) -> None:
  source = precomp.XmatchPrecomp(config='custom', data_dir=data_dir, file_format='array_record').as_data_source('train')
  expected = np.load(os.path.join(manual, 'train_ims.npy'), mmap_mode='r')
  if len(source) != images:
    raise AssertionError(f'built train split has {len(source)} images; expected {images}')
  for i in (0, images - 1):
    if not np.array_equal(source[i]['regions'], expected[i]):
      raise AssertionError(f'built train image {i} differs from train_ims.npy row {i}')


FLAGS = flags.FlagValues()
flags.DEFINE_integer('images', 20000, 'train images (COCO train: 113,287)', flag_values=FLAGS)
flags.DEFINE_integer('regions', 36, 'regions per image', flag_values=FLAGS)
flags.DEFINE_integer('dim', 2048, 'feature dimension', flag_values=FLAGS)
flags.DEFINE_string('dir', None, 'scratch directory (manual dir and TFDS data dir go inside)', flag_values=FLAGS)
flags.DEFINE_boolean('keep', False, 'keep the scratch directory', flag_values=FLAGS)
flags.DEFINE_string('json', '', 'also write the figures here', flag_values=FLAGS)


def main(argv=None) -> int:
  cli.parse_flags(FLAGS, argv, __doc__, required=('dir',))
  if FLAGS.images < 1 or FLAGS.regions < 1 or FLAGS.dim < 1:
    cli.usage_error('--images, --regions and --dim must be >= 1')
  if not os.path.exists('/proc/self/status'):
    cli.usage_error("needs Linux /proc to sample the build's memory")
  if os.path.exists(FLAGS.dir) and os.listdir(FLAGS.dir):
    cli.usage_error(f'--dir {FLAGS.dir} is not empty; give a new scratch directory (it is deleted afterwards)')
  manual, data_dir = os.path.join(FLAGS.dir, 'manual'), os.path.join(FLAGS.dir, 'tfds')
  try:
    input_bytes = write_manual_dir(manual, FLAGS.images, FLAGS.regions, FLAGS.dim)
    result = {
      'images': FLAGS.images,
      'regions': FLAGS.regions,
      'dim': FLAGS.dim,
      'input_bytes': input_bytes,
      **build_and_sample(manual, data_dir),
    }
    check_build(manual, data_dir, FLAGS.images)
  finally:
    if not FLAGS.keep:
      shutil.rmtree(FLAGS.dir, ignore_errors=True)
  gb = lambda b: f'{b / 2**30:.2f} GiB'
  print(
    f'train features {gb(result["input_bytes"])} ({FLAGS.images} x {FLAGS.regions} x {FLAGS.dim} float32); build '
    f'{result["build_seconds"]:.0f} s; peak RssAnon {gb(result["peak_anon_bytes"])}, peak RssFile '
    f'{gb(result["peak_file_bytes"])}, VmHWM {gb(result["peak_rss_bytes"])}; built split checked'
  )
  cli.write_json(FLAGS.json, result)
  return 0


if __name__ == '__main__':
  sys.exit(cli.run_tool(main))
