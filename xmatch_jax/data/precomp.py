"""TFDS builder for SCAN's precomputed-feature layout (`xmatch_precomp`: f30k, coco, custom), from a manual dir.

Expected files in the manual dir (SCAN's `data/<name>_precomp/`, e.g. f30k_precomp):

  {split}_ims.npy     [n_images, k, d] float32 bottom-up-attention region features (k = 36, d = 2048), or one row
                      per caption (images repeated 5 times, as some SCAN releases store them); for dataset
                      `precomp` also [n_images, d], one vector per image (VSE++'s releases), read as k = 1
  {split}_caps.txt    one caption per line, 5 consecutive lines per image (dataset `precomp`: any number per
                      image with {split}_caption_images.txt)
  {split}_ids.txt     optional, one integer id per line: per image (n_images lines) or per caption (the
                      SCAN releases: the 5 lines of an image carry its id); becomes each image's `image_id`,
                      which evaluation outputs carry (W/eval/<split>_topk.json). Ids must be unique per image.
                      Without it, image_id = the image's row.
  {split}_caption_images.txt
                      optional, dataset `precomp` only: line c holds the 0-based row in {split}_ims.npy of the
                      image caption c describes, so an image may have 1 to N captions (every image at least
                      one), in any order; the build groups each image's captions in file order.
  {split}_boxes.npy   optional, PFAN block positions [n_images, k, 2L] (see xmatch_jax.data.pfan)
  {split}_tags.txt    optional, per-region tags (GLFN): line i holds the k tags of image i ("red car", ...), in the
                      order of its regions in {split}_ims.npy, separated by TAB characters (a tag may contain
                      spaces; spaces around a tag are dropped); UTF-8; one line per image, also when
                      {split}_ims.npy repeats each image per caption. Every split has one, or none does.

Splits: train, dev, test (and testall for coco). Checks on build, each naming the file and the expected value:
Flickr30K test = 1000 images / 5000 captions, COCO testall = 5000 / 25000, captions = 5 x images (or the caption
index file's rows, each image at least one), ids integer and unique per image, feature size,
dtype float32, no NaN / inf, no empty caption, boxes matching the images, tags files for all splits or none, one
line per image with exactly k non-empty tags (named by line). Features are read one image at a time and written
shard by shard (StreamingArrayRecordBuilder: 256 MB of examples per shard), so COCO's ~17 GB train file never has to
fit in memory: a synthetic 16.5 GiB split builds with 0.36 GiB peak RSS (tools/precomp_build_memory.py).

Tags come from the detector that produced the features: bottom-up-attention predicts a Visual Genome class and
attribute per box, and GLFN's tag is "attribute class" (e.g. "white plate"), the names taken from the vocab files
shipped with bottom-up-attention (data/genome/1600-400-20/objects_vocab.txt, attributes_vocab.txt: line j names
class / attribute j, the first of its comma-separated synonyms). tools/convert_features.py writes {split}_tags.txt
with {split}_ims.npy when given --objects_vocab / --attributes_vocab and detections that carry objects_id /
attrs_id. The tags must describe the same boxes, in the same order, as the features: SCAN's released precomp
features carry no class ids, so for them the detector has to be re-run on their boxes.

  python -c "from xmatch_jax.data import precomp; precomp.build('f30k', manual_dir='data/f30k_precomp')"

(data_dir defaults to the library's, $XMATCH_DATA_DIR or ~/.cache/xmatch_jax/tfds, where training looks.)

The name does not clash with TFDS's own flickr30k / coco datasets. A build is stored in
<data_dir>/xmatch_precomp/<config>/<VERSION> and reused from then on; TFDS does not look at the manual dir again.
Version 1.1.0 added `tags`, so the first load after that update rebuilds every config from its manual dir (which must
still hold the files; as slow as the first build; the 1.0.0 directory is no longer read and may be deleted). Tags
files added after a build need a rebuild too: delete <data_dir>/xmatch_precomp/<config>/<version> (a load refuses a
build whose tags disagree with the manual dir, naming that directory). Version 1.2.0 added image ids from
{split}_ids.txt and any number of captions per image; a 1.1.0 build is still used as it is while its manual dir
has neither file (its data would be the same), and the first load after adding one builds 1.2.0.
"""

import contextlib
import dataclasses
import functools
import itertools
import os
import tokenize
from typing import NamedTuple

import numpy as np
import tensorflow_datasets as tfds

from xmatch_jax import errors
from xmatch_jax import progress
from xmatch_jax.data import array_record
from xmatch_jax.data import data_dir as data_dir_lib
from xmatch_jax.data import pfan

CAPTIONS_PER_IMAGE = 5
_RAW = tfds.features.Encoding.BYTES


@dataclasses.dataclass(eq=False)
class PrecompConfig(tfds.core.BuilderConfig):
  """splits: names to build; expected: {split: n_images} checked on build; region_dim: 0 = any."""

  splits: tuple = ('train', 'dev', 'test')
  expected: dict = dataclasses.field(default_factory=dict)
  region_dim: int = 0
  num_regions: int = 0


CONFIGS = {
  'f30k': PrecompConfig(
    name='f30k',
    description='Flickr30K, SCAN precomp (Karpathy split)',
    expected={'test': 1000, 'dev': 1000},
    region_dim=2048,
    num_regions=36,
  ),
  'coco': PrecompConfig(
    name='coco',
    description='MS-COCO, SCAN precomp (testall = 5K test)',
    splits=('train', 'dev', 'test', 'testall'),
    expected={'testall': 5000},
    region_dim=2048,
    num_regions=36,
  ),
  'custom': PrecompConfig(
    name='custom', description='Your own features in the SCAN precomp layout: only internal consistency is checked'
  ),
}


def _load_npy(path: str, expected: str) -> np.ndarray:
  """Memory-maps a .npy file; an unreadable one (truncated, empty, pickled objects, not .npy) names the file."""
  try:
    return np.load(path, mmap_mode='r', allow_pickle=False)
  except (ValueError, EOFError, OSError, OverflowError, tokenize.TokenError) as e:  # a header numpy cannot parse
    raise errors.UserError(
      f'{path}: not a readable .npy array ({type(e).__name__}: {e}); expected a complete .npy file '
      f'of {expected} written by numpy.save (truncated or partly copied?)'
    ) from None


class _SplitFiles(NamedTuple):
  """A checked split: features (memmap; row i * repeat is image i), captions in file order, image i's captions are
  captions[order[offsets[i]:offsets[i + 1]]], ids [n_images] int64 (None: the row), optional boxes and tags."""

  ims: np.ndarray
  captions: list
  repeat: int
  order: np.ndarray
  offsets: np.ndarray
  ids: np.ndarray | None
  boxes: np.ndarray | None
  tags_path: str | None

  @property
  def n_images(self) -> int:
    return len(self.offsets) - 1


def _int_lines(path: str, what: str) -> np.ndarray:
  """The integers of a text file with one per line (trailing empty lines ignored); errors name the line."""
  values = []
  with open(path, 'rb') as f:
    for lineno, raw in enumerate(f, 1):
      text = raw.strip()
      try:
        values.append(int(text))
      except ValueError:
        if text:
          shown = text[:40].decode('utf-8', 'replace')
          raise errors.UserError(
            f'{path}: line {lineno} is {shown!r}; expected one integer per line ({what})'
          ) from None
        values.append(None)
      if values[-1] is not None and not -(2**63) <= values[-1] < 2**63:
        raise errors.UserError(f'{path}: line {lineno} is {str(values[-1])[:40]}; expected a 64-bit integer ({what})')
  while values and values[-1] is None:
    values.pop()
  if None in values:
    raise errors.UserError(f'{path}: line {values.index(None) + 1} is empty; expected one integer per line ({what})')
  return np.array(values, np.int64)


def _caption_owners(path: str, n_captions: int, n_images: int, caps_path: str) -> np.ndarray:
  """{split}_caption_images.txt -> [n_captions] image rows, each in range, every image with a caption."""
  owner = _int_lines(path, f"the row of each caption's image in [0, {n_images})")
  if len(owner) != n_captions:
    raise errors.UserError(
      f'{path}: {len(owner)} lines for {n_captions} captions in {caps_path}; expected one per caption'
    )
  bad = np.flatnonzero((owner < 0) | (owner >= n_images))
  if bad.size:
    raise errors.UserError(
      f'{path}: line {bad[0] + 1} names image row {owner[bad[0]]}; expected a row in [0, {n_images})'
    )
  without = np.flatnonzero(np.bincount(owner, minlength=n_images) == 0)
  if without.size:
    raise errors.UserError(
      f'{path}: image row {without[0]} has no caption ({without.size} such images); expected at least one each'
    )
  return owner


def _image_ids(path: str, n_images: int, order: np.ndarray, offsets: np.ndarray) -> np.ndarray:
  """{split}_ids.txt -> [n_images] ids: one line per image, or one per caption (an image's captions agree)."""
  ids = _int_lines(path, 'an image id')
  n_captions = len(order)
  if len(ids) == n_captions and n_captions != n_images:
    per_caption = ids[order]  # grouped by image
    first = per_caption[offsets[:-1]]
    differ = np.flatnonzero(per_caption != np.repeat(first, np.diff(offsets)))
    if differ.size:
      image = int(np.searchsorted(offsets, differ[0], 'right')) - 1
      raise errors.UserError(
        f'{path}: line {int(order[differ[0]]) + 1} (a caption of image {image}) has id {per_caption[differ[0]]}, '
        f'another caption of that image {first[image]}; expected one id per image'
      )
    ids = first
  elif len(ids) != n_images:
    raise errors.UserError(
      f'{path}: {len(ids)} lines; expected one id per image ({n_images}) or per caption ({n_captions})'
    )
  values, counts = np.unique(ids, return_counts=True)
  if (counts > 1).any():
    dup = values[counts > 1][0]
    rows = np.flatnonzero(ids == dup)[:2]
    raise errors.UserError(f'{path}: id {dup} is given to images {rows[0]} and {rows[1]}; expected unique ids')
  return ids


def _check_files(manual_dir: str, config: PrecompConfig) -> dict:
  """Opens and checks every split's files; returns {split: _SplitFiles}."""
  out = {}
  tags_paths = {split: os.path.join(manual_dir, f'{split}_tags.txt') for split in config.splits}
  have_tags = [split for split in config.splits if os.path.exists(tags_paths[split])]
  if have_tags and len(have_tags) != len(config.splits):
    missing = [tags_paths[split] for split in config.splits if split not in have_tags]
    raise errors.MissingFileError(
      f'{", ".join(missing)}: missing, but {", ".join(f"{s}_tags.txt" for s in have_tags)} '
      f'exist(s) in {manual_dir}; expected a {{split}}_tags.txt for every split '
      f'({", ".join(config.splits)}) or for none'
    )
  for split in config.splits:
    ims_path = os.path.join(manual_dir, f'{split}_ims.npy')
    caps_path = os.path.join(manual_dir, f'{split}_caps.txt')
    for path in (ims_path, caps_path):
      if not os.path.exists(path):
        raise errors.MissingFileError(
          f'{path}: missing; the {config.name} precomp layout needs {split}_ims.npy and '
          f'{split}_caps.txt in {manual_dir}'
        )
    ims = _load_npy(ims_path, 'float32 [n_images, k, d] region features')
    if ims.ndim not in (2, 3):
      raise errors.UserError(f'{ims_path}: shape {ims.shape}; expected [n_images, k, d] (or [n_images, d]: k = 1)')
    if ims.dtype != np.float32:
      raise errors.UserError(f'{ims_path}: dtype {ims.dtype}; expected float32')
    if 0 in ims.shape[1:]:
      raise errors.UserError(f'{ims_path}: shape {ims.shape}; expected at least one region of at least one feature')
    k = 1 if ims.ndim == 2 else ims.shape[1]  # [n, d]: one vector per image (VSE++'s precomp releases)
    if config.num_regions and ims.ndim == 2:
      raise errors.UserError(
        f'{ims_path}: shape {ims.shape}, one vector per image (as in the VSE++ releases); the {config.name} layout has '
        f'{config.num_regions} regions per image. Put these files in the custom_precomp manual dir and use dataset '
        'precomp (--config.dataset=precomp), which takes them as k = 1 region.'
      )
    if config.region_dim and ims.shape[-1] != config.region_dim:
      raise errors.UserError(f'{ims_path}: feature size {ims.shape[-1]}; expected {config.region_dim}')
    if config.num_regions and k != config.num_regions:
      raise errors.UserError(f'{ims_path}: {k} regions per image; expected {config.num_regions}')
    try:
      with open(caps_path, encoding='utf-8') as f:
        captions = [line.rstrip('\n') for line in f]
    except UnicodeDecodeError as e:
      raise errors.UserError(f'{caps_path}: not UTF-8 text ({e}); expected one caption per line in UTF-8') from None
    if captions and captions[-1] == '':
      captions.pop()
    empty = [i + 1 for i, c in enumerate(captions) if not c.strip()]
    if empty:
      raise errors.UserError(f'{caps_path}: line {empty[0]} is empty ({len(empty)} empty caption(s))')
    repeat = 1
    index_path = os.path.join(manual_dir, f'{split}_caption_images.txt')
    if os.path.exists(index_path):
      if config.name != 'custom':
        raise errors.UserError(
          f'{index_path}: a caption index is read for dataset precomp (your own data) only; {config.name} has '
          f'{CAPTIONS_PER_IMAGE} consecutive captions per image'
        )
      n_images = ims.shape[0]
      owner = _caption_owners(index_path, len(captions), n_images, caps_path)
      order = np.argsort(owner, kind='stable')
      offsets = np.concatenate([[0], np.cumsum(np.bincount(owner, minlength=n_images))])
    else:
      if ims.shape[0] == len(captions) and ims.shape[0] % CAPTIONS_PER_IMAGE == 0 and ims.shape[0] > 1:
        repeat = CAPTIONS_PER_IMAGE  # one feature row per caption: the image repeated 5 times
      n_images = ims.shape[0] // repeat
      if len(captions) != CAPTIONS_PER_IMAGE * n_images:
        more = f' (or a {split}_caption_images.txt for another number per image)' if config.name == 'custom' else ''
        raise errors.UserError(
          f'{caps_path}: {len(captions)} captions for {n_images} images in {ims_path}; expected '
          f'{CAPTIONS_PER_IMAGE} x {n_images} = {CAPTIONS_PER_IMAGE * n_images}{more}'
        )
      order = np.arange(len(captions))
      offsets = np.arange(n_images + 1) * CAPTIONS_PER_IMAGE
    ids_path = os.path.join(manual_dir, f'{split}_ids.txt')
    ids = _image_ids(ids_path, n_images, order, offsets) if os.path.exists(ids_path) else None
    if split in config.expected and n_images != config.expected[split]:
      raise errors.UserError(
        f'{ims_path}: {n_images} images; {config.name} {split} has {config.expected[split]} '
        f'({CAPTIONS_PER_IMAGE * config.expected[split]} captions)'
      )
    boxes = None
    boxes_path = os.path.join(manual_dir, f'{split}_boxes.npy')
    if os.path.exists(boxes_path):
      boxes = _load_npy(boxes_path, f'PFAN block positions [{n_images}, {k}, 2L]')
      if boxes.shape[:2] != (n_images, k):
        raise errors.UserError(f'{boxes_path}: shape {boxes.shape}; expected [{n_images}, {k}, 2L]')
    tags_path = tags_paths[split] if have_tags else None
    if tags_path:
      _check_tags(tags_path, n_images, k, ims_path)
    out[split] = _SplitFiles(ims, captions, repeat, order, offsets, ids, boxes, tags_path)
  return out


def _split_tags(line: str, path: str, lineno: int, k: int) -> list:
  """One line of a tags file -> its k tags (stripped); errors name the file, the line and the expectation."""
  tags = [t.strip() for t in line.split('\t')]
  if len(tags) != k:
    hint = ' (this line has no TAB: are the tags separated by spaces?)' if len(tags) == 1 and k > 1 else ''
    ims = os.path.basename(path)[: -len('_tags.txt')] + '_ims.npy'
    raise errors.UserError(
      f'{path}: line {lineno} has {len(tags)} tag(s); expected {k} (one per region of {ims}), '
      f'separated by TAB characters{hint}'
    )
  empty = [r + 1 for r, t in enumerate(tags) if not t]
  if empty:
    raise errors.UserError(
      f'{path}: line {lineno}: tag {empty[0]} is empty ({len(empty)} empty); expected {k} non-empty tags'
    )
  return tags


def _tag_lines(path: str):
  """Yields (line number, text without the line end) of a UTF-8 tags file; non-UTF-8 bytes name the line."""
  with open(path, 'rb') as f:
    for lineno, raw in enumerate(f, 1):
      try:
        line = raw.decode('utf-8')
      except UnicodeDecodeError as e:
        raise errors.UserError(
          f'{path}: line {lineno} is not UTF-8 ({e.reason} at byte {e.start} of the line); expected UTF-8 text'
        ) from None
      yield lineno, line.rstrip('\n').rstrip('\r')


def _check_tags(path: str, n_images: int, k: int, ims_path: str) -> None:
  """One line per image of `ims_path` with k tags each (empty lines after the last image are ignored)."""
  lines = 0
  for lineno, line in _tag_lines(path):
    if lineno > n_images:
      if line.strip():
        raise errors.UserError(
          f'{path}: line {lineno}: more lines than images; expected {n_images} lines, one per image of {ims_path}'
        )
      continue
    _split_tags(line, path, lineno, k)
    lines = lineno
  if lines < n_images:
    raise errors.UserError(
      f'{path}: ends after {lines} line(s): line {lines + 1} is missing; expected {n_images} lines, '
      f'one per image of {ims_path}'
    )


def _read_row(f, array: np.ndarray, index: int) -> np.ndarray:
  """Row `index` of the .npy file `f` behind the memory map `array`, read with a plain file read: pages read through
  a memory map stay mapped (and counted in the build's RSS) while memory is free; a read leaves them to the page
  cache."""
  if not isinstance(array, np.memmap) or not array.flags.c_contiguous:
    return np.array(array[index])
  row_bytes = int(np.prod(array.shape[1:])) * array.itemsize
  f.seek(array.offset + index * row_bytes)
  data = f.read(row_bytes)
  if len(data) != row_bytes:
    raise errors.UserError(f'{f.name}: ends inside row {index}; expected {row_bytes} bytes (truncated file?)')
  return np.frombuffer(data, array.dtype).reshape(array.shape[1:]).copy()


class _SplitProgress:
  """One progress bar over the shards of a split (TFDS writes them one after another): images written of the split.
  The bar starts with the first image and closes after the last."""

  def __init__(self, desc: str, total: int):
    self.desc, self.total, self.bar = desc, total, None

  def update(self) -> None:
    if self.bar is None:
      self.bar = progress.bar(total=self.total, desc=self.desc, unit='image')
    self.bar.update(1)
    if self.bar.n >= self.total:
      self.bar.close()


class XmatchPrecomp(array_record.StreamingArrayRecordBuilder):
  """Region features + 5 captions per image from SCAN's precomp files (manual download)."""

  VERSION = tfds.core.Version('1.2.0')
  SUPPORTED_VERSIONS = ['1.1.0']  # read, never written: see `build`
  RELEASE_NOTES = {
    '1.0.0': 'SCAN precomp layout: regions, 5 captions, optional PFAN positions.',
    '1.1.0': 'Optional per-region tags from {split}_tags.txt (feature `tags`, empty when the dataset has none).',
    '1.2.0': 'image_id from {split}_ids.txt; dataset precomp: 1-N captions per image ({split}_caption_images.txt).',
  }
  BUILDER_CONFIGS = list(CONFIGS.values())
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

  def _info(self) -> tfds.core.DatasetInfo:
    return array_record.LocalDatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          'image_id': tfds.features.Scalar(np.int64),
          'regions': tfds.features.Tensor(shape=(None, None), dtype=np.float32, encoding=_RAW),
          'captions': tfds.features.Sequence(tfds.features.Text()),  # 5, or 1-N for dataset precomp
          'pfan_blocks': tfds.features.Tensor(shape=(None, None), dtype=np.int32, encoding='zlib'),
          'pfan_weights': tfds.features.Tensor(shape=(None, None), dtype=np.float32, encoding='zlib'),
          'tags': tfds.features.Sequence(tfds.features.Text()),  # k tags, or none
        }
      ),
      disable_shuffling=True,
    )

  def _shard_iterators_per_split(self, dl_manager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    files = _check_files(manual_dir, self.builder_config)
    out = {}
    for split in self.builder_config.splits:
      split_files = files[split]
      n_images, ims = split_files.n_images, split_files.ims
      per_shard = max(1, self.SHARD_BYTES // max(1, int(np.prod(ims.shape[1:])) * ims.itemsize))
      bar = _SplitProgress(f'building xmatch_precomp/{self.builder_config.name} {split}', n_images)
      out[split] = [
        functools.partial(
          self._generate_examples, split, manual_dir, split_files, start, min(start + per_shard, n_images), bar
        )
        for start in range(0, max(n_images, 1), per_shard)
      ]
    return out

  def _generate_examples(
    self, split, manual_dir, split_files: _SplitFiles, start, stop, bar: _SplitProgress | None = None
  ):
    """Images [start, stop) of a split: one shard; `bar` counts the images the writer has taken."""
    ims, captions, repeat, order, offsets, ids, boxes, tags_path = split_files
    ims_path = os.path.join(manual_dir, f'{split}_ims.npy')
    # Read in step with the images (checked by _check_files): the file is never held in memory.
    lines = _tag_lines(tags_path) if tags_path else None
    tag_lines = itertools.islice(lines, start, None) if lines is not None else None
    boxes_path = os.path.join(manual_dir, f'{split}_boxes.npy')
    with (
      open(ims_path, 'rb') as features,
      open(boxes_path, 'rb') if boxes is not None else contextlib.nullcontext() as pos,
    ):
      try:
        for i in range(start, stop):
          regions = _read_row(features, ims, i * repeat).astype(np.float32).reshape(-1, ims.shape[-1])  # [k, d]
          if not np.isfinite(regions).all():
            raise errors.UserError(f'{ims_path}: image {i} holds NaN or inf')
          if boxes is not None:
            blocks, weights = pfan.from_pfan_layout(
              _read_row(pos, boxes, i)[None], where=f'{split}_boxes.npy image {i}'
            )
            blocks, weights = blocks[0], weights[0]
          else:
            blocks, weights = np.zeros((0, 0), np.int32), np.zeros((0, 0), np.float32)
          tags = []
          if tag_lines is not None:
            lineno, line = next(tag_lines)
            tags = _split_tags(line, tags_path, lineno, regions.shape[0])
          yield (
            i,
            {
              'image_id': i if ids is None else int(ids[i]),
              'regions': regions,
              'captions': [captions[c] for c in order[offsets[i] : offsets[i + 1]]],
              'pfan_blocks': blocks,
              'pfan_weights': weights,
              'tags': tags,
            },
          )
          if bar is not None:
            bar.update()
      finally:
        if lines is not None:
          lines.close()


def build(name: str, manual_dir: str, data_dir: str | None = None) -> XmatchPrecomp:
  """Builds (once) and returns the `xmatch_precomp/<name>` builder from `manual_dir`."""
  if name not in CONFIGS:
    raise errors.UserError(f'xmatch_precomp has no config {name!r}; expected one of {sorted(CONFIGS)}')
  data_dir = data_dir or data_dir_lib.default_data_dir()
  if not os.path.isdir(manual_dir):
    raise errors.MissingFileError(
      f'{manual_dir}: manual dir not found; it must hold the SCAN precomp files ({{split}}_ims.npy, {{split}}_caps.txt)'
      + array_record.other_versions_note(XmatchPrecomp, name, data_dir)
    )
  version = None
  if not any(
    os.path.exists(os.path.join(manual_dir, f'{split}_{kind}.txt'))
    for split in CONFIGS[name].splits
    for kind in ('ids', 'caption_images')
  ):
    older = os.path.join(data_dir, XmatchPrecomp.name, name, '1.1.0', 'dataset_info.json')
    version = '1.1.0' if os.path.exists(older) else None  # same data as a 1.2.0 build would have: no rebuild
  builder = XmatchPrecomp.prepare(config=name, data_dir=data_dir, version=version, manual_dir=manual_dir)
  _check_built_tags(builder, manual_dir)
  return builder


def _check_built_tags(builder: XmatchPrecomp, manual_dir: str) -> None:
  """A reused build must agree with the manual dir on tags (TFDS never looks at the manual dir again)."""
  splits = builder.builder_config.splits
  files = [f'{split}_tags.txt' for split in splits if os.path.exists(os.path.join(manual_dir, f'{split}_tags.txt'))]
  built = False
  for split in splits:  # the first split with an image tells
    source = builder.open_split(split)
    if len(source):
      built = len(source[0]['tags']) > 0
      break
  if bool(files) != built:
    now = f'now holds {", ".join(files)}' if files else 'now holds no {split}_tags.txt'
    raise errors.UserError(
      f'{builder.data_dir}: this build of xmatch_precomp/{builder.builder_config.name} has '
      f'{"" if built else "no "}tags, but {manual_dir} {now}; expected them to agree. Delete '
      f'{builder.data_dir} to rebuild from {manual_dir} (see the rebuild note in '
      'xmatch_jax/data/precomp.py).'
    )
