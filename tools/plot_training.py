"""Plots a run's training curves from W/metrics.jsonl: loss, learning rate and dev rsum against steps (PNG).

python tools/plot_training.py --workdir=runs/rdan_shapes --out=runs/rdan_shapes/training.png
python tools/plot_training.py --workdir=runs/scan_shapes --workdir=runs/rdan_shapes --out=compare.png
"""

import json
import os
import sys

from absl import flags
import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

from xmatch_jax import cli
from xmatch_jax import errors
from xmatch_jax import workdirs

PANELS = (('loss', 'training loss'), ('learning_rate', 'learning rate'), ('dev_rsum', 'dev rsum'))


def read_metrics(workdir: str) -> dict:
  """{'loss': ([steps], [values]), ...} from W/metrics.jsonl; errors name the file and line."""
  path = workdirs.metrics_path(workdir)
  if not os.path.exists(path):
    raise errors.MissingFileError(f'{path} not found: {workdir} is not a training workdir (or logged nothing yet)')
  series = {key: ([], []) for key, _ in PANELS}
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise errors.UserError(f'{path}:{number}: not a json line ({e})') from None
      if 'step' not in record:
        raise errors.UserError(f'{path}:{number}: record has no "step"')
      for key, (steps, values) in series.items():
        if key in record:
          steps.append(record['step'])
          values.append(record[key])
  return series


def plot(workdirs: list, out: str) -> None:
  fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.6))
  for workdir in workdirs:
    series = read_metrics(workdir)
    label = os.path.basename(os.path.normpath(workdir))
    for ax, (key, title) in zip(axes, PANELS):
      steps, values = series[key]
      if steps:
        ax.plot(steps, values, marker='o' if key == 'dev_rsum' else None, markersize=3, label=label)
      ax.set_title(title)
      ax.set_xlabel('step')
  axes[0].set_yscale('log')
  axes[-1].legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=100)
  plt.close(fig)


FLAGS = flags.FlagValues()
flags.DEFINE_multi_string('workdir', None, 'training workdir; repeat to overlay runs', flag_values=FLAGS)
flags.DEFINE_string('out', None, 'PNG file', flag_values=FLAGS)


def main(argv=None) -> int:
  cli.parse_flags(FLAGS, argv, __doc__, required=('workdir', 'out'))
  plot(FLAGS.workdir, FLAGS.out)
  print(f'wrote {FLAGS.out}')
  return 0


if __name__ == '__main__':
  sys.exit(cli.run_tool(main))
