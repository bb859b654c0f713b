"""Retrieval examples drawn as pictures: top-k images per query caption, top-k captions per query image (PNG/HTML).

  python tools/retrieval_examples.py --workdir=runs/rdan_shapes --split=test --caption_index=0 --caption_index=7 \
      --caption="a red circle above a blue square" -k 5 --out=captions.png
  python tools/retrieval_examples.py --workdir=runs/rdan_shapes --image_index=3 --image_index=12 -k 5 \
      --out=images.html

Caption queries (--caption_index of the split, or free text --caption; repeat and mix, in order): one row each,
the query text, then the top-k images with rank, image index and score; for split captions the ground-truth image
has a green frame and the others a red one (free text has no ground truth: grey frames). Image queries
(--image_index, repeated): the image and its top-k captions with scores, the image's own captions in green (bold
in HTML). Each query also states the rank of its first ground-truth match, in or beyond the top k. The ranking is
xmatch_jax.retrieve's rank_images / rank_captions. --out=*.png draws a sheet; --out=*.html is a standalone page
(images embedded as base64 PNG). Needs a dataset with `pixels` (shapes, the category datasets).
"""

import base64
import html
import io
import os
import sys
from typing import NamedTuple

from absl import flags
import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont

from xmatch_jax import api
from xmatch_jax import cli
from xmatch_jax import data as data_lib
from xmatch_jax import errors
from xmatch_jax import retrieve

PANEL = 256  # images are upscaled (nearest neighbour, integer factor) to about this many pixels a side
FRAME = 6  # frame width around each retrieved image
GAP = 10  # between image cells
PAD = 12  # inner margin of text columns
TITLE_HEIGHT = 34
LABEL_HEIGHT = 26  # 'rank. image i  score' above each image
ROW_GAP = 18
TEXT_WIDTH = 330  # query text column of caption rows
CAPTIONS_WIDTH = 780  # caption list column of image rows
LINE_HEIGHT = 24
GREEN, RED, GREY = (0, 170, 0), (220, 30, 30), (150, 150, 150)


class CaptionExample(NamedTuple):
  caption: str
  caption_index: int | None  # None for free text
  truth: int | None  # the caption's image (None for free text)
  results: list  # [(image index, score)], best first (retrieve.rank_images)
  truth_rank: int | None  # 1-based rank of `truth` among all images


class ImageExample(NamedTuple):
  image_index: int
  truth: list  # caption indices of the image
  results: list  # [(caption index, score)], best first (retrieve.rank_captions)
  truth_rank: int  # 1-based rank of the image's best-ranked own caption
  truth_caption: int  # that caption's index
  truth_score: float


def load(workdir: str, split_name: str) -> tuple[api.Retriever, data_lib.Split]:
  """The workdir's Retriever and the split, which must have `pixels`."""
  retriever = api.Retriever.from_workdir(workdir)
  dataset = retriever.config.dataset
  split = data_lib.load_split(dataset, split_name, retriever.config.data_dir or None)
  if 'pixels' not in split.images:
    raise errors.UserError(
      f'dataset {dataset}/{split_name} has no "pixels" field (its image fields are {sorted(split.images)}), so '
      'retrieved images cannot be drawn; expected a dataset with pixels such as shapes. For text-only results use '
      f'python -m xmatch_jax.retrieve --workdir={workdir} --split={split_name} --caption="..." (or --image_index=N).'
    )
  return retriever, split


def _check_index(flag: str, index: int, count: int, what: str, where: str) -> None:
  if not 0 <= index < count:
    raise errors.UserError(f'--{flag}={index} is out of range: {where} has {count} {what} (valid 0 .. {count - 1}).')


def caption_examples(
  retriever: api.Retriever, split: data_lib.Split, queries: list, k: int, where: str = 'the split'
) -> list[CaptionExample]:
  """queries: caption indices of the split (int) and free captions (str) -> one CaptionExample each."""
  n_images = len(split.images['pixels'])
  for q in queries:
    if not isinstance(q, str):
      _check_index('caption_index', q, len(split.captions), 'captions', where)
  examples = []
  for q in queries:
    text, index = (q, None) if isinstance(q, str) else (split.captions[q], int(q))
    ranking = retrieve.rank_images(retriever, split.images, text, n_images)  # all images: the truth's rank too
    truth = None if index is None else int(split.caption_to_image[index])
    truth_rank = None if truth is None else 1 + [i for i, _ in ranking].index(truth)
    examples.append(CaptionExample(text, index, truth, ranking[:k], truth_rank))
  return examples


def image_examples(
  retriever: api.Retriever, split: data_lib.Split, image_indices: list, k: int, where: str = 'the split'
) -> list[ImageExample]:
  """One ImageExample per image index of the split."""
  n_images = len(split.images['pixels'])
  for i in image_indices:
    _check_index('image_index', i, n_images, 'images', where)
  examples = []
  for i in image_indices:
    ranking = retrieve.rank_captions(retriever, split.images, split.captions, i, len(split.captions))
    truth = [int(c) for c in np.flatnonzero(split.caption_to_image == i)]
    rank, (caption, score) = next((r, item) for r, item in enumerate(ranking, 1) if item[0] in truth)
    examples.append(ImageExample(int(i), truth, ranking[:k], rank, caption, score))
  return examples


def _font(size: int) -> ImageFont.ImageFont:
  try:
    return ImageFont.load_default(size=size)
  except (TypeError, OSError, ImportError):  # old Pillow or no FreeType: the fixed bitmap font
    return ImageFont.load_default()


def _wrap(text: str, font, width: float) -> list[str]:
  lines, line = [], ''
  for word in text.split():
    candidate = f'{line} {word}'.strip()
    if line and font.getlength(candidate) > width:
      lines.append(line)
      line = word
    else:
      line = candidate
  return lines + [line] if line else lines


def _fit(text: str, font, width: float) -> str:
  """text, cut with '...' to fit width pixels."""
  if font.getlength(text) <= width:
    return text
  while text and font.getlength(text + '...') > width:
    text = text[:-1]
  return text + '...'


def upscale(pixels: np.ndarray, scale: int = 0) -> Image.Image:
  """[H, W, 3] uint8 -> PIL image enlarged scale times (0: the integer factor that brings the longer side to about
  PANEL pixels)."""
  height, width = pixels.shape[:2]
  scale = scale or max(1, PANEL // max(height, width))
  return Image.fromarray(np.asarray(pixels, np.uint8)).resize((width * scale, height * scale), Image.NEAREST)


def _frame_colour(example: CaptionExample, image_index: int) -> tuple:
  if example.truth is None:
    return GREY
  return GREEN if image_index == example.truth else RED


def _caption_meta(example: CaptionExample, k: int) -> tuple[list, tuple]:
  """Lines under a query caption and their colour."""
  if example.truth is None:
    return ['free text (no ground truth)'], GREY
  found = example.truth_rank <= k
  return (
    [
      f'caption {example.caption_index} of image {example.truth}',
      f'ground truth at rank {example.truth_rank}' + ('' if found else f' (not in the top {k})'),
    ],
    GREEN if found else RED,
  )


def render_captions(
  pixels: np.ndarray, examples: list[CaptionExample], k: int, title: str, scale: int = 0
) -> Image.Image:
  """One row per caption query: its text, then its top-k images (framed, 'rank. image i  score' above each)."""
  side_h, side_w = upscale(pixels[0], scale).size[::-1]
  cell_w, cell_h = side_w + 2 * FRAME, side_h + 2 * FRAME
  big, small = _font(17), _font(15)
  texts = [_wrap(f'"{example.caption}"', big, TEXT_WIDTH - 2 * PAD) for example in examples]
  text_h = max(
    len(t) * LINE_HEIGHT + 6 + len(_caption_meta(e, k)[0]) * (LINE_HEIGHT - 2) for t, e in zip(texts, examples)
  )
  row_h = LABEL_HEIGHT + max(cell_h, text_h) + ROW_GAP
  sheet = Image.new('RGB', (TEXT_WIDTH + k * (cell_w + GAP), TITLE_HEIGHT + len(examples) * row_h), 'white')
  draw = ImageDraw.Draw(sheet)
  draw.text((PAD, 8), _fit(title, big, sheet.width - 2 * PAD), fill='black', font=big)
  for row, (example, text) in enumerate(zip(examples, texts)):
    top = TITLE_HEIGHT + row * row_h
    y = top + LABEL_HEIGHT
    for line in text:
      draw.text((PAD, y), line, fill='black', font=big)
      y += LINE_HEIGHT
    lines, colour = _caption_meta(example, k)
    y += 6
    for line in lines:
      draw.text((PAD, y), _fit(line, small, TEXT_WIDTH - 2 * PAD), fill=colour, font=small)
      y += LINE_HEIGHT - 2
    for rank, (i, score) in enumerate(example.results, 1):
      left = TEXT_WIDTH + (rank - 1) * (cell_w + GAP)
      label = f'{rank}. image {i}   {score:.3f}' + ('   ground truth' if i == example.truth else '')
      draw.text((left + 2, top + 4), _fit(label, small, cell_w), fill='black', font=small)
      draw.rectangle(
        [left, top + LABEL_HEIGHT, left + cell_w - 1, top + LABEL_HEIGHT + cell_h - 1], fill=_frame_colour(example, i)
      )
      sheet.paste(upscale(pixels[i], scale), (left + FRAME, top + LABEL_HEIGHT + FRAME))
  return sheet


def _image_lines(example: ImageExample, captions: list, k: int) -> list[tuple[str, bool]]:
  """(text, is ground truth) per line of an image query: the top-k captions, then the first ground truth's rank."""
  lines = [
    (f'{rank}. {score:.3f}  {captions[c]}', c in example.truth) for rank, (c, score) in enumerate(example.results, 1)
  ]
  if example.truth_rank <= k:
    lines.append((f'first own caption at rank {example.truth_rank}', True))
  else:
    lines.append(
      (
        f'first own caption at rank {example.truth_rank} (not in the top {k}), score '
        f'{example.truth_score:.3f}: {captions[example.truth_caption]}',
        False,
      )
    )
  return lines


def render_images(
  pixels: np.ndarray, captions: list, examples: list[ImageExample], k: int, title: str, scale: int = 0
) -> Image.Image:
  """One row per image query: the image, then its top-k captions (own captions green) and the truth's rank."""
  side_h, side_w = upscale(pixels[0], scale).size[::-1]
  image_w = side_w + 2 * PAD
  row_h = max(LABEL_HEIGHT + side_h, (k + 1) * LINE_HEIGHT + LABEL_HEIGHT) + ROW_GAP
  sheet = Image.new('RGB', (image_w + CAPTIONS_WIDTH, TITLE_HEIGHT + len(examples) * row_h), 'white')
  draw = ImageDraw.Draw(sheet)
  big, small = _font(17), _font(16)
  draw.text((PAD, 8), _fit(title, big, sheet.width - 2 * PAD), fill='black', font=big)
  for row, example in enumerate(examples):
    top = TITLE_HEIGHT + row * row_h
    draw.text((PAD, top + 4), f'image {example.image_index}', fill='black', font=big)
    sheet.paste(upscale(pixels[example.image_index], scale), (PAD, top + LABEL_HEIGHT))
    y = top + LABEL_HEIGHT
    for n, (line, own) in enumerate(_image_lines(example, captions, k)):
      last = n == k
      colour = (GREEN if own else RED) if last else (GREEN if own else 'black')
      text = _fit(line, small, CAPTIONS_WIDTH - 2 * PAD)
      for dx in (0, 1) if own and not last else (0,):  # own captions in faux bold
        draw.text((image_w + PAD + dx, y + (6 if last else 0)), text, fill=colour, font=small)
      y += LINE_HEIGHT
  return sheet


def _data_uri(image: Image.Image) -> str:
  buffer = io.BytesIO()
  image.save(buffer, format='PNG', optimize=True)
  return 'data:image/png;base64,' + base64.b64encode(buffer.getvalue()).decode('ascii')


def _css(colour: tuple) -> str:
  return 'rgb({}, {}, {})'.format(*colour)


HTML_HEAD = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 16px; }}
section {{ margin: 18px 0; padding-top: 10px; border-top: 1px solid #ccc; display: flex; gap: 16px; }}
figure {{ margin: 0; text-align: center; font-size: 13px; }}
figure img {{ display: block; border: {frame}px solid; image-rendering: pixelated; }}
.query {{ width: 300px; }} .meta {{ font-size: 13px; }}
li.truth {{ color: {green}; font-weight: bold; }} .found {{ color: {green}; }} .missed {{ color: {red}; }}
</style></head><body>
<h3>{title}</h3>
"""


def html_captions(pixels: np.ndarray, examples: list[CaptionExample], k: int, title: str, scale: int = 0) -> str:
  page = [HTML_HEAD.format(title=html.escape(title), frame=FRAME, green=_css(GREEN), red=_css(RED))]
  for example in examples:
    lines, colour = _caption_meta(example, k)
    kind = '' if example.truth is None else (' found' if colour == GREEN else ' missed')
    page.append(
      f'<section><div class="query"><p>"{html.escape(example.caption)}"</p>'
      + ''.join(f'<p class="meta{kind}">{html.escape(line)}</p>' for line in lines)
      + '</div>'
    )
    for rank, (i, score) in enumerate(example.results, 1):
      truth = ' class="truth"' if i == example.truth else ''
      page.append(
        f'<figure{truth}><img src="{_data_uri(upscale(pixels[i], scale))}" '
        f'style="border-color: {_css(_frame_colour(example, i))}" alt="image {i}">'
        f'<figcaption>{rank}. image {i} &nbsp; {score:.3f}{" &nbsp; ground truth" if truth else ""}'
        '</figcaption></figure>'
      )
    page.append('</section>')
  return '\n'.join(page + ['</body></html>\n'])


def html_images(
  pixels: np.ndarray, captions: list, examples: list[ImageExample], k: int, title: str, scale: int = 0
) -> str:
  page = [HTML_HEAD.format(title=html.escape(title), frame=0, green=_css(GREEN), red=_css(RED))]
  for example in examples:
    i = example.image_index
    page.append(
      f'<section><figure><img src="{_data_uri(upscale(pixels[i], scale))}" alt="image {i}">'
      f'<figcaption>image {i}</figcaption></figure><div><ol>'
    )
    for c, score in example.results:
      truth = ' class="truth"' if c in example.truth else ''
      page.append(f'<li{truth}>{score:.3f} &nbsp; {html.escape(captions[c])} <small>(caption {c})</small></li>')
    line, own = _image_lines(example, captions, k)[-1]
    page.append(f'</ol><p class="meta {"found" if own else "missed"}">{html.escape(line)}</p></div></section>')
  return '\n'.join(page + ['</body></html>\n'])


FLAGS = flags.FlagValues()
flags.DEFINE_string('workdir', None, 'trained workdir', flag_values=FLAGS)
flags.DEFINE_string('split', 'test', 'split to query', flag_values=FLAGS)
flags.DEFINE_multi_integer('caption_index', [], 'caption of the split to query with', flag_values=FLAGS)
flags.DEFINE_multi_string('caption', [], 'free query text', flag_values=FLAGS)
flags.DEFINE_multi_integer('image_index', [], 'query image', flag_values=FLAGS)
flags.DEFINE_integer('k', 5, 'results per query (-k 5 or --k=5)', flag_values=FLAGS)
flags.DEFINE_integer(
  'scale', 0, f'upscale factor of the images (0: to about {PANEL} pixels a side, 4x for shapes)', flag_values=FLAGS
)
flags.DEFINE_string('out', None, '.png or .html file', flag_values=FLAGS)


def caption_queries(argv: list[str]) -> list:
  """The --caption_index (int) and --caption (str) values in command-line order: the two kinds of caption query
  mix. absl keeps each flag's values apart, so the order is read back from the flag names in argv."""
  indices, texts = list(FLAGS.caption_index), list(FLAGS.caption)
  kinds = []
  tokens = iter(argv)
  for token in tokens:
    if token == '--':
      break
    if not token.startswith('-'):
      continue
    name, has_value, _ = token.lstrip('-').partition('=')
    if name in ('caption_index', 'caption'):
      kinds.append(name)
    if not has_value:
      next(tokens, None)  # every flag of this tool takes a value: `--name value`
  if kinds.count('caption_index') != len(indices) or kinds.count('caption') != len(texts):
    kinds = ['caption_index'] * len(indices) + ['caption'] * len(texts)  # not all on the command line (--flagfile)
  return [indices.pop(0) if kind == 'caption_index' else texts.pop(0) for kind in kinds]


def run(argv=None) -> list:
  """The CLI; returns the CaptionExamples or ImageExamples it drew."""
  argv = list(sys.argv[1:] if argv is None else argv)
  cli.parse_flags(FLAGS, argv, __doc__, required=('workdir', 'out'))
  captions = caption_queries(argv)
  if bool(captions) == bool(FLAGS.image_index):
    raise errors.UserError(
      'give caption queries (--caption_index / --caption) or image queries (--image_index); '
      f'got {len(captions)} caption and {len(FLAGS.image_index)} image queries.'
    )
  if FLAGS.k < 1:
    raise errors.UserError(f'-k must be >= 1; got {FLAGS.k}.')
  if FLAGS.scale < 0:
    raise errors.UserError(f'--scale must be >= 0 (0: automatic); got {FLAGS.scale}.')
  kind = os.path.splitext(FLAGS.out)[1].lower()
  if kind not in ('.png', '.html'):
    raise errors.UserError(f'--out={FLAGS.out}: expected a .png or .html file name.')
  for q in captions:
    if isinstance(q, str) and not q.strip():
      raise errors.UserError('--caption is empty; expected some query text.')

  retriever, split = load(FLAGS.workdir, FLAGS.split)
  config = retriever.config
  where = f'{config.dataset}/{FLAGS.split}'
  pixels = split.images['pixels']
  model = f'{config.model.name} ({retriever.checkpoint} checkpoint)'
  if captions:
    examples = caption_examples(retriever, split, captions, FLAGS.k, where)
    title = f'{where}, {model}: top-{FLAGS.k} images per caption; green frame = ground truth, red = not'
    for e in examples:
      print(
        f'"{e.caption}": '
        + ', '.join(f'{i} ({s:.3f})' for i, s in e.results)
        + ('' if e.truth is None else f'; ground truth image {e.truth} at rank {e.truth_rank}')
      )
    output = (
      render_captions(pixels, examples, FLAGS.k, title, FLAGS.scale)
      if kind == '.png'
      else html_captions(pixels, examples, FLAGS.k, title, FLAGS.scale)
    )
  else:
    examples = image_examples(retriever, split, FLAGS.image_index, FLAGS.k, where)
    title = f'{where}, {model}: top-{FLAGS.k} captions per image; green = a caption of the image'
    for e in examples:
      print(
        f'image {e.image_index}: '
        + ', '.join(f'{c}{"*" if c in e.truth else ""} ({s:.3f})' for c, s in e.results)
        + f'; first own caption at rank {e.truth_rank}'
      )
    output = (
      render_images(pixels, split.captions, examples, FLAGS.k, title, FLAGS.scale)
      if kind == '.png'
      else html_images(pixels, split.captions, examples, FLAGS.k, title, FLAGS.scale)
    )
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  if kind == '.png':
    output.save(FLAGS.out, optimize=True)
  else:
    with open(FLAGS.out, 'w', encoding='utf-8') as f:
      f.write(output)
  print(f'written to {FLAGS.out}')
  return examples


def main(argv=None) -> int:
  run(argv)
  return 0


if __name__ == '__main__':
  sys.exit(cli.run_tool(main))
