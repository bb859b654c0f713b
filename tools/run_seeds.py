"""Trains and evaluates one config with several seeds and reports the mean and standard deviation of every metric.

  python tools/run_seeds.py --config=configs/scan.py:shapes --seeds=0,1,2 --workdir=runs/scan_seeds \
      [--split=test] [--json=runs/scan_seeds/summary.json] [--set=num_epochs=1 ...]

Each seed trains into W/seed_<s> (resuming if it already has checkpoints), selects its checkpoint on dev only, then
evaluates `--split`. The table lists every seed's recalls and the mean +- std (sample std, n - 1).
"""

import json
import os
import sys

from absl import flags
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from xmatch_jax import cli
from xmatch_jax import errors
from xmatch_jax import evaluate  # pylint: disable=g-import-not-at-top
from xmatch_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
from xmatch_jax import trainers  # pylint: disable=g-import-not-at-top

METRICS = metrics_lib.RESULT_KEYS


def load_config(spec: str):
  """'configs/rdan.py:f30k' -> get_config('f30k') of that file (relative paths also under the repository)."""
  from xmatch_jax import run_setup  # pylint: disable=g-import-not-at-top

  return run_setup.load_config_file(spec, REPO)


def apply_sets(config, sets: list) -> None:
  """--set=key.sub=value overrides (value parsed as JSON when it can be, else a string); unknown keys are errors."""
  for item in sets:
    key, sep, raw = item.partition('=')
    if not sep:
      raise errors.UserError(f'--set {item!r}: expected key=value')
    try:
      value = json.loads(raw)
    except json.JSONDecodeError:
      value = raw
    *parents, leaf = key.split('.')
    target = config
    for part in parents:
      target = target[part]
    if leaf not in target:
      raise errors.UserError(f'--set {item!r}: config has no field {key!r}')
    target[leaf] = (
      type(target[leaf])(value)
      if isinstance(target[leaf], (int, float)) and not isinstance(target[leaf], bool)
      else value
    )


def run(spec: str, seeds: list, workdir: str, split: str, sets: list) -> dict:
  results = {}
  for seed in seeds:
    config = load_config(spec)
    apply_sets(config, sets)
    config.seed = seed
    seed_dir = os.path.join(workdir, f'seed_{seed}')
    trainers.train_and_evaluate(config, seed_dir)
    results[seed] = evaluate.evaluate_workdir(seed_dir, split)
  table = np.array([[results[s][k] for k in METRICS] for s in seeds], np.float64)
  summary = {
    'config': spec,
    'split': split,
    'seeds': seeds,
    'sets': sets,
    'per_seed': {str(s): {k: results[s][k] for k in METRICS} for s in seeds},
    'mean': dict(zip(METRICS, table.mean(0).tolist())),
    'std': dict(zip(METRICS, (table.std(0, ddof=1) if len(seeds) > 1 else np.zeros(len(METRICS))).tolist())),
  }
  return summary


def format_table(summary: dict) -> str:
  head = 'seed  ' + '  '.join(f'{k:>8}' for k in METRICS)
  rows = [f'{s:>4}  ' + '  '.join(f'{v[k]:8.1f}' for k in METRICS) for s, v in summary['per_seed'].items()]
  rows.append('mean  ' + '  '.join(f'{summary["mean"][k]:8.1f}' for k in METRICS))
  rows.append(' std  ' + '  '.join(f'{summary["std"][k]:8.2f}' for k in METRICS))
  return '\n'.join([head] + rows)


def parse_seeds(text: str) -> list:
  """'0,1,2' -> [0, 1, 2]; anything else is a usage error."""
  try:
    seeds = [int(s) for s in text.split(',') if s.strip()]
  except ValueError:
    cli.usage_error(f'--seeds must be comma-separated integers, got {text!r}')
  if not seeds or len(set(seeds)) != len(seeds):
    cli.usage_error(f'--seeds must list distinct seeds, got {text!r}')
  return seeds


FLAGS = flags.FlagValues()
flags.DEFINE_string('config', None, 'config file:arg, as for xmatch_jax.train', flag_values=FLAGS)
flags.DEFINE_string('seeds', '0,1,2', 'comma-separated seeds', flag_values=FLAGS)
flags.DEFINE_string('workdir', None, 'directory of the runs: W/seed_<s>', flag_values=FLAGS)
flags.DEFINE_string('split', 'test', 'split to evaluate', flag_values=FLAGS)
flags.DEFINE_multi_string('set', [], 'config override key=value', flag_values=FLAGS)
flags.DEFINE_string('json', '', 'also write the summary here', flag_values=FLAGS)


def main(argv=None) -> int:
  cli.parse_flags(FLAGS, argv, __doc__, required=('config', 'workdir'))
  seeds = parse_seeds(FLAGS.seeds)
  summary = run(FLAGS.config, seeds, FLAGS.workdir, FLAGS.split, FLAGS.set)
  print(format_table(summary))
  cli.write_json(FLAGS.json, summary)
  return 0


if __name__ == '__main__':
  sys.exit(cli.run_tool(main))
