"""Bucketed padding and the (seed, step)-pure training batcher."""

import numpy as np
import pytest

from xmatch_jax.data import batching

BUCKETS = (4, 8, 12)


def make_data(n_img=7, per_image=5, seed=0, max_len=12):
  rng = np.random.default_rng(seed)
  images = {
    'regions': rng.normal(size=(n_img, 3, 2)).astype(np.float32),
    'boxes': rng.random(size=(n_img, 3, 4)).astype(np.float32),
    'label': np.arange(n_img) * 10,
  }
  captions = [rng.integers(4, 50, size=rng.integers(1, max_len + 1)).astype(np.int32) for _ in range(n_img * per_image)]
  caption_to_image = np.repeat(np.arange(n_img), per_image)
  return images, captions, caption_to_image


def make_batcher(batch_size=4, seed=3, **kwargs):
  images, captions, c2i = make_data()
  return (
    batching.TrainBatcher(
      images,
      captions,
      c2i,
      batch_size=batch_size,
      seed=seed,
      buckets=BUCKETS,
      image_keys=('regions', 'label'),
      **kwargs,
    ),
    images,
    captions,
    c2i,
  )


def test_bucket_length():
  assert [batching.bucket_length(n, BUCKETS) for n in (1, 4, 5, 8, 9, 12)] == [4, 4, 8, 8, 12, 12]
  assert batching.bucket_length(3, (8, 4)) == 4  # unsorted buckets are fine
  assert batching.bucket_length(40, BUCKETS, truncate=True) == 12
  with pytest.raises(ValueError, match='largest bucket'):
    batching.bucket_length(13, BUCKETS)
  with pytest.raises(ValueError, match='buckets'):
    batching.bucket_length(3, ())
  with pytest.raises(ValueError, match='buckets'):
    batching.bucket_length(3, (0, 4))


def test_pad_captions_values_and_masks():
  arrays = [np.array([1, 5, 2]), np.array([1, 6, 7, 8, 9, 2], np.int64), np.array([7])]
  tokens, mask, n_truncated = batching.pad_captions(arrays, BUCKETS)
  assert tokens.shape == mask.shape == (3, 8)  # longest is 6 -> bucket 8
  assert tokens.dtype == np.int32 and mask.dtype == np.float32 and n_truncated == 0
  for row, a in enumerate(arrays):
    np.testing.assert_array_equal(tokens[row, : len(a)], a)
    assert np.all(tokens[row, len(a) :] == 0)
    np.testing.assert_array_equal(mask[row], np.arange(8) < len(a))  # real tokens are a prefix


def test_pad_captions_truncation_counted():
  arrays = [np.arange(1, 16), np.arange(1, 4), np.arange(1, 14)]
  with pytest.raises(ValueError, match='largest bucket'):
    batching.pad_captions(arrays, BUCKETS)
  tokens, mask, n_truncated = batching.pad_captions(arrays, BUCKETS, truncate=True)
  assert n_truncated == 2 and tokens.shape == (3, 12)
  np.testing.assert_array_equal(tokens[0], np.arange(1, 13))  # the first 12 tokens are kept
  assert mask[0].sum() == 12 and mask[1].sum() == 3 and mask[2].sum() == 12


def test_pad_captions_errors():
  with pytest.raises(ValueError, match='empty'):
    batching.pad_captions([], BUCKETS)
  with pytest.raises(ValueError, match='caption 1 has no tokens'):
    batching.pad_captions([np.array([1]), np.array([], np.int32)], BUCKETS)
  with pytest.raises(ValueError, match='caption 0.*1-D integer'):
    batching.pad_captions([np.array([[1, 2]])], BUCKETS)
  with pytest.raises(ValueError, match='1-D integer'):
    batching.pad_captions([np.array([1.0, 2.0])], BUCKETS)


def test_batch_is_pure_function_of_step():
  batcher, *_ = make_batcher()
  first = batcher.batch(17)
  for step in (0, 3, 40, 9, 17, 2, 8):  # other epochs in between (8: the one before 17's): no cache leaks
    batcher.batch(step)
  again = batcher.batch(17)
  fresh, *_ = make_batcher()  # a new process resuming at step 17
  for other in (again, fresh.batch(17)):
    np.testing.assert_array_equal(other['text']['tokens'], first['text']['tokens'])
    np.testing.assert_array_equal(other['text']['mask'], first['text']['mask'])
    np.testing.assert_array_equal(other['image_ids'], first['image_ids'])
    for key in first['images']:
      np.testing.assert_array_equal(other['images'][key], first['images'][key])
  # Any call order gives the documented order: default_rng([seed, epoch]).permutation, sliced by step.
  spe = batcher.steps_per_epoch
  for step in np.random.default_rng(0).permutation(5 * spe):
    epoch, within = divmod(int(step), spe)
    want = np.random.default_rng([3, epoch]).permutation(35)[within * 4 : (within + 1) * 4]
    np.testing.assert_array_equal(batcher.caption_indices(step), want)
  other_seed, *_ = make_batcher(seed=4)
  assert not np.array_equal(other_seed.caption_indices(17), batcher.caption_indices(17))


def test_batch_contents_pair_captions_with_their_images():
  batcher, images, captions, c2i = make_batcher()
  for step in (0, 5, 12):
    batch = batcher.batch(step)
    indices = batcher.caption_indices(step)
    assert set(batch) == {'images', 'text', 'image_ids'} and set(batch['images']) == {'regions', 'label'}
    assert batch['image_ids'].dtype == np.int32
    np.testing.assert_array_equal(batch['image_ids'], c2i[indices])
    np.testing.assert_array_equal(batch['images']['regions'], images['regions'][c2i[indices]])
    np.testing.assert_array_equal(batch['images']['label'], 10 * c2i[indices])
    want_tokens, want_mask, _ = batching.pad_captions([captions[i] for i in indices], BUCKETS)
    np.testing.assert_array_equal(batch['text']['tokens'], want_tokens)
    np.testing.assert_array_equal(batch['text']['mask'], want_mask)
    assert batch['text']['tokens'].shape[1] in BUCKETS


def test_each_epoch_covers_every_caption_once():
  batcher, _, captions, _ = make_batcher(batch_size=5)
  n_cap = len(captions)
  assert batcher.steps_per_epoch == n_cap // 5
  orders = []
  for epoch in range(3):
    steps = range(epoch * batcher.steps_per_epoch, (epoch + 1) * batcher.steps_per_epoch)
    assert all(batcher.epoch_of(s) == epoch for s in steps)
    seen = np.concatenate([batcher.caption_indices(s) for s in steps])
    np.testing.assert_array_equal(np.sort(seen), np.arange(n_cap))
    np.testing.assert_array_equal(seen, np.random.default_rng([3, epoch]).permutation(n_cap))
    orders.append(seen)
  assert not np.array_equal(orders[0], orders[1])  # reshuffled every epoch


def test_partial_last_batch_dropped():
  batcher, _, captions, _ = make_batcher(batch_size=8)  # 35 captions -> 4 steps, 3 captions unseen per epoch
  assert batcher.steps_per_epoch == 4
  seen = np.concatenate([batcher.caption_indices(s) for s in range(4)])
  assert len(seen) == 32 and len(set(seen.tolist())) == 32
  assert batcher.epoch_of(4) == 1
  np.testing.assert_array_equal(batcher.caption_indices(4), np.random.default_rng([3, 1]).permutation(35)[:8])


def test_truncation_in_batcher():
  images, captions, c2i = make_data()
  captions[3] = np.arange(1, 21, dtype=np.int32)  # 20 tokens > largest bucket 12
  with pytest.raises(ValueError, match='longer than the largest bucket'):
    batching.TrainBatcher(images, captions, c2i, batch_size=4, seed=0, buckets=BUCKETS)
  batcher = batching.TrainBatcher(images, captions, c2i, batch_size=35, seed=0, buckets=BUCKETS, truncate=True)
  assert batcher.num_truncated == 1
  batch = batcher.batch(0)  # one batch = all captions
  row = int(np.where(batcher.caption_indices(0) == 3)[0][0])
  np.testing.assert_array_equal(batch['text']['tokens'][row], np.arange(1, 13))


def test_iter_caption_batches_fixed_order():
  _, captions, _ = make_data()
  got = list(batching.iter_caption_batches(captions, 8, BUCKETS))
  assert [start for start, _, _ in got] == [0, 8, 16, 24, 32]
  assert [len(t) for _, t, _ in got] == [8, 8, 8, 8, 3]
  for start, tokens, mask in got:
    want_tokens, want_mask, _ = batching.pad_captions(captions[start : start + 8], BUCKETS)
    np.testing.assert_array_equal(tokens, want_tokens)
    np.testing.assert_array_equal(mask, want_mask)
  with pytest.raises(ValueError, match='batch_size'):
    next(batching.iter_caption_batches(captions, 0, BUCKETS))


def test_batcher_input_errors():
  images, captions, c2i = make_data()

  def build(**overrides):
    args = dict(images=images, captions=captions, caption_to_image=c2i, batch_size=4, seed=0, buckets=BUCKETS)
    args.update(overrides)
    return batching.TrainBatcher(**args)

  with pytest.raises(ValueError, match='caption_to_image'):
    build(caption_to_image=c2i[:-1])
  with pytest.raises(ValueError, match=r'\[0, 7\)'):
    build(caption_to_image=np.where(c2i == 6, 7, c2i))
  with pytest.raises(ValueError, match=r'\[0, 7\)'):
    build(caption_to_image=c2i - 1)
  with pytest.raises(ValueError, match='batch_size'):
    build(batch_size=36)
  with pytest.raises(ValueError, match='batch_size'):
    build(batch_size=0)
  with pytest.raises(ValueError, match='pixels'):
    build(image_keys=('regions', 'pixels'))
  with pytest.raises(ValueError, match='boxes'):
    build(images={**images, 'boxes': images['boxes'][:5]}, image_keys=('regions', 'boxes'))
  with pytest.raises(ValueError, match='caption 2 has no tokens'):
    build(captions=captions[:2] + [np.array([], np.int32)] + captions[3:])
  batcher = build()
  with pytest.raises(ValueError, match='step'):
    batcher.batch(-1)
