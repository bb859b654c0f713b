"""Two-stage retrieval for cross-attention matchers: a cheap global score shortlists the top K candidates of every
query, the model's full pair head re-scores only those (DESIGN.md; `evaluate --rerank_k=K`, `Retriever.score`).

Global score, from the encoded reps (no parameters): MMCA's i0 . c0 when the reps carry them, the global embeddings
of VSE++, else the cosine of the mean region vector and the mean real-word vector (SCAN, RDAN, GLFN).

Re-ranked score matrices keep the [n_img, n_txt] layout: in the query direction's matrix every query's K candidates
hold their full scores and rank above all other items, which follow in global-score order. Text-to-image and
image-to-text shortlists differ, so each direction has its own matrix.
"""

import jax
import jax.numpy as jnp
import numpy as np

from xmatch_jax import metrics as metrics_lib


def _l2norm(x, eps=1e-8):
  return x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + eps)


@jax.jit
def global_scores(image_rep: dict, text_rep: dict) -> jax.Array:
  """[n_img, n_txt] shortlist scores from encoded reps."""
  if 'i0' in image_rep and 'c0' in text_rep:
    return image_rep['i0'] @ text_rep['c0'].T
  if 'embedding' in image_rep and 'embedding' in text_rep:
    return image_rep['embedding'] @ text_rep['embedding'].T
  if 'regions' in image_rep and 'words' in text_rep and 'mask' in text_rep:
    image = _l2norm(jnp.mean(image_rep['regions'], axis=1))
    mask = text_rep['mask'][..., None]
    text = _l2norm(jnp.sum(text_rep['words'] * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1))
    return image @ text.T
  raise ValueError(f'no global score for reps with image fields {sorted(image_rep)} and text fields '
                   f'{sorted(text_rep)}; re-ranking needs i0/c0, embedding, or regions/words/mask.')


def shortlist(scores: np.ndarray, k: int) -> np.ndarray:
  """[n_queries, n_items] -> [n_queries, min(k, n_items)] indices of the best items per row (any order)."""
  if k < 1:
    raise ValueError(f'rerank k must be >= 1 (candidates per query); got {k}.')
  k = min(k, scores.shape[1])
  return np.argpartition(-scores, k - 1, axis=1)[:, :k]


def _merge(global_rows: np.ndarray, candidates: np.ndarray, full: np.ndarray) -> np.ndarray:
  """Rows of the global score with each row's candidates replaced by full scores placed above every other item."""
  floor = full.min() - 1.0
  out = floor - (global_rows.max() - global_rows)       # <= floor: below all candidates, in global order
  np.put_along_axis(out, candidates, full, axis=1)
  return out


def rerank(scorer, image_rep, text_rep, k: int, query_chunk: int = 64) -> tuple[np.ndarray, np.ndarray]:
  """Two-stage scores of all pairs. Returns (i2t [n_img, n_txt]: per image its top-k captions re-scored,
  t2i [n_img, n_txt]: per caption its top-k images re-scored). A k above the number of items re-scores them all."""
  coarse = np.asarray(global_scores(image_rep, text_rep))
  images_per_caption = shortlist(coarse.T, k)                                     # [n_txt, k]
  captions_per_image = shortlist(coarse, k)                                       # [n_img, k]
  t2i = scorer.candidate_scores(image_rep, text_rep, images_per_caption, query_side='text', chunk=query_chunk)
  i2t = scorer.candidate_scores(image_rep, text_rep, captions_per_image, query_side='image', chunk=query_chunk)
  return _merge(coarse, captions_per_image, i2t), _merge(coarse.T, images_per_caption, t2i).T


def two_way_recall(sims_i2t: np.ndarray, sims_t2i: np.ndarray) -> dict:
  """Recall metrics with image-to-text ranks from one matrix and text-to-image ranks from the other."""
  i2t = metrics_lib.recall_metrics(sims_i2t)
  t2i = metrics_lib.recall_metrics(sims_t2i)
  out = {**{k: v for k, v in i2t.items() if k.startswith('i2t')}, **{k: v for k, v in t2i.items() if k.startswith('t2i')}}
  out['rsum'] = sum(out[k] for k in metrics_lib.RECALL_KEYS)
  return out
