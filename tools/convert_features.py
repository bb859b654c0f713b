"""Region features from a detector's output files -> SCAN's precomp layout (`{split}_ims.npy`, `{split}_boxes.npy`,
optionally `{split}_tags.txt`).

  python tools/convert_features.py tsv --input=trainval_resnet101_faster_rcnn_genome_36.tsv --image_ids=test_ids.txt \
      --out_dir=data/f30k_precomp --split=test
  python tools/convert_features.py npz --input=features_dir --image_ids=test_ids.txt --out_dir=... --split=test

tsv: bottom-up-attention's format, tab-separated columns image_id, image_w, image_h, num_boxes, boxes, features
(boxes and features base64 float32, [num_boxes, 4] and [num_boxes, d]); several --input files may be given. TSVs
with 10 columns are read as the layout with detections (py-bottom-up-attention, LXMERT): img_id, img_h, img_w,
objects_id, objects_conf, attrs_id, attrs_conf, num_boxes, boxes, features (ids base64 int64 or int32, confidences
float32); --tsv_fields=a,b,... names the columns of any other order. A header row naming the columns is skipped.
npz: one `<image_id>.npz` per image with `x` (or `features`) [k, d], `bbox` (or `boxes`) [k, 4] and `image_w`,
`image_h` (bottom-up-attention.pytorch's extractor), and for tags `objects_id` (or `objects`), `attrs_id` (or
`attrs`), optional `attrs_conf`, either as arrays or inside that extractor's pickled `info` dict (read by an
unpickler that builds numpy arrays and plain values only, never running code). --image_ids lists one image id per
line in the order of the split's captions (5 lines per image in `{split}_caps.txt`); without it the TSV order is
kept.

Writes `{split}_ims.npy` [n, k, d] float32 through a memory map, one image at a time (the whole file never sits in
memory), and `{split}_boxes.npy`, the PFAN block positions [n, k, 2L] computed from the boxes and image sizes.
Every image must have the same k; errors name the file, the image and the field.

Tags (GLFN): with --objects_vocab=objects_vocab.txt [--attributes_vocab=attributes_vocab.txt] (the Visual Genome
1600 / 400 names shipped with bottom-up-attention, data/genome/1600-400-20/: line j names id j, first of its
comma-separated synonyms; ids count from 0, as bottom-up-attention's argmax over the scores without the background
column gives them) it also writes `{split}_tags.txt`: per image one line of k TAB-separated tags "attribute class"
(e.g. "white plate"), or "class" without --attributes_vocab or where the attribute's confidence (attrs_conf) is
<= --attr_threshold (default 0, so only the confidence 0 that exports without an attribute head write drops one;
bottom-up-attention's demo shows attributes above 0.1). Only the ids are kept while reading (2 small ints per
region); the file is written at the end in the split's order.

  python tools/convert_features.py tsv --input=f30k_lxmert_36.tsv --image_ids=test_ids.txt --out_dir=DIR \
      --split=test --objects_vocab=objects_vocab.txt --attributes_vocab=attributes_vocab.txt
"""

import base64
import contextlib
import csv
import os
import sys
import tokenize
import zipfile
import zlib

from absl import flags
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from xmatch_jax import cli
from xmatch_jax import errors
from xmatch_jax import progress
from xmatch_jax import safe_npz
from xmatch_jax import safe_pickle
from xmatch_jax.data import pfan  # pylint: disable=g-import-not-at-top

TSV_FIELDS = ('image_id', 'image_w', 'image_h', 'num_boxes', 'boxes', 'features')
# With detections (py-bottom-up-attention's and LXMERT's extractors; note img_h before img_w).
TSV_FIELDS_DETECTIONS = (
  'img_id',
  'img_h',
  'img_w',
  'objects_id',
  'objects_conf',
  'attrs_id',
  'attrs_conf',
  'num_boxes',
  'boxes',
  'features',
)
_ALIASES = {'img_id': 'image_id', 'img_w': 'image_w', 'img_h': 'image_h', 'objects': 'objects_id', 'attrs': 'attrs_id'}
LABEL_FIELDS = ('objects_id', 'attrs_id', 'attrs_conf')


def _decode(text: str, count: int, where: str, field: str) -> np.ndarray:
  try:
    raw = base64.b64decode(text, validate=True)
  except ValueError as e:
    raise errors.UserError(f'{where}: field {field} is not base64 ({e})') from None
  if len(raw) % 4 or (len(raw) // 4) % count:
    raise errors.UserError(
      f'{where}: field {field} holds {len(raw)} bytes; expected a multiple of 4 x num_boxes ({count})'
    )
  return np.frombuffer(raw, np.float32).reshape(count, -1)


def _decode_vector(text: str, count: int, where: str, field: str) -> np.ndarray:
  """A base64 vector of num_boxes ids (int64 or int32) or confidences (float32 or float64), told apart by size."""
  try:
    raw = base64.b64decode(text, validate=True)
  except ValueError as e:
    raise errors.UserError(f'{where}: field {field} is not base64 ({e})') from None
  kinds = (np.int64, np.int32) if field.endswith('_id') else (np.float32, np.float64)
  for dtype in kinds:
    if len(raw) == count * np.dtype(dtype).itemsize:
      return np.frombuffer(raw, dtype)
  names = ' or '.join(np.dtype(d).name for d in kinds)
  raise errors.UserError(
    f'{where}: field {field} holds {len(raw)} bytes; expected num_boxes ({count}) values of {names}'
  )


def _canonical(name: str) -> str:
  return _ALIASES.get(name, name)


def read_tsv(paths: list, fields: tuple | None = None):
  """Yields (image_id, regions [k, d], boxes [k, 4], (width, height), labels) from bottom-up-attention TSV files;
  labels: {objects_id, attrs_id, attrs_conf: [k]} for the columns the TSV has. fields: the column names (default:
  told by the column count, 6 or 10)."""
  csv.field_size_limit(sys.maxsize)
  layouts = {len(f): f for f in ((fields,) if fields else (TSV_FIELDS, TSV_FIELDS_DETECTIONS))}
  for path in paths:
    with open(path, newline='', encoding='utf-8') as f:
      yield from _read_tsv_rows(path, f, layouts, fields)


def _read_tsv_rows(path: str, f, layouts: dict, fields: tuple | None):
  line = 0
  try:
    names = None
    for line, row in enumerate(csv.reader(f, delimiter='\t'), 1):
      where = f'{path}:{line}'
      if names is None:
        if len(row) not in layouts:
          expected = ' or '.join(f'{n} ({", ".join(v)})' for n, v in layouts.items())
          raise errors.UserError(
            f'{where}: {len(row)} columns; expected {expected}{"" if fields else ", or name them with --tsv_fields"}'
          )
        names = tuple(_canonical(n) for n in layouts[len(row)])
        if tuple(_canonical(c) for c in row) == names:
          continue  # a header row
      if len(row) != len(names):
        raise errors.UserError(f'{where}: {len(row)} columns; expected {len(names)} ({", ".join(names)}) like line 1')
      record = dict(zip(names, row))
      try:
        count = int(record['num_boxes'])
        size = (float(record['image_w']), float(record['image_h']))
      except ValueError:
        raise errors.UserError(f'{where}: num_boxes / image_w / image_h must be numbers') from None
      if count < 1:
        raise errors.UserError(f'{where}: num_boxes is {count}; expected at least 1')
      boxes = _decode(record['boxes'], count, where, 'boxes')
      if boxes.shape[1] != 4:
        raise errors.UserError(f'{where}: field boxes has {boxes.shape[1]} values per box; expected 4')
      labels = {k: _decode_vector(record[k], count, where, k) for k in LABEL_FIELDS if k in record}
      yield record['image_id'], _decode(record['features'], count, where, 'features'), boxes, size, labels
  except UnicodeDecodeError as e:
    raise errors.UserError(
      f'{path}:{line + 1}: not UTF-8 text ({e.reason}); expected a tab-separated bottom-up-attention TSV'
    ) from None
  except csv.Error as e:
    raise errors.UserError(f'{path}:{line + 1}: {e}; expected a tab-separated bottom-up-attention TSV') from None


def _read_pickled_member(path: str, member: str):
  """The object array `member` (e.g. 'info') of an .npz, unpickled with numpy arrays and plain values only."""
  where = f'{path} field {member}'
  with zipfile.ZipFile(path) as archive, archive.open(f'{member}.npy') as f:
    version = np.lib.format.read_magic(f)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    _, _, dtype = read_header(f)
    if not dtype.hasobject:
      raise errors.UserError(f'{where}: dtype {dtype}; expected a pickled dict (object array)')
    value = safe_pickle.AllowListUnpickler(
      f, safe_pickle.NUMPY_VALUES, 'only numpy arrays and plain values are read', where, numpy_values=True
    ).load()
  return value.item() if isinstance(value, np.ndarray) and value.shape == () else value


def _npz_labels(z, path: str) -> dict:
  """objects_id / attrs_id / attrs_conf from an .npz: top-level arrays (also `objects`, `attrs`), else the pickled
  `info` dict of bottom-up-attention.pytorch."""
  labels = {}
  for key in z.files:
    if _canonical(key) in LABEL_FIELDS:
      labels[_canonical(key)] = np.asarray(z[key]).reshape(-1)
  if 'objects_id' not in labels and 'info' in z.files:
    info = _read_pickled_member(path, 'info')
    if not isinstance(info, dict):
      raise errors.UserError(
        f'{path}: field info is a {type(info).__name__}; expected a dict with objects_id, attrs_id'
      )
    labels = {k: np.asarray(info[k]).reshape(-1) for k in LABEL_FIELDS if k in info}
  for key, value in labels.items():
    if value.dtype.kind not in 'biuf':
      raise errors.UserError(f'{path}: field {key} holds {value.dtype} values; expected numbers (one per region)')
  return labels


def read_npz(directory: str, image_ids: list, with_labels: bool = False):
  """Yields (image_id, regions, boxes, (width, height), labels) from `<image_id>.npz` files; labels (see read_tsv)
  only with_labels, else {}."""
  for image_id in image_ids:
    path = os.path.join(directory, f'{image_id}.npz')
    if not os.path.exists(path):
      raise errors.MissingFileError(f'{path}: missing (image {image_id} of --image_ids)')
    # tokenize.TokenError: a .npy header numpy cannot parse; NotImplementedError / RuntimeError: an unknown
    # compression / an encrypted zip member.
    unreadable = (
      zipfile.BadZipFile,
      zlib.error,
      tokenize.TokenError,
      NotImplementedError,
      RuntimeError,
      EOFError,
      OSError,
    )
    unreadable += safe_pickle.LOAD_ERRORS
    expected = 'expected an .npz with x (or features) [k, d], bbox (or boxes) [k, 4], image_w, image_h'
    try:
      z = np.load(path, allow_pickle=False)
      if isinstance(z, np.lib.npyio.NpzFile):
        with contextlib.ExitStack() as on_error:
          on_error.callback(z.close)
          safe_npz.check_sizes(path, z.zip)
          on_error.pop_all()
    except unreadable as e:
      if isinstance(e, errors.UserError):
        raise
      raise errors.UserError(
        f'{path}: not a readable .npz file ({type(e).__name__}: {e}); {expected} (truncated or partly copied?)'
      ) from None
    if not isinstance(z, np.lib.npyio.NpzFile):
      raise errors.UserError(f'{path}: a single array, not an .npz archive; {expected}')
    with z:
      keys = set(z.files)
      feature_key = 'x' if 'x' in keys else 'features'
      box_key = 'bbox' if 'bbox' in keys else 'boxes'
      missing = [k for k in (feature_key, box_key, 'image_w', 'image_h') if k not in keys]
      if missing:
        raise errors.UserError(f'{path}: missing field(s) {missing}; has {sorted(keys)}')
      try:
        record = (
          np.asarray(z[feature_key], np.float32),
          np.asarray(z[box_key], np.float32),
          (float(z['image_w']), float(z['image_h'])),
        )
        labels = _npz_labels(z, path) if with_labels else {}
      except unreadable as e:  # also TypeError: image_w / image_h not one number
        if isinstance(e, errors.UserError) and not isinstance(e, safe_pickle.RefusedPickleError):
          raise
        raise errors.UserError(f'{path}: a field cannot be read ({type(e).__name__}: {e}); {expected}') from None
    regions, boxes = record[0], record[1]
    if regions.ndim != 2 or boxes.ndim != 2 or boxes.shape[1] != 4:
      raise errors.UserError(f'{path}: features of shape {regions.shape} and boxes of shape {boxes.shape}; {expected}')
    yield (image_id, *record, labels)


def load_vocab(path: str, what: str) -> list:
  """Names, one per line, each the first of the line's comma-separated synonyms (bottom-up-attention's
  objects_vocab.txt / attributes_vocab.txt); line j (from 0) names id j."""
  try:
    with open(path, encoding='utf-8') as f:
      lines = [line.rstrip('\n').rstrip('\r') for line in f]
  except UnicodeDecodeError as e:
    raise errors.UserError(f'{path}: not UTF-8 text ({e}); expected one {what} name per line') from None
  while lines and not lines[-1].strip():
    lines.pop()
  if not lines:
    raise errors.UserError(f'{path}: no names; expected one {what} name per line')
  names = []
  for lineno, line in enumerate(lines, 1):
    name = line.split(',')[0].strip()
    if not name or '\t' in name:
      raise errors.UserError(
        f'{path}: line {lineno} {"holds a TAB" if name else "is empty"}; expected one {what} name '
        'per line (synonyms after commas)'
      )
    names.append(name)
  return names


class Tagger:
  """Region tags "attribute class" from detector ids. `ids` checks one image's ids and returns them compactly
  ([k, 2] int32: class, attribute or -1); `line` turns those into the TAB-separated tags of `{split}_tags.txt`."""

  def __init__(self, objects_path: str, attributes_path: str | None = None, attr_threshold: float = 0.0):
    self.objects_path, self.attributes_path = objects_path, attributes_path
    self.objects = load_vocab(objects_path, 'object class')
    self.attributes = load_vocab(attributes_path, 'attribute') if attributes_path else None
    self.attr_threshold = attr_threshold

  def _vector(self, labels: dict, field: str, count: int, where: str, vocab: list | None, path: str | None):
    value = labels.get(field)
    if value is None:
      raise errors.UserError(
        f'{where} has no {field}; tags need detections with class ids (TSV columns objects_id / '
        'attrs_id / attrs_conf, or those npz fields or npz info dict)'
      )
    value = np.asarray(value).reshape(-1)
    if value.shape != (count,):
      raise errors.UserError(f'{where}: field {field} has {value.size} values; expected one per region ({count})')
    if vocab is not None:
      bad = (value < 0) | (value >= len(vocab))
      if bad.any():
        r = int(np.argmax(bad))
        raise errors.UserError(
          f'{where} region {r}: {field} {value[r]} is outside {path} ({len(vocab)} names: ids 0 .. {len(vocab) - 1})'
        )
    return value

  def ids(self, labels: dict, count: int, where: str) -> np.ndarray:
    out = np.full((count, 2), -1, np.int32)
    out[:, 0] = self._vector(labels, 'objects_id', count, where, self.objects, self.objects_path)
    if self.attributes is not None:
      attrs = self._vector(labels, 'attrs_id', count, where, self.attributes, self.attributes_path)
      keep = np.ones(count, bool)
      if labels.get('attrs_conf') is not None:
        keep = self._vector(labels, 'attrs_conf', count, where, None, None) > self.attr_threshold
      out[:, 1] = np.where(keep, attrs, -1)
    return out

  def line(self, ids: np.ndarray) -> str:
    return '\t'.join(self.objects[o] if a < 0 else f'{self.attributes[a]} {self.objects[o]}' for o, a in ids)


def convert(
  records, out_dir: str, split: str, image_ids: list | None, source: str, tagger: Tagger | None = None
) -> dict:
  """Writes `{split}_ims.npy` and `{split}_boxes.npy` (and with a tagger `{split}_tags.txt`) in `image_ids` order
  (or the records' order)."""
  os.makedirs(out_dir, exist_ok=True)
  if image_ids is not None:
    wanted = {image_id: i for i, image_id in enumerate(image_ids)}
    if len(wanted) != len(image_ids):
      twice = sorted({i for i in image_ids if image_ids.count(i) > 1})
      raise errors.UserError(f'--image_ids lists image(s) {twice[:3]} more than once')
  ims = positions = tag_ids = None
  seen = {}
  shape = None
  has_labels = False
  bar = progress.bar(total=len(image_ids) if image_ids is not None else None, desc=f'converting {split}', unit='image')
  for image_id, regions, boxes, size, *rest in records:
    labels = rest[0] if rest else {}
    if image_ids is not None and image_id not in wanted:
      continue
    index = wanted[image_id] if image_ids is not None else len(seen)
    if image_id in seen:
      raise errors.UserError(f'{source}: image {image_id} appears twice')
    if regions.shape[0] != boxes.shape[0]:
      raise errors.UserError(
        f'{source}: image {image_id} has {regions.shape[0]} feature rows but {boxes.shape[0]} boxes'
      )
    if shape is None:
      shape = regions.shape
      n = len(image_ids) if image_ids is not None else None
      if n is None:  # unknown count: collect (TSV order, no ids file)
        ims, positions, tag_ids = [], [], []
      else:
        tag_ids = np.full((n, shape[0], 2), -1, np.int32) if tagger else None
        ims = np.lib.format.open_memmap(os.path.join(out_dir, f'{split}_ims.npy'), 'w+', np.float32, (n,) + shape)
        positions = np.lib.format.open_memmap(
          os.path.join(out_dir, f'{split}_boxes.npy'), 'w+', np.float64, (n, shape[0], 2 * pfan.TOP_L)
        )
    if regions.shape != shape:
      raise errors.UserError(
        f'{source}: image {image_id} has features {regions.shape}; the first image had {shape} '
        '(every image needs the same number of regions)'
      )
    if not np.isfinite(regions).all():
      raise errors.UserError(f'{source}: image {image_id} features hold NaN or inf')
    blocks, weights = pfan.block_positions(boxes[None], np.array([size]), where=f'{source} image {image_id}')
    layout = pfan.to_pfan_layout(blocks, weights)[0]
    has_labels = has_labels or 'objects_id' in labels
    ids = tagger.ids(labels, shape[0], f'{source}: image {image_id}') if tagger else None
    if isinstance(ims, list):
      ims.append(regions)
      positions.append(layout)
      tag_ids.append(ids)
    else:
      ims[index] = regions
      positions[index] = layout
      if tagger:
        tag_ids[index] = ids
    seen[image_id] = index
    bar.update(1)
  bar.close()
  if image_ids is not None:
    missing = [i for i in image_ids if i not in seen]
    if missing:
      raise errors.UserError(f'{source}: {len(missing)} image(s) of --image_ids not found, e.g. {missing[:3]}')
    ims.flush()
    positions.flush()
  elif ims is None:
    raise errors.UserError(f'{source}: no images')
  else:
    np.save(os.path.join(out_dir, f'{split}_ims.npy'), np.stack(ims))
    np.save(os.path.join(out_dir, f'{split}_boxes.npy'), np.stack(positions))
  if tagger:
    with open(os.path.join(out_dir, f'{split}_tags.txt'), 'w', encoding='utf-8', newline='\n') as f:
      for ids in tag_ids:
        f.write(tagger.line(ids) + '\n')
  return {
    'images': len(seen),
    'regions': shape[0],
    'dim': shape[1],
    'has_labels': has_labels,
    'order': [i for i, _ in sorted(seen.items(), key=lambda kv: kv[1])],
  }


FORMATS = ('tsv', 'npz')

FLAGS = flags.FlagValues()
flags.DEFINE_multi_string('input', None, 'TSV file(s), or the npz directory', flag_values=FLAGS)
flags.DEFINE_string(
  'image_ids', None, "file with one image id per line, in the split's caption order", flag_values=FLAGS
)
flags.DEFINE_string('out_dir', None, 'precomp directory to write', flag_values=FLAGS)
flags.DEFINE_string('split', None, 'split name of the output files ({split}_ims.npy, ...)', flag_values=FLAGS)
flags.DEFINE_string(
  'tsv_fields', None, 'comma-separated TSV column names (default: by column count, see above)', flag_values=FLAGS
)
flags.DEFINE_string(
  'objects_vocab', None, 'class names, one per line (objects_vocab.txt): write {split}_tags.txt', flag_values=FLAGS
)
flags.DEFINE_string('attributes_vocab', None, 'attribute names, one per line (attributes_vocab.txt)', flag_values=FLAGS)
flags.DEFINE_float(
  'attr_threshold', 0.0, 'drop an attribute whose confidence (attrs_conf) is <= this (default 0)', flag_values=FLAGS
)


def main(argv=None) -> int:
  positional = cli.parse_flags(FLAGS, argv, __doc__, required=('input', 'out_dir', 'split'), args='{tsv,npz}')
  if not positional:
    cli.usage_error('the following arguments are required: format')
  if len(positional) > 1:
    cli.usage_error(f'unrecognized arguments: {" ".join(positional[1:])}')
  fmt = positional[0]
  if fmt not in FORMATS:
    cli.usage_error(f'argument format: invalid choice: {fmt!r} (choose from {", ".join(map(repr, FORMATS))})')
  if FLAGS.attributes_vocab and not FLAGS.objects_vocab:
    cli.usage_error('--attributes_vocab needs --objects_vocab (tags are "attribute class")')
  tagger = Tagger(FLAGS.objects_vocab, FLAGS.attributes_vocab, FLAGS.attr_threshold) if FLAGS.objects_vocab else None
  fields = None
  if FLAGS.tsv_fields:
    fields = tuple(_canonical(n.strip()) for n in FLAGS.tsv_fields.split(','))
    missing = [n for n in ('image_id', 'image_w', 'image_h', 'num_boxes', 'boxes', 'features') if n not in fields]
    if missing:
      cli.usage_error(f'--tsv_fields lacks {missing}; got {list(fields)}')
  image_ids = None
  if FLAGS.image_ids:
    with open(FLAGS.image_ids) as f:
      image_ids = [line.strip() for line in f if line.strip()]
  if fmt == 'npz':
    if image_ids is None:
      cli.usage_error('npz needs --image_ids (the order of the split)')
    records = read_npz(FLAGS.input[0], image_ids, with_labels=tagger is not None)
  else:
    records = read_tsv(FLAGS.input, fields)
  summary = convert(records, FLAGS.out_dir, FLAGS.split, image_ids, ', '.join(FLAGS.input), tagger)
  print(
    f'{FLAGS.split}: {summary["images"]} images x {summary["regions"]} regions x {summary["dim"]} -> '
    f'{FLAGS.out_dir}/{FLAGS.split}_ims.npy, {FLAGS.split}_boxes.npy{f", {FLAGS.split}_tags.txt" if tagger else ""}'
  )
  stale = os.path.join(FLAGS.out_dir, f'{FLAGS.split}_tags.txt')
  if not tagger and os.path.exists(stale):
    print(
      f'Note: {stale} was not rewritten (no --objects_vocab); the precomp builder reads it, so it must describe '
      'these regions, or be deleted.'
    )
  if summary['has_labels'] and not tagger:
    print(
      'The input has class ids (objects_id): --objects_vocab=objects_vocab.txt '
      '--attributes_vocab=attributes_vocab.txt would also write the region tags GLFN uses.'
    )
  if image_ids is None:
    with open(os.path.join(FLAGS.out_dir, f'{FLAGS.split}_ids.txt'), 'w') as f:
      f.write('\n'.join(summary['order']) + '\n')
  return 0


if __name__ == '__main__':
  sys.exit(cli.run_tool(main))
