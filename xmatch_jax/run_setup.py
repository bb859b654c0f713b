"""What training, evaluation and the Retriever share: workdir files, vocab, model and caption encoding."""

import json
import os

import jax
import ml_collections
import numpy as np

from xmatch_jax import errors
from xmatch_jax import models
from xmatch_jax.data import batching
from xmatch_jax.data import vocab as vocab_lib
from xmatch_jax.data import wordpiece

CONFIG_FILE = 'config.json'
VOCAB_FILE = 'vocab.json'


def load_config_file(spec: str, root: str = '') -> ml_collections.ConfigDict:
  """'configs/rdan.py:f30k' -> that file's get_config('f30k'); the path is tried as given, then under `root`.
  (Tools use this; `xmatch_jax.train` reads --config through ml_collections' config_flags.)"""
  import importlib.util  # pylint: disable=g-import-not-at-top

  path, _, arg = spec.partition(':')
  if not os.path.exists(path) and root:
    path = os.path.join(root, path)
  if not os.path.exists(path):
    raise errors.MissingFileError(
      f'config file {spec.partition(":")[0]!r} not found; expected a config file such as '
      'configs/scan.py:shapes (see configs/).'
    )
  module_spec = importlib.util.spec_from_file_location('xmatch_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def check_config_overrides(argv: list[str]) -> None:
  """Raises errors.UserError when the config file given by `--config=FILE[:ARG]` in `argv` is missing or refuses
  its argument, or when a `--config.a.b=...` override has no field a.b (naming the nearest existing ones);
  ml_collections reports these as tracebacks."""
  import difflib  # pylint: disable=g-import-not-at-top

  spec, keys = None, []
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      spec = arg.split('=', 1)[1]
    elif arg == '--config' and i + 1 < len(argv):
      spec = argv[i + 1]
    elif arg.startswith(('--config.', '--noconfig.')):
      keys.append(arg.split('=', 1)[0].split('config.', 1)[1])
  if spec is None:
    return
  try:
    config = load_config_file(spec)
  except (ValueError, KeyError) as e:  # no such file, or get_config refusing its argument (an unknown dataset)
    kind = errors.MissingFileError if isinstance(e, FileNotFoundError) else errors.UserError
    raise kind(f'--config={spec}: {e}') from e
  if not keys:
    return
  for key in keys:
    node, parts = config, key.split('.')
    for depth, part in enumerate(parts):
      if isinstance(node, ml_collections.ConfigDict) and part in node:
        node = node[part]
        continue
      parent = '.'.join(parts[:depth])
      fields = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      near = difflib.get_close_matches(part, fields, n=2, cutoff=0.8)
      where = f'config.{parent}' if parent else 'the config'
      hint = f' Did you mean {", ".join(repr(n) for n in near)}?' if near else ''
      if isinstance(node, ml_collections.ConfigDict):
        raise errors.UserError(
          f'--config.{key}: {where} of {spec} has no field {part!r}.{hint} Its fields: {", ".join(fields)}.'
        )
      raise errors.UserError(f'--config.{key}: {where} of {spec} is a value ({node!r}), not a group of fields.')


def save_config(config: ml_collections.ConfigDict, workdir: str, img_dim: int) -> None:
  """Writes W/config.json: the run's config plus `data_info` (what the model was built for)."""
  saved = ml_collections.ConfigDict(config.to_dict())
  saved.data_info = {'img_dim': int(img_dim)}
  with open(os.path.join(workdir, CONFIG_FILE), 'w') as f:
    f.write(saved.to_json(indent=2, sort_keys=True))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise errors.MissingFileError(f'{path} not found: {workdir} is not a training workdir (train into it first).')
  with open(path) as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise errors.UserError(f'{path}: not valid JSON ({e}); expected the config.json that training writes.') from None
  if not isinstance(data, dict) or not isinstance(data.get('model'), dict):
    raise errors.UserError(f'{path}: no "model" object; expected the config.json that training writes.')
  _upgrade_model_fields(data['model'])
  _upgrade_stage_fields(data)
  return ml_collections.ConfigDict(data)


# (model, field of earlier versions) -> the fields that replaced it, each taking its value.
_SPLIT_FIELDS = {
  ('mmca', 'attention_scale'): ('self_attention_scale', 'cross_attention_scale'),  # one scale for both units
  ('glfn', 'agg_func'): ('t2i_agg_func', 'i2t_agg_func'),  # one aggregation both ways
}


def _upgrade_model_fields(model: dict) -> None:
  """Renames fields of workdirs written by earlier versions, keeping their meaning."""
  for (name, old), new_fields in _SPLIT_FIELDS.items():
    if model.get('name') == name and old in model:
      value = model.pop(old)
      for field in new_fields:
        model.setdefault(field, value)
  if model.get('name') == 'glfn':
    model.setdefault('official_init', False)
  if model.get('name') == 'daer':
    model.setdefault('spatial_attention_at', 'projection')


def _upgrade_stage_fields(config: dict) -> None:
  """Runs written before `trainer` existed are staged exactly when they have stages; DAER stages trained before the
  per-stage optimiser field used Adam."""
  config.setdefault('trainer', 'staged' if 'stages' in config else 'contrastive')
  for stage in (config.get('stage') or {}).values():
    if isinstance(stage, dict):
      stage.setdefault('optimizer', 'adam')


def check_same_model(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses to resume a workdir whose checkpoint belongs to another model or model configuration."""
  # Through json on both sides: the saved config.json holds lists where the config has tuples.
  old, new = json.loads(saved.model.to_json()), json.loads(config.model.to_json())
  if old != new or saved.dataset != config.dataset:
    diffs = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    raise errors.UserError(
      f'{workdir} holds a checkpoint of model {old.get("name")!r} on dataset {saved.dataset!r}; the config asks for '
      f'model {new.get("name")!r} on {config.dataset!r} (differing model fields: {diffs}). '
      'Use a new --workdir (or delete the old one) to start this run.'
    )


def uses_bert(config: ml_collections.ConfigDict) -> bool:
  """The model reads WordPiece tokens through a BERT (its captions use the BERT's tokenizer)."""
  model_cls = models.MODELS.get(config.model.name)
  return model_cls is not None and model_cls.text_input == 'wordpiece'


def workdir_bert_dir(workdir: str) -> str:
  return os.path.join(workdir, wordpiece.BERT_SUBDIR)


def build_model(config: ml_collections.ConfigDict, vocab_size: int, img_dim: int, workdir: str = ''):
  """The model of `config`; a BERT-based model of a workdir takes the BERT config saved in W/bert."""
  model_config = config.model
  if workdir and uses_bert(config) and os.path.exists(os.path.join(workdir_bert_dir(workdir), 'config.json')):
    model_config = ml_collections.ConfigDict(config.model.to_dict())
    model_config.bert_dir = workdir_bert_dir(workdir)
  return models.build_model(model_config, vocab_size=vocab_size, img_dim=img_dim)


def load_vocab(workdir: str):
  """W/vocab.json (SCAN word vocabulary), or for BERT-based models the WordPiece tokenizer in W/bert."""
  if os.path.isdir(workdir_bert_dir(workdir)):
    return wordpiece.WordPieceVocab(workdir_bert_dir(workdir))
  return vocab_lib.Vocabulary.from_json(os.path.join(workdir, VOCAB_FILE))


def prepare_vocab(config: ml_collections.ConfigDict, workdir: str, train_captions: list):
  """A training run's caption vocabulary: kept from W when resuming; else SCAN's word vocabulary (from
  config.vocab_path or built from the training captions), or for BERT-based models the BERT's WordPiece tokenizer
  (copied to W/bert). Process 0 writes it."""
  if uses_bert(config):
    bert_dir = workdir_bert_dir(workdir)
    if os.path.exists(os.path.join(bert_dir, 'config.json')):
      return wordpiece.WordPieceVocab(bert_dir)
    if not config.model.bert_dir:
      raise errors.UserError(
        'config.model.bert_dir is empty; set it to a Hugging Face BERT directory (e.g. your '
        "bert-base-uncased) or to 'minilm'."
      )
    vocab = wordpiece.WordPieceVocab(config.model.bert_dir)
    if jax.process_index() == 0:
      vocab.save(workdir)
    return vocab
  path = os.path.join(workdir, VOCAB_FILE)
  if os.path.exists(path):  # resuming: keep the vocabulary the checkpoint was trained with
    return vocab_lib.Vocabulary.from_json(path)
  if config.vocab_path:
    vocab = vocab_lib.Vocabulary.load(config.vocab_path)
  else:
    vocab = vocab_lib.Vocabulary.build(train_captions, min_count=config.vocab_min_count)
  if jax.process_index() == 0:
    vocab.to_json(path)
  return vocab


def encode_captions(vocab: vocab_lib.Vocabulary, captions: list, config: ml_collections.ConfigDict):
  """Raw strings -> (tokens [n, L] int32, mask [n, L] float32) padded to one bucket; counts truncations."""
  for i, caption in enumerate(captions):
    if not isinstance(caption, str):
      raise errors.UserError(f'caption {i} is a {type(caption).__name__} ({caption!r:.60}); expected a str.')
    if not caption.strip():
      raise errors.UserError(f'caption {i} is empty ({caption!r}); captions need at least one word.')
  token_arrays = [vocab.encode(c) for c in captions]
  longest = max(config.caption_buckets)
  if not config.truncate_captions:
    for i, tokens in enumerate(token_arrays):
      if len(tokens) > longest:
        raise errors.UserError(
          f'caption {i} has {len(tokens)} tokens, longer than the largest bucket ({longest}) of '
          'config.caption_buckets; add a larger bucket or set config.truncate_captions=True (longer '
          'captions are then cut to it and counted).'
        )
  tokens, mask, n_truncated = batching.pad_captions(
    token_arrays, tuple(config.caption_buckets), truncate=bool(config.truncate_captions)
  )
  if n_truncated:
    print(
      f'note: {n_truncated} caption(s) longer than {max(config.caption_buckets)} tokens were truncated '
      '(config.truncate_captions=True).'
    )
  return tokens, mask


def img_dim_of(images: dict) -> int:
  """Size of the region features (0 for datasets of pixels only, which DAER reads)."""
  return int(np.shape(images['regions'])[-1]) if 'regions' in images else 0  # np.shape: no read of lazy rows
