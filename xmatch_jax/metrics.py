"""Retrieval metrics in plain numpy: SCAN's recall protocol and mAP for category-labelled data (DAER eq 12).

Recall follows SCAN's evaluation.py `i2t`/`t2i` exactly, including how ties are broken: the ranking of each row
comes from the same `np.argsort(row)[::-1]` call (numpy's default sort), applied to blocks of rows at once. Rows are
processed in chunks so that a COCO 5K matrix (5000 x 25000) never needs more than a bounded temporary.
"""

import numpy as np

from xmatch_jax import errors
from xmatch_jax.data import validation

RECALL_KS = (1, 5, 10)
RECALL_KEYS = ('i2t_r1', 'i2t_r5', 'i2t_r10', 't2i_r1', 't2i_r5', 't2i_r10')
RESULT_KEYS = RECALL_KEYS + ('rsum',)  # what a recall evaluation reports
MAP_KEYS = ('i2t_map', 't2i_map', 'mean_map')  # what an mAP evaluation reports
# Temporaries per chunk hold about this many elements (int64 argsort output: 64 MB).
DEFAULT_CHUNK_ELEMENTS = 1 << 23


def _check_sims(sims, captions_per_image: int, caption_to_image=None) -> tuple[np.ndarray, np.ndarray]:
  """The score matrix as an array and caption_to_image [n_cap] (c // captions_per_image when not given)."""
  sims = np.asarray(sims)
  if sims.ndim != 2 or sims.shape[0] < 1:
    raise errors.UserError(
      f'sims must be a 2-D [n_images, n_captions] matrix with n_images >= 1; got shape {sims.shape}.'
    )
  n_img, n_cap = sims.shape
  if caption_to_image is None:
    if n_cap != captions_per_image * n_img:
      raise errors.UserError(
        f'sims has {n_cap} caption columns for {n_img} image rows; the protocol needs '
        f'{captions_per_image} captions per image ({captions_per_image} x {n_img} = '
        f'{captions_per_image * n_img} columns, caption c belonging to image c // {captions_per_image}).'
      )
    caption_to_image = np.arange(n_cap) // captions_per_image
  else:
    caption_to_image = validation.check_caption_index(caption_to_image, n_cap, n_img)
    without = np.setdiff1d(np.arange(n_img), caption_to_image)
    if without.size:
      raise errors.UserError(
        f'image row {int(without[0])} has no caption ({without.size} such rows); every image needs at least one '
        'for image-to-text recall.'
      )
  if np.issubdtype(sims.dtype, np.floating) and np.isnan(sims).any():
    raise errors.UserError(f'sims holds {int(np.isnan(sims).sum())} NaN score(s); rankings would be meaningless.')
  return sims, caption_to_image


def _row_chunks(n_rows: int, n_cols: int, chunk_elements: int):
  step = max(1, chunk_elements // max(n_cols, 1))
  for start in range(0, n_rows, step):
    yield start, min(start + step, n_rows)


def i2t_ranks(
  sims, captions_per_image: int = 5, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, caption_to_image=None
) -> np.ndarray:
  """Image-to-text ranks as SCAN's `i2t`.

  Args:
    sims: [n_img, n_cap] scores; caption c belongs to image c // captions_per_image, or to caption_to_image[c].
    captions_per_image: captions per image (5 in every paper's protocol).
    chunk_elements: bound on the elements of the per-chunk temporaries.
    caption_to_image: optional [n_cap] int, the image row of each caption (any number of captions per image, at
      least one); replaces the c // captions_per_image layout.

  Returns:
    [n_img] int64: for each image, the 0-based position of its best-ranked ground-truth caption in
    `np.argsort(sims[i])[::-1]`.
  """
  sims, owner = _check_sims(sims, captions_per_image, caption_to_image)
  n_img, n_cap = sims.shape
  ranks = np.empty(n_img, np.int64)
  for start, stop in _row_chunks(n_img, n_cap, chunk_elements):
    inds = np.argsort(sims[start:stop], axis=1)[:, ::-1]
    # SCAN takes the min over the image's captions of their positions = the first position holding one of them.
    is_gt = owner[inds] == np.arange(start, stop)[:, None]
    ranks[start:stop] = np.argmax(is_gt, axis=1)
  return ranks


def t2i_ranks(
  sims, captions_per_image: int = 5, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, caption_to_image=None
) -> np.ndarray:
  """Text-to-image ranks as SCAN's `t2i`.

  Args:
    sims: [n_img, n_cap] scores; caption c belongs to image c // captions_per_image, or to caption_to_image[c].
    captions_per_image: captions per image.
    chunk_elements: bound on the elements of the per-chunk temporaries.
    caption_to_image: optional [n_cap] int, the image row of each caption (see `i2t_ranks`).

  Returns:
    [n_cap] int64: for each caption c, the 0-based position of its image in `np.argsort(sims.T[c])[::-1]`.
  """
  sims, owner = _check_sims(sims, captions_per_image, caption_to_image)
  sims_t = sims.T
  n_cap, n_img = sims_t.shape
  ranks = np.empty(n_cap, np.int64)
  for start, stop in _row_chunks(n_cap, n_img, chunk_elements):
    inds = np.argsort(sims_t[start:stop], axis=1)[:, ::-1]
    ranks[start:stop] = np.argmax(inds == owner[start:stop, None], axis=1)
  return ranks


def _rank_summary(ranks: np.ndarray, prefix: str) -> dict:
  out = {f'{prefix}_r{k}': 100.0 * float(np.mean(ranks < k)) for k in RECALL_KS}
  out[f'{prefix}_medr'] = float(np.floor(np.median(ranks)) + 1)
  out[f'{prefix}_meanr'] = float(ranks.mean() + 1)
  return out


def recall_metrics(
  sims, captions_per_image: int = 5, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, caption_to_image=None
) -> dict:
  """R@1/5/10 both ways (percent), rsum (sum of the six), and median/mean rank (1-based) as SCAN prints them.

  Args:
    sims: [n_img, n_cap] scores; caption c belongs to image c // captions_per_image, or to caption_to_image[c].
    captions_per_image: captions per image.
    chunk_elements: bound on the elements of the per-chunk temporaries.
    caption_to_image: optional [n_cap] int, the image row of each caption (see `i2t_ranks`).

  Returns:
    dict with `i2t_r1 i2t_r5 i2t_r10 t2i_r1 t2i_r5 t2i_r10 rsum i2t_medr i2t_meanr t2i_medr t2i_meanr` (floats).
  """
  out = {
    **_rank_summary(i2t_ranks(sims, captions_per_image, chunk_elements, caption_to_image), 'i2t'),
    **_rank_summary(t2i_ranks(sims, captions_per_image, chunk_elements, caption_to_image), 't2i'),
  }
  out['rsum'] = sum(out[k] for k in RECALL_KEYS)
  return out


def fold_metrics(sims_per_fold: list, captions_per_image: int = 5) -> dict:
  """Mean of `recall_metrics` over folds (MS-COCO 1K: 5 folds of 1000 images).

  Every metric is averaged over the folds as in SCAN's `evalrank(fold5=True)`; rsum is the sum of the six
  averaged recalls (SCAN's script prints 6 x the mean i2t recall there instead, a known slip).

  Args:
    sims_per_fold: list of [n_img_f, 5 n_img_f] score matrices, one per fold.
    captions_per_image: captions per image.

  Returns:
    dict with the same keys as `recall_metrics`.
  """
  if not len(sims_per_fold):
    raise errors.UserError('sims_per_fold is empty; expected one score matrix per fold.')
  per_fold = [recall_metrics(s, captions_per_image) for s in sims_per_fold]
  out = {k: float(np.mean([m[k] for m in per_fold])) for k in per_fold[0] if k != 'rsum'}
  out['rsum'] = sum(out[k] for k in RECALL_KEYS)
  return out


def average_precisions(sims, query_labels, doc_labels, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> np.ndarray:
  """Average precision of every query over the full ranking of all documents (DAER eq 12).

  AP = (1/R) sum_k (R_k / k) rel_k with R the number of relevant documents (same label as the query), R_k the
  relevant ones among the top k. Documents are ranked by decreasing score; equal scores keep document order
  (stable sort), so ties are resolved deterministically, not optimistically.

  Args:
    sims: [n_queries, n_docs] scores.
    query_labels: [n_queries] class labels.
    doc_labels: [n_docs] class labels.
    chunk_elements: bound on the elements of the per-chunk temporaries.

  Returns:
    [n_queries] float64 APs.

  Raises:
    ValueError: on shape mismatches, NaN scores, or a query with no relevant document (its AP is undefined; we
      refuse rather than silently drop it, since it means the labels of the two sides do not match).
  """
  sims = np.asarray(sims)
  query_labels, doc_labels = np.asarray(query_labels), np.asarray(doc_labels)
  if sims.ndim != 2:
    raise errors.UserError(f'sims must be a 2-D [n_queries, n_docs] matrix; got shape {sims.shape}.')
  if query_labels.shape != (sims.shape[0],):
    raise errors.UserError(
      f'query_labels must have shape ({sims.shape[0]},) (one per sims row); got {query_labels.shape}.'
    )
  if doc_labels.shape != (sims.shape[1],):
    raise errors.UserError(
      f'doc_labels must have shape ({sims.shape[1]},) (one per sims column); got {doc_labels.shape}.'
    )
  if np.issubdtype(sims.dtype, np.floating) and np.isnan(sims).any():
    raise errors.UserError(f'sims holds {int(np.isnan(sims).sum())} NaN score(s); rankings would be meaningless.')
  n_relevant = (query_labels[:, None] == doc_labels[None, :]).sum(axis=1)
  if (n_relevant == 0).any():
    first = int(np.argmax(n_relevant == 0))
    raise errors.UserError(
      f'{int((n_relevant == 0).sum())} query(ies) have no relevant document (first: query {first} '
      f'with label {query_labels[first]!r}); AP is undefined for them.'
    )
  aps = np.empty(sims.shape[0], np.float64)
  positions = np.arange(1, sims.shape[1] + 1)
  for start, stop in _row_chunks(sims.shape[0], sims.shape[1], chunk_elements):
    order = np.argsort(-sims[start:stop].astype(np.float64), axis=1, kind='stable')
    rel = doc_labels[order] == query_labels[start:stop, None]
    precision_at_k = np.cumsum(rel, axis=1) / positions
    aps[start:stop] = (precision_at_k * rel).sum(axis=1) / n_relevant[start:stop]
  return aps


def mean_average_precision(sims, query_labels, doc_labels) -> float:
  """mAP: the mean over queries of `average_precisions` (each row of sims is a query)."""
  return float(average_precisions(sims, query_labels, doc_labels).mean())


def map_metrics(sims, image_labels, text_labels) -> dict:
  """mAP both ways for a [n_img, n_txt] score matrix: `i2t_map`, `t2i_map` and their mean `mean_map`."""
  sims = np.asarray(sims)
  i2t = mean_average_precision(sims, image_labels, text_labels)
  t2i = mean_average_precision(sims.T, text_labels, image_labels)
  return {'i2t_map': i2t, 't2i_map': t2i, 'mean_map': (i2t + t2i) / 2}


# ------------------------------------------------------------------------------------------------ protocols
PROTOCOLS = {
  '1k': 'all images of a 1000-image split (Flickr30K test, shapes test)',
  '5k': 'all images of a 5000-image split (MS-COCO 5K test)',
  'fold5': 'mean over 5 sequential folds of n/5 images (MS-COCO 1K: 5 folds of 1000); rsum = sum of mean recalls',
}
# The field's named protocols: (dataset, split, protocol). Results carry the name.
NAMED_PROTOCOLS = {
  'f30k_1k': ('f30k', 'test', '1k'),
  'coco_1k_fold5': ('coco', 'testall', 'fold5'),
  'coco_5k': ('coco', 'testall', '5k'),
}


def protocol_metrics(sims: np.ndarray, protocol: str) -> dict:
  """Recall metrics of an [n_img, 5 n_img] score matrix under a named protocol."""
  n_img = sims.shape[0]
  if protocol not in PROTOCOLS:
    raise errors.UserError(f'unknown protocol {protocol!r}; expected one of {sorted(PROTOCOLS)}.')
  if protocol == '1k' and n_img != 1000 or protocol == '5k' and n_img != 5000:
    raise errors.UserError(
      f'protocol {protocol!r} needs a split of {1000 if protocol == "1k" else 5000} images; '
      f'this split has {n_img}. Use --protocol=fold5 for fold-wise evaluation.'
    )
  if protocol == 'fold5':
    if n_img % 5:
      raise errors.UserError(f'protocol "fold5" needs a number of images divisible by 5; got {n_img}.')
    fold = n_img // 5
    return fold_metrics([sims[f * fold : (f + 1) * fold, 5 * f * fold : 5 * (f + 1) * fold] for f in range(5)])
  return recall_metrics(sims)


def default_protocol(n_img: int) -> str:
  if n_img == 1000:
    return '1k'
  if n_img == 5000:
    raise errors.UserError(
      'a 5000-image split is ambiguous (MS-COCO 5K or 5 folds of 1K): pass --protocol=5k or fold5.'
    )
  return 'all'


def resolve_protocol(protocol: str | None, dataset: str, split: str | None) -> tuple[str, str | None, str | None]:
  """A named protocol (f30k_1k, coco_1k_fold5, coco_5k) -> (split, base protocol, name); checks that the dataset
  and an explicitly given split agree with it. Other protocols pass through with split defaulting to test."""
  if protocol not in NAMED_PROTOCOLS:
    return split or 'test', protocol, protocol
  want_dataset, want_split, base = NAMED_PROTOCOLS[protocol]
  if dataset != want_dataset:
    raise errors.UserError(
      f'protocol {protocol!r} is defined on dataset {want_dataset!r}; this workdir was trained on {dataset!r}.'
    )
  if split is not None and split != want_split:
    raise errors.UserError(f'protocol {protocol!r} evaluates split {want_split!r}; got --split={split}.')
  return want_split, base, protocol


def metrics_for(sims: np.ndarray, protocol: str | None, caption_to_image=None) -> tuple[dict, str]:
  """Recall metrics of a split's score matrix under `protocol` (None: from its size). Returns (metrics, protocol).

  `caption_to_image` ([n_cap] int, see `i2t_ranks`): a split whose captions are not 5 consecutive ones per image
  (custom data with 1-N captions); it is scored over all images ('all') and a named protocol is refused."""
  if caption_to_image is not None:
    caption_to_image = np.asarray(caption_to_image)
    uniform = np.arange(5 * sims.shape[0]) // 5
    if caption_to_image.shape == uniform.shape and (caption_to_image == uniform).all():
      caption_to_image = None  # the protocols' own layout
    elif protocol not in (None, 'all'):
      raise errors.UserError(
        f'protocol {protocol!r} needs 5 consecutive captions per image; this split has '
        f'{len(caption_to_image)} captions for {sims.shape[0]} images in another layout (evaluate it without '
        '--protocol: recall over all images).'
      )
    else:
      return recall_metrics(sims, caption_to_image=caption_to_image), 'all'
  protocol = protocol or default_protocol(sims.shape[0])
  metrics = recall_metrics(sims) if protocol == 'all' else protocol_metrics(sims, protocol)
  return metrics, protocol
