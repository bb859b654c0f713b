"""Checks on a loaded split: every error names the source, the field and what was expected."""

import numpy as np

from xmatch_jax import errors
from xmatch_jax.data import lazy


def check_split(
  images: dict,
  captions: list,
  caption_to_image: np.ndarray,
  source: str,
  captions_per_image: int | None = 5,
  region_dim: int | None = None,
) -> None:
  """Validates a split as returned by `load_split`.

  Args:
    images: dict with `regions` [N, k, d] float32 (region datasets) or `pixels` [N, H, W, 3] uint8 (image
      datasets), or both.
    captions: list of N_cap caption strings.
    caption_to_image: [N_cap] int index into images.
    source: where the data came from (file or dataset name), used in every message.
    captions_per_image: expected captions per image (None: any count).
    region_dim: expected feature size d (None: any).

  A lazy field (data/lazy.py LazyRows, read from disk on demand) is checked from its metadata only (shape, dtype),
  so validating a large split costs O(captions), not O(features): its values were checked finite by the builder
  (data/precomp.py refuses NaN / inf at build time) and are checked again row by row whenever they are read.
  """
  if 'regions' not in images and 'pixels' not in images:
    raise errors.UserError(
      f'{source}: image inputs have neither field "regions" nor "pixels"; got fields {sorted(images)}.'
    )
  if 'pixels' in images:
    pixels = images['pixels']
    if pixels.ndim != 4 or pixels.shape[-1] != 3 or pixels.dtype != np.uint8:
      raise errors.UserError(
        f'{source}: field "pixels" must be [n_images, H, W, 3] uint8; got shape {pixels.shape}, dtype {pixels.dtype}.'
      )
    n_img = pixels.shape[0]
  if 'regions' in images:
    regions = images['regions']
    if regions.ndim != 3:
      raise errors.UserError(f'{source}: field "regions" must be [n_images, k, d]; got shape {regions.shape}.')
    n_img = regions.shape[0]
    if region_dim is not None and regions.shape[-1] != region_dim:
      raise errors.UserError(f'{source}: field "regions" has feature size {regions.shape[-1]}; expected {region_dim}.')
    if lazy.is_lazy(regions):  # metadata only, see the docstring
      if regions.dtype != np.float32:
        raise errors.UserError(f'{source}: field "regions" has dtype {regions.dtype}; expected float32.')
    else:
      bad = ~np.isfinite(regions).reshape(n_img, -1).all(axis=1)
      if bad.any():
        raise errors.UserError(
          f'{source}: field "regions" holds NaN or inf in {int(bad.sum())} image(s), first at '
          f'index {int(np.argmax(bad))}; features must be finite.'
        )
  for key, value in images.items():
    if len(value) != n_img:
      raise errors.UserError(f'{source}: field "{key}" has {len(value)} entries; expected one per image ({n_img}).')
  if captions_per_image is not None and len(captions) != captions_per_image * n_img:
    raise errors.UserError(
      f'{source}: {len(captions)} captions for {n_img} images; expected '
      f'{captions_per_image} x {n_img} = {captions_per_image * n_img}.'
    )
  check_caption_index(caption_to_image, len(captions), n_img, source)
  for i, caption in enumerate(captions):
    if not isinstance(caption, str) or not caption.strip():
      raise errors.UserError(f'{source}: caption {i} is empty; every caption needs at least one word.')


def check_caption_index(caption_to_image, n_cap: int, n_img: int, source: str = '') -> np.ndarray:
  """caption_to_image as an array: integer, one entry per caption, each an image row in [0, n_img). `source`
  (where the data came from) starts every message."""
  where = f'{source}: ' if source else ''
  caption_to_image = np.asarray(caption_to_image)
  if caption_to_image.shape != (n_cap,) or not np.issubdtype(caption_to_image.dtype, np.integer):
    raise errors.UserError(
      f'{where}caption_to_image has shape {caption_to_image.shape}; expected ({n_cap},), one integer per caption '
      f'(got dtype {caption_to_image.dtype}).'
    )
  if n_cap and (caption_to_image.min() < 0 or caption_to_image.max() >= n_img):
    raise errors.UserError(
      f'{where}caption_to_image must index images in [0, {n_img}); got values in '
      f'[{caption_to_image.min()}, {caption_to_image.max()}].'
    )
  return caption_to_image
