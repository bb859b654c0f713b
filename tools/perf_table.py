"""The README's performance table, generated from `tools/benchmark.py --json` results.

  python tools/perf_table.py tools/perf_results/intel_xeon/scan_t2i_f30k.json \
      tools/perf_results/intel_xeon/rdan_f30k.json tools/perf_results/intel_xeon/mmca_f30k.json

Prints a Markdown table (pairs/s, achieved GFLOP/s and % of the matmul rate measured in the same run, speed-up over
the PyTorch implementation, training step time and batch, peak host memory) and the command of every row. FLOPs
are the padded count (tools/benchmark.py); for RDAN's compiled kernel, which skips padded words, the share of the
matmul rate at the captions' real lengths follows.
tests/test_readme.py checks that README.md holds exactly this output for the folders of tools/perf_results.
"""

import json
import sys

from absl import flags

from xmatch_jax import cli
from xmatch_jax import errors
from xmatch_jax import models

HEADER = (
  '| pair head | pairs/s | GFLOP/s (% of matmul) | vs PyTorch | train step (batch) | peak host memory |\n'
  '| --- | --- | --- | --- | --- | --- |'
)


def describe(result: dict) -> str:
  """'SCAN t2i, D 1024, n 14' from the model config and sizes of a result (the matcher's `describe`)."""
  fields = result['model']
  model_cls = models.MODELS.get(fields['name'])
  if model_cls is None:
    return f'{fields["name"]}, D {result["sizes"]["embed_size"]}'
  return model_cls.describe(fields, result['sizes'])


def row(result: dict) -> str:
  speedup = result.get('speedup_vs_torch')
  torch = f'{speedup:.2f}x ({result["torch_implementation"]})' if speedup else '-'
  train = result.get('train_step_s')
  step = f'{train["median"]:.1f} s ({result["sizes"]["train_batch"]})' if train else '-'
  memory = result['peak_memory_bytes'] / 1e9
  which = 'training step' if train else 'scoring'
  # A head that skips padded words (RDAN's CPU kernel) does less than the padded count: its share at real lengths.
  real = result.get('real_word_pct_of_matmul')
  skips = real is not None and result.get('sizes', {}).get('relation_cnn') == 'compiled kernel'
  real_share = f'; {real:.0f}% at real lengths' if skips else ''
  return (
    f'| {describe(result)} | {result["pairs_per_s"]:,.0f} | {result["pair_gflops_per_s"]:.0f} '
    f'({result["pct_of_matmul"]:.0f}% of {result["matmul_gflops_per_s"]:.0f}{real_share}) | {torch} | {step} | '
    f'{memory:.2f} GB ({which}) |'
  )


def _load(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise errors.UserError(f'{path}: not valid json ({e}); expected the --json output of tools/benchmark.py.') from None


def table(paths: list) -> str:
  results = [_load(p) for p in paths]
  lines = [HEADER] + [row(r) for r in results]
  lines.append('')
  lines.append('Commands, one per row:')
  lines.append('')
  lines += [f'- `{r["command"]}`' for r in results]
  return '\n'.join(lines)


FLAGS = flags.FlagValues()  # no flags: the arguments are tools/benchmark.py --json files, one per table row


def main(argv=None) -> int:
  results = cli.parse_flags(FLAGS, argv, __doc__, args='RESULT.json [RESULT.json ...]')
  if not results:
    cli.usage_error('the following arguments are required: results')
  print(table(results))
  return 0


if __name__ == '__main__':
  sys.exit(cli.run_tool(main))
