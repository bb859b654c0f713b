"""PFAN block positions for GLFN from region boxes and image sizes, in PFAN's `{split}_boxes.npy` layout.

  python tools/pfan_positions.py --boxes=train_bboxes.npy --sizes=train_sizes.npy --out=train_boxes.npy
  python tools/pfan_positions.py --check=train_boxes.npy          # validate an existing PFAN file

--boxes: [n_images, k, 4] x1, y1, x2, y2 in pixels (as bottom-up-attention writes them); --sizes: [n_images, 2]
width, height. Writes [n_images, k, 2L]: the top-L block indices (16 x 16 grid, 256 = padding) then their
overlap weights (eqs 2-5 of GLFN / PFAN). Files are read with allow_pickle=False.
"""

import sys

from absl import flags
import numpy as np

from xmatch_jax import cli
from xmatch_jax.data import pfan

FLAGS = flags.FlagValues()
flags.DEFINE_string('boxes', None, '[n_images, k, 4] npy of pixel boxes', flag_values=FLAGS)
flags.DEFINE_string('sizes', None, '[n_images, 2] npy of (width, height)', flag_values=FLAGS)
flags.DEFINE_string('out', None, 'output npy in PFAN layout', flag_values=FLAGS)
flags.DEFINE_integer('grid', pfan.GRID, 'blocks per side of the image grid', flag_values=FLAGS)
flags.DEFINE_integer('top_l', pfan.TOP_L, 'L: blocks kept per region', flag_values=FLAGS)
flags.DEFINE_string('check', None, 'validate a PFAN-layout npy and print its summary', flag_values=FLAGS)


def main(argv=None) -> int:
  cli.parse_flags(FLAGS, argv, __doc__)
  if FLAGS.check:
    indices, weights = pfan.from_pfan_layout(np.load(FLAGS.check, allow_pickle=False), FLAGS.grid, FLAGS.check)
    padded = indices == FLAGS.grid * FLAGS.grid
    print(
      f'{FLAGS.check}: {indices.shape[0]} images x {indices.shape[1]} regions x L={indices.shape[2]}; '
      f'{padded.mean():.1%} padding entries; weights sum to 1: ok'
    )
    return 0
  if not (FLAGS.boxes and FLAGS.sizes and FLAGS.out):
    cli.usage_error('give --boxes, --sizes and --out (or --check)')
  boxes = np.load(FLAGS.boxes, allow_pickle=False)
  sizes = np.load(FLAGS.sizes, allow_pickle=False)
  indices, weights = pfan.block_positions(boxes, sizes, FLAGS.grid, FLAGS.top_l, where=FLAGS.boxes)
  np.save(FLAGS.out, pfan.to_pfan_layout(indices, weights))
  print(
    f'wrote {FLAGS.out}: {indices.shape[0]} images x {indices.shape[1]} regions, L={FLAGS.top_l}, '
    f'grid {FLAGS.grid} x {FLAGS.grid}'
  )
  return 0


if __name__ == '__main__':
  sys.exit(cli.run_tool(main))
