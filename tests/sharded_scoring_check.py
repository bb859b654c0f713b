"""Run by test_inference.py with 8 fake CPU devices: all-pairs scores, a re-rank pair list's scores and the
shortlist's global scores split over the 8 devices equal one device's, for a region matcher (RDAN) and a
joint-sequence one (MMCA, tiny BERT). Prints one JSON line."""

import json
import os
import sys

import jax
import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from xmatch_jax import inference  # noqa: E402
from xmatch_jax import rerank  # noqa: E402
from xmatch_jax.models import build_model  # noqa: E402

TINY_BERT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'tiny_bert')


def random_inputs(fields: dict, n_img: int, n_txt: int, k: int = 5, n: int = 7, vocab: int = 34):
  """A model with its variables and seeded random images / captions: the same on every process that asks.

  vocab 34: the tiny BERT's vocabulary. Returns (model, variables, images, tokens, mask).
  """
  rng = np.random.default_rng(0)
  model = build_model(ml_collections.ConfigDict(fields), vocab_size=vocab, img_dim=6)
  images = {'regions': rng.normal(size=(n_img, k, 6)).astype(np.float32)}
  lengths = rng.integers(2, n + 1, size=n_txt)
  mask = (np.arange(n)[None] < lengths[:, None]).astype(np.float32)
  tokens = (rng.integers(1, vocab, size=(n_txt, n)) * mask).astype(np.int32)
  return model, model.init(jax.random.key(0), *model.example_inputs()), images, tokens, mask


def listed_pairs(n_img: int, n_txt: int, count: int = 150) -> tuple:
  """A seeded re-rank list: (image_index, caption_index), repeats included, the same on every process."""
  rng = np.random.default_rng(1)
  return rng.integers(0, n_img, count), rng.integers(0, n_txt, count)


def check(fields: dict) -> dict:
  # 37 images: 8 devices x chunk 2 = 16 per call, the last padded.
  model, variables, images, tokens, mask = random_inputs(fields, n_img=37, n_txt=23)
  sharded = inference.Scorer(model, variables, image_chunk=2, text_batch=8)
  single = inference.Scorer(model, variables, image_chunk=2, text_batch=8, devices=jax.local_devices()[:1])
  got, want = sharded.score(images, tokens, mask), single.score(images, tokens, mask)
  # Re-rank: tiles of up to 4 captions of one image, 8 devices x (block_size x 8 / size) tiles a call.
  image_rep, text_rep = single.encode_images(images), single.encode_text(tokens, mask)
  images_of, captions_of = listed_pairs(37, 23)
  listed = sharded.pair_list_scores(image_rep, text_rep, images_of, captions_of, tile=4)
  listed_one = single.pair_list_scores(image_rep, text_rep, images_of, captions_of, tile=4)
  # The shortlist's global scores: 8 devices x 2 blocks of 2 images a call, against 1 device x 2 blocks.
  coarse = rerank._shortlist_scores(sharded, image_rep, text_rep, desc='', block_size=2, chunk_blocks=2)  # pylint: disable=protected-access
  coarse_one = rerank._shortlist_scores(single, image_rep, text_rep, desc='', block_size=2, chunk_blocks=2)  # pylint: disable=protected-access
  return {
    'devices': len(sharded.devices),
    'max_abs_diff': float(np.max(np.abs(got - want))),
    'shape': got.shape,
    'list_max_abs_diff': float(np.max(np.abs(listed - listed_one))),
    'list_vs_matrix': float(np.max(np.abs(listed - want[images_of, captions_of]))),
    'shortlist_max_abs_diff': float(np.max(np.abs(coarse - coarse_one))),
    'shortlist_shape': coarse.shape,
  }


if __name__ == '__main__':
  print(
    json.dumps(
      {
        'rdan': check({'name': 'rdan', 'embed_size': 8, 'word_dim': 8, 'cnn_channels': 4, 'block_size': 2}),
        'mmca': check({'name': 'mmca', 'embed_size': 8, 'num_heads': 2, 'cnn_filters': 4, 'bert_dir': TINY_BERT}),
      }
    )
  )
