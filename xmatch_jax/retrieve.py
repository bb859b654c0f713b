"""Query a trained workdir: `python -m xmatch_jax.retrieve --workdir=W [--split=test] --caption="..." [-k 5]` ranks
the split's images for a caption; `--image_index=N` ranks the split's captions for image N. Prints rank, score and
what was retrieved (image index, its scene / first caption; caption index, its text and image), marking ground truth.
"""

import sys

from absl import app
from absl import flags
from absl import logging as absl_logging
import numpy as np

from xmatch_jax import api
from xmatch_jax import cli
from xmatch_jax import errors
from xmatch_jax.data import load_split


def rank_images(retriever: api.Retriever, images: dict, caption: str, k: int) -> list:
  """[(image index, score)] of the k best images for `caption`, best first."""
  scores = retriever.score(images, [caption])[:, 0]
  order = np.argsort(-scores, kind='stable')[:k]
  return [(int(i), float(scores[i])) for i in order]


def rank_captions(retriever: api.Retriever, images: dict, captions: list, image_index: int, k: int) -> list:
  """[(caption index, score)] of the k best captions for image `image_index`, best first."""
  n_images = len(next(iter(images.values())))
  if not 0 <= image_index < n_images:
    raise errors.UserError(f'--image_index={image_index} is outside the split (0 .. {n_images - 1})')
  one = {key: value[image_index : image_index + 1] for key, value in images.items()}
  scores = retriever.score(one, captions)[0]
  order = np.argsort(-scores, kind='stable')[:k]
  return [(int(c), float(scores[c])) for c in order]


def run(workdir: str, split: str, caption: str | None, image_index: int | None, k: int, out=None) -> list:
  out = out or sys.stdout  # looked up per call: a default bound at import would keep a replaced stream
  if (caption is None) == (image_index is None):
    raise errors.UserError('give exactly one of --caption or --image_index')
  if k < 1:
    raise errors.UserError(f'-k must be >= 1, got {k}')
  retriever = api.Retriever.from_workdir(workdir)
  data = load_split(retriever.config.dataset, split, retriever.config.data_dir or None)
  first_caption = {int(i): c for c, i in reversed(list(zip(data.captions, data.caption_to_image)))}
  if caption is not None:
    results = rank_images(retriever, data.images, caption, k)
    print(
      f'images of {retriever.config.dataset}/{split} for "{caption}" ({retriever.config.model.name}, '
      f'{retriever.checkpoint} checkpoint):',
      file=out,
    )
    for rank, (i, score) in enumerate(results, 1):
      print(f'{rank:3d}. image {i:5d}  score {score:8.4f}  ({first_caption.get(i, "")})', file=out)
  else:
    results = rank_captions(retriever, data.images, data.captions, image_index, k)
    print(
      f'captions of {retriever.config.dataset}/{split} for image {image_index} '
      f'({retriever.config.model.name}, {retriever.checkpoint} checkpoint); * = a caption of this image:',
      file=out,
    )
    for rank, (c, score) in enumerate(results, 1):
      mark = '*' if int(data.caption_to_image[c]) == image_index else ' '
      print(f'{rank:3d}.{mark} caption {c:6d}  score {score:8.4f}  {data.captions[c]}', file=out)
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  absl_logging.set_verbosity(absl_logging.WARNING)
  f = flags.FLAGS
  run(f.workdir, f.split, f.caption, f.image_index, f.k)


if __name__ == '__main__':
  flags.DEFINE_string('workdir', None, 'Training workdir.')
  flags.DEFINE_string('split', 'test', 'Split to search.')
  flags.DEFINE_string('caption', None, "Query caption: rank the split's images.")
  flags.DEFINE_integer('image_index', None, "Query image (index in the split): rank the split's captions.")
  flags.DEFINE_integer('k', 5, 'How many results (-k 5 or --k=5).')
  flags.mark_flag_as_required('workdir')
  cli.run_absl(main)
