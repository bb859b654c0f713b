"""RDAN attention figure (as the paper's Figure 3): the most attended region of every word, drawn on the image.

  python tools/rdan_attention.py --workdir=runs/rdan_shapes --split=test --image_index=0 --caption_index=0 \
      --out=rdan_attention.png
  python tools/rdan_attention.py --workdir=runs/rdan_shapes --image_index=3 --caption="a red circle above a blue square"

For word j the tool shows argmax_i beta_ij, beta = softmax_i(lambda S^1_ij) (eq 9): the column-wise pathway
is the one that distributes each word over the regions, which is what the paper's figure visualises (the
row-wise weights alpha of eq 8 distribute a region over the words instead). Needs a dataset with `pixels` and
`boxes` (x1, y1, x2, y2 in [0, 1]), i.e. `shapes`. Prints, per word, the region, its box, the weight and (for
`shapes`) the scene objects whose centre lies in the box, so one can check that the attention lands on them.
"""

import json
import os
import sys

from absl import flags
import numpy as np
from PIL import Image
from PIL import ImageDraw

from xmatch_jax import api
from xmatch_jax import cli
from xmatch_jax import data as data_lib
from xmatch_jax import errors
from xmatch_jax.data import shapes_scenes
from xmatch_jax.data import vocab as vocab_lib
from xmatch_jax.models.rdan import RDAN

SCALE = 4  # each 64 x 64 shapes image is drawn 256 x 256
TITLE_HEIGHT = 28
COLUMNS = 4


def word_attention(retriever: api.Retriever, images: dict, caption: str) -> tuple[list, np.ndarray]:
  """Column-wise weights beta (eq 9) of one image and one caption.

  Args:
    retriever: a Retriever of an RDAN workdir.
    images: dataset-format dict of ONE image (leading dim 1).
    caption: raw string.

  Returns:
    (words, beta): the caption's tokens as the model reads them (with <start>/<end>) and beta [k, n].
  """
  model = retriever.model
  if not isinstance(model, RDAN):
    raise errors.UserError(f'the workdir holds a {type(model).__name__} model; attention figures are for RDAN.')
  tokens = retriever.vocab.encode(caption)
  if all(t == vocab_lib.UNK_ID for t in tokens[1:-1]):
    raise errors.UserError(f"caption {caption!r} has no word in the model's vocabulary; nothing to attend.")
  mask = np.ones((1, len(tokens)), np.float32)
  variables = {'params': retriever.params}
  image_rep = model.apply(variables, {'regions': images['regions']}, method=model.encode_image)
  text_rep = model.apply(variables, {'tokens': tokens[None], 'mask': mask}, method=model.encode_text)
  weights = model.apply(variables, image_rep, text_rep, method=model.attention_weights)
  words = [retriever.vocab.words[t] for t in tokens]
  return words, np.asarray(weights['beta'][0, 0])


def most_attended_regions(beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """beta [k, n] -> (region index [n], its weight [n]) of every word."""
  index = np.argmax(beta, axis=0)
  return index, beta[index, np.arange(beta.shape[1])]


def objects_in_box(scene_json: str, box: np.ndarray) -> list[str]:
  """Descriptions ('small red circle') of the shapes-scene objects whose centre lies inside box (x1, y1, x2, y2)."""
  found = []
  for obj in json.loads(scene_json)['objects']:
    x, y = obj['x'] / shapes_scenes.CANVAS, obj['y'] / shapes_scenes.CANVAS
    if box[0] <= x <= box[2] and box[1] <= y <= box[3]:
      found.append(f'{obj["size"]} {obj["colour"]} {obj["shape"]}')
  return found


def render(pixels: np.ndarray, boxes: np.ndarray, words: list, regions: np.ndarray, weights: np.ndarray) -> Image.Image:
  """A grid with one panel per word: the image, the word's most attended box, 'word (weight)' above it.

  Args:
    pixels: [H, W, 3] uint8.
    boxes: [k, 4] (x1, y1, x2, y2) in [0, 1].
    words: n word strings.
    regions: [n] region index per word.
    weights: [n] attention weight per word.
  """
  height, width = pixels.shape[:2]
  panel_w, panel_h = width * SCALE, height * SCALE + TITLE_HEIGHT
  columns = min(COLUMNS, len(words))
  rows = -(-len(words) // columns)
  sheet = Image.new('RGB', (columns * panel_w, rows * panel_h), 'white')
  base = Image.fromarray(pixels).resize((panel_w, height * SCALE), Image.NEAREST)
  for j, (word, region, weight) in enumerate(zip(words, regions, weights)):
    left, top = (j % columns) * panel_w, (j // columns) * panel_h
    sheet.paste(base, (left, top + TITLE_HEIGHT))
    draw = ImageDraw.Draw(sheet)
    x1, y1, x2, y2 = (boxes[region] * [panel_w, height * SCALE, panel_w, height * SCALE]).tolist()
    draw.rectangle(
      [left + x1, top + TITLE_HEIGHT + y1, left + x2 - 1, top + TITLE_HEIGHT + y2 - 1], outline=(255, 160, 0), width=3
    )
    draw.text((left + 6, top + 8), f'{word}  ({weight:.2f}, region {region})', fill='black')
  return sheet


FLAGS = flags.FlagValues()
flags.DEFINE_string('workdir', None, 'trained RDAN workdir', flag_values=FLAGS)
flags.DEFINE_string('split', 'test', 'split of the image and caption', flag_values=FLAGS)
flags.DEFINE_integer('image_index', 0, 'image of the split', flag_values=FLAGS)
flags.DEFINE_integer(
  'caption_index', None, "caption of the split (default: the image's first); not with --caption", flag_values=FLAGS
)
flags.DEFINE_string('caption', None, 'a free caption string; not with --caption_index', flag_values=FLAGS)
flags.DEFINE_string('out', 'rdan_attention.png', 'PNG path', flag_values=FLAGS)


def main(argv=None) -> int:
  cli.parse_flags(FLAGS, argv, __doc__.split('\n')[0], required=('workdir',))
  if FLAGS.caption_index is not None and FLAGS.caption is not None:
    cli.usage_error('give --caption_index or --caption, not both')

  retriever = api.Retriever.from_workdir(FLAGS.workdir)
  config = retriever.config
  split = data_lib.load_split(config.dataset, FLAGS.split, config.data_dir or None)
  n_images = len(split.images['regions'])
  if not 0 <= FLAGS.image_index < n_images:
    raise errors.UserError(
      f'--image_index={FLAGS.image_index} is out of range: {config.dataset}/{FLAGS.split} has {n_images} images.'
    )
  for key in ('pixels', 'boxes'):
    if key not in split.images:
      raise errors.UserError(f'dataset {config.dataset} has no "{key}" field; the figure needs pixels and boxes.')
  caption = FLAGS.caption
  if caption is None:
    index = FLAGS.caption_index
    if index is None:
      index = int(np.flatnonzero(split.caption_to_image == FLAGS.image_index)[0])
    if not 0 <= index < len(split.captions):
      raise errors.UserError(f'--caption_index={index} is out of range: {len(split.captions)} captions.')
    caption = split.captions[index]

  image = {k: v[FLAGS.image_index : FLAGS.image_index + 1] for k, v in split.images.items()}
  words, beta = word_attention(retriever, image, caption)
  regions, weights = most_attended_regions(beta)
  keep = [j for j, w in enumerate(words) if w not in (vocab_lib.START, vocab_lib.END)]
  boxes = image['boxes'][0]
  print(f'image {FLAGS.image_index}, caption: {caption!r}')
  for j in keep:
    contents = ''
    if 'scene' in image:
      contents = ', '.join(objects_in_box(image['scene'][0], boxes[regions[j]])) or 'no object centre'
    print(
      f'  {words[j]:>12s} -> region {regions[j]:2d} box [{", ".join(f"{v:.2f}" for v in boxes[regions[j]])}] '
      f'weight {weights[j]:.2f}  [{contents}]'
    )
  sheet = render(image['pixels'][0], boxes, [words[j] for j in keep], regions[keep], weights[keep])
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  sheet.save(FLAGS.out)
  print(f'written to {FLAGS.out}')
  return 0


if __name__ == '__main__':
  sys.exit(cli.run_tool(main))
