"""PFAN block positions (Wang et al. 2019, used by GLFN eqs 2-5): which image blocks each region covers.

The image is split into G x G blocks (G = 16), numbered m = row * G + col. For every region box the overlap
area with every block is computed (eq 2), the top L (= 15) blocks by overlap are kept (eq 3) and their overlaps
normalised to weights summing to 1 (eqs 4-5). A region covering fewer than L blocks is padded with the index
G * G (the padding row of the block embedding) and weight 0.

File layout (PFAN's `{split}_boxes.npy`, e.g. its Flickr30K train_boxes.npy; tests/fixtures holds 8 images of
it): float array [n_images, k, 2L], the L block indices (as floats) then the L weights, weights in decreasing order.

Overlaps are areas of the continuous boxes (pixel coordinates x1, y1, x2, y2) with blocks of size W/G x H/G;
ties keep the smaller block index first.
"""

import numpy as np

from xmatch_jax import errors

GRID = 16
TOP_L = 15


def block_positions(
  boxes: np.ndarray, image_sizes: np.ndarray, grid: int = GRID, top_l: int = TOP_L, where: str = 'boxes'
) -> tuple[np.ndarray, np.ndarray]:
  """Block indices and weights of every region.

  Args:
    boxes: [N, k, 4] x1, y1, x2, y2 in pixels.
    image_sizes: [N, 2] width, height in pixels.
    grid: G; blocks are numbered 0 .. G*G - 1, G*G is padding.
    top_l: L.
    where: name of the source for error messages.

  Returns:
    (indices [N, k, L] int32, weights [N, k, L] float32); weights sum to 1 per region, 0 at padding.

  Raises:
    ValueError: bad shapes, non-finite values, non-positive image sizes, or a box with no area inside the image
      (named by image and region).
  """
  boxes = np.asarray(boxes, np.float64)
  sizes = np.asarray(image_sizes, np.float64)
  if boxes.ndim != 3 or boxes.shape[-1] != 4:
    raise errors.UserError(f'{where}: boxes must be [n_images, k, 4] (x1, y1, x2, y2); got shape {boxes.shape}')
  if sizes.shape != (boxes.shape[0], 2):
    raise errors.UserError(f'{where}: image sizes must be [{boxes.shape[0]}, 2] (width, height); got {sizes.shape}')
  if not (np.isfinite(boxes).all() and np.isfinite(sizes).all()):
    raise errors.UserError(f'{where}: boxes and image sizes must be finite')
  if (sizes <= 0).any():
    bad = int(np.argwhere((sizes <= 0).any(-1))[0, 0])
    raise errors.UserError(f'{where}: image {bad} has size {sizes[bad].tolist()}; width and height must be > 0')
  if not 1 <= top_l <= grid * grid:
    raise errors.UserError(f'top_l must be in [1, {grid * grid}], got {top_l}')
  edges = np.arange(grid + 1) / grid  # block edges as image fractions
  x0, x1 = edges[:-1] * sizes[:, None, 0:1], edges[1:] * sizes[:, None, 0:1]  # [N, 1, G]
  y0, y1 = edges[:-1] * sizes[:, None, 1:2], edges[1:] * sizes[:, None, 1:2]
  overlap_x = np.clip(np.minimum(boxes[..., 2:3], x1) - np.maximum(boxes[..., 0:1], x0), 0, None)  # [N, k, G]
  overlap_y = np.clip(np.minimum(boxes[..., 3:4], y1) - np.maximum(boxes[..., 1:2], y0), 0, None)
  overlap = (overlap_y[..., :, None] * overlap_x[..., None, :]).reshape(boxes.shape[:2] + (grid * grid,))  # eq 2
  empty = overlap.sum(-1) <= 0
  if empty.any():
    image, region = map(int, np.argwhere(empty)[0])
    raise errors.UserError(
      f'{where}: image {image} region {region} box {boxes[image, region].tolist()} has no area '
      f'inside the {sizes[image].tolist()} image'
    )
  order = np.argsort(-overlap, axis=-1, kind='stable')[..., :top_l]  # eq 3: top L, ties by block index
  top = np.take_along_axis(overlap, order, axis=-1)
  weights = top / top.sum(-1, keepdims=True)  # eqs 4-5
  indices = np.where(top > 0, order, grid * grid)
  return indices.astype(np.int32), np.where(top > 0, weights, 0.0).astype(np.float32)


def to_pfan_layout(indices: np.ndarray, weights: np.ndarray) -> np.ndarray:
  """[N, k, L] indices and weights -> PFAN's [N, k, 2L] float64 array."""
  return np.concatenate([indices.astype(np.float64), weights.astype(np.float64)], axis=-1)


def from_pfan_layout(
  array: np.ndarray, grid: int = GRID, where: str = 'boxes.npy', atol: float = 1e-5
) -> tuple[np.ndarray, np.ndarray]:
  """Reads and checks PFAN's [N, k, 2L] layout -> (indices [N, k, L] int32, weights [N, k, L] float32).

  Raises:
    ValueError: wrong shape, indices that are not integers in [0, G*G], negative weights, non-zero weight at
      padding, or weights not summing to 1 (named by image and region).
  """
  array = np.asarray(array)
  if array.dtype.kind not in 'biuf':
    raise errors.UserError(f'{where}: dtype {array.dtype}; expected real numbers (block indices and weights)')
  if array.ndim != 3 or array.shape[-1] % 2:
    raise errors.UserError(f'{where}: expected [n_images, k, 2L] (L block indices then L weights); got {array.shape}')
  if not np.isfinite(array).all():
    raise errors.UserError(f'{where}: holds NaN or inf')
  top_l = array.shape[-1] // 2
  raw_indices, weights = array[..., :top_l], array[..., top_l:]

  def fail(mask, what):
    image, region = map(int, np.argwhere(mask.any(-1) if mask.ndim == 3 else mask)[0])
    raise errors.UserError(f'{where}: image {image} region {region}: {what}')

  if (raw_indices != np.round(raw_indices)).any():
    fail(raw_indices != np.round(raw_indices), 'block indices must be integers')
  if ((raw_indices < 0) | (raw_indices > grid * grid)).any():
    fail(
      (raw_indices < 0) | (raw_indices > grid * grid),
      f'block indices must be in [0, {grid * grid}] (grid {grid} x {grid}, {grid * grid} = padding)',
    )
  if (weights < 0).any():
    fail(weights < 0, 'weights must be >= 0')
  padding = raw_indices == grid * grid
  if (padding & (weights != 0)).any():
    fail(padding & (weights != 0), f'padding index {grid * grid} must have weight 0')
  sums = weights.sum(-1)
  if (np.abs(sums - 1) > atol).any():
    fail(np.abs(sums - 1) > atol, f'weights sum to {sums[np.abs(sums - 1) > atol][0]:.6f}; expected 1')
  return raw_indices.astype(np.int32), weights.astype(np.float32)
