r"""Reference retrieval numbers on the `shapes` dataset: chance level, a bag-of-objects oracle, a scene oracle.

  python tools/shapes_baselines.py --config default [--data_dir DIR] [--split test]

- chance: every score equal, so recall is the expected recall of a random ranking: t2i R@K = K / n_images,
  i2t R@K = 1 - C(n_cap - 5, K) / C(n_cap, K) (5 relevant captions among n_cap).
- bag-of-objects oracle: knows every image's exact multiset of objects (shape, colour, size) and, per caption,
  the objects it mentions (parsed with the grammar's vocabulary, counts included) but no positions or relations.
  A pair scores 1 if the caption could describe the bag (Hall's condition: distinct objects for the "a ..."
  mentions, exact counts for "two ..."), else 0. This is the upper bound of a model that sees bags of objects.
- scene oracle: like the bag oracle but also checks every stated relation against the object positions: the
  ceiling for any model (what is left is captions that are true of several images).
Ties are broken by expected rank (the mean over all orderings of the tied items), so no random seed is involved.
Recalls are in percent, rsum is the sum of the six, as in SCAN's evaluation.py.
"""

from collections.abc import Sequence
import itertools
import json
import math
import sys

from absl import flags
import numpy as np

from xmatch_jax import cli
from xmatch_jax import data as data_lib
from xmatch_jax import errors
from xmatch_jax.data import shapes_scenes as scenes

KS = (1, 5, 10)
_TYPES = list(itertools.product(scenes.SHAPES, scenes.COLOURS, scenes.SIZES))  # object kinds


def _miss_probability(n_tied: int, n_relevant: int, n_slots: int) -> float:
  """P(none of n_relevant items lands in the first n_slots places of a random order of n_tied items)."""
  if n_slots <= 0:
    return 1.0
  if n_slots > n_tied - n_relevant:
    return 0.0
  return math.comb(n_tied - n_relevant, n_slots) / math.comb(n_tied, n_slots)


def chance_recalls(n_images: int, captions_per_image: int = scenes.CAPTIONS_PER_IMAGE, ks: Sequence[int] = KS) -> dict:
  """Expected recalls (percent) of a random ranking, both ways, and their rsum."""
  n_cap = n_images * captions_per_image
  out = {}
  for k in ks:
    out[f'i2t_r{k}'] = 100 * (1 - _miss_probability(n_cap, captions_per_image, k))
    out[f't2i_r{k}'] = 100 * min(k / n_images, 1.0)
  out['rsum'] = sum(out.values())
  return out


def expected_recalls(
  scores: np.ndarray, captions_per_image: int = scenes.CAPTIONS_PER_IMAGE, ks: Sequence[int] = KS
) -> dict:
  """Recalls (percent) of a score matrix with ties broken uniformly at random, in expectation.

  Args:
    scores: [n_img, n_cap], caption c belongs to image c // captions_per_image.
  """
  n_img, n_cap = scores.shape
  if n_cap != n_img * captions_per_image:
    raise errors.UserError(f'scores has {n_cap} captions for {n_img} images; expected {captions_per_image} per image.')
  owner = np.arange(n_cap) // captions_per_image
  out = {f'i2t_r{k}': 0.0 for k in ks} | {f't2i_r{k}': 0.0 for k in ks}
  for i in range(n_img):
    row = scores[i]
    relevant = row[owner == i]
    best = relevant.max()
    better, tied = int((row > best).sum()), int((row == best).sum())
    n_best = int((relevant == best).sum())
    for k in ks:
      out[f'i2t_r{k}'] += 1 - _miss_probability(tied, n_best, k - better)
  true_scores = scores[owner, np.arange(n_cap)]
  better = (scores > true_scores[None]).sum(0)
  tied = (scores == true_scores[None]).sum(0)
  for k in ks:
    out[f't2i_r{k}'] = float(np.clip((k - better) / tied, 0, 1).sum())
  out = {key: 100 * value / (n_img if key.startswith('i2t') else n_cap) for key, value in out.items()}
  out['rsum'] = sum(out.values())
  return out


def _bag_counts(objects_per_image: Sequence[Sequence[dict]]) -> np.ndarray:
  """[n_img, n_kinds] number of objects of every (shape, colour, size) kind."""
  index = {kind: t for t, kind in enumerate(_TYPES)}
  counts = np.zeros((len(objects_per_image), len(_TYPES)), np.int64)
  for i, objects in enumerate(objects_per_image):
    for o in objects:
      counts[i, index[(o['shape'], o['colour'], o['size'])]] += 1
  return counts


def _kinds_matching(mention: dict) -> np.ndarray:
  return np.array(
    [
      all(mention[key] is None or mention[key] == value for key, value in zip(('shape', 'colour', 'size'), kind))
      for kind in _TYPES
    ]
  )


def bag_oracle_scores(objects_per_image: Sequence[Sequence[dict]], meanings: Sequence[dict]) -> np.ndarray:
  """[n_img, n_cap] 1.0 where the caption's mentioned objects fit the image's bag of objects, else 0.0."""
  counts = _bag_counts(objects_per_image)
  scores = np.ones((len(objects_per_image), len(meanings)))
  for c, meaning in enumerate(meanings):
    ok = np.ones(len(objects_per_image), bool)
    singles = []
    for mention in meaning['mentions']:
      if mention['count'] is None:
        singles.append(_kinds_matching(mention))
      else:
        ok &= counts @ _kinds_matching(mention) == mention['count']
    # Hall's theorem: distinct objects for all single mentions iff every subset S of them matches >= |S| objects.
    for size in range(1, len(singles) + 1):
      for subset in itertools.combinations(singles, size):
        ok &= counts @ np.logical_or.reduce(subset) >= size
    scores[:, c] = ok
  return scores


def scene_oracle_scores(
  objects_per_image: Sequence[Sequence[dict]], meanings: Sequence[dict], bag_scores: np.ndarray | None = None
) -> np.ndarray:
  """[n_img, n_cap] 1.0 where the caption is true of the scene (relations included), else 0.0."""
  if bag_scores is None:
    bag_scores = bag_oracle_scores(objects_per_image, meanings)
  scores = np.zeros_like(bag_scores)
  for i, c in zip(*np.nonzero(bag_scores)):  # a true caption always fits the bag
    scores[i, c] = scenes.caption_holds(meanings[c], objects_per_image[i])
  return scores


def load_split(data_dir: str, config: str, split: str) -> tuple:
  """(objects per image, captions) of one split of the built dataset, in image order."""
  from xmatch_jax.data import shapes  # pylint: disable=g-import-not-at-top (imports tfds)

  source = shapes.shapes_builder(data_dir, config=config).as_data_source(split)
  objects, captions = [], []
  for i in range(len(source)):
    example = source[i]
    objects.append(json.loads(data_lib.as_text(example['scene']))['objects'])
    captions.extend(data_lib.as_text(c) for c in example['captions'])
  return objects, captions


def weight_by_specificity(compatible: np.ndarray) -> np.ndarray:
  """compatible[i, c] / (number of images caption c fits): prefers specific captions in i2t ranking (a caption
  true of few images is more likely written for each of them); t2i rankings are unchanged."""
  return compatible / np.maximum(compatible.sum(0, keepdims=True), 1)


def baseline_table(objects_per_image: Sequence[Sequence[dict]], captions: Sequence[str]) -> dict:
  """name -> recalls for chance, the bag-of-objects oracle and the scene oracle."""
  meanings = [scenes.parse_caption(c) for c in captions]
  bag = bag_oracle_scores(objects_per_image, meanings)
  return {
    'chance': chance_recalls(len(objects_per_image)),
    'bag-of-objects oracle': expected_recalls(weight_by_specificity(bag)),
    'scene oracle (relations)': expected_recalls(
      weight_by_specificity(scene_oracle_scores(objects_per_image, meanings, bag))
    ),
  }


def format_table(table: dict) -> str:
  keys = [f'i2t_r{k}' for k in KS] + [f't2i_r{k}' for k in KS] + ['rsum']
  lines = [f'{"":26s}' + ''.join(f'{k:>9s}' for k in keys)]
  for name, row in table.items():
    lines.append(f'{name:26s}' + ''.join(f'{row[k]:9.2f}' for k in keys))
  return '\n'.join(lines)


FLAGS = flags.FlagValues()
cli.define_enum('config', 'default', ('default', 'tiny'), 'xmatch_shapes config', FLAGS)
flags.DEFINE_string(
  'data_dir',
  None,
  "TFDS data dir (the dataset is built there if missing); default: the library's, "
  '$XMATCH_DATA_DIR or ~/.cache/xmatch_jax/tfds',
  flag_values=FLAGS,
)
cli.define_enum('split', 'test', ('train', 'dev', 'test'), 'split to score', FLAGS)


def main(argv: Sequence[str] | None = None) -> None:
  cli.parse_flags(FLAGS, argv, __doc__)
  from xmatch_jax import data as data_lib  # pylint: disable=g-import-not-at-top

  objects, captions = load_split(FLAGS.data_dir or data_lib.default_data_dir(), FLAGS.config, FLAGS.split)
  print(f'xmatch_shapes/{FLAGS.config} {FLAGS.split}: {len(objects)} images, {len(captions)} captions')
  print(format_table(baseline_table(objects, captions)))


if __name__ == '__main__':
  sys.exit(cli.run_tool(main))
