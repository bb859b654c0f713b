"""A run directory (workdir), and the one place that knows its layout:

W/config.json                 the run's config plus `data_info` (save_config / load_config)
W/vocab.json                  the SCAN word vocabulary, or for BERT-based models
W/bert/                       the BERT's config.json and tokenizer files (its weights are in the checkpoints)
W/checkpoints/<step>/         the latest checkpoints;  W/best/<step>/  the best on dev (xmatch_jax/checkpoints.py)
W/stages/<stage>/             DAER's stages 1-2, each a workdir of checkpoints of its own
W/metrics.jsonl, W/tb/        training logs (JSON lines, TensorBoard)
W/.lock                       the pid and host of the training run using W (run_lock)
W/eval/<split>.json, <split>_rerank<k>.json, <split>_scores.npy, <split>_fused.json, <split>_topk.json
                              evaluation outputs; .partial_<split>/ the finished score columns of an interrupted one
"""

import contextlib
import json
import os
import socket
import time

import jax
import ml_collections

from xmatch_jax import errors
from xmatch_jax import models
from xmatch_jax import parallel
from xmatch_jax.data import vocab as vocab_lib
from xmatch_jax.data import wordpiece

CONFIG_FILE = 'config.json'
VOCAB_FILE = 'vocab.json'


def config_path(workdir: str) -> str:
  return os.path.join(workdir, CONFIG_FILE)


def vocab_path(workdir: str) -> str:
  return os.path.join(workdir, VOCAB_FILE)


def bert_dir(workdir: str) -> str:
  return os.path.join(workdir, 'bert')


def checkpoints_dir(workdir: str) -> str:
  return os.path.join(workdir, 'checkpoints')


def best_dir(workdir: str) -> str:
  return os.path.join(workdir, 'best')


def stage_dir(workdir: str, stage: str) -> str:
  return os.path.join(workdir, 'stages', stage)


def metrics_path(workdir: str) -> str:
  return os.path.join(workdir, 'metrics.jsonl')


def tensorboard_dir(workdir: str) -> str:
  return os.path.join(workdir, 'tb')


def eval_dir(workdir: str) -> str:
  return os.path.join(workdir, 'eval')


def result_name(split: str, rerank_k: int = 0, fused: bool = False, dataset: str = '') -> str:
  """<split>, <split>_rerank<k> (two-stage retrieval) or <split>_fused (an ensemble); prefixed <dataset>_ when a
  run is evaluated on a dataset other than its own (cross-dataset)."""
  name = f'{split}_fused' if fused else f'{split}_rerank{rerank_k}' if rerank_k else split
  return f'{dataset}_{name}' if dataset else name


def result_path(workdir: str, split: str, rerank_k: int = 0, fused: bool = False, dataset: str = '') -> str:
  """W/eval/<result_name>.json: the metrics of one evaluation."""
  return os.path.join(eval_dir(workdir), f'{result_name(split, rerank_k, fused, dataset)}.json')


def topk_path(workdir: str, split: str, rerank_k: int = 0, dataset: str = '') -> str:
  """W/eval/<result_name>_topk.json: per query its k best items with ids and scores (evaluate --topk)."""
  return os.path.join(eval_dir(workdir), f'{result_name(split, rerank_k, dataset=dataset)}_topk.json')


def partial_scores_dir(workdir: str, name: str) -> str:
  """W/eval/.partial_<name>/: finished score columns of an evaluation in progress (removed when it completes)."""
  return os.path.join(eval_dir(workdir), f'.partial_{name}')


def scores_path(workdir: str, split: str, dataset: str = '') -> str:
  """W/eval/<result_name>_scores.npy: the [n_images, n_captions] float32 score matrix (for ensembles)."""
  return os.path.join(eval_dir(workdir), f'{result_name(split, dataset=dataset)}_scores.npy')


def layout_path(workdir: str, split: str, dataset: str = '') -> str:
  """W/eval/<result_name>_layout.npz, beside the scores: `caption_to_image` [n_captions] and, for runs evaluated by
  mAP, the images' `labels` [n_images]: what turns the matrix into metrics without the dataset."""
  return os.path.join(eval_dir(workdir), f'{result_name(split, dataset=dataset)}_layout.npz')


def has_checkpoints(workdir: str) -> bool:
  """W holds checkpoints (latest or best) already."""
  return os.path.exists(checkpoints_dir(workdir)) or os.path.exists(best_dir(workdir))


def save_config(config: ml_collections.ConfigDict, workdir: str, img_dim: int) -> None:
  """Writes W/config.json: the run's config plus `data_info` (what the model was built for)."""
  saved = ml_collections.ConfigDict(config.to_dict())
  saved.data_info = {'img_dim': int(img_dim)}
  with open(config_path(workdir), 'w') as f:
    f.write(saved.to_json(indent=2, sort_keys=True))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = config_path(workdir)
  if not os.path.exists(path):
    raise errors.MissingFileError(f'{path} not found: {workdir} is not a training workdir (train into it first).')
  with open(path, encoding='utf-8') as f:
    try:
      data = json.load(f)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of too many digits
      raise errors.UserError(f'{path}: not valid JSON ({e}); expected the config.json that training writes.') from None
  if not isinstance(data, dict) or not isinstance(data.get('model'), dict):
    raise errors.UserError(f'{path}: no "model" object; expected the config.json that training writes.')
  _upgrade(data)
  return ml_collections.ConfigDict(data)


def _upgrade(config: dict) -> None:
  """Fields of workdirs written by earlier versions, kept in meaning: runs written before `trainer` existed are
  staged exactly when they have stages; DAER stages trained before the per-stage optimiser field used Adam; the
  model's own renames (`Matcher.upgrade_fields`)."""
  config.setdefault('trainer', 'staged' if 'stages' in config else 'contrastive')
  for stage in (config.get('stage') or {}).values():
    if isinstance(stage, dict):
      stage.setdefault('optimizer', 'adam')
  name = config['model'].get('name')
  model_cls = models.MODELS.get(name) if isinstance(name, str) else None
  if model_cls is not None:
    model_cls.upgrade_fields(config['model'])


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


def load_vocab(workdir: str):
  """W/vocab.json (SCAN word vocabulary), or for BERT-based models the WordPiece tokenizer in W/bert."""
  if os.path.isdir(bert_dir(workdir)):
    return wordpiece.WordPieceVocab(bert_dir(workdir))
  return vocab_lib.Vocabulary.from_json(vocab_path(workdir))


def prepare_vocab(config: ml_collections.ConfigDict, workdir: str, train_captions: list):
  """A training run's caption vocabulary: kept from W when resuming; else SCAN's word vocabulary (from
  config.vocab_path or built from the training captions), or for BERT-based models the BERT's WordPiece tokenizer
  (copied to W/bert). Process 0 writes it."""
  if models.uses_bert(config.model.name):
    saved = bert_dir(workdir)
    if os.path.exists(os.path.join(saved, 'config.json')):
      return wordpiece.WordPieceVocab(saved)
    if not config.model.bert_dir:
      raise errors.UserError(
        'config.model.bert_dir is empty; set it to a Hugging Face BERT directory (e.g. your '
        "bert-base-uncased) or to 'minilm'."
      )
    vocab = wordpiece.WordPieceVocab(config.model.bert_dir)
    if jax.process_index() == 0:
      vocab.save(bert_dir(workdir))
    return vocab
  path = vocab_path(workdir)
  if os.path.exists(path):  # resuming: keep the vocabulary the checkpoint was trained with
    return vocab_lib.Vocabulary.from_json(path)
  if config.vocab_path:
    vocab = vocab_lib.Vocabulary.load(config.vocab_path)
  else:
    vocab = vocab_lib.Vocabulary.build(train_captions, min_count=config.vocab_min_count)
  if jax.process_index() == 0:
    vocab.to_json(path)
  return vocab


LOCK_FILE = '.lock'


def lock_path(workdir: str) -> str:
  return os.path.join(workdir, LOCK_FILE)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  return True


def _read_lock(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return {}  # half-written by a process killed while writing it: stale


def _age(path: str) -> float:
  try:
    return time.time() - os.path.getmtime(path)
  except FileNotFoundError:
    return 0.0


@contextlib.contextmanager
def run_lock(workdir: str):
  """Holds W/.lock (pid, host, start time) while a training run uses W, so that a second run into the same workdir
  is refused with a message naming the first. A lock left by a dead process of this host (kill -9, a crash) is
  taken over with a warning; one of another host is refused (its liveness cannot be checked from here), saying
  how to remove it. Only process 0 of a multi-process run holds it."""
  if jax.process_index() != 0:
    yield
    return
  os.makedirs(workdir, exist_ok=True)
  path, host, pid = lock_path(workdir), socket.gethostname(), os.getpid()
  mine = {'pid': pid, 'host': host, 'started': time.strftime('%Y-%m-%d %H:%M:%S')}
  while True:
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      held = _read_lock(path)
      if not held and _age(path) < 10:  # being written by a run starting right now
        time.sleep(0.5)
        continue
      owner = f'pid {held.get("pid")} on host {held.get("host")} (since {held.get("started")})'
      if held and held.get('host') != host:
        raise errors.UserError(
          f'{workdir} is in use by the training run of {owner}; wait for it, use another --workdir, or delete '
          f'{path} if that run is gone'
        ) from None
      if held and held.get('pid') != pid and _alive(int(held['pid'])):
        raise errors.UserError(
          f'{workdir} is in use by the training run of {owner}; wait for it or use another --workdir'
        ) from None
      gone = owner if held else 'an unreadable lock file'
      print(f'warning: {path}: taking over the lock of {gone}, whose run is no longer running', flush=True)
      with contextlib.suppress(FileNotFoundError):
        os.remove(path)
      continue
    with os.fdopen(fd, 'w') as f:
      json.dump(mine, f)
    break

  def release():
    if _read_lock(path).get('pid') == pid:
      os.remove(path)

  try:
    with parallel.on_lost_process(release):  # another process lost: the relaunch (maybe on another host) may start
      yield
  finally:
    release()
