"""Run by test_multiprocess_scoring.py as one of 2 localhost processes x 2 CPU devices (gloo): all-pairs scores, a
re-rank pair list's scores and the shortlist's scores split over the processes equal one device's, and an
interrupted evaluation's finished column (kept by process 0) reaches every process. Writes one JSON file per process.

  python tests/multiprocess_scoring_check.py COORDINATOR NUM_PROCESSES PROCESS_ID OUT_JSON RESUME_DIR
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from xmatch_jax import parallel  # noqa: E402  (before any JAX computation)

coordinator, num_processes, process_id, out_path, resume_dir = sys.argv[1:]
parallel.initialize(coordinator, int(num_processes), int(process_id), 'gloo')

import jax  # noqa: E402
import numpy as np  # noqa: E402

from xmatch_jax import inference  # noqa: E402
from xmatch_jax import rerank  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sharded_scoring_check  # noqa: E402

TEXT_BATCH = 8


def check(fields: dict) -> dict:
  # 29 images over 2 processes: shares of 15, the last one padded; the same inputs on every process.
  n_img, n_txt = 29, 21
  model, variables, images, tokens, mask = sharded_scoring_check.random_inputs(fields, n_img, n_txt)
  split = inference.Scorer(model, variables, image_chunk=2, text_batch=TEXT_BATCH)
  alone = inference.Scorer(model, variables, image_chunk=2, text_batch=TEXT_BATCH, devices=jax.local_devices()[:1])
  image_rep, text_rep = split.encode_images(images), split.encode_text(tokens, mask)
  got, want = split.pair_scores(image_rep, text_rep), alone.pair_scores(image_rep, text_rep)
  # Re-rank: the tiles split over 2 processes x 2 devices, every process gets every pair's score.
  images_of, captions_of = sharded_scoring_check.listed_pairs(n_img, n_txt)
  listed = split.pair_list_scores(image_rep, text_rep, images_of, captions_of, tile=4)
  listed_alone = alone.pair_list_scores(image_rep, text_rep, images_of, captions_of, tile=4)
  coarse = rerank._shortlist_scores(split, image_rep, text_rep, desc='', block_size=2, chunk_blocks=2)  # pylint: disable=protected-access
  coarse_alone = rerank._shortlist_scores(alone, image_rep, text_rep, desc='', block_size=2, chunk_blocks=2)  # pylint: disable=protected-access
  # An interrupted evaluation left its second column on process 0 (marked +1000 so its use is visible). Every caption
  # here is scored at width 8 (7 tokens), so the scorer's order by width is the given one and column 2 is captions
  # 8-15; the store's identity is the one the scorer gives it.
  store_dir = os.path.join(resume_dir, fields['name'])
  identity = {'run': fields['name']}
  if jax.process_index() == 0:
    stored = {**identity, 'shape': [n_img, n_txt], 'text_batch': TEXT_BATCH, 'caption_order': 'by_width'}
    store = inference._ColumnStore(store_dir, stored)  # pylint: disable=protected-access
    store.put(TEXT_BATCH, want[:, TEXT_BATCH : 2 * TEXT_BATCH] + 1000.0)
  parallel.sync('column stored')
  resumed = split.pair_scores(image_rep, text_rep, store_dir, identity)
  parallel.sync('store removed')  # process 0 removes it after its last column
  marked = want.copy()
  marked[:, TEXT_BATCH : 2 * TEXT_BATCH] += 1000.0
  return {
    'processes': split.processes,
    'devices': len(split.devices),
    'shape': list(got.shape),
    'max_abs_diff': float(np.max(np.abs(got - want))),
    'list_max_abs_diff': float(np.max(np.abs(listed - listed_alone))),
    'shortlist_max_abs_diff': float(np.max(np.abs(coarse - coarse_alone))),
    'shortlist_shape': list(coarse.shape),
    'resumed_max_abs_diff': float(np.max(np.abs(resumed - marked))),
    'store_removed': not os.path.exists(store_dir),
  }


if __name__ == '__main__':
  result = {
    'scan': check({'name': 'scan', 'embed_size': 8, 'word_dim': 8}),
    'rdan': check({'name': 'rdan', 'embed_size': 8, 'word_dim': 8, 'cnn_channels': 4, 'block_size': 2}),
  }
  with open(out_path, 'w') as f:
    json.dump(result, f)
