"""The matcher contract: everything the trainers, evaluation, the Retriever, re-ranking, the converters and the tools
may ask of a model (docs/architecture.md, "The matcher contract"). Every model in `models.MODELS` subclasses
`Matcher`; nothing outside `models/` probes a model with `getattr` or switches on its name.

A subclass is a Flax module whose fields include `vocab_size` and `img_dim` (set from the data) and which implements
`encode_image`, `encode_text` and `pair_scores`; the other hooks have defaults for a region / word matcher.
"""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xmatch_jax import errors
from xmatch_jax import pairwise
from xmatch_jax.data import lazy
from xmatch_jax.models import layers


class Matcher(nn.Module):
  """Base class of the matchers.

  Class attributes (hooks with defaults):
    image_keys: the image fields `encode_image` reads, after `prepare_images` (a property where it depends on
      fields, as GLFN's tags).
    text_input: 'words' (the run's word vocabulary) or 'wordpiece' (the tokenizer of the model's `bert_dir`).
    frozen_params: top-level param groups the trainers leave untouched (no optimizer state, zero updates).
    block_size: images per block of the all-pairs scorer, which `trainers.loop.plan_memory` may lower (None: the
      model has no such field).
    random_reps: `pair_scores` accepts `example_reps` (random encoder outputs); False when its reps hold
      projections made with parameters, which the benchmark then encodes (MMCA).
    item_flops_key: the name `item_flops` is reported under.
    untrimmed_text_keys: keys of a dict text rep that have no token axis (`trim_text_rep` leaves them whole).
    has_paired_scores: the model implements `paired_scores`; else the training step scores its rescored pairs as
      `pair_scores` of one image and one caption, vmapped.
  """

  image_keys = ('regions',)
  text_input = 'words'
  frozen_params = ()
  block_size = None
  random_reps = True
  item_flops_key = 'item_gram'
  untrimmed_text_keys = ()
  has_paired_scores = False

  # ------------------------------------------------------------------------------------------ the model proper
  def encode_image(self, images: dict):
    """Image inputs (`image_keys`, [I, ...]) -> an image rep (a dict or array with leading axis I)."""
    raise NotImplementedError

  def encode_text(self, text: dict):
    """{'tokens': [C, n] int32, 'mask': [C, n] float32} -> a text rep (leading axis C)."""
    raise NotImplementedError

  def pair_scores(self, image_rep, text_rep) -> jax.Array:
    """Every image against every caption -> [I, C] scores."""
    raise NotImplementedError

  def paired_scores(self, image_rep, text_rep) -> jax.Array:
    """Image p against caption p only (reps with leading axis P) -> [P] scores: the training step's rescored pairs
    (trainers/contrastive.py), where a model sets `has_paired_scores` because one call over P pairs runs faster than
    `pair_scores` vmapped over them."""
    raise NotImplementedError

  def __call__(self, images: dict, text: dict) -> jax.Array:
    return self.pair_scores(self.encode_image(images), self.encode_text(text))

  @classmethod
  def upgrade_fields(cls, fields: dict) -> None:
    """Rewrites, in place, the model fields of a config.json written by an earlier version into today's fields with
    the same meaning (xmatch_jax/workdirs.py calls it on every load). Default: nothing to do."""
    del fields

  @classmethod
  def describe(cls, fields: dict, sizes: dict) -> str:
    """One line naming the model and the sizes that set its cost, from a config's model fields and a benchmark's
    sizes ({'embed_size', 'n', 'min_len', 'k', ...}): the first column of tools/perf_table.py."""
    del fields
    return f'{cls.__name__}, D {sizes["embed_size"]}'

  @classmethod
  def fusion_weights(cls, parts: list[dict]) -> list[float]:
    """Weights of the score matrices of several runs of this matcher (their model fields) when their scores are
    fused into one model (tools/compare_models.py). Default: equal weights."""
    return [1.0 / len(parts)] * len(parts)

  # ------------------------------------------------------------------------------------------ inputs
  def prepare_images(self, images: dict) -> dict:
    """Dataset-format image fields -> the fields the model reads (outside jit; default: as they are)."""
    return images

  def image_inputs(self, images: dict) -> dict:
    """The `image_keys` fields of dataset-format images, after `prepare_images`, as numpy arrays; lazily read
    fields (data/lazy.py) stay lazy. A missing field is an error naming it."""
    images = self.prepare_images(images)
    missing = [k for k in self.image_keys if k not in images]
    if missing:
      raise errors.UserError(
        f'image inputs lack field(s) {missing} that model {type(self).__name__} needs; got {sorted(images)}.'
      )
    return {k: images[k] if lazy.is_lazy(images[k]) else np.asarray(images[k]) for k in self.image_keys}

  def example_images(self, rng: np.random.Generator, batch: int, regions: int) -> dict:
    """Random dataset-format image fields of `batch` images with `regions` regions (default: region features)."""
    return {'regions': rng.standard_normal((batch, regions, self.img_dim)).astype(np.float32)}

  def example_inputs(
    self, batch: int = 2, regions: int = 4, words: int = 4, min_len: Optional[int] = None, seed: int = 0
  ) -> tuple[dict, dict]:
    """A random batch in the model's input format: (images as `image_inputs` gives them, text {'tokens', 'mask':
    [batch, words]} with lengths in [min_len, words]). For shape probes (`model.init`) and benchmarks."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len or words, words + 1, size=batch)
    mask = (np.arange(words)[None] < lengths[:, None]).astype(np.float32)
    text = {'tokens': (rng.integers(1, self.vocab_size, (batch, words)) * mask).astype(np.int32), 'mask': mask}
    return self.image_inputs(self.example_images(rng, batch, regions)), text

  def example_reps(self, seed: int, n_images: int, n_captions: int, regions: int, words: int, min_len: int):
    """Random encoder outputs in the form `pair_scores` takes: {'regions': [I, k, D]}, {'words': [C, n, D],
    'mask': [C, n]} (lengths in [min_len, n]); D = the model's `embed_size`. Used when `random_reps`."""
    rng = np.random.default_rng(seed)
    d = self.embed_size
    lengths = rng.integers(min_len, words + 1, size=n_captions)
    mask = (np.arange(words)[None] < lengths[:, None]).astype(np.float32)
    image_rep = {'regions': rng.standard_normal((n_images, regions, d)).astype(np.float32)}
    text_rep = {'words': rng.standard_normal((n_captions, words, d)).astype(np.float32) * mask[..., None], 'mask': mask}
    return image_rep, text_rep

  # ------------------------------------------------------------------------------------------ all-pairs scoring
  def text_lengths(self, text_rep, xp=np) -> Optional[np.ndarray]:
    """Tokens up to each caption's last real one, [C], when `trim_text_rep` can cut the rep's token axis; None
    when it cannot (the scorer then scores the rep as it is). Default: dict reps with a 'mask' [C, n].
    xp: `np` (host arrays) or `jnp` (inside `jit`)."""
    if not isinstance(text_rep, dict) or 'mask' not in text_rep:
      return None
    real = xp.asarray(text_rep['mask']) > 0
    return xp.where(real.any(axis=1), real.shape[1] - xp.argmax(real[:, ::-1], axis=1), 0)

  def trim_text_rep(self, text_rep, length: int):
    """The same captions' rep with its token axis cut to `length` (>= every `text_lengths`), so that a tile of short
    captions is scored without the padding of the split's longest one. `pair_scores` must not depend on padding
    (every model's padding test). Default: axis 1 of every leaf but `untrimmed_text_keys`."""
    return {key: x if key in self.untrimmed_text_keys else x[:, :length] for key, x in text_rep.items()}

  # ------------------------------------------------------------------------------------------ re-ranking
  def global_scores(self, image_rep, text_rep, block_size: int = 16) -> jax.Array:
    """[I, C] cheap scores from encoded reps, without parameters: the shortlist of two-stage retrieval
    (xmatch_jax/rerank.py). Default, for region / word reps: each real word's best region cosine, averaged."""
    if not isinstance(image_rep, dict) or 'regions' not in image_rep:
      raise errors.UserError(f'{type(self).__name__} has no global score for re-ranking')
    # Unit vectors once per call, not once per image block.
    return pairwise.score_in_blocks(
      lambda regions, text: best_region_score(regions, *text),
      layers.l2norm(image_rep['regions']),
      (layers.l2norm(text_rep['words']), text_rep['mask']),
      block_size,
    )

  # ------------------------------------------------------------------------------------------ cost model
  def pair_flops(self, regions: int, words: int) -> dict:
    """Analytic forward FLOPs of `pair_scores` per image-caption pair, by part ({'similarity': ..., ...})."""
    raise errors.UserError(f'{type(self).__name__} has no FLOP count')

  def item_flops(self, regions: int, words: int) -> tuple[int, int]:
    """FLOPs per image and per caption computed once per item, outside the pair loop (Gram matrices)."""
    del regions, words
    return 0, 0


def best_region_cosine(regions: jax.Array, words: jax.Array, mask: jax.Array) -> jax.Array:
  """regions [b, k, D], words [C, n, D], mask [C, n] -> [b, C]: mean over real words of max over regions of S."""
  return best_region_score(layers.l2norm(regions), layers.l2norm(words), mask)


def best_region_score(unit_regions: jax.Array, unit_words: jax.Array, mask: jax.Array) -> jax.Array:
  """`best_region_cosine` of inputs that are unit vectors already: [b, k, D], [C, n, D], [C, n] -> [b, C]."""
  s = pairwise.region_word_similarity(unit_regions, unit_words)  # [b, C, k, n]
  best = jnp.max(s, axis=2)
  return jnp.sum(best * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1)


def scan_attention_flops(direction: str, regions: int, words: int) -> int:
  """SCAN's attention per pair: t2i: w . S over regions, w^T G_img w; i2t: w . S over words, w^T G_txt w."""
  k, n = regions, words
  gram = 2 * k * k * n if direction == 't2i' else 2 * k * n * n
  return 2 * k * n + gram + 2 * k * n
