"""TFDS builder of the category-labelled image-text datasets of DAER (`xmatch_category`), from a manual dir.

Configs: wikipedia, pascal, xmedianet, and category (your own data in the manifest layout). One example per
image-text pair:

  image_id  int64, the pair's index in the pooled order of its layout (below)
  pixels    [S, S, 3] uint8: the image decoded with Pillow, converted to RGB and resized to S x S (S = 224 by
            default) with Pillow's bilinear filter (which antialiases when shrinking); the aspect ratio is not kept
  label     int64, 0-based class
  text      the pair's text, whitespace runs collapsed to one space

The manual dir is $XMATCH_MANUAL_DIR/<name>, else <data_dir>/manual/<name> (`xmatch_jax.data.category_manual_dir`).
Layouts (those of the public releases):

wikipedia: Rasiwasia et al. 2010, the "wikipedia_dataset" release (2866 pairs, 10 classes)
  images/<category>/<image_name>.jpg
  texts/<text_id>.xml            the article inside a <text> element (malformed XML is read with a regex)
  categories.list                one category name per line, in label order
  trainset_txt_img_cat.list      lines <text_id> <image_name> <category, 1-based>, tab-separated
  testset_txt_img_cat.list       same; pairs are pooled in file order, train list then test list

pascal: Pascal Sentence, Rashtchian et al. 2010 (1000 pairs, 20 classes)
  dataset/<category>/<image>.jpg
  sentence/<category>/<image>.txt  5 sentences, one per line, joined by a space into the image's one text
  label = index of the category in the sorted folder names of dataset/; pairs in sorted (category, image) order

xmedianet: the image and text parts of XMediaNet, Peng et al. (40000 pairs, 200 classes), and category (any
number of pairs and classes): the release layout of XMediaNet varies, so both read a manifest
  pairs.tsv   header line `image<TAB>text<TAB>label`, then one pair per line in pooled order (no quoting):
              image path relative to the manual dir; text inline, or a path to a .txt file relative to the
              manual dir if it ends in .txt; integer label, 0-based

Splits (DAER section 4.1: 80% train, 10% dev, 10% test): with N pooled pairs, `np.random.default_rng(0)
.permutation(N)` is drawn; its first round(0.8 N) entries are train, the next round(0.1 N) dev, the rest test, each
split in permutation order. Sizes:

  wikipedia   2866 -> 2293 / 287 / 286   (the paper's 2292 / 286 / 287 sums to 2865, one pair fewer)
  pascal      1000 ->  800 / 100 / 100
  xmedianet  40000 -> 32000 / 4000 / 4000

A `splits.json` in the manual dir, {"train": [...], "dev": [...], "test": [...]} of pooled indices (disjoint, in
[0, N), need not cover every pair), replaces the permutation, so any published split is reproduced exactly.

Checks on build, each naming the file: every listed file exists, every image decodes, labels in range, every
line well formed, texts UTF-8 and not empty, the pair and class counts of the named datasets (EXPECTED_PAIRS,
EXPECTED_CLASSES; a mismatch is an error naming both counts).

Memory and disk: pixels are stored raw, 150 kB per image at S = 224; XMediaNet is 6 GB on disk, and `load_split`
holds a split in memory as for the other datasets (train 4.8 GB). The build is cached in
<data_dir>/xmatch_category/<config>/; delete that directory to rebuild after changing the manual dir.
`load_split` uses S = 224; `build(name, manual_dir, data_dir, image_size=S)` builds other sizes as configs of their
own (<name>_<S>px).

  python -c "from xmatch_jax.data import category; category.build('pascal', 'data/pascal', 'DATA_DIR')"
"""

import dataclasses
import html
import json
import os
import re
from typing import NamedTuple
from xml.etree import ElementTree

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from xmatch_jax import errors
from xmatch_jax import progress
from xmatch_jax.data import array_record

IMAGE_SIZE = 224
SPLITS = ('train', 'dev', 'test')
SPLIT_FRACTIONS = (0.8, 0.1)  # train, dev; test is the rest
SPLIT_SEED = 0
SENTENCES_PER_IMAGE = 5  # Pascal Sentence
# Checked on build; the tests patch them to build tiny fake trees under the real names.
EXPECTED_PAIRS = {'wikipedia': 2866, 'pascal': 1000, 'xmedianet': 40000}
EXPECTED_CLASSES = {'wikipedia': 10, 'pascal': 20, 'xmedianet': 200}
_RAW = tfds.features.Encoding.BYTES

LAYOUTS = {
  'wikipedia': (
    'images/<category>/<image_name>.jpg, texts/<text_id>.xml (article in <text>), categories.list '
    '(one category per line, label order), trainset_txt_img_cat.list and testset_txt_img_cat.list '
    '(lines <text_id>\\t<image_name>\\t<category 1-based>)'
  ),
  'pascal': 'dataset/<category>/<image>.jpg and sentence/<category>/<image>.txt (5 sentences, one per line)',
  'xmedianet': (
    'pairs.tsv with header image\\ttext\\tlabel: image path relative to the manual dir, text inline '
    'or a .txt path relative to the manual dir, 0-based integer label'
  ),
}
LAYOUTS['category'] = LAYOUTS['xmedianet']
_OPTIONAL = 'optional splits.json {"train": [...], "dev": [...], "test": [...]} of pair indices'


class Pair(NamedTuple):
  image: str  # path of the image file
  text: str
  label: int


@dataclasses.dataclass(eq=False)
class CategoryConfig(tfds.core.BuilderConfig):
  """dataset: key of LAYOUTS / EXPECTED_*; layout: 'wikipedia', 'pascal' or 'manifest'; image_size: S of the
  stored [S, S, 3] pixels."""

  dataset: str = 'category'
  layout: str = 'manifest'
  image_size: int = IMAGE_SIZE


CONFIGS = {
  'wikipedia': CategoryConfig(
    name='wikipedia',
    dataset='wikipedia',
    layout='wikipedia',
    description='Wikipedia (Rasiwasia et al. 2010): 2866 pairs, 10 classes',
  ),
  'pascal': CategoryConfig(
    name='pascal',
    dataset='pascal',
    layout='pascal',
    description='Pascal Sentence (Rashtchian et al. 2010): 1000 pairs, 20 classes',
  ),
  'xmedianet': CategoryConfig(
    name='xmedianet',
    dataset='xmedianet',
    description='XMediaNet image-text pairs from a pairs.tsv manifest: 40000 pairs, 200 classes',
  ),
  'category': CategoryConfig(
    name='category', description='Your own pairs from a pairs.tsv manifest: only internal consistency is checked'
  ),
}


def _clean(text: str) -> str:
  return ' '.join(text.split())


def _require(path: str, what: str) -> str:
  if not os.path.exists(path):
    raise errors.MissingFileError(f'{path}: missing; {what}')
  return path


def _read_text(path: str) -> str:
  try:
    with open(path, encoding='utf-8') as f:
      return f.read()
  except UnicodeDecodeError as e:
    raise errors.UserError(f'{path}: not UTF-8 text ({e})') from None


def _counted(items, total: int, desc: str, unit: str):
  """Yields `items`, counting the ones done on a progress.bar (shown for passes over 10 s)."""
  with progress.bar(total=total, desc=desc, unit=unit, leave=False) as bar:
    for item in items:
      yield item
      bar.update(1)


def _read_lines(path: str) -> list[tuple[int, str]]:
  """(1-based line number, stripped line) of the non-blank lines of a text file."""
  return [(i + 1, line.strip()) for i, line in enumerate(_read_text(path).split('\n')) if line.strip()]


def _wikipedia_text(path: str) -> str:
  with open(path, 'rb') as f:
    raw = f.read()
  try:
    node = next(ElementTree.fromstring(raw).iter('text'), None)
    text = None if node is None else ''.join(node.itertext())
  except (ElementTree.ParseError, LookupError):  # some release files hold unescaped '&', an unknown encoding, ...
    match = re.search(r'<text\b[^>]*>(.*)</text>', raw.decode('utf-8', errors='replace'), re.DOTALL)
    text = None if match is None else html.unescape(match.group(1))
  if text is None or not text.strip():
    raise errors.UserError(
      f'{path}: no <text> element or an empty one; expected the article text inside <text>...</text>'
    )
  return _clean(text)


def _scan_wikipedia(root: str) -> tuple[list[Pair], int, str]:
  """(pairs, number of categories, file defining the categories)."""
  categories = [
    line for _, line in _read_lines(_require(os.path.join(root, 'categories.list'), 'the wikipedia layout needs it'))
  ]
  pairs = []
  for list_name in ('trainset_txt_img_cat.list', 'testset_txt_img_cat.list'):
    list_path = _require(os.path.join(root, list_name), 'the wikipedia layout needs it')
    lines = _read_lines(list_path)
    for number, line in _counted(lines, len(lines), f'wikipedia {list_name}', 'pair'):
      fields = line.split()
      if len(fields) != 3 or not re.fullmatch(r'-?\d{1,18}', fields[2]):
        raise errors.UserError(
          f'{list_path}: line {number} is {line!r}; expected <text_id>\\t<image_name>\\t<category 1-based integer>'
        )
      text_id, image_name, category = fields[0], fields[1], int(fields[2])
      if not 1 <= category <= len(categories):
        raise errors.UserError(
          f'{list_path}: line {number}: category {category} out of range; expected 1..'
          f'{len(categories)} (the lines of categories.list)'
        )
      image = _require(
        os.path.join(root, 'images', categories[category - 1], image_name + '.jpg'),
        f'listed in {list_name} line {number}',
      )
      text_path = _require(os.path.join(root, 'texts', text_id + '.xml'), f'listed in {list_name} line {number}')
      pairs.append(Pair(image, _wikipedia_text(text_path), category - 1))
  return pairs, len(categories), os.path.join(root, 'categories.list')


def _scan_pascal(root: str) -> tuple[list[Pair], int, str]:
  """(pairs, number of categories, folder defining the categories)."""
  image_root = _require(os.path.join(root, 'dataset'), 'the pascal layout needs dataset/<category>/<image>.jpg')
  categories = sorted(
    d for d in os.listdir(image_root) if os.path.isdir(os.path.join(image_root, d)) and not d.startswith('.')
  )
  pairs = []
  for label, category in enumerate(_counted(categories, len(categories), 'pascal', 'category')):
    for name in sorted(n for n in os.listdir(os.path.join(image_root, category)) if n.lower().endswith('.jpg')):
      text_path = _require(
        os.path.join(root, 'sentence', category, os.path.splitext(name)[0] + '.txt'),
        f'the sentences of dataset/{category}/{name}',
      )
      sentences = [line for _, line in _read_lines(text_path)]
      if len(sentences) != SENTENCES_PER_IMAGE:
        raise errors.UserError(
          f'{text_path}: {len(sentences)} non-empty lines; expected {SENTENCES_PER_IMAGE} sentences, one per line'
        )
      pairs.append(Pair(os.path.join(image_root, category, name), _clean(' '.join(sentences)), label))
  return pairs, len(categories), image_root


def _scan_manifest(root: str, num_classes: int | None) -> list[Pair]:
  path = _require(os.path.join(root, 'pairs.tsv'), 'the manifest layout needs it')
  lines = [line.rstrip('\r') for line in _read_text(path).split('\n')]
  if not lines or lines[0] != 'image\ttext\tlabel':
    raise errors.UserError(f'{path}: line 1 is {lines[0] if lines else ""!r}; expected the header image\\ttext\\tlabel')
  pairs = []
  for number, line in _counted(enumerate(lines[1:], 2), len(lines) - 1, 'pairs.tsv', 'line'):
    if not line.strip():
      continue
    fields = line.split('\t')
    if len(fields) != 3 or not re.fullmatch(r'\s*-?\d{1,18}\s*', fields[2]):
      raise errors.UserError(
        f'{path}: line {number} has {len(fields)} tab-separated field(s) {fields[:3]!r}; expected '
        'image path, text, integer label'
      )
    image, text, label = fields[0].strip(), fields[1], int(fields[2])
    if label < 0 or (num_classes is not None and label >= num_classes):
      raise errors.UserError(
        f'{path}: line {number}: label {label} out of range; expected 0..'
        f'{"" if num_classes is None else num_classes - 1} (0-based)'
      )
    image = _require(os.path.join(root, image), f'listed in pairs.tsv line {number}')
    if text.strip().endswith('.txt'):
      text = _read_text(_require(os.path.join(root, text.strip()), f'listed in pairs.tsv line {number}'))
    if not text.strip():
      raise errors.UserError(f'{path}: line {number}: empty text; every pair needs at least one word')
    pairs.append(Pair(image, _clean(text), label))
  return pairs


def scan(name: str, manual_dir: str) -> list[Pair]:
  """Reads and checks the pairs of dataset `name` in `manual_dir`, in pooled order (texts read, images not)."""
  layout = CONFIGS[name].layout
  expected_classes = EXPECTED_CLASSES.get(name)
  if layout == 'manifest':
    pairs = _scan_manifest(manual_dir, expected_classes)
  else:
    pairs, num_classes, where = (_scan_wikipedia if layout == 'wikipedia' else _scan_pascal)(manual_dir)
    if expected_classes is not None and num_classes != expected_classes:
      raise errors.UserError(f'{where}: {num_classes} categories; {name} has {expected_classes}')
  if name in EXPECTED_PAIRS and len(pairs) != EXPECTED_PAIRS[name]:
    raise errors.UserError(f'{manual_dir}: {len(pairs)} pairs found; {name} has {EXPECTED_PAIRS[name]}')
  if not pairs:
    raise errors.UserError(f'{manual_dir}: no pairs found; expected the {name} layout: {LAYOUTS[name]}')
  return pairs


def split_indices(n: int, manual_dir: str) -> dict[str, np.ndarray]:
  """{split: pooled pair indices}: splits.json in `manual_dir` if present, else the seeded 80/10/10 permutation."""
  path = os.path.join(manual_dir, 'splits.json')
  if not os.path.exists(path):
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_train, n_dev = (round(fraction * n) for fraction in SPLIT_FRACTIONS)
    splits = {'train': order[:n_train], 'dev': order[n_train : n_train + n_dev], 'test': order[n_train + n_dev :]}
    for split, indices in splits.items():
      if not len(indices):
        raise errors.UserError(
          f'{manual_dir}: {n} pairs give an empty {split} split under the 80/10/10 split; add more '
          'pairs or a splits.json'
        )
    return splits
  with open(path, encoding='utf-8') as f:
    try:
      raw = json.load(f)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of too many digits
      raise errors.UserError(f'{path}: not valid JSON ({e})') from None
  if not isinstance(raw, dict) or sorted(raw) != sorted(SPLITS):
    raise errors.UserError(
      f'{path}: keys {sorted(raw) if isinstance(raw, dict) else type(raw).__name__}; expected an '
      f'object with exactly the keys {list(SPLITS)}'
    )
  splits, seen = {}, {}
  for split in SPLITS:
    values = raw[split]
    # type() rather than isinstance: JSON true / false would pass as 1 / 0.
    if not isinstance(values, list) or not values or not all(type(v) is int for v in values):
      raise errors.UserError(f'{path}: "{split}" must be a non-empty list of integer pair indices')
    for v in values:
      if not 0 <= v < n:
        raise errors.UserError(f'{path}: "{split}" holds index {v}; expected pair indices in [0, {n})')
      if v in seen:
        raise errors.UserError(
          f'{path}: index {v} is in both "{seen[v]}" and "{split}"'
          if seen[v] != split
          else f'{path}: index {v} appears twice in "{split}"'
        )
      seen[v] = split
    splits[split] = np.array(values, np.int64)
  return splits


def load_image(path: str, size: int) -> np.ndarray:
  """[size, size, 3] uint8: the image at `path` in RGB, bilinear-resized to size x size."""
  try:
    with Image.open(path) as image:
      return np.asarray(image.convert('RGB').resize((size, size), Image.BILINEAR), np.uint8)
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise errors.UserError(f'{path}: unreadable image ({e})') from None


class XmatchCategory(array_record.ArrayRecordBuilder):
  """Image pixels, one text and a class label per pair, from a manual dir (manual download)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Wikipedia, Pascal Sentence, XMediaNet and manifest pairs: pixels, text, label.'}
  BUILDER_CONFIGS = list(CONFIGS.values())
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    return array_record.LocalDatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          'image_id': tfds.features.Scalar(np.int64),
          'pixels': tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8, encoding=_RAW),
          'label': tfds.features.Scalar(np.int64),
          'text': tfds.features.Text(),
        }
      ),
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    pairs = scan(self.builder_config.dataset, manual_dir)
    splits = split_indices(len(pairs), manual_dir)
    return {split: self._generate_examples(pairs, splits[split], split) for split in SPLITS}

  def _generate_examples(self, pairs, indices, split: str = ''):
    # TFDS writes unshuffled examples in key order, so the key is the position in the split.
    desc = f'building xmatch_category/{self.builder_config.name} {split}'.rstrip()
    for position, index in enumerate(_counted(indices, len(indices), desc, 'image')):
      pair = pairs[index]
      yield (
        position,
        {
          'image_id': int(index),
          'pixels': load_image(pair.image, self.builder_config.image_size),
          'label': pair.label,
          'text': pair.text,
        },
      )


def build(name: str, manual_dir: str, data_dir: str | None = None, image_size: int = IMAGE_SIZE) -> XmatchCategory:
  """Builds (once) and returns the `xmatch_category/<name>` builder from `manual_dir`, images at image_size^2."""
  if name not in CONFIGS:
    raise errors.UserError(f'xmatch_category has no config {name!r}; expected one of {sorted(CONFIGS)}')
  config = CONFIGS[name]
  if image_size != config.image_size:  # a config of its own, so builds of different sizes do not collide
    config = dataclasses.replace(config, name=f'{name}_{image_size}px', image_size=image_size)
  if not os.path.isdir(manual_dir):
    note = array_record.other_versions_note(XmatchCategory, config.name, data_dir) if data_dir else ''
    raise errors.MissingFileError(
      f'{manual_dir}: manual dir not found; the {name} layout is: {LAYOUTS[name]}; plus an {_OPTIONAL}{note}'
    )
  return XmatchCategory.prepare(config=config, data_dir=data_dir, manual_dir=manual_dir)
