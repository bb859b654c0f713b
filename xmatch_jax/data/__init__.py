"""Datasets: a registry of split loaders, all returning the same in-memory layout.

`load_split(name, split)` returns `Split(images, captions, caption_to_image)`: `images` is a dict of stacked
arrays with the keys of docs/architecture.md, "Datasets" (`regions` [N, k, d] float32, `boxes` [N, k, 4],
`pixels`, `label`, `tags` ...),
`captions` a list of strings and `caption_to_image` [N_cap] int (caption c belongs to image c // 5 in test splits
of the caption datasets; the category datasets of data/category.py have one text per image, `pixels` and `label`).
These are the inputs `Retriever.score` takes, so any subset can be scored.
"""

import os
from typing import Callable
from typing import NamedTuple

import numpy as np

from xmatch_jax import errors
from xmatch_jax import progress
from xmatch_jax.data import lazy
from xmatch_jax.data import validation
from xmatch_jax.data.data_dir import default_data_dir  # noqa: F401 (re-exported)


class Split(NamedTuple):
  images: dict
  captions: list
  caption_to_image: np.ndarray


def _load_shapes(split: str, data_dir: str, builder_config: str) -> Split:
  from xmatch_jax.data import shapes  # pylint: disable=g-import-not-at-top (imports tfds)

  builder = shapes.shapes_builder(data_dir, config=builder_config)
  if split not in builder.info.splits:
    raise errors.UserError(
      f'dataset xmatch_shapes/{builder_config}: no split {split!r}; expected one of {sorted(builder.info.splits)}.'
    )
  source = builder.open_split(split)  # shards checked; a damaged record is an error naming its shard
  examples = [source[i] for i in range(len(source))]
  images = {
    'regions': np.stack([e['regions'] for e in examples]).astype(np.float32),
    'boxes': np.stack([e['boxes'] for e in examples]).astype(np.float32),
    'pixels': np.stack([e['pixels'] for e in examples]),
    'label': np.array([e['label'] for e in examples], np.int64),
    'image_id': np.array([e['image_id'] for e in examples], np.int64),
    'tags': np.array([[as_text(t) for t in e['tags']] for e in examples], dtype=object),
    'scene': np.array([as_text(e['scene']) for e in examples], dtype=object),
  }
  captions = [as_text(c) for e in examples for c in e['captions']]
  caption_to_image = np.repeat(np.arange(len(examples)), shapes.CAPTIONS_PER_IMAGE)
  return Split(images, captions, caption_to_image)


def manual_dir(name: str, data_dir: str) -> str:
  """Where the SCAN precomp files of `name` are read from: $XMATCH_MANUAL_DIR/<name>_precomp, else
  <data_dir>/manual/<name>_precomp."""
  base = os.environ.get('XMATCH_MANUAL_DIR') or os.path.join(data_dir, 'manual')
  return os.path.join(base, f'{name}_precomp')


# A precomp split whose image fields (regions, PFAN positions) exceed this many bytes is not loaded into memory: its
# image fields are LazyRows (data/lazy.py) read from the TFDS array_record files batch by batch. $XMATCH_LAZY=1 / 0
# forces either way.
LAZY_THRESHOLD_BYTES = 2 << 30


def _lazy_wanted(nbytes: int, where: str) -> bool:
  value = os.environ.get('XMATCH_LAZY', '').strip()
  if value in ('1', '0'):
    return value == '1'
  if value:
    raise errors.UserError(
      f'XMATCH_LAZY={value!r} (loading {where}); expected 1 (read image features from disk on '
      f'demand), 0 (load them into memory) or unset (on demand above {LAZY_THRESHOLD_BYTES} bytes).'
    )
  return nbytes > LAZY_THRESHOLD_BYTES


def _load_precomp(name: str, split: str, data_dir: str) -> Split:
  """Small splits in memory; large ones (see LAZY_THRESHOLD_BYTES) with `regions` (and `pfan_blocks` /
  `pfan_weights`) as LazyRows, captions and image ids in memory.

  `tags` ([N, k] object array of str, only when the dataset was built with `{split}_tags.txt`) is always in memory,
  also for lazy splits: equal tags share one str object, so COCO train (113k x 36) costs ~33 MB of pointers plus
  its few thousand distinct tags, and GLFN's prepare_images tokenises the whole field at once anyway.
  """
  from xmatch_jax.data import precomp  # pylint: disable=g-import-not-at-top (imports tfds)

  builder = precomp.build(name, manual_dir(name, data_dir), data_dir)
  if split not in builder.info.splits:
    raise errors.UserError(
      f'dataset xmatch_precomp/{name}: no split {split!r}; expected one of {sorted(builder.info.splits)}.'
    )
  source = builder.open_split(split)  # shards checked; a damaged record, now or in a lazy read, names its shard
  where = f'dataset xmatch_precomp/{name} split {split}'
  n = len(source)
  if not n:
    raise errors.UserError(f'{where}: the split has no images; expected at least one.')
  first = source[0]
  fields = ['regions'] + (['pfan_blocks', 'pfan_weights'] if first['pfan_blocks'].size else [])
  tags = _Tags(n, len(first['tags']), where) if len(first['tags']) else None
  if _lazy_wanted(n * sum(first[f].nbytes for f in fields), where):
    return _load_precomp_lazy(source, first, fields, where, tags)
  # Filled in place, one example at a time: stacking a list of examples would hold the features twice.
  images = {f: np.empty((n,) + first[f].shape, np.float32 if f == 'regions' else first[f].dtype) for f in fields}
  images['image_id'] = np.empty(n, np.int64)
  captions, counts = [], np.empty(n, np.int64)
  with progress.bar(total=n, desc=f'loading {name}/{split}', unit='image') as bar:
    for i in range(n):
      e = source[i]
      for f in fields:
        if e[f].shape != images[f].shape[1:]:
          raise errors.UserError(
            f'{where}: field "{f}" row {i} has shape {e[f].shape}; expected {images[f].shape[1:]} like row 0.'
          )
        images[f][i] = e[f]
      images['image_id'][i] = e['image_id']
      captions.extend(as_text(c) for c in e['captions'])
      counts[i] = len(e['captions'])
      if tags is not None:
        tags.set(i, e['tags'])
      bar.update(1)
  if tags is not None:
    images['tags'] = tags.values
  return Split(images, captions, _caption_to_image(counts, where))


class _Tags:
  """The `tags` field being filled: [n, k] object array of str; equal tags share one str object."""

  def __init__(self, n: int, k: int, where: str):
    self.values = np.empty((n, k), dtype=object)
    self.where = where
    self._interned = {}

  def set(self, i: int, row) -> None:
    if len(row) != self.values.shape[1]:
      raise errors.UserError(
        f'{self.where}: field "tags" row {i} has {len(row)} tags; expected {self.values.shape[1]} '
        'like row 0 (one per region).'
      )
    for r, tag in enumerate(row):
      self.values[i, r] = self._interned.setdefault(tag, as_text(tag))


def _caption_to_image(counts: np.ndarray, where: str) -> np.ndarray:
  """[n_captions] image row of each caption, from the number of captions of each image (in order)."""
  if not counts.all():
    raise errors.UserError(f'{where}: image row {int(np.argmin(counts))} has no caption; expected at least one.')
  return np.repeat(np.arange(len(counts)), counts)


def _load_precomp_lazy(source, first: dict, fields: list, where: str, tags: _Tags | None = None) -> Split:
  """Image fields as LazyRows over `source` (row shape and dtype of the first example, checked on every read);
  one pass over the examples, a chunk at a time, collects the captions, image ids and tags (in memory)."""
  reader = lazy.RowReader(source, where)
  images = {
    f: lazy.LazyRows(reader, f, first[f].shape, np.float32 if f == 'regions' else first[f].dtype) for f in fields
  }
  n = len(source)
  image_ids, captions, counts = np.empty(n, np.int64), [], np.empty(n, np.int64)
  with progress.bar(total=n, desc=f'scanning {where}', unit='image') as bar:
    for start in range(0, n, lazy.SCAN_CHUNK):
      rows = np.arange(start, min(start + lazy.SCAN_CHUNK, n))
      for i, e in enumerate(reader.read(rows, cache=False)):
        image_ids[start + i] = e['image_id']
        captions.extend(as_text(c) for c in e['captions'])
        counts[start + i] = len(e['captions'])
        if tags is not None:
          tags.set(start + i, e['tags'])
      bar.update(len(rows))
  images['image_id'] = image_ids
  if tags is not None:
    images['tags'] = tags.values
  return Split(images, captions, _caption_to_image(counts, where))


def category_manual_dir(name: str, data_dir: str) -> str:
  """Where the files of category dataset `name` are read from: $XMATCH_MANUAL_DIR/<name>, else
  <data_dir>/manual/<name>."""
  base = os.environ.get('XMATCH_MANUAL_DIR') or os.path.join(data_dir, 'manual')
  return os.path.join(base, name)


def _load_category(name: str, split: str, data_dir: str) -> Split:
  from xmatch_jax.data import category  # pylint: disable=g-import-not-at-top (imports tfds)

  builder = category.build(name, category_manual_dir(name, data_dir), data_dir)
  if split not in builder.info.splits:
    raise errors.UserError(
      f'dataset xmatch_category/{name}: no split {split!r}; expected one of {sorted(builder.info.splits)}.'
    )
  source = builder.open_split(split)  # shards checked; a damaged record is an error naming its shard
  n = len(source)
  size = builder.builder_config.image_size
  # Filled in place: stacking a list of examples would hold XMediaNet's 4.8 GB train pixels twice.
  pixels = np.empty((n, size, size, 3), np.uint8)
  labels, image_ids, captions = np.empty(n, np.int64), np.empty(n, np.int64), []
  with progress.bar(total=n, desc=f'loading {name}/{split}', unit='image') as bar:
    for i in range(n):
      e = source[i]
      pixels[i], labels[i], image_ids[i] = e['pixels'], e['label'], e['image_id']
      captions.append(as_text(e['text']))
      bar.update(1)
  return Split({'pixels': pixels, 'label': labels, 'image_id': image_ids}, captions, np.arange(n))


def as_text(value) -> str:
  """A TFDS text field (bytes, or str) as str."""
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


# name -> loader(split, data_dir). The paper datasets (f30k, coco precomp) get builders with manual_dir.
DATASETS: dict[str, Callable[[str, str], Split]] = {
  'shapes': lambda split, data_dir: _load_shapes(split, data_dir, 'default'),
  'shapes_tiny': lambda split, data_dir: _load_shapes(split, data_dir, 'tiny'),
  # SCAN precomp features from a manual dir (see data/precomp.py); in memory, or read on demand when large.
  'f30k': lambda split, data_dir: _load_precomp('f30k', split, data_dir),
  'coco': lambda split, data_dir: _load_precomp('coco', split, data_dir),
  'precomp': lambda split, data_dir: _load_precomp('custom', split, data_dir),
  # DAER's category datasets (pixels, one text per image, label) from a manual dir (see data/category.py);
  # 'category' is your own pairs in the same manifest layout as xmedianet.
  'wikipedia': lambda split, data_dir: _load_category('wikipedia', split, data_dir),
  'pascal': lambda split, data_dir: _load_category('pascal', split, data_dir),
  'xmedianet': lambda split, data_dir: _load_category('xmedianet', split, data_dir),
  'category': lambda split, data_dir: _load_category('category', split, data_dir),
}

# Datasets whose layout is not 5 captions per image (checked by load_split; None: any number, at least one).
CAPTIONS_PER_IMAGE = {'wikipedia': 1, 'pascal': 1, 'xmedianet': 1, 'category': 1, 'precomp': None}


def load_split(dataset_name: str, split: str, data_dir: str | None = None) -> Split:
  """Loads one split of a registered dataset into memory and validates it."""
  if dataset_name not in DATASETS:
    raise errors.UserError(f'no dataset builder named {dataset_name!r}; registered datasets: {sorted(DATASETS)}.')
  data = DATASETS[dataset_name](split, data_dir or default_data_dir())
  validation.check_split(
    *data, source=f'dataset {dataset_name}/{split}', captions_per_image=CAPTIONS_PER_IMAGE.get(dataset_name, 5)
  )
  return data
