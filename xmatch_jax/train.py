"""Training: `python -m xmatch_jax.train --config=configs/scan.py:shapes --workdir=W [--config.key=value ...]`.

Runs the config's trainer (xmatch_jax/trainers: 'contrastive' or DAER's 'staged'), resuming from W's latest
checkpoint. Writes W/config.json, the vocabulary, W/metrics.jsonl, TensorBoard logs in W/tb, checkpoints in
W/checkpoints (latest) and W/best (best dev score). Several processes (hosts): add `--coordinator=host:port
--num_processes=N --process_id=i` to each, or run under srun (SLURM is detected); see launch/. Each process loads
its rows of every batch; process 0 writes the logs.
"""

import sys

from absl import app
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from xmatch_jax import cli
from xmatch_jax import parallel
from xmatch_jax import run_setup
from xmatch_jax import trainers
from xmatch_jax.trainers import loop


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
  parallel.initialize_from_flags()
  print(parallel.topology(), flush=True)
  try:
    with parallel.lost_process_stops_this_one():
      trainers.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
  except FloatingPointError as e:
    raise SystemExit(f'error: {e}') from e
  except loop.Interrupted as e:
    print(e, flush=True)
    sys.exit(128 + e.signum)  # the shell convention for "ended by this signal", after a clean save


if __name__ == '__main__':
  # Flags are defined here, not at import, so train and evaluate can be imported together.
  config_flags.DEFINE_config_file('config', None, 'Model config file, e.g. configs/scan.py:shapes.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, logs, eval).')
  parallel.define_flags()
  flags.adopt_module_key_flags(parallel)  # listed by --helpshort
  flags.mark_flags_as_required(['config', 'workdir'])
  with cli.user_errors():
    run_setup.check_config_overrides(sys.argv[1:])
  cli.run_absl(main)
