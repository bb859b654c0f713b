"""Pretrained bundles: a trained matcher as one directory, loaded without its workdir (`Retriever.from_pretrained`).

  DIR/config.json          the run's config with `data_info`, as in a workdir
  DIR/vocab.json, DIR/bert/ the caption vocabulary, or the BERT's config and tokenizer files, as in a workdir
  DIR/model.safetensors    the variables, keys `<collection>/<module>/.../<leaf>` ('params/image_encoder/fc/kernel',
                           Flax layout) with metadata: format, model, dataset, checkpoint, step
  DIR/eval/<name>.json     the workdir's evaluation results, when the bundle is made from a workdir
  DIR/README.md            the model card: model, data, checkpoint, results, how to load it

BERT-based models (MMCA, GLFN) carry the BERT's weights in model.safetensors (they are part of the params); bert/
holds only its config and tokenizer, so a bundle needs no other file.
"""

import json
import os

import jax
import numpy as np

from xmatch_jax import checkpoints
from xmatch_jax import errors
from xmatch_jax import metrics as metrics_lib
from xmatch_jax import run_setup
from xmatch_jax import workdirs

FORMAT = '1'
WEIGHTS_FILE = 'model.safetensors'
CARD_FILE = 'README.md'


def flatten(variables: dict) -> dict:
  """{'params': {...}} -> {'params/a/b/kernel': np.ndarray}."""
  flat = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(variables):
    flat['/'.join(str(getattr(p, 'key', p)) for p in path)] = np.asarray(leaf)
  return flat


def unflatten(flat: dict) -> dict:
  """The inverse of `flatten`."""
  out = {}
  for key, value in flat.items():
    node = out
    *parents, leaf = key.split('/')
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return out


def weights_path(bundle_dir: str) -> str:
  return os.path.join(bundle_dir, WEIGHTS_FILE)


def save(
  out_dir: str, config, vocab, variables: dict, checkpoint: str = '', step: int = -1, results: dict | None = None
) -> str:
  """Writes a bundle in `out_dir` (new or empty): the run's config (with data_info), its vocabulary (or WordPiece
  tokenizer), `variables` ({'params': ..., 'batch_stats': ...}); `results`: {name: evaluation result dict} for the
  card and eval/. Returns out_dir."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  if os.path.exists(out_dir) and os.listdir(out_dir):
    raise errors.UserError(f'{out_dir}: exists and is not empty; a bundle is written into a new directory')
  os.makedirs(out_dir, exist_ok=True)
  workdirs.save_config(config, out_dir, int(config.data_info.img_dim))
  if hasattr(vocab, 'to_json'):
    vocab.to_json(workdirs.vocab_path(out_dir))
  else:  # WordPiece: the BERT's config and tokenizer files
    vocab.save(workdirs.bert_dir(out_dir))
  flat = flatten(variables)
  save_file(
    {k: np.ascontiguousarray(v) for k, v in flat.items()},
    weights_path(out_dir),
    metadata={
      'format': FORMAT,
      'model': config.model.name,
      'dataset': config.dataset,
      'checkpoint': checkpoint,
      'step': str(int(step)),
    },
  )
  results = results or {}
  if results:
    os.makedirs(workdirs.eval_dir(out_dir), exist_ok=True)
    for name, result in results.items():
      with open(os.path.join(workdirs.eval_dir(out_dir), f'{name}.json'), 'w') as f:
        json.dump(result, f, indent=2)
  n_params = sum(int(v.size) for k, v in flat.items() if k.startswith('params/'))
  with open(os.path.join(out_dir, CARD_FILE), 'w') as f:
    f.write(model_card(config, checkpoint, step, n_params, results))
  return out_dir


def from_workdir(workdir: str, out_dir: str) -> str:
  """The bundle of a workdir's best (else latest) checkpoint, with its evaluation results."""
  config = workdirs.load_config(workdir)
  vocab = workdirs.load_vocab(workdir)
  model = run_setup.build_model(config, len(vocab), int(config.data_info.img_dim), workdir)
  variables, meta, which = checkpoints.load_variables(workdir, model)
  results = {}
  eval_dir = workdirs.eval_dir(workdir)
  for name in sorted(os.listdir(eval_dir)) if os.path.isdir(eval_dir) else []:
    if name.endswith('.json') and not name.endswith('_topk.json'):
      with open(os.path.join(eval_dir, name)) as f:
        results[name[: -len('.json')]] = json.load(f)
  return save(out_dir, config, vocab, variables, which, int(meta.get('step', -1)), results)


def load(bundle_dir: str):
  """(config, vocab, model, variables, checkpoint) of a bundle, the variables checked against the model."""
  from safetensors import SafetensorError  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

  path = weights_path(bundle_dir)
  if not os.path.isfile(path):
    raise errors.MissingFileError(
      f'{path} not found: {bundle_dir} is not a bundle (Retriever.save_pretrained / tools/export_bundle.py write '
      'one); for a training workdir use Retriever.from_workdir'
    )
  config = workdirs.load_config(bundle_dir)
  vocab = workdirs.load_vocab(bundle_dir)
  config_path = workdirs.config_path(bundle_dir)
  try:  # the model the config describes (a config.json edited or corrupted by hand fails here)
    model = run_setup.build_model(config, len(vocab), int(config.data_info.img_dim), bundle_dir)
    expected = checkpoints.expected_variables(model)
  except errors.UserError as e:
    raise errors.UserError(f'{config_path}: {e}') from None
  except (AttributeError, TypeError, ValueError, KeyError, OverflowError) as e:
    raise errors.UserError(
      f'{config_path}: no model can be built from it ({type(e).__name__}: {e}); expected the config.json a bundle '
      'is saved with'
    ) from None
  try:
    flat = load_file(path)
  except (SafetensorError, OSError, ValueError) as e:
    raise errors.UserError(f'{path}: not a readable safetensors file ({e})') from None
  variables = unflatten(flat)
  for collection in expected:
    if collection not in variables:
      raise errors.UserError(f'{path}: no {collection!r} tensors; the model needs them')
    checkpoints.check_params_match(variables[collection], expected[collection], path)
  variables = {c: jax.tree.map(np.asarray, variables[c]) for c in expected}
  with open(path, 'rb') as f:  # the header's metadata: which checkpoint the weights are
    header = json.loads(f.read(int.from_bytes(f.read(8), 'little')))
  checkpoint = header.get('__metadata__', {}).get('checkpoint', '')
  return config, vocab, model, variables, checkpoint


def model_card(config, checkpoint: str, step: int, n_params: int, results: dict) -> str:
  """README.md of a bundle."""
  name = config.model.name
  lines = [
    f'# {name} trained on {config.dataset}',
    '',
    f'An xmatch_jax bundle: model `{name}`, {n_params:,} parameters, trained on `{config.dataset}` '
    f'({config.get("trainer", "contrastive")} trainer, seed {config.get("seed", 0)}); weights of the '
    f'{checkpoint or "given"} checkpoint' + (f' at step {step}.' if step >= 0 else '.'),
    '',
    '```python',
    'from xmatch_jax import Retriever',
    "retriever = Retriever.from_pretrained('THIS_DIRECTORY')",
    "scores = retriever.score(images, ['a caption'])  # [n_images, n_captions]",
    '```',
    '',
    'The full training configuration is `config.json`; the same run trains again (from the xmatch_jax '
    'repository, with the dataset built) with',
    '',
    '```',
    'python -m xmatch_jax.train --config=configs/from_json.py:THIS_DIRECTORY/config.json --workdir=NEW_WORKDIR',
    '```',
  ]
  rows = [(n, r) for n, r in results.items() if all(k in r for k in metrics_lib.RESULT_KEYS)]
  if rows:
    lines += ['', '## Results (from the workdir this bundle was made from)', '']
    lines += ['| evaluation | ' + ' | '.join(metrics_lib.RESULT_KEYS) + ' |']
    lines += ['| --- ' * (len(metrics_lib.RESULT_KEYS) + 1) + '|']
    for n, r in rows:
      values = ' | '.join(f'{r[k]:.1f}' for k in metrics_lib.RESULT_KEYS)
      lines += [
        f'| {n} ({r.get("dataset", config.dataset)}/{r.get("split", "?")}, {r.get("protocol", "")}) | {values} |'
      ]
  return '\n'.join(lines) + '\n'
