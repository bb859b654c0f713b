"""BERT encoder (Devlin et al. 2019) in Flax, any size, laid out like Hugging Face's BertModel.

Embeddings (token + absolute position + segment, LayerNorm), then post-LN Transformer layers: multi-head
self-attention -> dense -> residual + LayerNorm -> dense + GELU -> dense -> residual + LayerNorm; optional
pooler (tanh dense on [CLS]). Dropout is left out: the matchers use BERT frozen (inference behaviour).

Parameter names mirror the PyTorch module names (`embeddings/word_embeddings`, `encoder/layer_3/attention/self/
query`, ...), so `xmatch_jax.convert.hf_bert` maps a Hugging Face state_dict onto them key by key.
"""

import dataclasses
import json
import os
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from xmatch_jax import errors

_ACTIVATIONS = {
  'gelu': lambda x: jax.nn.gelu(x, approximate=False),  # transformers' 'gelu' is the exact erf form
  'gelu_new': lambda x: jax.nn.gelu(x, approximate=True),
  'gelu_pytorch_tanh': lambda x: jax.nn.gelu(x, approximate=True),
  'relu': jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The fields of a Hugging Face BERT config.json that define the network."""

  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = 'gelu'
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  pad_token_id: int = 0

  def __post_init__(self):
    if not isinstance(self.hidden_act, str) or self.hidden_act not in _ACTIVATIONS:
      raise errors.UserError(f'BertConfig.hidden_act must be one of {sorted(_ACTIVATIONS)}, got {self.hidden_act!r}')
    for name in (
      'vocab_size',
      'hidden_size',
      'num_hidden_layers',
      'num_attention_heads',
      'intermediate_size',
      'max_position_embeddings',
      'type_vocab_size',
    ):
      value = getattr(self, name)
      if type(value) is not int or not 1 <= value < 2**31:  # type(): JSON true / 2.5 are not sizes
        raise errors.UserError(f'BertConfig.{name} must be an integer in [1, 2**31), got {value!r:.40}')
    if type(self.pad_token_id) is not int or not 0 <= self.pad_token_id < self.vocab_size:
      raise errors.UserError(f'BertConfig.pad_token_id must be an id in [0, vocab_size), got {self.pad_token_id!r:.40}')
    eps = self.layer_norm_eps
    if type(eps) not in (int, float) or not 0 < eps < 1:
      raise errors.UserError(f'BertConfig.layer_norm_eps must be a number in (0, 1), got {eps!r:.40}')
    if self.hidden_size % self.num_attention_heads:
      raise errors.UserError(
        f'BertConfig.hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads '
        f'({self.num_attention_heads})'
      )

  @classmethod
  def from_json(cls, path: str) -> 'BertConfig':
    """Reads a Hugging Face config.json; refuses non-BERT models and position encodings other than absolute."""
    where = os.path.abspath(path)
    with open(path, encoding='utf-8') as f:
      try:
        raw = json.load(f)
      except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of too many digits
        raise errors.UserError(f'{where}: not valid JSON ({e}); expected a Hugging Face BERT config.json') from None
    if not isinstance(raw, dict):
      raise errors.UserError(f'{where}: a JSON {type(raw).__name__}; expected an object of BERT config fields')
    model_type = raw.get('model_type', 'bert')
    if model_type != 'bert':
      raise errors.UserError(f'{where}: model_type is {model_type!r}; expected "bert"')
    position = raw.get('position_embedding_type', 'absolute')
    if position != 'absolute':
      raise errors.UserError(f'{where}: position_embedding_type is {position!r}; only "absolute" is supported')
    fields = {f.name: raw[f.name] for f in dataclasses.fields(cls) if f.name in raw}
    missing = [
      name
      for name in ('vocab_size', 'hidden_size', 'num_hidden_layers', 'num_attention_heads', 'intermediate_size')
      if name not in raw
    ]
    if missing:
      raise errors.UserError(f'{where}: missing field(s) {missing} of a BERT config')
    try:
      return cls(**fields)
    except (TypeError, ValueError) as e:
      raise errors.UserError(f'{where}: {e}') from None

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def _dense(features: int, name: str) -> nn.Dense:
  # BERT's init: N(0, 0.02) weights, zero bias (used only when not loading a checkpoint).
  return nn.Dense(features, kernel_init=nn.initializers.normal(0.02), name=name)


class BertEmbeddings(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
    c = self.config
    init = nn.initializers.normal(0.02)
    positions = jnp.arange(input_ids.shape[-1])
    x = (
      nn.Embed(c.vocab_size, c.hidden_size, embedding_init=init, name='word_embeddings')(input_ids)
      + nn.Embed(c.max_position_embeddings, c.hidden_size, embedding_init=init, name='position_embeddings')(positions)[
        None
      ]
      + nn.Embed(c.type_vocab_size, c.hidden_size, embedding_init=init, name='token_type_embeddings')(token_type_ids)
    )
    return nn.LayerNorm(epsilon=c.layer_norm_eps, name='LayerNorm')(x)


class BertSelfAttention(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """x [B, n, H], mask [B, n] (1 = real token) -> context [B, n, H]."""
    c = self.config
    heads, head_dim = c.num_attention_heads, c.hidden_size // c.num_attention_heads
    split = lambda y: y.reshape(y.shape[:2] + (heads, head_dim))
    q = split(_dense(c.hidden_size, 'query')(x))
    k = split(_dense(c.hidden_size, 'key')(x))
    v = split(_dense(c.hidden_size, 'value')(x))
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) / jnp.sqrt(head_dim).astype(x.dtype)
    # As transformers: padded keys get the dtype's lowest value (not -inf, so an all-padding row stays finite).
    logits = jnp.where(mask[:, None, None, :] > 0, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum('bhqk,bkhd->bqhd', weights, v).reshape(x.shape)


class BertLayer(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    c = self.config
    context = BertSelfAttention(c, name='attention_self')(x, mask)
    x = nn.LayerNorm(epsilon=c.layer_norm_eps, name='attention_output_LayerNorm')(
      _dense(c.hidden_size, 'attention_output_dense')(context) + x
    )
    hidden = _ACTIVATIONS[c.hidden_act](_dense(c.intermediate_size, 'intermediate_dense')(x))
    return nn.LayerNorm(epsilon=c.layer_norm_eps, name='output_LayerNorm')(
      _dense(c.hidden_size, 'output_dense')(hidden) + x
    )


class BertModel(nn.Module):
  """BERT encoder.

  Attributes:
    config: the network's sizes.
    add_pooling_layer: create the pooler (tanh dense on the [CLS] state).
  """

  config: BertConfig
  add_pooling_layer: bool = True

  @nn.compact
  def __call__(
    self,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    token_type_ids: Optional[jax.Array] = None,
    output_hidden_states: bool = False,
  ) -> dict:
    """input_ids, attention_mask, token_type_ids: [B, n] -> {'last_hidden_state': [B, n, H],
    'pooler_output': [B, H] (with the pooler), 'hidden_states': (L + 1) x [B, n, H] (if asked)}."""
    c = self.config
    if input_ids.shape[-1] > c.max_position_embeddings:
      raise errors.UserError(
        f'BERT input has {input_ids.shape[-1]} tokens; this model takes at most '
        f'{c.max_position_embeddings} (max_position_embeddings)'
      )
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = BertEmbeddings(c, name='embeddings')(input_ids, token_type_ids)
    hidden_states = [x]
    for i in range(c.num_hidden_layers):
      x = BertLayer(c, name=f'encoder_layer_{i}')(x, attention_mask)
      hidden_states.append(x)
    out = {'last_hidden_state': x}
    if self.add_pooling_layer:
      out['pooler_output'] = jnp.tanh(_dense(c.hidden_size, 'pooler_dense')(x[:, 0]))
    if output_hidden_states:
      out['hidden_states'] = tuple(hidden_states)
    return out
