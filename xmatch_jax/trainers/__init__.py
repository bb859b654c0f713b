"""Trainers, peers chosen by `config.trainer`: 'contrastive' (the hinge loss over each batch's B x B scores: SCAN,
VSE++, RDAN, MMCA, GLFN) and 'staged' (DAER's Algorithm 1). Both run on trainers/loop.py and trainers/optim.py."""

import ml_collections

from xmatch_jax import errors
from xmatch_jax import workdirs
from xmatch_jax.trainers import contrastive
from xmatch_jax.trainers import staged

TRAINERS = {'contrastive': contrastive.train_and_evaluate, 'staged': staged.train_and_evaluate}


def trainer_name(config: ml_collections.ConfigDict) -> str:
  """config.trainer; configs written before the field existed are staged exactly when they have stages."""
  return config.get('trainer') or ('staged' if 'stages' in config else 'contrastive')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains `config` into `workdir` (resuming if it has a checkpoint) with its trainer; returns the last dev metrics.
  A second run into a workdir in use is refused (workdirs.run_lock)."""
  name = trainer_name(config)
  if name not in TRAINERS:
    raise errors.UserError(f'config.trainer = {name!r}; expected one of {sorted(TRAINERS)}.')
  with workdirs.run_lock(workdir):
    return TRAINERS[name](config, workdir)
