"""PFAN block positions for GLFN from region boxes and image sizes, in PFAN's `{split}_boxes.npy` layout.

  python tools/pfan_positions.py --boxes=train_bboxes.npy --sizes=train_sizes.npy --out=train_boxes.npy
  python tools/pfan_positions.py --check=train_boxes.npy          # validate an existing PFAN file

--boxes: [n_images, k, 4] x1, y1, x2, y2 in pixels (as bottom-up-attention writes them); --sizes: [n_images, 2]
width, height. Writes [n_images, k, 2L]: the top-L block indices (16 x 16 grid, 256 = padding) then their
overlap weights (eqs 2-5 of GLFN / PFAN). Files are read with allow_pickle=False.
"""

import argparse
import sys

import numpy as np

from xmatch_jax import cli
from xmatch_jax.data import pfan


def main(argv=None) -> int:
  parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--boxes', help='[n_images, k, 4] npy of pixel boxes')
  parser.add_argument('--sizes', help='[n_images, 2] npy of (width, height)')
  parser.add_argument('--out', help='output npy in PFAN layout')
  parser.add_argument('--grid', type=int, default=pfan.GRID)
  parser.add_argument('--top_l', type=int, default=pfan.TOP_L)
  parser.add_argument('--check', help='validate a PFAN-layout npy and print its summary')
  args = parser.parse_args(argv)
  if args.check:
    indices, weights = pfan.from_pfan_layout(np.load(args.check, allow_pickle=False), args.grid, args.check)
    padded = indices == args.grid * args.grid
    print(
      f'{args.check}: {indices.shape[0]} images x {indices.shape[1]} regions x L={indices.shape[2]}; '
      f'{padded.mean():.1%} padding entries; weights sum to 1: ok'
    )
    return 0
  if not (args.boxes and args.sizes and args.out):
    parser.error('give --boxes, --sizes and --out (or --check)')
  boxes = np.load(args.boxes, allow_pickle=False)
  sizes = np.load(args.sizes, allow_pickle=False)
  indices, weights = pfan.block_positions(boxes, sizes, args.grid, args.top_l, where=args.boxes)
  np.save(args.out, pfan.to_pfan_layout(indices, weights))
  print(
    f'wrote {args.out}: {indices.shape[0]} images x {indices.shape[1]} regions, L={args.top_l}, '
    f'grid {args.grid} x {args.grid}'
  )
  return 0


if __name__ == '__main__':
  sys.exit(cli.run_tool(main))
