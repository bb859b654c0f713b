"""A run's saved config as a config file: `--config=configs/from_json.py:W/config.json` trains again with exactly
the config of workdir (or bundle) W, e.g. with another seed (`--config.seed=1`) or into a new workdir.

The `data_info` that training adds to config.json (what the model was built for) is dropped: the new run
measures its data again. Earlier versions' field names are upgraded as when W itself is loaded.
"""

import os

import ml_collections

from xmatch_jax import workdirs


def get_config(path: str = '') -> ml_collections.ConfigDict:
  if not path:
    raise ValueError('configs/from_json.py needs the path of a config.json after ":" (e.g. runs/scan/config.json)')
  if os.path.basename(path) != workdirs.CONFIG_FILE:
    raise ValueError(f'configs/from_json.py:{path}: expected a path ending in {workdirs.CONFIG_FILE}')
  config = workdirs.load_config(os.path.dirname(path) or '.')
  if 'data_info' in config:
    with config.unlocked():
      del config['data_info']
  return config
