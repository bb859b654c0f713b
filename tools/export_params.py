"""Any trained workdir's variables to a safetensors (or npz) file, for use outside xmatch.

  python tools/export_params.py --workdir=runs/rdan_shapes --out=rdan_shapes.safetensors

Key layout: `<collection>/<module>/.../<leaf>` joined by '/', e.g. `params/image_encoder/fc/kernel` (Flax layout:
Dense kernels are [in, out], convolutions HWIO) and, for models with BatchNorm (DAER), `batch_stats/...`. The
safetensors metadata holds `model` (the model name) and `config` (the workdir's config.json); an npz gets the
same keys plus `__config__` (a 0-d string array). Best checkpoint, else the latest.
"""

import os
import sys

from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from xmatch_jax import bundles  # noqa: E402  pylint: disable=g-import-not-at-top
from xmatch_jax import checkpoints
from xmatch_jax import cli
from xmatch_jax import errors
from xmatch_jax import workdirs  # noqa: E402  pylint: disable=g-import-not-at-top


def export(workdir: str, out: str) -> dict:
  config = workdirs.load_config(workdir)
  state, meta, which = checkpoints.RunCheckpoints(workdir).restore_for_eval()
  variables = {k: state[k] for k in ('params', 'batch_stats') if k in state}
  flat = bundles.flatten(variables)
  config_json = config.to_json(sort_keys=True)
  if out.endswith('.safetensors'):
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

    save_file(
      {k: np.ascontiguousarray(v) for k, v in flat.items()},
      out,
      metadata={
        'model': config.model.name,
        'config': config_json,
        'checkpoint': which,
        'step': str(int(meta.get('step', -1))),
      },
    )
  elif out.endswith('.npz'):
    np.savez(out, __config__=np.array(config_json), **flat)
  else:
    raise errors.UserError(f'--out={out}: expected a .safetensors or .npz file name.')
  return flat


FLAGS = flags.FlagValues()
flags.DEFINE_string('workdir', None, 'trained workdir', flag_values=FLAGS)
flags.DEFINE_string('out', None, 'FILE.safetensors or FILE.npz', flag_values=FLAGS)


def main(argv=None) -> int:
  cli.parse_flags(FLAGS, argv, __doc__, required=('workdir', 'out'))
  flat = export(FLAGS.workdir, FLAGS.out)
  print(f'wrote {len(flat)} arrays ({sum(v.size for v in flat.values()):,} values) to {FLAGS.out}')
  return 0


if __name__ == '__main__':
  sys.exit(cli.run_tool(main))
