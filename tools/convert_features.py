"""Region features from a detector's output files -> SCAN's precomp layout (`{split}_ims.npy`, `{split}_boxes.npy`).

  python tools/convert_features.py tsv --input=trainval_resnet101_faster_rcnn_genome_36.tsv --image_ids=test_ids.txt \
      --out_dir=data/f30k_precomp --split=test
  python tools/convert_features.py npz --input=features_dir --image_ids=test_ids.txt --out_dir=... --split=test

tsv: bottom-up-attention's format, tab-separated columns image_id, image_w, image_h, num_boxes, boxes, features
(boxes and features base64 float32, [num_boxes, 4] and [num_boxes, d]); several --input files may be given.
npz: one `<image_id>.npz` per image with `x` (or `features`) [k, d], `bbox` (or `boxes`) [k, 4] and `image_w`,
`image_h` (bottom-up-attention.pytorch's extractor). --image_ids lists one image id per line in the order of the
split's captions (5 lines per image in `{split}_caps.txt`); without it the TSV order is kept.

Writes `{split}_ims.npy` [n, k, d] float32 through a memory map, one image at a time (the whole file never sits in
memory), and `{split}_boxes.npy`, the PFAN block positions [n, k, 2L] computed from the boxes and image sizes.
Every image must have the same k; errors name the file, the image and the field.
"""

import argparse
import base64
import csv
import os
import sys
import zipfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from xmatch_jax.data import pfan  # pylint: disable=g-import-not-at-top

TSV_FIELDS = ('image_id', 'image_w', 'image_h', 'num_boxes', 'boxes', 'features')


def _decode(text: str, count: int, where: str, field: str) -> np.ndarray:
  try:
    raw = base64.b64decode(text, validate=True)
  except ValueError as e:
    raise ValueError(f'{where}: field {field} is not base64 ({e})') from None
  if len(raw) % 4 or (len(raw) // 4) % count:
    raise ValueError(f'{where}: field {field} holds {len(raw)} bytes; expected a multiple of 4 x num_boxes '
                     f'({count})')
  return np.frombuffer(raw, np.float32).reshape(count, -1)


def read_tsv(paths: list):
  """Yields (image_id, regions [k, d], boxes [k, 4], (width, height)) from bottom-up-attention TSV files."""
  csv.field_size_limit(sys.maxsize)
  for path in paths:
    with open(path, newline='') as f:
      for line, row in enumerate(csv.reader(f, delimiter='\t'), 1):
        where = f'{path}:{line}'
        if len(row) != len(TSV_FIELDS):
          raise ValueError(f'{where}: {len(row)} columns; expected {len(TSV_FIELDS)} ({", ".join(TSV_FIELDS)})')
        record = dict(zip(TSV_FIELDS, row))
        try:
          count = int(record['num_boxes'])
          size = (float(record['image_w']), float(record['image_h']))
        except ValueError:
          raise ValueError(f'{where}: num_boxes / image_w / image_h must be numbers') from None
        boxes = _decode(record['boxes'], count, where, 'boxes')
        if boxes.shape[1] != 4:
          raise ValueError(f'{where}: field boxes has {boxes.shape[1]} values per box; expected 4')
        yield record['image_id'], _decode(record['features'], count, where, 'features'), boxes, size


def read_npz(directory: str, image_ids: list):
  """Yields (image_id, regions, boxes, (width, height)) from `<image_id>.npz` files."""
  for image_id in image_ids:
    path = os.path.join(directory, f'{image_id}.npz')
    if not os.path.exists(path):
      raise FileNotFoundError(f'{path}: missing (image {image_id} of --image_ids)')
    unreadable = (zipfile.BadZipFile, ValueError, EOFError, OSError)
    expected = 'expected an .npz with x (or features) [k, d], bbox (or boxes) [k, 4], image_w, image_h'
    try:
      z = np.load(path, allow_pickle=False)
    except unreadable as e:
      raise ValueError(f'{path}: not a readable .npz file ({type(e).__name__}: {e}); {expected} (truncated or '
                       'partly copied?)') from None
    if not isinstance(z, np.lib.npyio.NpzFile):
      raise ValueError(f'{path}: a single array, not an .npz archive; {expected}')
    with z:
      keys = set(z.files)
      feature_key = 'x' if 'x' in keys else 'features'
      box_key = 'bbox' if 'bbox' in keys else 'boxes'
      missing = [k for k in (feature_key, box_key, 'image_w', 'image_h') if k not in keys]
      if missing:
        raise ValueError(f'{path}: missing field(s) {missing}; has {sorted(keys)}')
      try:
        record = (np.asarray(z[feature_key], np.float32), np.asarray(z[box_key], np.float32),
                  (float(z['image_w']), float(z['image_h'])))
      except unreadable as e:
        raise ValueError(f'{path}: a field cannot be read ({type(e).__name__}: {e}); {expected}') from None
    yield (image_id, *record)


def convert(records, out_dir: str, split: str, image_ids: list | None, source: str) -> dict:
  """Writes `{split}_ims.npy` and `{split}_boxes.npy` in `image_ids` order (or the records' order)."""
  os.makedirs(out_dir, exist_ok=True)
  if image_ids is not None:
    wanted = {image_id: i for i, image_id in enumerate(image_ids)}
    if len(wanted) != len(image_ids):
      twice = sorted({i for i in image_ids if image_ids.count(i) > 1})
      raise ValueError(f'--image_ids lists image(s) {twice[:3]} more than once')
  ims = positions = None
  seen = {}
  shape = None
  for image_id, regions, boxes, size in records:
    if image_ids is not None and image_id not in wanted:
      continue
    index = wanted[image_id] if image_ids is not None else len(seen)
    if image_id in seen:
      raise ValueError(f'{source}: image {image_id} appears twice')
    if regions.shape[0] != boxes.shape[0]:
      raise ValueError(f'{source}: image {image_id} has {regions.shape[0]} feature rows but {boxes.shape[0]} boxes')
    if shape is None:
      shape = regions.shape
      n = len(image_ids) if image_ids is not None else None
      if n is None:   # unknown count: collect (TSV order, no ids file)
        ims, positions = [], []
      else:
        ims = np.lib.format.open_memmap(os.path.join(out_dir, f'{split}_ims.npy'), 'w+', np.float32, (n,) + shape)
        positions = np.lib.format.open_memmap(os.path.join(out_dir, f'{split}_boxes.npy'), 'w+', np.float64,
                                              (n, shape[0], 2 * pfan.TOP_L))
    if regions.shape != shape:
      raise ValueError(f'{source}: image {image_id} has features {regions.shape}; the first image had {shape} '
                       '(every image needs the same number of regions)')
    if not np.isfinite(regions).all():
      raise ValueError(f'{source}: image {image_id} features hold NaN or inf')
    blocks, weights = pfan.block_positions(boxes[None], np.array([size]), where=f'{source} image {image_id}')
    layout = pfan.to_pfan_layout(blocks, weights)[0]
    if isinstance(ims, list):
      ims.append(regions)
      positions.append(layout)
    else:
      ims[index] = regions
      positions[index] = layout
    seen[image_id] = index
  if image_ids is not None:
    missing = [i for i in image_ids if i not in seen]
    if missing:
      raise ValueError(f'{source}: {len(missing)} image(s) of --image_ids not found, e.g. {missing[:3]}')
    ims.flush()
    positions.flush()
  elif ims is None:
    raise ValueError(f'{source}: no images')
  else:
    np.save(os.path.join(out_dir, f'{split}_ims.npy'), np.stack(ims))
    np.save(os.path.join(out_dir, f'{split}_boxes.npy'), np.stack(positions))
  return {'images': len(seen), 'regions': shape[0], 'dim': shape[1],
          'order': [i for i, _ in sorted(seen.items(), key=lambda kv: kv[1])]}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('format', choices=('tsv', 'npz'))
  parser.add_argument('--input', action='append', required=True, help='TSV file(s), or the npz directory')
  parser.add_argument('--image_ids', help='file with one image id per line, in the split\'s caption order')
  parser.add_argument('--out_dir', required=True)
  parser.add_argument('--split', required=True)
  args = parser.parse_args(argv)
  image_ids = None
  if args.image_ids:
    with open(args.image_ids) as f:
      image_ids = [line.strip() for line in f if line.strip()]
  if args.format == 'npz':
    if image_ids is None:
      parser.error('npz needs --image_ids (the order of the split)')
    records = read_npz(args.input[0], image_ids)
  else:
    records = read_tsv(args.input)
  summary = convert(records, args.out_dir, args.split, image_ids, ', '.join(args.input))
  print(f'{args.split}: {summary["images"]} images x {summary["regions"]} regions x {summary["dim"]} -> '
        f'{args.out_dir}/{args.split}_ims.npy, {args.split}_boxes.npy')
  if image_ids is None:
    with open(os.path.join(args.out_dir, f'{args.split}_ids.txt'), 'w') as f:
      f.write('\n'.join(summary['order']) + '\n')
  return 0


if __name__ == '__main__':
  sys.exit(main())
