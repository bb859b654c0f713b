"""Matcher registry: model name -> Flax module, and `build_model` from a config.

Every matcher subclasses `matcher.Matcher` (the contract: docs/architecture.md, "The matcher contract").
"""

import dataclasses
import os
from typing import Any
from typing import Mapping

import flax.linen as nn

from xmatch_jax import errors
from xmatch_jax.data import bert_dir as bert_dir_lib
from xmatch_jax.models import matcher
from xmatch_jax.models.bert import BertConfig
from xmatch_jax.models.daer import DAER
from xmatch_jax.models.glfn import GLFN
from xmatch_jax.models.mmca import MMCA
from xmatch_jax.models.rdan import RDAN
from xmatch_jax.models.scan import SCAN
from xmatch_jax.models.vsepp import VSEPP

MODELS: dict[str, type[matcher.Matcher]] = {
  'vsepp': VSEPP,
  'scan': SCAN,
  'rdan': RDAN,
  'mmca': MMCA,
  'glfn': GLFN,
  'daer': DAER,
}


def register(name: str, model_cls: type[matcher.Matcher]) -> None:
  """Adds a matcher under `name` (a config's `model.name`); it must subclass `matcher.Matcher`."""
  if not (isinstance(model_cls, type) and issubclass(model_cls, matcher.Matcher)):
    raise errors.UserError(f'models.register({name!r}, ...): {model_cls!r} is not a matcher.Matcher subclass')
  if name in MODELS and MODELS[name] is not model_cls:
    raise errors.UserError(f'models.register: {name!r} is already {MODELS[name].__name__}')
  MODELS[name] = model_cls


def uses_bert(name: str) -> bool:
  """Model `name` reads WordPiece tokens through a BERT (its captions use the BERT's own tokenizer)."""
  model_cls = MODELS.get(name)
  return model_cls is not None and model_cls.text_input == 'wordpiece'


# Set from the data, not from the model config.
_DATA_FIELDS = ('vocab_size', 'img_dim', 'bert')
# Fields every Flax module has that are not model hyper-parameters.
_MODULE_FIELDS = ('parent', 'name')


def model_fields(model_cls: type[nn.Module]) -> tuple[str, ...]:
  """The hyper-parameter fields a model config may set for `model_cls`."""
  return tuple(f.name for f in dataclasses.fields(model_cls) if f.init and f.name not in _DATA_FIELDS + _MODULE_FIELDS)


def build_model(model_config: Any, vocab_size: int, img_dim: int) -> nn.Module:
  """Builds the matcher named by `model_config.name`.

  Args:
    model_config: ml_collections ConfigDict (or mapping) with `name` (a key of MODELS) and any of
      the model's fields other than vocab_size / img_dim.
    vocab_size: number of token ids of the dataset's vocabulary.
    img_dim: size of the dataset's precomputed region features.

  Returns:
    The (unbound) Flax module.

  Raises:
    ValueError: no or unknown `name`, or a field the model does not have.
  """
  if hasattr(model_config, 'to_dict'):
    model_config = model_config.to_dict()
  if not isinstance(model_config, Mapping):
    raise errors.UserError(f'model config must be a ConfigDict or mapping, got {type(model_config)}')
  kwargs = dict(model_config)
  name = kwargs.pop('name', None)
  if name not in MODELS:
    raise errors.UserError(f'model config name must be one of {sorted(MODELS)}, got {name!r}')
  model_cls = MODELS[name]
  allowed = model_fields(model_cls)
  for field in kwargs:
    if field in _DATA_FIELDS:
      raise errors.UserError(f'model config for {name!r} sets {field!r}, which comes from the dataset; remove it')
    if field not in allowed:
      raise errors.UserError(f'model config for {name!r} has unknown field {field!r}; known fields: {list(allowed)}')
  if 'bert' in {f.name for f in dataclasses.fields(model_cls)}:
    # Models with a BERT text encoder take its sizes from the checkpoint's config.json.
    bert_dir = kwargs.get('bert_dir', model_cls.bert_dir)
    if not bert_dir:
      raise errors.UserError(
        f"model config for {name!r} needs bert_dir: a Hugging Face BERT directory (e.g. bert-base-uncased) or 'minilm'"
      )
    bert_dir = bert_dir_lib.resolve_dir(bert_dir)
    kwargs['bert'] = BertConfig.from_json(os.path.join(bert_dir, 'config.json'))
  return model_cls(vocab_size=vocab_size, img_dim=img_dim, **kwargs)
