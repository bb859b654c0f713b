"""The Python API: score dataset-format images against raw caption strings with a trained workdir.

from xmatch_jax import Retriever
r = Retriever.from_workdir('runs/rdan_shapes')
images, captions, caption_to_image = xmatch_jax.data.load_split('shapes', 'test')
scores = r.score({k: v[:10] for k, v in images.items()}, ['a red circle above a blue square'])  # [10, 1]

# One directory to hand to someone else, loaded without the workdir:
r.save_pretrained('rdan_shapes_bundle')
r = Retriever.from_pretrained('rdan_shapes_bundle')

# A gallery encoded once, saved, and queried later without encoding it again:
gallery = r.encode_images(images)                      # a rep pytree, leading dim n_images
save_reps('gallery.npz', gallery)
scores = r.score_encoded(load_reps('gallery.npz'), r.encode_texts(['a red circle above a blue square']))
"""

import os
import struct
import tokenize
import zipfile
import zlib

import jax
import numpy as np

from xmatch_jax import bundles
from xmatch_jax import checkpoints
from xmatch_jax import errors
from xmatch_jax import inference
from xmatch_jax import rerank
from xmatch_jax import run_setup
from xmatch_jax import safe_npz
from xmatch_jax import workdirs


class Retriever:
  """A trained matcher: config, vocabulary and the best checkpoint of a workdir."""

  def __init__(self, config, vocab, model, variables, checkpoint: str = ''):
    """variables: {'params': ...} (and 'batch_stats' for models with BatchNorm)."""
    self.config = config
    self.vocab = vocab
    self.model = model
    self.variables = variables
    self.checkpoint = checkpoint
    self._scorer = inference.Scorer(model, variables, config.eval_image_chunk, config.eval_text_batch)

  @classmethod
  def from_workdir(cls, workdir: str) -> 'Retriever':
    config = workdirs.load_config(workdir)
    vocab = workdirs.load_vocab(workdir)
    model, variables, which = _load_model(workdir, config, vocab)
    return cls(config, vocab, model, variables, checkpoint=which)

  @classmethod
  def from_pretrained(cls, bundle_dir: str) -> 'Retriever':
    """A bundle written by `save_pretrained` or tools/export_bundle.py (xmatch_jax/bundles.py); no workdir needed."""
    config, vocab, model, variables, checkpoint = bundles.load(bundle_dir)
    return cls(config, vocab, model, variables, checkpoint=checkpoint)

  def save_pretrained(self, out_dir: str, results: dict | None = None) -> str:
    """Writes this matcher as a bundle directory (config, vocabulary or BERT tokenizer files, safetensors weights,
    model card; `results`: {name: evaluation result} for the card). Returns out_dir."""
    return bundles.save(out_dir, self.config, self.vocab, self.variables, self.checkpoint, results=results)

  @property
  def params(self) -> dict:
    return self.variables['params']

  def encode_images(self, images: dict):
    """Dataset-format images (`regions` [n_img, k, d], or the fields the model reads) -> the image rep: numpy arrays
    (a dict of them, or one array for DAER) with leading dim n_img."""
    self._check_images(images)
    return jax.tree.map(np.asarray, self._scorer.encode_images(images))

  def encode_texts(self, captions: list):
    """Caption strings -> the text rep: numpy arrays with leading dim n_captions (tokenised with this run's
    vocabulary or BERT tokenizer)."""
    self._check_captions(captions)
    tokens, mask = run_setup.encode_captions(self.vocab, list(captions), self.config)
    return jax.tree.map(np.asarray, self._scorer.encode_text(tokens, mask))

  def score_encoded(self, image_rep, text_rep, rerank_k: int = 0) -> np.ndarray:
    """Reps from `encode_images` / `encode_texts` (or `load_reps`) -> [n_img, n_captions] scores, the same as
    `score` on the inputs they came from; `rerank_k` as in `score`."""
    self._check_rerank_k(rerank_k)
    if rerank_k:
      return rerank.rerank(self._scorer, image_rep, text_rep, rerank_k)[1]
    return self._scorer.pair_scores(image_rep, text_rep)

  def score(self, images: dict, captions: list, rerank_k: int = 0) -> np.ndarray:
    """images: dataset-format dict (`regions` [n_img, k, d], ...); captions: raw strings -> [n_img, n_cap].

    rerank_k > 0: two-stage text-to-image retrieval (xmatch_jax.rerank): per caption only the top rerank_k images
    of the global score get the full score; the others rank below them in global-score order.
    """
    self._check_captions(captions)
    self._check_rerank_k(rerank_k)
    inputs = self._check_images(images)
    tokens, mask = run_setup.encode_captions(self.vocab, list(captions), self.config)
    if rerank_k:
      return self.score_encoded(self._scorer.encode_images(inputs), self._scorer.encode_text(tokens, mask), rerank_k)
    return self._scorer.score(inputs, tokens, mask)

  @staticmethod
  def _check_captions(captions) -> None:
    if isinstance(captions, str):
      raise errors.UserError('captions must be a list of strings, not one string.')
    if not captions:
      raise errors.UserError('captions is empty; pass at least one caption string.')

  @staticmethod
  def _check_rerank_k(rerank_k) -> None:
    if not isinstance(rerank_k, (int, np.integer)) or rerank_k < 0:
      raise errors.UserError(f'rerank_k must be an int >= 0 (0: score every pair); got {rerank_k!r}.')

  def _check_images(self, images) -> dict:
    """The model's inputs of dataset-format images, checked (one row per image in every field, finite regions)."""
    if not hasattr(images, 'keys'):
      raise errors.UserError(
        f'images must be a dict of dataset fields such as {{"regions": [n_images, k, d]}}; got {type(images).__name__}.'
      )
    inputs = self.model.image_inputs(images)
    counts = {key: len(value) for key, value in inputs.items()}
    if min(counts.values()) == 0:
      raise errors.UserError(f'images hold no image (fields {counts}); pass at least one.')
    if len(set(counts.values())) > 1:
      raise errors.UserError(
        f'images fields have different numbers of images {counts}; expected one row per image in every field.'
      )
    regions = inputs['regions'] if 'regions' in inputs else None
    if regions is not None:
      if regions.ndim != 3 or regions.shape[-1] != self.img_dim:
        raise errors.UserError(f'images["regions"] must be [n_images, k, {self.img_dim}]; got shape {regions.shape}.')
      if not np.isfinite(regions).all():
        raise errors.UserError('images["regions"] holds NaN or inf; features must be finite.')
    return inputs

  @property
  def img_dim(self) -> int:
    return int(self.config.data_info.img_dim)


def _load_model(workdir: str, config, vocab):
  img_dim = int(config.data_info.img_dim)
  model = run_setup.build_model(config, len(vocab), img_dim, workdir)
  variables, _, which = checkpoints.load_variables(workdir, model)
  return model, variables, which


def save_reps(path: str, rep) -> None:
  """Writes a rep (from `Retriever.encode_images` / `encode_texts`) to an .npz: one array per field ('.' for a
  single-array rep)."""
  fields = rep if isinstance(rep, dict) else {'.': rep}
  np.savez(path, **{k: np.asarray(v) for k, v in fields.items()})


# What numpy raises on a corrupt .npz (tokenize.TokenError: a .npy header it cannot parse; zipfile: NotImplementedError
# for an unknown compression, RuntimeError for an encrypted member, OSError without a file name for a bad offset).
_NPZ_ERRORS = (
  zipfile.BadZipFile,
  zipfile.LargeZipFile,
  zlib.error,
  tokenize.TokenError,
  ValueError,
  EOFError,
  KeyError,
  NotImplementedError,
  RuntimeError,
  struct.error,
)


def load_reps(path: str):
  """The rep `save_reps` wrote."""
  if not os.path.isfile(path):
    raise errors.MissingFileError(f'{path}: rep file not found; expected an .npz written by save_reps.')
  try:
    data = np.load(path, mmap_mode='r', allow_pickle=False)  # mmap: a lone .npy is refused without reading it
    if not isinstance(data, np.lib.npyio.NpzFile):
      raise errors.UserError(f'{path}: a single array, not an .npz archive; expected an .npz written by save_reps.')
    with data:
      safe_npz.check_sizes(path, data.zip)
      fields = {k: data[k] for k in data.files}
  except (*_NPZ_ERRORS, OSError) as e:
    if isinstance(e, errors.UserError) or (isinstance(e, OSError) and e.filename):  # filename: cannot be opened
      raise
    raise errors.UserError(
      f'{path}: not a readable .npz file ({type(e).__name__}: {e}); expected an .npz written by save_reps '
      '(truncated or partly copied?)'
    ) from None
  return fields['.'] if set(fields) == {'.'} else fields
