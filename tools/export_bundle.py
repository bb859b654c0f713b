"""A trained workdir as a pretrained bundle: one directory to hand to someone else (xmatch_jax/bundles.py).

  python tools/export_bundle.py --workdir=runs/rdan_shapes --out=bundles/rdan_shapes

The bundle holds config.json, the vocabulary (or BERT tokenizer files), model.safetensors (best checkpoint, else
the latest), the workdir's evaluation results and a model card (README.md). Load it with
`xmatch_jax.Retriever.from_pretrained('bundles/rdan_shapes')`.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from xmatch_jax import bundles  # noqa: E402  pylint: disable=g-import-not-at-top
from xmatch_jax import cli


def main(argv=None) -> int:
  parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', required=True, help='trained workdir')
  parser.add_argument('--out', required=True, help='bundle directory to write (new or empty)')
  args = parser.parse_args(argv)
  out = bundles.from_workdir(args.workdir, args.out)
  files = sorted(os.listdir(out))
  print(f'{args.workdir} -> {out}: {", ".join(files)}')
  return 0


if __name__ == '__main__':
  sys.exit(cli.run_tool(main))
