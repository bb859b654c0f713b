"""Where datasets are built and read: $XMATCH_DATA_DIR, else ~/.cache/xmatch_jax/tfds."""

import os


def default_data_dir() -> str:
  return os.environ.get('XMATCH_DATA_DIR') or os.path.join(os.path.expanduser('~'), '.cache', 'xmatch_jax', 'tfds')
