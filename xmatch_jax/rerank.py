"""Two-stage retrieval for cross-attention matchers: a cheap global score shortlists the top K candidates of every
query, the model's full pair head re-scores only those (docs/architecture.md, "Two-stage retrieval";
`evaluate --rerank_k=K`, `Retriever.score`).

Global score, from the encoded reps (no parameters), each model's `global_scores` (models/matcher.py): MMCA's
i0 . c0, the global embeddings of VSE++, and for region / word models (SCAN, RDAN, GLFN) the mean over real words of
each word's best region cosine: one pass of the batch-wide similarity tensor S, without the attention head. (The
cosine of mean-pooled region and word vectors was tried first: on RDAN/shapes it kept the true image in a caption's
top 10 only 31% of the time.)

Re-ranked score matrices keep the [n_img, n_txt] layout: in the query direction's matrix every query's K candidates
hold their full scores and rank above all other items, which follow in global-score order. Text-to-image and
image-to-text shortlists differ, so each direction has its own matrix.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from xmatch_jax import errors
from xmatch_jax import inference
from xmatch_jax import metrics as metrics_lib


def global_scores(model, image_rep, text_rep, block_size: int = 16) -> jax.Array:
  """[n_img, n_txt] shortlist scores from encoded reps: the model's `global_scores` (the matcher contract), jitted."""
  return _global_fn(model, block_size)(image_rep, text_rep)


def _global_fn(model, block_size: int, mesh: jax.sharding.Mesh | None = None):
  """jit of the model's `global_scores`; with a mesh, the images split over its `images` axis (shard_map)."""
  fn = functools.partial(model.global_scores, block_size=block_size)
  if mesh is None:
    return jax.jit(fn)
  spec = jax.sharding.PartitionSpec
  return jax.jit(
    jax.shard_map(fn, mesh=mesh, in_specs=(spec('images'), spec()), out_specs=spec('images'), check_vma=False)
  )


def _shortlist_scores(
  scorer, image_rep, text_rep, desc: str, block_size: int = 16, chunk_blocks: int = 8
) -> np.ndarray:
  """`global_scores` as numpy [n_img, n_txt], `chunk_blocks` blocks of `block_size` images per device and call, with
  a progress bar (a region / word score is a pass of S over all pairs: minutes for a large split on CPU).

  The images are split as `Scorer.pair_scores` splits them: contiguous shares over the processes (the rows
  all-gathered), each share over the scorer's devices. When the model can cut its text rep's token axis, captions
  are scored in groups of one width (their length rounded up to TOKEN_STEP, as `Scorer.pair_scores` does), so a split
  padded to its longest caption is not scored at that length: COCO-5K's shortlist was ~3x slower padded. A score
  depends only on its own image and caption, whatever the chunks."""
  model = scorer.model
  n_img = jax.tree.leaves(image_rep)[0].shape[0]
  image_rep = scorer.process_share(image_rep, n_img)
  share, devices = jax.tree.leaves(image_rep)[0].shape[0], len(scorer.devices)
  chunk = min(block_size * chunk_blocks, -(-share // devices)) * devices  # images per call, over all devices
  score = _global_fn(model, block_size, scorer.mesh)
  lengths = model.text_lengths(text_rep)
  if lengths is None:
    groups, given = [jax.device_put(text_rep, scorer.replicated)], None
  else:
    widths = inference.caption_widths(lengths)
    columns = [np.flatnonzero(widths == width) for width in np.unique(widths)]
    groups = [
      jax.device_put(model.trim_text_rep(jax.tree.map(lambda x: x[c], text_rep), int(widths[c[0]])), scorer.replicated)
      for c in columns
    ]
    given = np.argsort(np.concatenate(columns))  # the groups' columns back in the given order

  def chunk_scores(images):
    images = jax.device_put(images, scorer.split)
    out = jnp.concatenate([score(images, rep) for rep in groups], axis=1)
    return out if given is None else out[:, given]

  return scorer.gather_shares(
    np.asarray(inference.map_chunks(chunk_scores, image_rep, chunk, desc=desc, unit='image')), n_img
  )


def shortlist(scores: np.ndarray, k: int) -> np.ndarray:
  """[n_queries, n_items] -> [n_queries, min(k, n_items)] indices of the best items per row (any order)."""
  if k < 1:
    raise errors.UserError(f'rerank k must be >= 1 (candidates per query); got {k}.')
  k = min(k, scores.shape[1])
  return np.argpartition(-scores, k - 1, axis=1)[:, :k]


def _merge(global_rows: np.ndarray, candidates: np.ndarray, full: np.ndarray) -> np.ndarray:
  """Rows of the global score with each row's candidates replaced by full scores placed above every other item."""
  floor = full.min() - 1.0
  out = floor - (global_rows.max() - global_rows)  # <= floor: below all candidates, in global order
  np.put_along_axis(out, candidates, full, axis=1)
  return out


def rerank(scorer, image_rep, text_rep, k: int, tile: int = 64) -> tuple[np.ndarray, np.ndarray]:
  """Two-stage scores of all pairs. Returns (i2t [n_img, n_txt]: per image its top-k captions re-scored,
  t2i [n_img, n_txt]: per caption its top-k images re-scored). A k above the number of items re-scores them all.
  A pair shortlisted in both directions is scored once (`Scorer.pair_list_scores`, `tile` captions per image)."""
  coarse = _shortlist_scores(scorer, image_rep, text_rep, desc=f'{scorer.desc} (shortlist)')
  n_img, n_txt = coarse.shape
  images_per_caption = shortlist(coarse.T, k)  # [n_txt, k]
  captions_per_image = shortlist(coarse, k)  # [n_img, k]
  keys = np.concatenate(
    [
      images_per_caption.ravel() * n_txt + np.repeat(np.arange(n_txt), images_per_caption.shape[1]),
      np.repeat(np.arange(n_img), captions_per_image.shape[1]) * n_txt + captions_per_image.ravel(),
    ]
  )
  unique, inverse = np.unique(keys, return_inverse=True)
  full = scorer.pair_list_scores(image_rep, text_rep, unique // n_txt, unique % n_txt, tile=tile)[inverse]
  t2i, i2t = np.split(full, [images_per_caption.size])
  t2i, i2t = t2i.reshape(images_per_caption.shape), i2t.reshape(captions_per_image.shape)
  return _merge(coarse, captions_per_image, i2t), _merge(coarse.T, images_per_caption, t2i).T


def two_way_recall(sims_i2t: np.ndarray, sims_t2i: np.ndarray, caption_to_image=None) -> dict:
  """Recall metrics with image-to-text ranks from one matrix and text-to-image ranks from the other
  (`caption_to_image`: see metrics.i2t_ranks)."""
  i2t = metrics_lib.recall_metrics(sims_i2t, caption_to_image=caption_to_image)
  t2i = metrics_lib.recall_metrics(sims_t2i, caption_to_image=caption_to_image)
  out = {
    **{k: v for k, v in i2t.items() if k.startswith('i2t')},
    **{k: v for k, v in t2i.items() if k.startswith('t2i')},
  }
  out['rsum'] = sum(out[k] for k in metrics_lib.RECALL_KEYS)
  return out
