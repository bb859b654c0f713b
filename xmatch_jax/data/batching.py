"""Host-side batching: captions padded to length buckets, and training batches as a pure function of (seed, step).

Padding every batch to the bucket of its longest caption (instead of to its exact length) bounds the number of
distinct shapes, hence of jit recompilations, to the number of buckets.

Training samples captions, as SCAN does (one epoch = every caption once; an image appears once per caption it has).
The caption order of epoch e is `np.random.default_rng([seed, e]).permutation(n_captions)`, so batch `step` depends
only on (seed, step): a run resumed at any step sees exactly the batches an uninterrupted run would.
"""

from typing import Iterator
from typing import Sequence

import numpy as np

from xmatch_jax import errors
from xmatch_jax.data import lazy
from xmatch_jax.data import validation


def _check_buckets(buckets: Sequence[int]) -> tuple:
  buckets = tuple(sorted(set(int(b) for b in buckets)))
  if not buckets or buckets[0] < 1:
    raise errors.UserError(f'buckets must be a non-empty sequence of positive lengths; got {buckets}.')
  return buckets


def bucket_length(n: int, buckets: Sequence[int], truncate: bool = False) -> int:
  """The smallest bucket >= n; the largest bucket when n exceeds it and `truncate` is True."""
  buckets = _check_buckets(buckets)
  for b in buckets:
    if b >= n:
      return b
  if truncate:
    return buckets[-1]
  raise errors.UserError(
    f'caption of {n} tokens is longer than the largest bucket ({buckets[-1]}); add a larger '
    'bucket (config.caption_buckets) or allow truncation (config.truncate_captions=True).'
  )


def _check_token_array(tokens, index: int) -> np.ndarray:
  tokens = np.asarray(tokens)
  if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
    raise errors.UserError(
      f'caption {index}: token ids must be a 1-D integer array; got shape {tokens.shape}, dtype {tokens.dtype}.'
    )
  if tokens.size == 0:
    raise errors.UserError(f'caption {index} has no tokens; every caption needs at least one.')
  return tokens


def pad_captions(token_arrays: Sequence[np.ndarray], buckets: Sequence[int], truncate: bool = False) -> tuple:
  """Pads token id arrays to one bucket length.

  Args:
    token_arrays: N 1-D integer arrays (e.g. `Vocabulary.encode` outputs), each with >= 1 token.
    buckets: allowed padded lengths.
    truncate: cut captions longer than the largest bucket to it (keeping the first tokens) instead of failing.

  Returns:
    (tokens [N, L] int32 with 0 = <pad>, mask [N, L] float32 with 1 on real tokens, n_truncated), where L is the
    bucket of the longest caption.
  """
  if not len(token_arrays):
    raise errors.UserError('token_arrays is empty; expected at least one caption.')
  arrays = [_check_token_array(t, i) for i, t in enumerate(token_arrays)]
  lengths = np.array([a.size for a in arrays])
  width = bucket_length(int(lengths.max()), buckets, truncate)
  tokens = np.zeros((len(arrays), width), np.int32)
  mask = np.zeros((len(arrays), width), np.float32)
  for i, a in enumerate(arrays):
    n = min(a.size, width)
    tokens[i, :n] = a[:n]
    mask[i, :n] = 1.0
  return tokens, mask, int((lengths > width).sum())


def iter_caption_batches(
  captions: Sequence[np.ndarray], batch_size: int, buckets: Sequence[int], truncate: bool = False
) -> Iterator[tuple]:
  """Captions in their fixed order, `batch_size` at a time (the last batch may be smaller), for evaluation.

  Yields:
    (start, tokens [b, L] int32, mask [b, L] float32): captions[start:start + b], L the bucket of their longest.
  """
  if batch_size < 1:
    raise errors.UserError(f'batch_size must be >= 1; got {batch_size}.')
  for start in range(0, len(captions), batch_size):
    tokens, mask, _ = pad_captions(captions[start : start + batch_size], buckets, truncate)
    yield start, tokens, mask


class TrainBatcher:
  """Training batches of (caption, its image) pairs; `batch(step)` is a pure function of (seed, step).

  Attributes:
    steps_per_epoch: n_captions // batch_size (the last partial batch of an epoch is dropped, as SCAN's loader).
    num_truncated: captions longer than the largest bucket (cut whenever sampled; only with truncate=True).
  """

  def __init__(
    self,
    images: dict,
    captions: Sequence[np.ndarray],
    caption_to_image: np.ndarray,
    batch_size: int,
    seed: int,
    buckets: Sequence[int],
    image_keys: Sequence[str] = ('regions',),
    truncate: bool = False,
  ):
    """Args:
    images: dict of arrays [n_img, ...] (at least the `image_keys`); lazy ones (data/lazy.py LazyRows, or any
      row-indexable object with `shape` that is not an in-memory array) stay on disk: each batch reads its rows.
    captions: n_cap 1-D integer token arrays.
    caption_to_image: [n_cap] int, the image of each caption.
    batch_size: captions per batch (<= n_cap).
    seed: data-order seed.
    buckets: allowed padded caption lengths.
    image_keys: which image fields go into the batch.
    truncate: cut captions longer than the largest bucket instead of failing.
    """
    self.buckets = _check_buckets(buckets)
    self.truncate = bool(truncate)
    self.seed = int(seed)
    self.image_keys = tuple(image_keys)
    missing = [k for k in self.image_keys if k not in images]
    if not self.image_keys or missing:
      raise errors.UserError(
        f'images lack field(s) {missing or list(self.image_keys)} named in image_keys; got fields {sorted(images)}.'
      )
    self._images = {k: images[k] if lazy.is_lazy(images[k]) else np.asarray(images[k]) for k in self.image_keys}
    n_img = len(self._images[self.image_keys[0]])
    for key, value in self._images.items():
      if value.ndim < 1 or len(value) != n_img:
        raise errors.UserError(
          f'images["{key}"] has {len(value) if value.ndim else 0} rows; expected {n_img} like '
          f'images["{self.image_keys[0]}"].'
        )
    self._captions = [_check_token_array(c, i) for i, c in enumerate(captions)]
    n_cap = len(self._captions)
    caption_to_image = validation.check_caption_index(caption_to_image, n_cap, n_img)
    self._caption_to_image = caption_to_image.astype(np.int32)
    if not 1 <= batch_size <= n_cap:
      raise errors.UserError(f'batch_size must be in [1, n_captions = {n_cap}]; got {batch_size}.')
    self.batch_size = int(batch_size)
    lengths = np.array([c.size for c in self._captions])
    self.num_truncated = int((lengths > self.buckets[-1]).sum())
    if self.num_truncated and not self.truncate:
      raise errors.UserError(
        f'{self.num_truncated} caption(s) are longer than the largest bucket ({self.buckets[-1]}); '
        f'the longest has {lengths.max()} tokens (caption {int(lengths.argmax())}). Add a bucket '
        '(config.caption_buckets) or set truncate=True (config.truncate_captions).'
      )
    self._cached_order = (None, None)  # (epoch, permutation): a cache only, batches never depend on it

  @property
  def num_captions(self) -> int:
    return len(self._captions)

  @property
  def steps_per_epoch(self) -> int:
    return self.num_captions // self.batch_size

  def epoch_of(self, step: int) -> int:
    """The epoch that training step `step` (0-based) belongs to."""
    if step < 0:
      raise errors.UserError(f'step must be >= 0; got {step}.')
    return int(step) // self.steps_per_epoch

  def epoch_order(self, epoch: int) -> np.ndarray:
    """[n_cap] the caption order of an epoch: a permutation drawn from default_rng([seed, epoch])."""
    if epoch < 0:
      raise errors.UserError(f'epoch must be >= 0; got {epoch}.')
    cached_epoch, order = self._cached_order
    if cached_epoch != epoch:
      order = np.random.default_rng([self.seed, int(epoch)]).permutation(self.num_captions)
      self._cached_order = (epoch, order)
    return order

  def caption_indices(self, step: int) -> np.ndarray:
    """[B] indices of the captions in batch `step`."""
    epoch = self.epoch_of(step)
    start = (int(step) % self.steps_per_epoch) * self.batch_size
    return self.epoch_order(epoch)[start : start + self.batch_size]

  def batch(self, step: int) -> dict:
    """Batch `step`: {'images': {key: [B, ...]}, 'text': {'tokens' [B, L] int32, 'mask' [B, L] float32},
    'image_ids': [B] int32}; caption b is paired with image b."""
    indices = self.caption_indices(step)
    image_ids = self._caption_to_image[indices]
    tokens, mask, _ = pad_captions([self._captions[i] for i in indices], self.buckets, self.truncate)
    return {
      'images': {k: lazy.take_rows(v, image_ids) for k, v in self._images.items()},
      'text': {'tokens': tokens, 'mask': mask},
      'image_ids': image_ids,
    }
