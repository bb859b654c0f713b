"""The hinge-based triplet ranking loss of VSE++ and SCAN.

Follows `ContrastiveLoss` in SCAN's model.py (and VSE++'s, which it copies): the loss is a SUM over the batch, not
a mean, so its scale grows with the batch size exactly as in the official code.
"""

import numbers

import jax.numpy as jnp
import numpy as np

from xmatch_jax import errors


def _negatives_mask(batch: int, image_ids) -> jnp.ndarray:
  """[B, B] bool: True where (image i, caption j) is a negative pair."""
  if image_ids is None:
    return ~jnp.eye(batch, dtype=bool)
  image_ids = jnp.asarray(image_ids)
  if image_ids.shape != (batch,):
    raise errors.UserError(
      f'image_ids must have shape ({batch},) to match scores [{batch}, {batch}]; got {image_ids.shape}.'
    )
  # Caption j of another row whose image is image i is a positive of image i, not a negative.
  return image_ids[:, None] != image_ids[None, :]


def _check_margin(margin) -> None:
  if isinstance(margin, numbers.Real) and not margin >= 0:  # traced margins are not checked
    raise errors.UserError(f'margin must be >= 0; got {margin}.')


def contrastive_loss(scores, margin: float, max_violation: bool, image_ids=None) -> jnp.ndarray:
  """SCAN/VSE++ contrastive loss of a batch score matrix.

  Args:
    scores: [B, B] scores, scores[i, j] = image i vs caption j; the positive pairs are on the diagonal.
    margin: hinge margin alpha (>= 0).
    max_violation: True sums only the hardest negative per query (VSE++ "MH"), False sums all negatives.
    image_ids: optional [B] int image index of each row. Off-diagonal pairs with equal ids are the same image
      with another of its captions, so they are excluded from the negatives like the diagonal.

  Returns:
    Scalar: sum over images of the caption-retrieval cost plus sum over captions of the image-retrieval cost.
  """
  scores = jnp.asarray(scores)
  if scores.ndim != 2 or scores.shape[0] != scores.shape[1]:
    raise errors.UserError(f'scores must be a square [B, B] matrix (image i vs caption j); got shape {scores.shape}.')
  _check_margin(margin)
  batch = scores.shape[0]
  diagonal = jnp.diagonal(scores)
  negatives = _negatives_mask(batch, image_ids)
  # cost_s: image i as the query, captions j compete with its own caption i (caption retrieval, per row).
  cost_s = jnp.where(negatives, jnp.maximum(margin + scores - diagonal[:, None], 0.0), 0.0)
  # cost_im: caption j as the query, images i compete with its own image j (image retrieval, per column).
  cost_im = jnp.where(negatives, jnp.maximum(margin + scores - diagonal[None, :], 0.0), 0.0)
  if max_violation:
    cost_s = cost_s.max(axis=1)
    cost_im = cost_im.max(axis=0)
  return cost_s.sum() + cost_im.sum()


def hardest_negatives(scores, image_ids=None) -> tuple:
  """The hardest negative of every row and column of a [B, B] score matrix (no gradient flows through it).

  Returns:
    (hard_caption [B] int, row_has_negative [B] bool, hard_image [B] int, column_has_negative [B] bool):
    hard_caption[i] is the caption j maximising scores[i, j] over image i's negatives, hard_image[j] the image
    maximising scores[i, j] over caption j's negatives; the first such index on ties, as PyTorch's `max(1)`
    (docs/fidelity.md, LOSS-4). A row or column without negatives gets index 0 and has_negative False.
  """
  scores = jnp.asarray(scores)
  negatives = _negatives_mask(scores.shape[0], image_ids)
  masked = jnp.where(negatives, scores, -jnp.inf)
  return (
    jnp.argmax(masked, axis=1),
    negatives.any(axis=1),
    jnp.argmax(masked, axis=0),
    negatives.any(axis=0),
  )


def hardest_negative_loss(positive, hard_caption, hard_image, row_has_negative, column_has_negative, margin: float):
  """`contrastive_loss(..., max_violation=True)` from the scores of the pairs it depends on.

  max_j relu(margin + s_ij - s_ii) = relu(margin + max_j s_ij - s_ii), so the loss is a function of 3 B scores:
  positive [B] (s_ii), hard_caption [B] (image i with its hardest negative caption) and hard_image [B] (caption j
  with its hardest negative image), as chosen by `hardest_negatives`; row_has_negative / column_has_negative [B]
  zero the terms of rows and columns without negatives.
  """
  _check_margin(margin)
  cost_s = jnp.where(row_has_negative, jnp.maximum(margin + hard_caption - positive, 0.0), 0.0)
  cost_im = jnp.where(column_has_negative, jnp.maximum(margin + hard_image - positive, 0.0), 0.0)
  return cost_s.sum() + cost_im.sum()


def collapse_value(batch: int, margin: float, max_violation: bool, image_ids=None) -> float:
  """The loss when all scores are equal (a collapsed embedding), for a "training has collapsed" warning.

  Every negative then costs exactly `margin`: 2 B margin with max_violation (one hardest negative per row and per
  column), 2 B (B - 1) margin when summing all negatives. With `image_ids` [B], pairs of the same image are not
  negatives and the count follows `contrastive_loss`'s mask.
  """
  if batch < 1:
    raise errors.UserError(f'batch must be >= 1; got {batch}.')
  _check_margin(margin)
  if image_ids is None:
    negatives = ~np.eye(batch, dtype=bool)
  else:
    image_ids = np.asarray(image_ids)
    if image_ids.shape != (batch,):
      raise errors.UserError(f'image_ids must have shape ({batch},); got {image_ids.shape}.')
    negatives = image_ids[:, None] != image_ids[None, :]
  if max_violation:  # rows and columns with at least one negative each contribute one margin
    count = negatives.any(axis=1).sum() + negatives.any(axis=0).sum()
  else:
    count = 2 * negatives.sum()
  return float(count) * float(margin)
