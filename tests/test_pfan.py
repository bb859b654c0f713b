"""PFAN block positions: a numpy brute force of eqs 2-5 pixel by pixel, the shared PFAN fixture's invariants,
the file layout round trip, and bad input."""

import os
import sys

import numpy as np
import pytest

from xmatch_jax.data import pfan

# The first 8 images of PFAN's Flickr30K train_boxes.npy (a real file from the field).
FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'f30k_sample_train_boxes_8.npy')
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tools'))
import pfan_positions  # pylint: disable=g-import-not-at-top


def brute_force(box, width, height, grid, top_l):
  """Counts the pixels of an integer box in every block of an integer image (eq 2), then eqs 3-5."""
  counts = np.zeros(grid * grid)
  for y in range(height):
    for x in range(width):
      if box[0] <= x < box[2] and box[1] <= y < box[3]:
        counts[(y * grid // height) * grid + x * grid // width] += 1
  order = sorted(range(grid * grid), key=lambda m: (-counts[m], m))[:top_l]
  top = counts[order]
  return [m if c > 0 else grid * grid for m, c in zip(order, top)], list(top / top.sum())


def test_equals_pixel_counting():
  rng = np.random.default_rng(0)
  grid, top_l = 4, 6
  sizes = np.array([[32, 24], [16, 40], [24, 24]])  # blocks of whole pixels, a different size per image
  boxes = []
  for width, height in sizes:
    x1, y1 = rng.integers(0, width - 1, 5), rng.integers(0, height - 1, 5)
    b = np.stack([x1, y1, x1 + rng.integers(1, width, 5), y1 + rng.integers(1, height, 5)], -1)
    boxes.append(np.minimum(b, [width, height, width, height]))
  indices, weights = pfan.block_positions(np.array(boxes), sizes, grid, top_l)
  for i, (width, height) in enumerate(sizes):
    for r, box in enumerate(boxes[i]):
      expected_indices, expected_weights = brute_force(box, width, height, grid, top_l)
      np.testing.assert_array_equal(indices[i, r], expected_indices)
      np.testing.assert_allclose(weights[i, r], expected_weights, rtol=1e-6)


def test_small_box_is_padded_with_weight_zero():
  indices, weights = pfan.block_positions(np.array([[[0, 0, 10, 10]]]), np.array([[160, 160]]))
  assert indices[0, 0, 0] == 0 and weights[0, 0, 0] == 1.0
  assert (indices[0, 0, 1:] == 256).all() and (weights[0, 0, 1:] == 0).all()


@pytest.mark.slow
def test_the_pfan_fixture_satisfies_the_invariants_and_round_trips(tmp_path):
  raw = np.load(FIXTURE, allow_pickle=False)
  indices, weights = pfan.from_pfan_layout(raw, where=FIXTURE)
  assert indices.shape == (8, 36, 15)
  np.testing.assert_allclose(weights.sum(-1), 1, atol=1e-5)
  assert (weights[indices == 256] == 0).all() and (indices == 256).any()
  assert (np.diff(weights, axis=-1) <= 1e-7).all()  # decreasing, as our tool writes them
  np.testing.assert_array_equal(pfan.to_pfan_layout(indices, weights)[..., :15], raw[..., :15])
  assert pfan_positions.main([f'--check={FIXTURE}']) == 0


def test_cli_writes_the_layout(tmp_path):
  np.save(tmp_path / 'b.npy', np.array([[[0, 0, 50, 40], [10, 10, 300, 200]]], np.float32))
  np.save(tmp_path / 's.npy', np.array([[320, 240]]))
  assert (
    pfan_positions.main(
      [f'--boxes={tmp_path / "b.npy"}', f'--sizes={tmp_path / "s.npy"}', f'--out={tmp_path / "o.npy"}']
    )
    == 0
  )
  out = np.load(tmp_path / 'o.npy')
  assert out.shape == (1, 2, 30)
  pfan.from_pfan_layout(out)


@pytest.mark.parametrize(
  'edit,message',
  [
    (lambda a: a.__setitem__((0, 1, 0), 3.5), 'image 0 region 1: block indices must be integers'),
    (lambda a: a.__setitem__((2, 0, 0), 300), r'in \[0, 256\]'),
    (lambda a: a.__setitem__((0, 0, 15), a[0, 0, 15] + 0.5), 'sum to'),
    (lambda a: a.__setitem__((0, 0, slice(None)), np.r_[[256] * 15, [1] + [0] * 14]), 'padding index 256'),
  ],
)
def test_bad_files_name_image_and_region(edit, message):
  indices = np.tile(np.arange(15.0), (3, 2, 1))
  array = np.concatenate([indices, np.full((3, 2, 15), 1 / 15)], -1)
  edit(array)
  with pytest.raises(ValueError, match=message):
    pfan.from_pfan_layout(array)


def test_boxes_outside_the_image_are_refused():
  with pytest.raises(ValueError, match='image 0 region 1 .* has no area'):
    pfan.block_positions(np.array([[[0, 0, 5, 5], [400, 400, 500, 500]]]), np.array([[320, 240]]))
