"""GLFN: generative label fused network (Zhao et al., Neurocomputing 2023), section 3.

Image side, per region i:
  (1) o_i = [i_i, v^t_i]                       detector feature and the BERT embedding of its generated tag
  (2-5) the top-L blocks of a G x G grid by overlap with the box, weights w_im (xmatch_jax.data.pfan)
  (6) v^b_im: embeddings (D_b) of the block indices; index G*G is padding (weight 0)
  (7-9) att_im = softmax_m(tanh(f(o_i) . v^b_im)), f: linear to D_b
  (10-12) p_i = sum_m (att_im w_im / sum_m' att_im' w_im') v^b_im
  (13-14) v^o_i = l2norm(W [o_i, p_i, t_i] + b) (D = 1024; t_i is the tag embedding again, as eq 13 writes it)
Text side (15-27): frozen BERT token features -> FC to 300 -> bi-GRU (hidden D, directions averaged) -> l2norm.
Similarity (28-33): SCAN's stacked cross attention t2i and i2t on these vectors (raw-feature norm,
lambda_softmax, aggregation as in SCAN, computed from the batch-wide similarity tensor), S = alpha S_i2t +
(1 - alpha) S_t2i, alpha = 0.5.

Readings and deviations (module fields where they matter):
- Eq 10 multiplies the pre-softmax att'_im; eq 9 computes the softmax and is otherwise unused, and PFAN (which
  eqs 2-12 take from) multiplies the softmax weights. This follows eq 9 -> eq 10 with the softmax weights.
  (The softmax normaliser then cancels in eq 11.)
- Eqs 28-31 describe SCAN t2i without its softmax or temperature; the paper uses "stack cross attention [2]"
  (SCAN), so SCAN's attention is used with its published lambda_softmax per direction. Eqs 31-32 aggregate by
  the mean, as the official f30k_i2t.sh (`--agg_func=Mean`): `t2i_agg_func` / `i2t_agg_func` default to 'Mean'.
- Tag embedding: mean of the tag's BERT token states over its real tokens ([CLS] and [SEP] included) (the
  paper does not say how the 768-d tag vector is pooled).
- The paper's bi-GRU dropout 0.5 acts only between stacked layers; with one layer (the paper's) it does nothing.
- The official code (smileslabsh/Generative-Label-Fused-Network, model.py) differs from the equations in three
  places, each a field: `tag_in_fusion='once'`, `train_position_attention=False` (it detaches the position
  vectors), `t2i_max_attention_weight=0.5` (an extra t2i term), and `position_eps=1e-6` (eq 11 divides by
  sum + 1e-6). Its initialisation is another field, `official_init` (block embeddings N(0, 1) as nn.Embedding,
  Xavier-uniform f and word FC, zero biases). It trains t2i and i2t as two models and fuses their scores at
  evaluation (sec 4.2, Table 1); `score='fused'` trains one model on the fused score. docs/fidelity.md, GLFN.
- Ablations (Table 3): use_tags=False (no-tag: o_i = i_i, no t_i), text_encoder='gru' (only-GRU: learned
  embeddings of the WordPiece tokens, no BERT), text_encoder='bert' (only-BERT: BERT features -> FC to D).
"""

import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xmatch_jax import data as data_lib
from xmatch_jax import errors
from xmatch_jax import pairwise
from xmatch_jax.data import lazy
from xmatch_jax.data import pfan
from xmatch_jax.data import wordpiece
from xmatch_jax.models import bert as bert_lib
from xmatch_jax.models import layers
from xmatch_jax.models import matcher
from xmatch_jax.models import scan

SCORES = ('fused', 't2i', 'i2t')
_DIRECTIONS = {'fused': ('t2i', 'i2t'), 't2i': ('t2i',), 'i2t': ('i2t',)}
_TAG_LEN = 4  # example tags: [CLS] + a two-word tag such as "white plate" + [SEP]
TEXT_ENCODERS = ('bert_gru', 'gru', 'bert')


def position_attention(
  objects: jax.Array, blocks: jax.Array, weights: jax.Array, table: jax.Array, eps: float = 0.0
) -> jax.Array:
  """Eqs 6-12: objects [..., k, D_b] (= f(o_i)), blocks [..., k, L] int, weights [..., k, L], table
  [G*G + 1, D_b] -> position vectors p_i [..., k, D_b]. eps > 0 renormalises by (sum + eps) as the official code
  (1e-6); 0 divides by the sum itself (eq 11)."""
  v = table[blocks]  # eq 6: [..., k, L, D_b]
  att = jax.nn.softmax(jnp.tanh(jnp.einsum('...kd,...kld->...kl', objects, v)), axis=-1)  # eqs 8-9
  p = att * weights  # eq 10
  total = jnp.sum(p, axis=-1, keepdims=True)
  p = p / (total + eps if eps else jnp.maximum(total, 1e-12))  # eq 11
  return jnp.einsum('...kl,...kld->...kd', p, v)  # eq 12


class GLFN(matcher.Matcher):
  """GLFN matcher.

  Attributes:
    vocab_size: WordPiece vocabulary size (the BERT's).
    img_dim: detector feature size.
    bert: the BERT's sizes (set from `bert_dir` by `models.build_model`).
    bert_dir: Hugging Face BERT directory, or 'minilm'.
    embed_size: D (1024): region vectors and GRU hidden size.
    word_dim: size BERT features are reduced to before the GRU (300, eq 16).
    num_layers: GRU layers.
    position_dim: D_b (200).
    grid: G (16); top_l: L (15) (must match the data's block positions).
    use_tags: eq 1 / 13 tag features (False: no-tag ablation).
    text_encoder: 'bert_gru' (the paper), 'gru' (only-GRU), 'bert' (only-BERT).
    score: 'fused' (eq 33), 't2i' or 'i2t'.
    alpha: weight of S_i2t in the fused score (0.5).
    raw_feature_norm: SCAN's option for both directions.
    t2i_agg_func, i2t_agg_func: aggregation over words (t2i) / regions (i2t): 'Mean' (eqs 31-32), 'LogSumExp',
      'Max' or 'Sum' (SCAN's).
    t2i_lambda_softmax, t2i_lambda_lse, i2t_lambda_softmax, i2t_lambda_lse: SCAN's published settings (lse:
      with agg 'LogSumExp' only).
    official_init: initialise as the official code (block embeddings N(0, 1), Xavier-uniform f and word FC with
      zero bias) instead of Flax's defaults (block embeddings N(0, 1 / D_b): ~14x smaller position logits).
    tag_in_fusion: 'twice' (eq 13 as written: [o_i, p_i, t_i] with o_i = [i_i, t_i]) or 'once' (the official
      code: [i_i, p_i, t_i]).
    train_position_attention: False reproduces the official code, whose position vectors are detached
      (`.data`), so f and the block embeddings are never trained.
    t2i_max_attention_weight: the official t2i score adds 0.5 x LogSumExp over words of each word's largest
      attention weight; 0 (the paper's eqs 28-31) leaves it out.
    position_eps: 0 renormalises the position weights exactly (eq 11); the official code adds 1e-6 to the sum.
    block_size: images per block of the all-pairs scorer; remat: recompute blocks in the backward pass.
    tag_batch: the frozen BERT runs on at most this many distinct tags per call, each region then reads its tag's
      vector (tags repeat: a detector has a fixed label set); when a call holds more, it runs on every region's
      tag as with 0 (off). Same features either way.
  """

  vocab_size: int
  img_dim: int
  bert: Optional[bert_lib.BertConfig] = None
  bert_dir: str = 'minilm'
  embed_size: int = 1024
  word_dim: int = 300
  num_layers: int = 1
  position_dim: int = 200
  grid: int = pfan.GRID
  top_l: int = pfan.TOP_L
  use_tags: bool = True
  text_encoder: str = 'bert_gru'
  score: str = 'fused'
  alpha: float = 0.5
  raw_feature_norm: str = 'clipped_l2norm'
  t2i_agg_func: str = 'Mean'
  i2t_agg_func: str = 'Mean'
  t2i_lambda_softmax: float = 9.0
  t2i_lambda_lse: float = 6.0
  i2t_lambda_softmax: float = 4.0
  i2t_lambda_lse: float = 5.0
  tag_in_fusion: str = 'twice'
  train_position_attention: bool = True
  t2i_max_attention_weight: float = 0.0
  position_eps: float = 0.0
  official_init: bool = False
  block_size: int = 32
  remat: bool = False
  tag_batch: int = 0

  text_input = 'wordpiece'
  frozen_params = ('bert',)

  @property
  def image_keys(self) -> tuple:
    keys = ('regions', 'pfan_blocks', 'pfan_weights')
    return keys + ('tag_tokens', 'tag_mask') if self.use_tags else keys

  @classmethod
  def describe(cls, fields: dict, sizes: dict) -> str:
    score = fields.get('score', 'fused')
    score = 'fused t2i + i2t' if score == 'fused' else score
    return f'GLFN {score}, D {sizes["embed_size"]}, n {sizes["min_len"]}-{sizes["n"]}'

  @classmethod
  def upgrade_fields(cls, fields: dict) -> None:
    if 'agg_func' in fields:  # one aggregation both ways before t2i_agg_func / i2t_agg_func
      value = fields.pop('agg_func')
      fields.setdefault('t2i_agg_func', value)
      fields.setdefault('i2t_agg_func', value)
    fields.setdefault('official_init', False)

  @classmethod
  def fusion_weights(cls, parts: list[dict]) -> list[float]:
    """Eq 33 across runs: a t2i run and an i2t run fuse as alpha S_i2t + (1 - alpha) S_t2i (the i2t run's alpha);
    any other set of runs gets equal weights."""
    scores = [p.get('score') for p in parts]
    if sorted(map(str, scores)) != ['i2t', 't2i']:
      return super().fusion_weights(parts)
    alpha = float(parts[scores.index('i2t')].get('alpha', 0.5))
    return [alpha if score == 'i2t' else 1.0 - alpha for score in scores]

  def __post_init__(self):
    if self.bert is None:
      raise errors.UserError('GLFN needs `bert` (a BertConfig); build it with xmatch_jax.models.build_model')
    if self.score not in SCORES:
      raise errors.UserError(f'GLFN.score must be one of {SCORES}, got {self.score!r}')
    if self.text_encoder not in TEXT_ENCODERS:
      raise errors.UserError(f'GLFN.text_encoder must be one of {TEXT_ENCODERS}, got {self.text_encoder!r}')
    if not 0 <= self.alpha <= 1:
      raise errors.UserError(f'GLFN.alpha must be in [0, 1], got {self.alpha}')
    if self.vocab_size != self.bert.vocab_size:
      raise errors.UserError(
        f'GLFN: the tokenizer has {self.vocab_size} tokens but the BERT has {self.bert.vocab_size}'
      )
    if self.block_size < 1:
      raise errors.UserError(f'GLFN.block_size must be >= 1, got {self.block_size}')
    for field in ('t2i_agg_func', 'i2t_agg_func'):
      if getattr(self, field) not in scan.AGG_FUNCS:
        raise errors.UserError(f'GLFN.{field} must be one of {scan.AGG_FUNCS}, got {getattr(self, field)!r}')
    if self.tag_in_fusion not in ('twice', 'once'):
      raise errors.UserError(f"GLFN.tag_in_fusion must be 'twice' or 'once', got {self.tag_in_fusion!r}")
    super().__post_init__()

  def setup(self):
    needs_bert = self.use_tags or self.text_encoder != 'gru'
    if needs_bert:
      self.bert_encoder = bert_lib.BertModel(self.bert, add_pooling_layer=False, name='bert')
    # f of eq 7; the paper does not say whether it has a bias, the official code has none.
    xavier = nn.initializers.glorot_uniform()
    official = {'kernel_init': xavier, 'bias_init': nn.initializers.zeros} if self.official_init else {}
    self.object_fc = nn.Dense(
      self.position_dim, use_bias=False, name='object_fc', **({'kernel_init': xavier} if self.official_init else {})
    )
    self.block_embed = nn.Embed(
      self.grid * self.grid + 1,
      self.position_dim,
      name='block_embed',
      **({'embedding_init': nn.initializers.normal(1.0)} if self.official_init else {}),
    )
    self.region_fc = nn.Dense(self.embed_size, kernel_init=nn.initializers.glorot_uniform(), name='region_fc')
    if self.text_encoder == 'bert':
      self.word_fc = nn.Dense(self.embed_size, name='word_fc')
    else:
      if self.text_encoder == 'bert_gru':
        self.word_fc = nn.Dense(self.word_dim, name='word_fc', **official)  # eq 16
      self.gru = layers.GRUTextEncoder(
        vocab_size=self.vocab_size,
        word_dim=self.word_dim,
        embed_size=self.embed_size,
        num_layers=self.num_layers,
        bidirectional=True,
        name='gru',
      )

  def prepare_images(self, images: dict) -> dict:
    """Dataset-format images -> this model's inputs (block positions from boxes, tags tokenised by the BERT's
    own tokenizer); called by the data pipeline outside jit."""
    tokenizer = _tokenizer(self.bert_dir) if self.use_tags and 'tag_tokens' not in images else None
    return prepare_images(images, tokenizer, self.grid, self.top_l, self.use_tags)

  def _bert_states(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    return jax.lax.stop_gradient(self.bert_encoder(tokens, mask)['last_hidden_state'])

  def _tag_vectors(self, rows: jax.Array) -> jax.Array:
    """rows [m, 2t]: a tag's tokens then its mask -> mean BERT state over its real tokens, [m, H]."""
    t = rows.shape[1] // 2
    mask = rows[:, t:].astype(jnp.float32)
    states = self._bert_states(rows[:, :t], mask)
    return jnp.sum(states * mask[..., None], axis=1) / jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1.0)

  def tag_features(self, tag_tokens: jax.Array, tag_mask: jax.Array) -> jax.Array:
    """tag_tokens, tag_mask [I, k, t] -> mean BERT state over each tag's real tokens, [I, k, H]."""
    i, k, t = tag_tokens.shape
    rows = jnp.concatenate([tag_tokens.reshape(i * k, t), tag_mask.reshape(i * k, t).astype(tag_tokens.dtype)], 1)
    if not 0 < self.tag_batch < i * k:
      return self._tag_vectors(rows).reshape(i, k, -1)
    distinct, inverse, fits = distinct_rows(rows, self.tag_batch)
    vectors = nn.cond(
      fits,
      lambda mdl, d, inv, r: mdl._tag_vectors(d)[inv],
      lambda mdl, d, inv, r: mdl._tag_vectors(r),
      self,
      distinct,
      inverse,
      rows,
    )
    return vectors.reshape(i, k, -1)

  def encode_image(self, images: dict) -> dict:
    """regions [I, k, img_dim], pfan_blocks / pfan_weights [I, k, L], tag_tokens / tag_mask [I, k, t] ->
    {'regions': [I, k, D]} (eqs 1-14)."""
    layers.require_keys(images, self.image_keys, 'GLFN.encode_image')
    regions = images['regions']
    blocks = images['pfan_blocks']
    if blocks.shape[-1] != self.top_l:
      raise errors.UserError(f'GLFN: pfan_blocks has L={blocks.shape[-1]}; the model was built for top_l={self.top_l}')
    if self.use_tags:
      tags = self.tag_features(images['tag_tokens'], images['tag_mask'])
      objects = jnp.concatenate([regions, tags], axis=-1)  # eq 1
    else:
      objects = regions
    positions = position_attention(
      self.object_fc(objects), blocks, images['pfan_weights'], self.block_embed.embedding, self.position_eps
    )  # eqs 7-12
    if not self.train_position_attention:
      positions = jax.lax.stop_gradient(positions)
    if not self.use_tags:
      parts = [regions, positions]
    elif self.tag_in_fusion == 'twice':
      parts = [objects, positions, tags]  # eq 13
    else:
      parts = [regions, positions, tags]
    return {'regions': layers.l2norm(self.region_fc(jnp.concatenate(parts, axis=-1)))}  # eq 14

  def encode_text(self, text: dict) -> dict:
    """tokens / mask [C, n] (WordPiece) -> {'words': [C, n, D], 'mask'} (eqs 15-27)."""
    layers.require_keys(text, ('tokens', 'mask'), 'GLFN.encode_text')
    tokens, mask = text['tokens'], text['mask']
    if self.text_encoder == 'bert':
      words = layers.l2norm(self.word_fc(self._bert_states(tokens, mask)))
      words = jnp.where(mask[..., None] > 0, words, 0.0)
    elif self.text_encoder == 'bert_gru':
      words, _ = self.gru(tokens, mask, embedded=self.word_fc(self._bert_states(tokens, mask)))
    else:
      words, _ = self.gru(tokens, mask)
    return {'words': words, 'mask': mask}

  def pair_scores(self, image_rep: dict, text_rep: dict) -> jax.Array:
    """S of every pair, [I, C] (eq 33 for 'fused'), in blocks of `block_size` images."""
    need_gram = self.score in ('fused', 'i2t')
    text = scan.prepare_text(text_rep['words'], text_rep['mask'], with_gram=need_gram)
    t2i = functools.partial(
      scan.t2i_scores,
      raw_feature_norm=self.raw_feature_norm,
      lambda_softmax=self.t2i_lambda_softmax,
      agg_func=self.t2i_agg_func,
      lambda_lse=self.t2i_lambda_lse,
      max_attention_weight=self.t2i_max_attention_weight,
    )
    i2t = functools.partial(
      scan.i2t_scores,
      raw_feature_norm=self.raw_feature_norm,
      lambda_softmax=self.i2t_lambda_softmax,
      agg_func=self.i2t_agg_func,
      lambda_lse=self.i2t_lambda_lse,
    )

    def head(image_block, text_):
      regions = image_block['regions']
      if self.score == 't2i':
        return t2i(regions, text_)
      if self.score == 'i2t':
        return i2t(regions, text_)
      sim = scan.t2i_similarity(regions, text_['words'])  # S once for both directions
      return self.alpha * i2t(regions, text_, sim=scan.i2t_layout(sim)) + (1 - self.alpha) * t2i(
        regions, text_, sim=sim
      )

    return pairwise.score_in_blocks(head, image_rep, text, self.block_size, remat=self.remat)

  def example_images(self, rng: np.random.Generator, batch: int, regions: int) -> dict:
    """Regions, random boxes (x1, y1, x2, y2 in [0, 1]; `prepare_images` finds their blocks) and, with tags,
    random tag tokens [batch, regions, 4]."""
    images = super().example_images(rng, batch, regions)
    corners = rng.uniform(0, 0.7, (batch, regions, 2))
    images['boxes'] = np.concatenate([corners, corners + rng.uniform(0.05, 0.3, (batch, regions, 2))], axis=-1)
    if self.use_tags:
      images['tag_tokens'] = rng.integers(1, self.vocab_size, (batch, regions, _TAG_LEN)).astype(np.int32)
      images['tag_mask'] = np.ones((batch, regions, _TAG_LEN), np.float32)
    return images

  def pair_flops(self, regions: int, words: int) -> dict:
    # 'fused' computes S once ([I, k, C, n]) and hands i2t its transpose.
    attention = sum(matcher.scan_attention_flops(x, regions, words) for x in _DIRECTIONS[self.score])
    return {'similarity': 2 * regions * words * self.embed_size, 'attention': attention}

  def item_flops(self, regions: int, words: int) -> tuple[int, int]:
    directions, d = _DIRECTIONS[self.score], self.embed_size
    return 2 * regions * regions * d * ('t2i' in directions), 2 * words * words * d * ('i2t' in directions)


def distinct_rows(rows: jax.Array, size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """rows [m, w] -> (distinct [size, w] padded with zero rows, inverse [m], fits): when `fits` (at most `size`
  distinct rows), distinct[inverse] == rows; otherwise distinct and inverse are not usable. Jit-compatible."""
  distinct, inverse = jnp.unique(rows, axis=0, size=size, fill_value=0, return_inverse=True)
  ordered = rows[jnp.lexsort(rows.T[::-1])]
  count = 1 + jnp.sum(jnp.any(ordered[1:] != ordered[:-1], axis=1))
  return distinct, inverse.reshape(-1), count <= size


@functools.lru_cache(maxsize=4)
def _tokenizer(bert_dir: str):
  return wordpiece.WordPieceVocab(bert_dir)


def _rows(field, dtype):
  """A field as a numpy array of `dtype`; a lazily read field of that dtype (large precomp splits) stays lazy."""
  if isinstance(field, lazy.LazyRows) and field.dtype == dtype:
    return field
  return np.asarray(field, dtype)


def prepare_images(
  images: dict, tokenizer, grid: int = pfan.GRID, top_l: int = pfan.TOP_L, use_tags: bool = True, where: str = 'images'
) -> dict:
  """Dataset-format images -> GLFN inputs.

  Block positions come from `pfan_blocks` / `pfan_weights` if present, else from `boxes` ([I, k, 4] x1, y1, x2, y2
  normalised to [0, 1], as `shapes` stores them); tags from `tag_tokens` / `tag_mask`, else tokenised from `tags`
  (k strings per image) with `tokenizer` (a WordPieceVocab).

  Raises:
    ValueError: a needed field is missing (named, with what would provide it).
  """
  out = {'regions': _rows(images['regions'], np.float32)}
  if 'pfan_blocks' in images and 'pfan_weights' in images:
    out['pfan_blocks'] = _rows(images['pfan_blocks'], np.int32)
    out['pfan_weights'] = _rows(images['pfan_weights'], np.float32)
  elif 'boxes' in images:
    boxes = np.asarray(images['boxes'], np.float64)
    out['pfan_blocks'], out['pfan_weights'] = pfan.block_positions(
      boxes, np.ones((boxes.shape[0], 2)), grid, top_l, where=f'{where}["boxes"]'
    )
  else:
    raise errors.UserError(
      f'{where}: GLFN needs block positions: fields pfan_blocks + pfan_weights (PFAN boxes.npy, see '
      'tools/pfan_positions.py) or boxes; got fields ' + str(sorted(images))
    )
  if not use_tags:
    return out
  if 'tag_tokens' in images and 'tag_mask' in images:
    out['tag_tokens'] = np.asarray(images['tag_tokens'], np.int32)
    out['tag_mask'] = np.asarray(images['tag_mask'], np.float32)
    return out
  if 'tags' not in images:
    raise errors.UserError(
      f'{where}: GLFN with use_tags needs per-region tags (field tags: k strings per image) or '
      f'tag_tokens + tag_mask; got fields {sorted(images)}. For the SCAN precomp datasets (f30k, coco, '
      'precomp) this means the manual dir has no {split}_tags.txt (line i: the k region tags of image '
      'i, TAB-separated, e.g. "white plate"; see xmatch_jax/data/precomp.py; tools/convert_features.py '
      '--objects_vocab=objects_vocab.txt --attributes_vocab=attributes_vocab.txt writes them from '
      'bottom-up-attention detections); add them to every split and delete the built dataset to '
      'rebuild, or train without tags: --config.model.use_tags=False (the no-tag ablation).'
    )
  encoded, cache = [], {}
  for i, image_tags in enumerate(images['tags']):
    row = []
    for r, tag in enumerate(image_tags):
      tag = data_lib.as_text(tag)
      if not tag.strip():
        raise errors.UserError(f'{where}: image {i} region {r} has an empty tag')
      if tag not in cache:
        cache[tag] = tokenizer.encode(tag)
      row.append(cache[tag])
    encoded.append(row)
  t = max(len(ids) for row in encoded for ids in row)
  tokens = np.zeros((len(encoded), len(encoded[0]), t), np.int32)
  for i, row in enumerate(encoded):
    for r, ids in enumerate(row):
      tokens[i, r, : len(ids)] = ids
  out['tag_tokens'], out['tag_mask'] = tokens, (tokens > 0).astype(np.float32)
  return out
