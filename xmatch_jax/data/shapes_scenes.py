"""Scenes of the built-in `shapes` dataset: sampling, rendering, detector-like regions, tags, captions.

Pure numpy, no TFDS. A scene is a JSON-serialisable dict

    {"objects": [{"shape": "circle", "colour": "red", "size": "small", "x": 20, "y": 41}, ...]}

with 2-4 objects; `shape` in SHAPES, `colour` in COLOURS, `size` in SIZES, and (x, y) the object's centre in
pixels (x to the right, y downwards) on a CANVAS x CANVAS canvas. An object of half-size h = HALF_SIZE[size]
covers the box [x - h, x + h] x [y - h, y + h]; boxes must lie inside the canvas and must not overlap.

`example_from_scene(scene, seed)` builds everything a dataset example holds (pixels, NUM_REGIONS region
features, boxes, noisy tags, label, 5 captions); the same (scene, seed) always gives the same example, so users
can write their own probes. `scene_for_index(split, index)` is the fixed scene of every dataset image. Scenes
come in look-alike groups of GROUP_SIZE = 8 (`sample_group`): 2 colour bindings x 4 layouts of the same
objects, so 4 images share each bag of objects and differ only in relations.

Regions (`region_descriptors`, `region_features`): one per object, one per pair union, the whole image, then
background crops up to NUM_REGIONS, in shuffled order. Features are ReLU(descriptor @ W + b + noise) with a
fixed random W (FEATURE_SEED); the descriptor holds the region type, the attributes of its object(s), its box
and, for unions, the signed offset between the two objects, so relations are recoverable from the regions.

Spatial relations follow the dominant axis of the offset between centres: with dx = x_b - x_a and
dy = y_b - y_a, "a left of b" iff |dx| >= |dy| and dx > 0 (right: dx < 0); otherwise "a above b" iff dy > 0
(below: dy < 0). Exactly one relation holds for every ordered pair.

Every generated caption is true for its scene and `parse_caption` recovers its meaning: the objects it
mentions (attributes and exact counts) and the relations between them; `caption_holds` checks that meaning
against a scene. Everything here (seeds, projection, grammar, sampling) defines the data of
`XmatchShapes.VERSION`: any change that alters generated examples needs a new dataset version.
"""

from collections.abc import Sequence
import functools
import itertools
import json

import numpy as np

from xmatch_jax import errors

SHAPES = ('circle', 'square', 'triangle', 'diamond', 'cross')
COLOURS = ('red', 'green', 'blue', 'yellow', 'purple', 'white')
SIZES = ('small', 'large')
CANVAS = 64
HALF_SIZE = {'small': 5, 'large': 8}
NUM_REGIONS = 12
REGION_DIM = 256
CAPTIONS_PER_IMAGE = 5
MAX_OBJECTS = 4  # 4 objects + 6 pair unions + 1 whole image = 11 <= NUM_REGIONS.
# label = SHAPES.index(shape) * len(COLOURS) + COLOURS.index(colour) of the largest object (ties: leftmost,
# then topmost); LABEL_NAMES[label] is e.g. "red circle".
NUM_LABELS = len(SHAPES) * len(COLOURS)
LABEL_NAMES = tuple(f'{c} {s}' for s in SHAPES for c in COLOURS)

GROUP_SIZE = 8  # 2 colour bindings x 4 layouts of the same objects.
SPLIT_SEEDS = {'train': 0, 'dev': 1, 'test': 2}
SCENE_SEED = 20_250_001
EXAMPLE_SEED = 20_250_002
FEATURE_SEED = 20_250_003

TAG_NOISE = 0.12  # probability that an object tag has a wrong colour or shape
FEATURE_NOISE = 0.2  # std of the Gaussian noise added before the ReLU (pre-activations have std ~1)
PIXEL_NOISE = 6.0
COLOUR_JITTER = 12
BACKGROUND_RGB = (20, 20, 24)
RGB = {
  'red': (220, 40, 40),
  'green': (40, 190, 60),
  'blue': (50, 90, 235),
  'yellow': (235, 215, 40),
  'purple': (150, 60, 205),
  'white': (240, 240, 240),
}

# Sampling keeps centres apart so that any two positions can be swapped without overlap (large boxes are
# 17 px wide) and away from the diagonal so that relations are clear-cut.
_MIN_SEPARATION = 2 * HALF_SIZE['large'] + 2
_DIAGONAL_MARGIN = 4
_DUPLICATE_PROB = 0.25

# ---------------------------------------------------------------------------------------------- vocabulary
SHAPE_NOUNS = {
  'circle': (('circle', 'circles'), ('disc', 'discs'), ('disk', 'disks')),
  'square': (('square', 'squares'), ('box', 'boxes'), ('block', 'blocks')),
  'triangle': (('triangle', 'triangles'),),
  'diamond': (('diamond', 'diamonds'), ('rhombus', 'rhombuses')),
  'cross': (('cross', 'crosses'),),
}
GENERIC_NOUNS = (('shape', 'shapes'), ('object', 'objects'), ('thing', 'things'), ('item', 'items'))
COLOUR_WORDS = {
  'red': ('red',),
  'green': ('green',),
  'blue': ('blue',),
  'yellow': ('yellow',),
  'purple': ('purple', 'violet'),
  'white': ('white',),
}
SIZE_WORDS = {'small': ('small', 'little', 'tiny'), 'large': ('large', 'big', 'huge')}
COUNT_WORDS = {2: 'two', 3: 'three', 4: 'four'}
RELATION_PHRASES = {
  'left': ('to the left of', 'left of', 'on the left of'),
  'right': ('to the right of', 'right of', 'on the right of'),
  'above': ('above', 'over', 'higher than'),
  'below': ('below', 'under', 'beneath', 'lower than'),
}
_PREFIX_SINGULAR = ('there is', 'a picture of', 'an image of', 'this image shows', 'a drawing of')
_PREFIX_PLURAL = ('there are', 'a picture of', 'an image of', 'this image shows')
_SUFFIXES = ('on a black background', 'in the image', 'in the picture')
_VERBS = ('is', 'sits', 'lies')
_JOINERS = ('with', 'including')
MAX_CAPTION_WORDS = 20
_ATTRIBUTES = ('shape', 'colour', 'size')

_NOUN_LOOKUP = {}  # word -> (canonical shape or None for generic nouns, is_plural)
for _shape, _forms in SHAPE_NOUNS.items():
  for _singular, _plural in _forms:
    _NOUN_LOOKUP[_singular], _NOUN_LOOKUP[_plural] = (_shape, False), (_shape, True)
for _singular, _plural in GENERIC_NOUNS:
  _NOUN_LOOKUP[_singular], _NOUN_LOOKUP[_plural] = (None, False), (None, True)
_COLOUR_LOOKUP = {w: c for c, words in COLOUR_WORDS.items() for w in words}
_SIZE_LOOKUP = {w: s for s, words in SIZE_WORDS.items() for w in words}
_COUNT_LOOKUP = {w: n for n, w in COUNT_WORDS.items()}
_RELATION_LOOKUP = sorted(
  ((tuple(p.split()), r) for r, ps in RELATION_PHRASES.items() for p in ps), key=lambda item: -len(item[0])
)  # longest phrase first


# ---------------------------------------------------------------------------------------------- scenes
def validate_scene(scene) -> dict:
  """Checks a scene dict and returns a normalised copy (fixed key order). Raises ValueError naming the field."""
  if not isinstance(scene, dict) or set(scene) != {'objects'}:
    raise errors.UserError(f'scene must be a dict with the single key "objects"; got {scene!r}.')
  objects = scene['objects']
  if not isinstance(objects, (list, tuple)) or not 2 <= len(objects) <= MAX_OBJECTS:
    raise errors.UserError(f'scene["objects"] must be a list of 2 to {MAX_OBJECTS} objects; got {objects!r}.')
  normalised = []
  for i, obj in enumerate(objects):
    if not isinstance(obj, dict) or set(obj) != {'shape', 'colour', 'size', 'x', 'y'}:
      raise errors.UserError(f'scene object {i} must have exactly the keys shape, colour, size, x, y; got {obj!r}.')
    for key, allowed in (('shape', SHAPES), ('colour', COLOURS), ('size', SIZES)):
      if obj[key] not in allowed:
        raise errors.UserError(f'scene object {i}: "{key}" is {obj[key]!r}; expected one of {allowed}.')
    half = HALF_SIZE[obj['size']]
    for key in ('x', 'y'):
      value = obj[key]
      if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise errors.UserError(f'scene object {i}: "{key}" must be a number; got {value!r}.')
      if not half <= value <= CANVAS - 1 - half:
        raise errors.UserError(
          f'scene object {i}: "{key}" = {value} puts its {obj["size"]} box outside the canvas; '
          f'expected {half} <= {key} <= {CANVAS - 1 - half}.'
        )
    normalised.append(
      {
        'shape': obj['shape'],
        'colour': obj['colour'],
        'size': obj['size'],
        'x': _plain_number(obj['x']),
        'y': _plain_number(obj['y']),
      }
    )
  for (i, a), (j, b) in itertools.combinations(enumerate(normalised), 2):
    gap = HALF_SIZE[a['size']] + HALF_SIZE[b['size']]
    if max(abs(a['x'] - b['x']), abs(a['y'] - b['y'])) <= gap:
      raise errors.UserError(
        f'scene objects {i} and {j} overlap; their centres must differ by more than {gap} px along x or y.'
      )
  return {'objects': normalised}


def _plain_number(value):
  return int(value) if float(value).is_integer() else float(value)


def relation_between(a: dict, b: dict) -> str:
  """The relation r ('left', 'right', 'above', 'below') for which "a r b" is true (dominant axis)."""
  dx, dy = b['x'] - a['x'], b['y'] - a['y']
  if abs(dx) >= abs(dy):
    return 'left' if dx > 0 else 'right'
  return 'above' if dy > 0 else 'below'


def _sample_layout(rng: np.random.Generator, n: int) -> list:
  """n centres in the canvas, pairwise far apart and off the diagonal. Returns [(x, y), ...]."""
  low, high = HALF_SIZE['large'], CANVAS - HALF_SIZE['large']
  while True:
    points = []
    for _ in range(200):
      x, y = (int(v) for v in rng.integers(low, high, size=2))
      if all(
        max(abs(x - px), abs(y - py)) >= _MIN_SEPARATION and abs(abs(x - px) - abs(y - py)) >= _DIAGONAL_MARGIN
        for px, py in points
      ):
        points.append((x, y))
        if len(points) == n:
          return points


def sample_scene(rng: np.random.Generator) -> dict:
  """Samples a scene of 2-4 objects; some objects repeat another's shape and colour (for count captions)."""
  if not isinstance(rng, np.random.Generator):
    raise errors.UserError(f'rng must be a numpy.random.Generator; got {type(rng).__name__}.')
  n = int(rng.integers(2, MAX_OBJECTS + 1))
  objects = []
  for x, y in _sample_layout(rng, n):
    if objects and rng.random() < _DUPLICATE_PROB:
      template = objects[int(rng.integers(len(objects)))]
      shape, colour = template['shape'], template['colour']
    else:
      shape, colour = SHAPES[int(rng.integers(len(SHAPES)))], COLOURS[int(rng.integers(len(COLOURS)))]
    objects.append({'shape': shape, 'colour': colour, 'size': SIZES[int(rng.integers(len(SIZES)))], 'x': x, 'y': y})
  return {'objects': objects}


# Layout symmetries of the canvas that change the relation of every pair of objects: identity, rotation by
# 180 degrees (left <-> right, above <-> below), transpose (left -> above, right -> below, above -> left,
# below -> right) and anti-transpose (left -> below, right -> above, above -> right, below -> left).
_LAST = CANVAS - 1
LAYOUT_TRANSFORMS = (
  lambda x, y: (x, y),
  lambda x, y: (_LAST - x, _LAST - y),
  lambda x, y: (y, x),
  lambda x, y: (_LAST - y, _LAST - x),
)


def sample_group(rng: np.random.Generator) -> list:
  """GROUP_SIZE look-alike scenes of the same objects: 2 colour bindings x 4 layouts.

  Bindings: the sampled colours, and the colours of two objects swapped (red circle + blue square -> blue
  circle + red square). Layouts: the sampled positions under LAYOUT_TRANSFORMS, so that every pairwise
  relation differs between any two layouts. The 4 scenes of one binding share their bag of objects and
  differ only in relations; the two bindings share their bag of words.
  """
  while True:
    base = sample_scene(rng)['objects']
    bindable = [
      (i, j)
      for i, j in itertools.combinations(range(len(base)), 2)
      if base[i]['colour'] != base[j]['colour']
      and (base[i]['shape'], base[i]['size']) != (base[j]['shape'], base[j]['size'])
    ]
    if bindable:
      break
  a, b = bindable[int(rng.integers(len(bindable)))]
  rebound = [dict(o) for o in base]
  rebound[a]['colour'], rebound[b]['colour'] = base[b]['colour'], base[a]['colour']
  return [
    {'objects': [dict(o, **dict(zip('xy', move(o['x'], o['y'])))) for o in objects]}
    for objects in (base, rebound)
    for move in LAYOUT_TRANSFORMS
  ]


def _check_split(split: str) -> int:
  if split not in SPLIT_SEEDS:
    raise errors.UserError(f'split {split!r} is not a shapes split; expected one of {sorted(SPLIT_SEEDS)}.')
  return SPLIT_SEEDS[split]


_MAX_IMAGES = 10_000_000  # per split


def _check_index(index: int) -> int:
  if not 0 <= int(index) < _MAX_IMAGES:
    raise errors.UserError(f'image index must be in [0, {_MAX_IMAGES}); got {index}.')
  return int(index)


@functools.lru_cache(maxsize=64)
def _group_json(split_seed: int, group: int) -> str:
  return json.dumps(sample_group(np.random.default_rng([SCENE_SEED, split_seed, group])))


def scene_for_index(split: str, index: int) -> dict:
  """The fixed scene of image `index` of `split`; images 8g..8g+7 form look-alike group g."""
  group, member = divmod(_check_index(index), GROUP_SIZE)
  return json.loads(_group_json(_check_split(split), group))[member]


def example_seed(split: str, index: int) -> int:
  """The `example_from_scene` seed of image `index` of `split` (distinct for every split and index)."""
  return _check_split(split) * _MAX_IMAGES + _check_index(index)


# ---------------------------------------------------------------------------------------------- rendering
def _object_arrays(objects: Sequence[dict]) -> dict:
  return {
    'shape': np.array([SHAPES.index(o['shape']) for o in objects]),
    'colour': np.array([COLOURS.index(o['colour']) for o in objects]),
    'size': np.array([SIZES.index(o['size']) for o in objects]),
    'half': np.array([HALF_SIZE[o['size']] for o in objects], np.float64),
    'x': np.array([o['x'] for o in objects], np.float64),
    'y': np.array([o['y'] for o in objects], np.float64),
  }


def object_masks(objects: Sequence[dict]) -> np.ndarray:
  """Boolean masks [n, CANVAS, CANVAS] of every object (all shapes evaluated at once, then selected)."""
  arr = _object_arrays(objects)
  grid = np.arange(CANVAS, dtype=np.float32)
  dx = grid[None, None, :] - arr['x'][:, None, None].astype(np.float32)
  dy = grid[None, :, None] - arr['y'][:, None, None].astype(np.float32)
  h = arr['half'][:, None, None].astype(np.float32)
  adx, ady = np.abs(dx), np.abs(dy)
  bar = h / 3
  masks = np.stack(
    np.broadcast_arrays(
      dx**2 + dy**2 <= (h + 0.5) ** 2,  # circle
      (adx <= h - 1) & (ady <= h - 1),  # square
      (dy >= -h) & (dy <= h) & (adx <= (dy + h) / 2),  # triangle, apex up
      adx + ady <= h,  # diamond
      ((adx <= bar) & (ady <= h)) | ((ady <= bar) & (adx <= h)),  # cross
    )
  )
  return masks[arr['shape'], np.arange(len(objects))]


def render(objects: Sequence[dict], rng: np.random.Generator) -> np.ndarray:
  """Pixels [CANVAS, CANVAS, 3] uint8: objects in (jittered) colour on a dark background, with pixel noise."""
  masks = object_masks(objects)
  palette = np.array([RGB[o['colour']] for o in objects] + [BACKGROUND_RGB], np.float32)
  palette[:-1] += rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=(len(objects), 3))
  owner = np.where(masks.any(0), masks.argmax(0), len(objects))  # objects do not overlap
  image = palette[owner] + PIXEL_NOISE * rng.standard_normal((CANVAS, CANVAS, 3), dtype=np.float32)
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- regions
_TYPE_OBJECT, _TYPE_PAIR, _TYPE_WHOLE, _TYPE_BACKGROUND = range(4)
_ATTR_DIM = len(SHAPES) + len(COLOURS) + len(SIZES)
# [region type one-hot 4 | attributes of object a | attributes of object b | box x1 y1 x2 y2 cx cy w h |
#  b - a centre offset dx dy, horizontal-dominant flag, vertical-dominant flag]
DESCRIPTOR_DIM = 4 + 2 * _ATTR_DIM + 8 + 4


@functools.lru_cache(maxsize=1)
def feature_projection() -> tuple:
  """The fixed random projection (W [DESCRIPTOR_DIM, REGION_DIM], b [REGION_DIM]) from FEATURE_SEED."""
  rng = np.random.default_rng(FEATURE_SEED)
  # A region descriptor has ~6 units of squared norm, so pre-activations have std ~1.
  weights = rng.normal(0, 1 / np.sqrt(6), size=(DESCRIPTOR_DIM, REGION_DIM))
  bias = rng.normal(0, 0.3, size=REGION_DIM)
  return weights, bias


def _attributes(arr: dict) -> np.ndarray:
  n = len(arr['shape'])
  out = np.zeros((n, _ATTR_DIM))
  rows = np.arange(n)
  out[rows, arr['shape']] = 1
  out[rows, len(SHAPES) + arr['colour']] = 1
  out[rows, len(SHAPES) + len(COLOURS) + arr['size']] = 1
  return out


def _box_geometry(boxes: np.ndarray) -> np.ndarray:
  centre = (boxes[:, :2] + boxes[:, 2:]) / 2
  return np.concatenate([boxes, centre, boxes[:, 2:] - boxes[:, :2]], axis=1)


def region_descriptors(objects: Sequence[dict], rng: np.random.Generator) -> tuple:
  """Detector-like regions before projection: one per object, one per pair union, the whole image, then
  random background crops up to NUM_REGIONS.

  Returns:
    descriptors [NUM_REGIONS, DESCRIPTOR_DIM] float64, boxes [NUM_REGIONS, 4] (x1, y1, x2, y2 in [0, 1]),
    kinds [NUM_REGIONS] region type, and owner [NUM_REGIONS] index of the object a region is tagged with
    (-1 for whole-image and background regions). Region order is as listed (not yet shuffled).
  """
  arr = _object_arrays(objects)
  n = len(objects)
  attrs = _attributes(arr)
  object_boxes = (
    np.stack(
      [arr['x'] - arr['half'], arr['y'] - arr['half'], arr['x'] + arr['half'] + 1, arr['y'] + arr['half'] + 1], axis=1
    )
    / CANVAS
  )
  pairs = np.array(list(itertools.combinations(range(n), 2)))
  a, b = pairs[:, 0], pairs[:, 1]
  pair_boxes = np.concatenate(
    [np.minimum(object_boxes[a, :2], object_boxes[b, :2]), np.maximum(object_boxes[a, 2:], object_boxes[b, 2:])], axis=1
  )
  n_background = NUM_REGIONS - n - len(pairs) - 1
  size = rng.integers(10, 29, size=(n_background, 2))
  corner = rng.integers(0, CANVAS - size + 1)
  background_boxes = np.concatenate([corner, corner + size], axis=1) / CANVAS
  boxes = np.concatenate([object_boxes, pair_boxes, [[0.0, 0.0, 1.0, 1.0]], background_boxes])
  kinds = np.concatenate(
    [np.full(n, _TYPE_OBJECT), np.full(len(pairs), _TYPE_PAIR), [_TYPE_WHOLE], np.full(n_background, _TYPE_BACKGROUND)]
  )
  desc = np.zeros((NUM_REGIONS, DESCRIPTOR_DIM))
  desc[np.arange(NUM_REGIONS), kinds] = 1
  slot_a, slot_b = slice(4, 4 + _ATTR_DIM), slice(4 + _ATTR_DIM, 4 + 2 * _ATTR_DIM)
  desc[:n, slot_a] = attrs
  desc[n : n + len(pairs), slot_a] = attrs[a]
  desc[n : n + len(pairs), slot_b] = attrs[b]
  desc[n + len(pairs), slot_a] = attrs.mean(0)  # the whole image sees a blur of every object
  geometry_start = 4 + 2 * _ATTR_DIM
  desc[:, geometry_start : geometry_start + 8] = _box_geometry(boxes)
  offset = np.stack([arr['x'][b] - arr['x'][a], arr['y'][b] - arr['y'][a]], axis=1) / CANVAS
  horizontal = np.abs(offset[:, 0]) >= np.abs(offset[:, 1])
  desc[n : n + len(pairs), geometry_start + 8 :] = np.concatenate(
    [offset, horizontal[:, None], ~horizontal[:, None]], axis=1
  )
  # A union region is tagged like a detector would: with its larger object (ties: the first of the pair).
  larger = np.where(arr['size'][b] > arr['size'][a], b, a)
  owner = np.concatenate([np.arange(n), larger, np.full(1 + n_background, -1)])
  return desc, boxes, kinds, owner


def region_features(descriptors: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """ReLU(descriptors @ W + b + noise): [k, REGION_DIM] float32, non-negative like pooled CNN features."""
  weights, bias = feature_projection()
  pre = descriptors @ weights + bias + rng.normal(0, FEATURE_NOISE, size=(len(descriptors), REGION_DIM))
  return np.maximum(pre, 0).astype(np.float32)


def _noisy_tag(obj: dict, rng: np.random.Generator) -> str:
  colour, shape = obj['colour'], obj['shape']
  if rng.random() < TAG_NOISE:
    if rng.random() < 0.5:
      colour = rng.choice([c for c in COLOURS if c != colour])
    else:
      shape = rng.choice([s for s in SHAPES if s != shape])
  return f'{colour} {shape}'


def scene_label(objects: Sequence[dict]) -> int:
  """Category label: shape and colour of the largest object (ties: leftmost, then topmost); see NUM_LABELS."""
  largest = min(objects, key=lambda o: (-HALF_SIZE[o['size']], o['x'], o['y']))
  return SHAPES.index(largest['shape']) * len(COLOURS) + COLOURS.index(largest['colour'])


# ---------------------------------------------------------------------------------------------- captions
def _pick(rng: np.random.Generator, options: Sequence):
  return options[int(rng.random() * len(options))]  # 3x faster than rng.integers for scalars


def _mention(shape=None, colour=None, size=None, count=None) -> dict:
  return {'shape': shape, 'colour': colour, 'size': size, 'count': count}


def _noun_phrase(obj: dict, rng: np.random.Generator, size_prob: float = 0.75) -> tuple:
  """'a small red circle' for one object, sometimes leaving attributes out; returns (words, mention)."""
  use_size = rng.random() < size_prob
  use_colour = rng.random() < 0.95
  use_shape = not use_colour or rng.random() < 0.95
  words = [_pick(rng, SIZE_WORDS[obj['size']])] if use_size else []
  if use_colour:
    words.append(_pick(rng, COLOUR_WORDS[obj['colour']]))
  words.append(_pick(rng, SHAPE_NOUNS[obj['shape']])[0] if use_shape else _pick(rng, GENERIC_NOUNS)[0])
  determiner = 'an' if words[0][0] in 'aeiou' else 'a'
  mention = _mention(
    obj['shape'] if use_shape else None, obj['colour'] if use_colour else None, obj['size'] if use_size else None
  )
  return [determiner] + words, mention


def _count_options(objects: Sequence[dict]) -> dict:
  """Partial descriptions (shape, colour, size; None = unsaid) naming a shape or colour that >= 2 objects fit,
  mapped to the indices of the objects that fit."""
  kinds = [(o['shape'], o['colour'], o['size']) for o in objects]
  keys = {
    tuple(v if s else None for v, s in zip(kind, said))
    for kind in kinds
    for said in itertools.product((False, True), repeat=3)
    if said[0] or said[1]
  }
  options = {}
  for key in keys:
    fitting = [i for i, kind in enumerate(kinds) if all(k is None or k == v for k, v in zip(key, kind))]
    if len(fitting) >= 2:
      options[key] = fitting
  return options


def _frame(words: list, rng: np.random.Generator, prefixes=_PREFIX_SINGULAR, prefix_prob=0.35) -> list:
  """Optional 'there is ...' prefix and '... in the image' suffix (only 'on a black background' after a prefix)."""
  prefixed = rng.random() < prefix_prob
  if prefixed:
    words = _pick(rng, prefixes).split() + words
  if rng.random() < 0.25:
    words = words + _pick(rng, _SUFFIXES[:1] if prefixed else _SUFFIXES).split()
  return words


def _relation_core(objects, rng) -> tuple:
  """'a red circle' REL 'a blue square' for a random ordered pair; returns (np_a, rel_words, np_b, rel)."""
  a, b = (int(i) for i in rng.permutation(len(objects))[:2])
  (np_a, m_a), (np_b, m_b) = _noun_phrase(objects[a], rng), _noun_phrase(objects[b], rng)
  rel = relation_between(objects[a], objects[b])
  return np_a, _pick(rng, RELATION_PHRASES[rel]).split(), np_b, (m_a, rel, m_b)


def _relation_caption(objects, rng):
  np_a, rel_words, np_b, (m_a, rel, m_b) = _relation_core(objects, rng)
  verb = [_pick(rng, _VERBS)] if rng.random() < 0.5 else []
  # No 'there is' prefix before a verb ("there is a red circle is left of ..." is not English).
  words = _frame(np_a + verb + rel_words + np_b, rng, prefix_prob=0.0 if verb else 0.5)
  return words, {'mentions': [m_a, m_b], 'relations': [(0, rel, 1)]}


def _double_relation_caption(objects, rng):
  """'a red circle is left of a blue box and above a white cross', or (4 objects) two clauses
  'a red circle is left of a blue box and a white cross lies above a green disc'."""
  order = [objects[int(i)] for i in rng.permutation(len(objects))]
  phrases, mentions = zip(*(_noun_phrase(o, rng, size_prob=0.2) for o in order))
  verb = _pick(rng, _VERBS)
  if len(objects) == 4 and rng.random() < 0.5:
    clauses = [(0, 1), (2, 3)]
  else:
    clauses = [(0, 1), (0, 2)]
  relations = [(i, relation_between(order[i], order[j]), j) for i, j in clauses]
  words = []
  for i, rel, j in relations:
    subject = [] if words and i == 0 else phrases[i] + [verb]  # "... and above a white cross"
    words += (['and'] if words else []) + subject + _pick(rng, RELATION_PHRASES[rel]).split() + phrases[j]
  used = max(j for _, _, j in relations) + 1
  return words, {'mentions': list(mentions[:used]), 'relations': relations}


def _list_caption(objects, rng):
  k = int(rng.integers(2, len(objects) + 1))
  chosen = [int(i) for i in rng.permutation(len(objects))[:k]]
  words, mentions = [], []
  for i in chosen:
    phrase, mention = _noun_phrase(objects[i], rng)
    words += (['and'] if words else []) + phrase
    mentions.append(mention)
  return _frame(words, rng, prefix_prob=0.4), {'mentions': mentions, 'relations': []}


def _count_caption(objects, rng):
  """'two red circles and a blue square' (exact count, then up to two of the other objects)."""
  options = _count_options(objects)
  if not options:
    return _list_caption(objects, rng)
  shape, colour, size = key = _pick(rng, sorted(options, key=str))
  words = [COUNT_WORDS[len(options[key])]]
  words += [_pick(rng, SIZE_WORDS[size])] if size else []
  words += [_pick(rng, COLOUR_WORDS[colour])] if colour else []
  words.append(_pick(rng, SHAPE_NOUNS[shape])[1] if shape else _pick(rng, GENERIC_NOUNS)[1])
  mentions = [_mention(shape, colour, size, len(options[key]))]
  others = [int(i) for i in rng.permutation(len(objects)) if i not in options[key]]
  for i in others[:2]:
    phrase, mention = _noun_phrase(objects[i], rng)
    words += ['and'] + phrase
    mentions.append(mention)
  prefix_prob = 0.4 if len(mentions) > 1 else 1.0  # at least 4 words
  return _frame(words, rng, _PREFIX_PLURAL, prefix_prob), {'mentions': mentions, 'relations': []}


def _count_relation_caption(objects, rng):
  """'three shapes with a red circle to the left of a blue square'."""
  n = len(objects)
  np_a, rel_words, np_b, (m_a, rel, m_b) = _relation_core(objects, rng)
  words = [COUNT_WORDS[n], _pick(rng, GENERIC_NOUNS)[1], _pick(rng, _JOINERS)] + np_a + rel_words + np_b
  return words, {'mentions': [_mention(count=n), m_a, m_b], 'relations': [(1, rel, 2)]}


_CAPTION_KINDS = {
  'relation': _relation_caption,
  'double_relation': _double_relation_caption,
  'list': _list_caption,
  'count': _count_caption,
  'count_relation': _count_relation_caption,
}


def caption_plan(n_objects: int, rng: np.random.Generator) -> list:
  """Kinds of the 5 captions: >= 3 that state relations (so layouts are distinguishable), >= 1 without."""
  rich = ['count_relation'] + (['double_relation'] if n_objects >= 3 else [])
  plan = [
    'relation',
    'relation',
    _pick(rng, rich),
    _pick(rng, ['list', 'count']),
    _pick(rng, rich + ['relation', 'list', 'count']),
  ]
  return [plan[int(i)] for i in rng.permutation(len(plan))]


def generate_captions(objects: Sequence[dict], rng: np.random.Generator) -> list:
  """CAPTIONS_PER_IMAGE distinct true captions of 4-20 words; returns [(text, meaning)] (see parse_caption)."""
  captions, seen = [], set()
  for kind in caption_plan(len(objects), rng):
    for _ in range(50):
      words, meaning = _CAPTION_KINDS[kind](objects, rng)
      text = ' '.join(words)
      if text not in seen and len(words) <= MAX_CAPTION_WORDS:
        break
      kind = 'relation'  # fall back to the shortest relational kind if the first draws collide or run long
    seen.add(text)
    captions.append((text, meaning))
  return captions


def parse_caption(text: str) -> dict:
  """Meaning of a caption written in the grammar's vocabulary.

  Returns:
    {'mentions': [{'shape', 'colour', 'size', 'count'}, ...] in textual order (None = not said; count None =
    "a ..." (at least one), n = exactly n objects match), 'relations': [(i, rel, j), ...]: mention i is `rel`
    of mention j}. Words outside the vocabulary (frames like "there is", verbs) are skipped.
  """
  tokens = text.lower().split()
  items, i = [], 0
  while i < len(tokens):
    relation = next(((p, r) for p, r in _RELATION_LOOKUP if tuple(tokens[i : i + len(p)]) == p), None)
    if relation is not None:
      items.append(('rel', relation[1]))
      i += len(relation[0])
      continue
    phrase = _parse_noun_phrase(tokens, i)
    if phrase is not None:
      items.append(('np', phrase[0]))
      i = phrase[1]
      continue
    if tokens[i] == 'and':
      items.append(('and', None))
    i += 1
  mentions, relations, subject = [], [], None
  for position, (kind, value) in enumerate(items):
    if kind == 'np':
      mentions.append(value)
    elif kind == 'rel' and position + 1 < len(items) and items[position + 1][0] == 'np':
      previous = items[position - 1][0] if position else None
      if previous == 'np':
        subject = len(mentions) - 1
      if subject is not None and previous in ('np', 'and'):
        relations.append((subject, value, len(mentions)))
  return {'mentions': mentions, 'relations': relations}


def _parse_noun_phrase(tokens: list, start: int):
  """(mention, end) for '<a|an|two|three|four> [size] [colour] <noun>' at tokens[start], else None."""
  first = tokens[start]
  if first in ('a', 'an'):
    count = None
  elif first in _COUNT_LOOKUP:
    count = _COUNT_LOOKUP[first]
  else:
    return None
  i = start + 1
  size = _SIZE_LOOKUP.get(tokens[i]) if i < len(tokens) else None
  i += size is not None
  colour = _COLOUR_LOOKUP.get(tokens[i]) if i < len(tokens) else None
  i += colour is not None
  if i >= len(tokens) or tokens[i] not in _NOUN_LOOKUP:
    return None
  shape, plural = _NOUN_LOOKUP[tokens[i]]
  if plural != (count is not None):
    return None
  return _mention(shape, colour, size, count), i + 1


def _matches(mention: dict, obj: dict) -> bool:
  return all(mention[k] is None or mention[k] == obj[k] for k in _ATTRIBUTES)


def caption_holds(meaning: dict, objects: Sequence[dict], relations: bool = True) -> bool:
  """Whether a parsed caption is true of a scene's objects.

  Counted mentions need exactly `count` matching objects; the other mentions must name distinct objects
  (any assignment) for which every stated relation holds. With relations=False only the bag of objects is
  used (the bag-of-objects oracle).
  """
  for m in meaning['mentions']:
    if m['count'] is not None and sum(_matches(m, o) for o in objects) != m['count']:
      return False
  single = [i for i, m in enumerate(meaning['mentions']) if m['count'] is None]
  for assignment in itertools.permutations(range(len(objects)), len(single)):
    chosen = dict(zip(single, assignment))
    if not all(_matches(meaning['mentions'][i], objects[chosen[i]]) for i in single):
      continue
    if not relations or all(
      i in chosen and j in chosen and relation_between(objects[chosen[i]], objects[chosen[j]]) == rel
      for i, rel, j in meaning['relations']
    ):
      return True
  return False


# ---------------------------------------------------------------------------------------------- examples
def example_from_scene(scene: dict, seed: int, image_id: int = 0) -> dict:
  """One dataset example from a scene description (see the module docstring); deterministic in (scene, seed).

  Returns:
    dict with `image_id` int, `regions` [NUM_REGIONS, REGION_DIM] float32, `boxes` [NUM_REGIONS, 4] float32,
    `tags` list of NUM_REGIONS str, `pixels` [CANVAS, CANVAS, 3] uint8, `label` int in [0, NUM_LABELS),
    `scene` JSON str (normalised scene), `captions` list of CAPTIONS_PER_IMAGE str.
  """
  scene = validate_scene(scene)
  objects = scene['objects']
  pixel_rng, region_rng, tag_rng, caption_rng = (
    np.random.default_rng(s) for s in np.random.SeedSequence([EXAMPLE_SEED, int(seed)]).spawn(4)
  )
  descriptors, boxes, _, owner = region_descriptors(objects, region_rng)
  features = region_features(descriptors, region_rng)
  tags = [_noisy_tag(objects[o], tag_rng) if o >= 0 else 'background' for o in owner]
  order = region_rng.permutation(NUM_REGIONS)
  return {
    'image_id': int(image_id),
    'regions': features[order],
    'boxes': boxes[order].astype(np.float32),
    'tags': [tags[i] for i in order],
    'pixels': render(objects, pixel_rng),
    'label': scene_label(objects),
    'scene': json.dumps(scene),
    'captions': [text for text, _ in generate_captions(objects, caption_rng)],
  }
