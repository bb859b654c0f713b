"""Compares models at one equal budget over seeds: mean +- std of the test rsum (mAP for category datasets).

  python tools/compare_models.py --workdir=runs/compare --seeds=0,1,2 --set=num_epochs=1 \
      --model=scan_t2i=configs/scan.py:shapes \
      --model=rdan=configs/rdan.py:shapes \
      --model=rdan_l2=configs/rdan.py:shapes --set=rdan_l2:model.l2norm_features=true \
      --model=glfn=configs/glfn.py:shapes,t2i+configs/glfn.py:shapes,i2t

`--model=NAME=SPEC` names one config; `NAME=SPEC1+SPEC2` trains each config separately and scores the weighted sum
of their score matrices: equal weights, or for GLFN's t2i + i2t pair eq 33 (alpha S_i2t + (1 - alpha) S_t2i), the
paper's two-run protocol (docs/fidelity.md#glfn-1). GLFN as in the paper, one seed:

  python tools/compare_models.py --workdir=runs/glfn_f30k --seeds=0 \
      --set=model.bert_dir=PATH/bert-base-uncased --model=glfn=configs/glfn.py:f30k,t2i+configs/glfn.py:f30k,i2t

`--set=key=value` overrides every model's config, `--set=NAME:key=value` one model's. Every model must end with the
same budget (dataset, epochs or max_steps x batch size, or DAER's per-stage epochs); a fused entry spends it once
per part. Each run trains into W/NAME/seed_<s>[/part_<i>] (resuming there), keeps its best checkpoint by dev
recall (or dev mAP) only, and is then scored on `--split`. W/summary.json collects the models of every run into W
at the same split, seeds and budget (a model run again replaces its entry), and the table printed covers them all.
"""

import json
import os
import sys

from absl import flags
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run_seeds  # pylint: disable=g-import-not-at-top

from xmatch_jax import cli  # pylint: disable=g-import-not-at-top
from xmatch_jax import ensemble  # pylint: disable=g-import-not-at-top
from xmatch_jax import errors  # pylint: disable=g-import-not-at-top
from xmatch_jax import evaluate  # pylint: disable=g-import-not-at-top
from xmatch_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
from xmatch_jax import models  # pylint: disable=g-import-not-at-top
from xmatch_jax import trainers  # pylint: disable=g-import-not-at-top
from xmatch_jax import workdirs  # pylint: disable=g-import-not-at-top


def parse_models(items: list) -> dict:
  """['NAME=SPEC[+SPEC]', ...] -> {NAME: [SPEC, ...]} in the given order."""
  models = {}
  for item in items:
    name, sep, specs = item.partition('=')
    if not sep or not name or not specs or ':' in name:
      raise errors.UserError(f'--model {item!r}: expected NAME=configs/FILE.py:ARG[+configs/FILE.py:ARG]')
    if name in models:
      raise errors.UserError(f'--model {item!r}: the name {name!r} is used twice')
    models[name] = [s.strip() for s in specs.split('+')]
  if not models:
    raise errors.UserError('give at least one --model=NAME=SPEC')
  return models


def split_sets(sets: list, names) -> dict:
  """--set values -> {NAME: [key=value, ...]}: a 'NAME:key=value' goes to NAME, a plain 'key=value' to all."""
  per_model = {name: [] for name in names}
  for item in sets:
    head, _, _ = item.partition('=')
    target, colon, key_value = item.partition(':') if ':' in head else ('', '', item)
    if colon and target not in per_model:
      raise errors.UserError(f'--set {item!r}: no --model named {target!r}; models: {sorted(per_model)}')
    for name in [target] if colon else per_model:
      per_model[name].append(key_value)
  return per_model


def budget_of(config) -> tuple:
  """What one run spends: equal tuples mean an equal number of training captions (same dataset)."""
  if 'stages' in config:
    return (
      config.dataset,
      'stages',
      tuple(
        (s, config.stage[s].num_epochs, config.stage[s].max_steps * config.stage[s].batch_size) for s in config.stages
      ),
    )
  if config.max_steps:
    return (config.dataset, 'captions', config.max_steps * config.batch_size)
  return (config.dataset, 'epochs', config.num_epochs)


def build_configs(models: dict, sets: dict) -> dict:
  """{NAME: [config per part]}; refuses models whose budgets or metrics differ."""
  configs = {}
  for name, specs in models.items():
    configs[name] = []
    for spec in specs:
      config = run_seeds.load_config(spec)
      run_seeds.apply_sets(config, sets[name])
      configs[name].append(config)
  budgets = {(name, spec): budget_of(c) for name, specs in models.items() for spec, c in zip(specs, configs[name])}
  if len(set(budgets.values())) > 1:
    listed = '; '.join(f'{name} ({spec}): {budget}' for (name, spec), budget in budgets.items())
    raise errors.UserError(f'the models have different budgets (set num_epochs / max_steps for all): {listed}')
  metrics = {c.get('eval_metric', 'recall') for parts in configs.values() for c in parts}
  if len(metrics) > 1:
    raise errors.UserError(f'the models are evaluated by different metrics {sorted(metrics)}; compare like with like')
  return configs


def fusion_weights(parts: list) -> list:
  """Weights of the parts' score matrices: the matcher's `fusion_weights` when all parts are one matcher (GLFN's
  t2i + i2t pair: eq 33, alpha S_i2t + (1 - alpha) S_t2i), else equal weights."""
  names = {p.model.name for p in parts}
  if len(names) == 1:
    return models.MODELS[names.pop()].fusion_weights([p.model.to_dict() for p in parts])
  return [1.0 / len(parts)] * len(parts)


def run_model(name: str, parts: list, seed: int, workdir: str, split: str) -> dict:
  """Trains every part of one model with `seed` and scores it (parts fused by `fusion_weights`)."""
  seed_dir = os.path.join(workdir, name, f'seed_{seed}')
  dirs = [seed_dir] if len(parts) == 1 else [os.path.join(seed_dir, f'part_{i}') for i in range(len(parts))]
  for config, run_dir in zip(parts, dirs):
    config.seed = seed
    trainers.train_and_evaluate(config, run_dir)
  if len(parts) == 1:
    return evaluate.evaluate_workdir(seed_dir, split)
  result = ensemble.ensemble(dirs, fusion_weights(parts), split=split)
  os.makedirs(workdirs.eval_dir(seed_dir), exist_ok=True)
  with open(workdirs.result_path(seed_dir, split, fused=True), 'w') as f:
    json.dump(result, f, indent=2)
  return result


def compare(models: dict, seeds: list, workdir: str, split: str, sets: list) -> dict:
  configs = build_configs(models, split_sets(sets, models))
  keys = (
    metrics_lib.MAP_KEYS
    if next(iter(configs.values()))[0].get('eval_metric', 'recall') == 'map'
    else metrics_lib.RESULT_KEYS
  )
  summary = {
    'split': split,
    'seeds': seeds,
    'sets': sets,
    'metric': keys[-1],
    'budget': list(budget_of(next(iter(configs.values()))[0])),
    'models': {},
  }
  for name, parts in configs.items():
    per_seed = {}
    for seed in seeds:
      result = run_model(name, [p.copy_and_resolve_references() for p in parts], seed, workdir, split)
      per_seed[str(seed)] = {k: float(result[k]) for k in keys}
    table = np.array([[per_seed[str(s)][k] for k in keys] for s in seeds], np.float64)
    std = table.std(0, ddof=1) if len(seeds) > 1 else np.zeros(len(keys))
    summary['models'][name] = {
      'specs': models[name],
      'per_seed': per_seed,
      'mean': dict(zip(keys, table.mean(0).tolist())),
      'std': dict(zip(keys, std.tolist())),
    }
  return summary


def merge_summary(previous: dict, summary: dict) -> dict:
  """A workdir's summary after another compare_models run into it: the models of both when the runs are comparable
  (same split, seeds, budget and metric; a model run again replaces its entry), else this run's alone."""
  keys = ('split', 'seeds', 'budget', 'metric')
  if any(previous.get(k) != summary[k] for k in keys):
    return summary
  return {**summary, 'models': {**previous.get('models', {}), **summary['models']}}


def format_table(summary: dict) -> str:
  metric, seeds = summary['metric'], summary['seeds']
  width = max(len(n) for n in summary['models'])
  head = (
    f'{"model":<{width}}  ' + '  '.join(f'{"seed " + str(s):>10}' for s in seeds) + f'  {metric + " mean +- std":>22}'
  )
  rows = [head]
  for name, m in summary['models'].items():
    cells = '  '.join(f'{m["per_seed"][str(s)][metric]:10.1f}' for s in seeds)
    rows.append(f'{name:<{width}}  {cells}  {m["mean"][metric]:13.1f} +- {m["std"][metric]:5.1f}')
  return '\n'.join(rows) + f'\n({summary["split"]} split; budget per run: {summary["budget"]})'


FLAGS = flags.FlagValues()
flags.DEFINE_multi_string('model', [], 'NAME=SPEC or NAME=SPEC1+SPEC2', flag_values=FLAGS)
flags.DEFINE_string('seeds', '0,1,2', 'comma-separated seeds', flag_values=FLAGS)
flags.DEFINE_string('workdir', None, 'directory of the runs: W/NAME/seed_<s>', flag_values=FLAGS)
flags.DEFINE_string('split', 'test', 'split to score', flag_values=FLAGS)
flags.DEFINE_multi_string(
  'set', [], 'config override key=value for every model, or NAME:key=value for one', flag_values=FLAGS
)
flags.DEFINE_string('json', '', 'also write the summary here (default: W/summary.json)', flag_values=FLAGS)


def main(argv=None) -> int:
  cli.parse_flags(FLAGS, argv, __doc__, required=('workdir',))
  seeds = run_seeds.parse_seeds(FLAGS.seeds)
  summary = compare(parse_models(FLAGS.model), seeds, FLAGS.workdir, FLAGS.split, FLAGS.set)
  path = FLAGS.json or os.path.join(FLAGS.workdir, 'summary.json')
  if os.path.exists(path):
    with open(path) as f:
      summary = merge_summary(json.load(f), summary)
  print(format_table(summary))
  with open(path, 'w') as f:
    json.dump(summary, f, indent=2)
  return 0


if __name__ == '__main__':
  sys.exit(cli.run_tool(main))
