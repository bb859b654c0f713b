"""Datasets: a registry of split loaders, all returning the same in-memory layout.

`load_split(name, split)` returns `Split(images, captions, caption_to_image)`: `images` is a dict of stacked
arrays with DESIGN.md's keys (`regions` [N, k, d] float32, `boxes` [N, k, 4], `pixels`, `label`, `tags` ...),
`captions` a list of strings and `caption_to_image` [N_cap] int (caption c belongs to image c // 5 in test splits
of the caption datasets; the category datasets of data/category.py have one text per image, `pixels` and `label`).
These are the inputs `Retriever.score` takes, so any subset can be scored.
"""

import os
from typing import Callable, NamedTuple

import numpy as np

from xmatch_jax.data import validation


class Split(NamedTuple):
  images: dict
  captions: list
  caption_to_image: np.ndarray


def default_data_dir() -> str:
  return os.environ.get('XMATCH_DATA_DIR') or os.path.join(os.path.expanduser('~'), '.cache', 'xmatch_jax', 'tfds')


def _load_shapes(split: str, data_dir: str, builder_config: str) -> Split:
  from xmatch_jax.data import shapes  # pylint: disable=g-import-not-at-top (imports tfds)

  builder = shapes.shapes_builder(data_dir, config=builder_config)
  if split not in builder.info.splits:
    raise ValueError(f'dataset xmatch_shapes/{builder_config}: no split {split!r}; '
                     f'expected one of {sorted(builder.info.splits)}.')
  source = builder.as_data_source(split)
  examples = [source[i] for i in range(len(source))]
  images = {
      'regions': np.stack([e['regions'] for e in examples]).astype(np.float32),
      'boxes': np.stack([e['boxes'] for e in examples]).astype(np.float32),
      'pixels': np.stack([e['pixels'] for e in examples]),
      'label': np.array([e['label'] for e in examples], np.int64),
      'image_id': np.array([e['image_id'] for e in examples], np.int64),
      'tags': np.array([[_text(t) for t in e['tags']] for e in examples], dtype=object),
      'scene': np.array([_text(e['scene']) for e in examples], dtype=object),
  }
  captions = [_text(c) for e in examples for c in e['captions']]
  caption_to_image = np.repeat(np.arange(len(examples)), shapes.CAPTIONS_PER_IMAGE)
  return Split(images, captions, caption_to_image)


def manual_dir(name: str, data_dir: str) -> str:
  """Where the SCAN precomp files of `name` are read from: $XMATCH_MANUAL_DIR/<name>_precomp, else
  <data_dir>/manual/<name>_precomp."""
  base = os.environ.get('XMATCH_MANUAL_DIR') or os.path.join(data_dir, 'manual')
  return os.path.join(base, f'{name}_precomp')


def _load_precomp(name: str, split: str, data_dir: str) -> Split:
  from xmatch_jax.data import precomp  # pylint: disable=g-import-not-at-top (imports tfds)

  builder = precomp.build(name, manual_dir(name, data_dir), data_dir)
  if split not in builder.info.splits:
    raise ValueError(f'dataset xmatch_precomp/{name}: no split {split!r}; expected one of '
                     f'{sorted(builder.info.splits)}.')
  source = builder.as_data_source(split)
  examples = [source[i] for i in range(len(source))]
  images = {'regions': np.stack([e['regions'] for e in examples]).astype(np.float32),
            'image_id': np.array([e['image_id'] for e in examples], np.int64)}
  if examples and examples[0]['pfan_blocks'].size:
    images['pfan_blocks'] = np.stack([e['pfan_blocks'] for e in examples])
    images['pfan_weights'] = np.stack([e['pfan_weights'] for e in examples])
  captions = [_text(c) for e in examples for c in e['captions']]
  caption_to_image = np.repeat(np.arange(len(examples)), precomp.CAPTIONS_PER_IMAGE)
  return Split(images, captions, caption_to_image)


def category_manual_dir(name: str, data_dir: str) -> str:
  """Where the files of category dataset `name` are read from: $XMATCH_MANUAL_DIR/<name>, else
  <data_dir>/manual/<name>."""
  base = os.environ.get('XMATCH_MANUAL_DIR') or os.path.join(data_dir, 'manual')
  return os.path.join(base, name)


def _load_category(name: str, split: str, data_dir: str) -> Split:
  from xmatch_jax.data import category  # pylint: disable=g-import-not-at-top (imports tfds)

  builder = category.build(name, category_manual_dir(name, data_dir), data_dir)
  if split not in builder.info.splits:
    raise ValueError(f'dataset xmatch_category/{name}: no split {split!r}; expected one of '
                     f'{sorted(builder.info.splits)}.')
  source = builder.as_data_source(split)
  n = len(source)
  size = builder.builder_config.image_size
  # Filled in place: stacking a list of examples would hold XMediaNet's 4.8 GB train pixels twice.
  pixels = np.empty((n, size, size, 3), np.uint8)
  labels, image_ids, captions = np.empty(n, np.int64), np.empty(n, np.int64), []
  for i in range(n):
    e = source[i]
    pixels[i], labels[i], image_ids[i] = e['pixels'], e['label'], e['image_id']
    captions.append(_text(e['text']))
  return Split({'pixels': pixels, 'label': labels, 'image_id': image_ids}, captions, np.arange(n))


def _text(value) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


# name -> loader(split, data_dir). The paper datasets (f30k, coco precomp) get builders with manual_dir.
DATASETS: dict[str, Callable[[str, str], Split]] = {
    'shapes': lambda split, data_dir: _load_shapes(split, data_dir, 'default'),
    'shapes_tiny': lambda split, data_dir: _load_shapes(split, data_dir, 'tiny'),
    # SCAN precomp features from a manual dir (see data/precomp.py); loaded into memory.
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

# Datasets whose layout is not 5 captions per image (checked by load_split).
CAPTIONS_PER_IMAGE = {'wikipedia': 1, 'pascal': 1, 'xmedianet': 1, 'category': 1}


def load_split(dataset_name: str, split: str, data_dir: str | None = None) -> Split:
  """Loads one split of a registered dataset into memory and validates it."""
  if dataset_name not in DATASETS:
    raise ValueError(f'no dataset builder named {dataset_name!r}; registered datasets: {sorted(DATASETS)}.')
  data = DATASETS[dataset_name](split, data_dir or default_data_dir())
  validation.check_split(*data, source=f'dataset {dataset_name}/{split}',
                         captions_per_image=CAPTIONS_PER_IMAGE.get(dataset_name, 5))
  return data
