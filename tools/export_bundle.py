"""A trained workdir as a pretrained bundle: one directory to hand to someone else (xmatch_jax/bundles.py).

  python tools/export_bundle.py --workdir=runs/rdan_shapes --out=bundles/rdan_shapes

The bundle holds config.json, the vocabulary (or BERT tokenizer files), model.safetensors (best checkpoint, else
the latest), the workdir's evaluation results and a model card (README.md). Load it with
`xmatch_jax.Retriever.from_pretrained('bundles/rdan_shapes')`.
"""

import os
import sys

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from xmatch_jax import bundles  # noqa: E402  pylint: disable=g-import-not-at-top
from xmatch_jax import cli

FLAGS = flags.FlagValues()
flags.DEFINE_string('workdir', None, 'trained workdir', flag_values=FLAGS)
flags.DEFINE_string('out', None, 'bundle directory to write (new or empty)', flag_values=FLAGS)


def main(argv=None) -> int:
  cli.parse_flags(FLAGS, argv, __doc__, required=('workdir', 'out'))
  out = bundles.from_workdir(FLAGS.workdir, FLAGS.out)
  files = sorted(os.listdir(out))
  print(f'{FLAGS.workdir} -> {out}: {", ".join(files)}')
  return 0


if __name__ == '__main__':
  sys.exit(cli.run_tool(main))
