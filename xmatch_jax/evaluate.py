"""Evaluation: `python -m xmatch_jax.evaluate --workdir=W [--split=test] [--protocol=PROTOCOL] [--topk=K]`.

PROTOCOL: 1k, 5k, fold5, f30k_1k, coco_1k_fold5 or coco_5k.

Scores every image against every caption of the split with the workdir's best checkpoint (latest if no best),
computes recall exactly as SCAN's evaluation.py (or, for runs with config.eval_metric = 'map' such as DAER on
category datasets, mAP both ways, eq 12 of the DAER paper) and writes W/eval/<split>.json. The evaluation fields of
the run's config can be overridden (`--config.eval_image_chunk=64` on a smaller machine, `--config.eval_text_batch`,
`--config.data_dir`), and `--config.dataset=NAME` evaluates on another dataset with the same feature size
(cross-dataset: the run's vocabulary encodes its captions; written to W/eval/<NAME>_<split>.json, which names both
datasets). `--topk=K` also writes W/eval/<split>_topk.json: per image its K best captions, per caption its K best
images, with image ids ({split}_ids.txt of precomp data) and scores. Several processes (`--coordinator=host:port
--num_processes=N --process_id=i` on each, srun, or `MODULE=xmatch_jax.evaluate launch/localhost_cpu.sh N D
--workdir=W`) split the exhaustive scoring's images between them; process 0 writes the outputs.
"""

import json
import os
import time

from absl import app
from absl import flags
from absl import logging as absl_logging
import jax
import numpy as np

from xmatch_jax import checkpoints
from xmatch_jax import cli
from xmatch_jax import errors
from xmatch_jax import inference
from xmatch_jax import metrics as metrics_lib
from xmatch_jax import parallel
from xmatch_jax import rerank
from xmatch_jax import run_setup
from xmatch_jax import workdirs
from xmatch_jax.data import load_split

# The config fields an evaluation may override (--config.<field>), and their types.
EVAL_FIELDS = {'dataset': str, 'data_dir': str, 'eval_image_chunk': int, 'eval_text_batch': int}


def _apply_overrides(config, overrides: dict, source: str) -> str:
  """Sets the evaluation fields of `overrides` on `config`; returns the dataset the run was trained on."""
  trained_on = config.dataset
  for key, value in (overrides or {}).items():
    if key not in EVAL_FIELDS:
      raise errors.UserError(f'--config.{key}: not an evaluation field; expected one of {sorted(EVAL_FIELDS)}')
    if value is None:
      continue
    if EVAL_FIELDS[key] is int and (not isinstance(value, int) or value < 1):
      raise errors.UserError(f'--config.{key}={value!r}: expected a positive integer')
    with config.unlocked():
      config[key] = value
  if config.dataset != trained_on and config.get('eval_metric', 'recall') != 'recall':
    raise errors.UserError(f'{source}: cross-dataset evaluation is for recall runs; this one is evaluated by mAP')
  return trained_on


def top_k(sims: np.ndarray, k: int, image_ids: np.ndarray, captions: list) -> dict:
  """Per image its k best captions and per caption its k best images (ids and scores), best first.

  Args:
    sims: [n_img, n_cap] scores.
    k: list length (at most the number of items).
    image_ids: [n_img] ids of the images.
    captions: the n_cap caption strings.
  """
  sims = np.asarray(sims)
  k_cap, k_img = min(k, sims.shape[1]), min(k, sims.shape[0])
  best_caps = np.argsort(-sims, axis=1, kind='stable')[:, :k_cap]
  best_imgs = np.argsort(-sims.T, axis=1, kind='stable')[:, :k_img]
  return {
    'i2t': [
      {'image_id': int(image_ids[i]), 'captions': [int(c) for c in cs], 'scores': [float(sims[i, c]) for c in cs]}
      for i, cs in enumerate(best_caps)
    ],
    't2i': [
      {
        'caption': c,
        'text': captions[c],
        'image_ids': [int(image_ids[i]) for i in ims],
        'scores': [float(sims[i, c]) for i in ims],
      }
      for c, ims in enumerate(best_imgs)
    ],
  }


def evaluate_workdir(
  workdir: str,
  split: str | None = 'test',
  protocol: str | None = None,
  save_scores: bool = False,
  rerank_k: int = 0,
  overrides: dict | None = None,
  topk: int = 0,
) -> dict:
  """Scores `split` with W's best checkpoint and writes W/eval/<split>.json. Returns the result dict.

  `protocol`: 1k / 5k / fold5, a named protocol (f30k_1k, coco_1k_fold5, coco_5k; split None = its split), or
  None (from the split size; a 5000-image split is ambiguous and must be named). `save_scores` also writes the
  [n_images, n_captions] float32 score matrix to W/eval/<split>_scores.npy (for ensembles, xmatch_jax.ensemble).
  `rerank_k` > 0: two-stage retrieval (xmatch_jax.rerank), the full head scores each query's top k candidates of
  the global score; recall protocols only; written to W/eval/<split>_rerank<k>.json. `overrides`: evaluation
  fields of the config (EVAL_FIELDS; a `dataset` other than the run's is a cross-dataset evaluation). `topk` > 0:
  also writes the k best of every query (`top_k`) to W/eval/<split>_topk.json.
  """
  config = workdirs.load_config(workdir)
  trained_on = _apply_overrides(config, overrides, workdirs.config_path(workdir))
  cross = config.dataset if config.dataset != trained_on else ''
  split, protocol, name = metrics_lib.resolve_protocol(protocol, config.dataset, split)
  vocab = workdirs.load_vocab(workdir)
  # Process 0 builds a dataset not built yet, the others then read it.
  data = parallel.first_on_process_zero(lambda: load_split(config.dataset, split, config.data_dir or None), 'data')
  img_dim = run_setup.img_dim_of(data.images)
  trained_dim = config.get('data_info', {}).get('img_dim')
  if trained_dim and img_dim and img_dim != int(trained_dim):  # 0: a pixel model (DAER) reads no features
    raise errors.UserError(
      f'dataset {config.dataset}/{split} has {img_dim}-d image features; the run in {workdir} was trained on '
      f'{trained_on} with {trained_dim}-d features'
    )
  model = run_setup.build_model(config, len(vocab), img_dim, workdir)
  variables, meta, which = checkpoints.load_variables(workdir, model)
  tokens, mask = run_setup.encode_captions(vocab, data.captions, config)
  metric = config.get('eval_metric', 'recall')
  if metric == 'map' and protocol is not None:
    raise errors.UserError(
      f'--protocol={protocol} is a recall protocol; this run is evaluated by mAP over category '
      'labels (config.eval_metric = "map").'
    )
  if rerank_k and (metric != 'recall' or protocol == 'fold5'):
    raise errors.UserError(
      '--rerank_k works with the recall protocols 1k / 5k over a whole split; got '
      f'metric {metric!r}, protocol {protocol!r}.'
    )
  scorer = inference.Scorer(model, variables, config.eval_image_chunk, config.eval_text_batch, desc=f'{split} scoring')
  image_rep = jax.block_until_ready(scorer.encode_images(data.images))
  text_rep = jax.block_until_ready(scorer.encode_text(tokens, mask))
  start = time.perf_counter()
  if rerank_k:
    sims_i2t, sims = rerank.rerank(scorer, image_rep, text_rep, rerank_k)  # sims: the text-to-image matrix
  else:  # finished column blocks are kept in W/eval/.partial_<name> until the matrix is complete (resumable)
    partial = workdirs.partial_scores_dir(workdir, workdirs.result_name(split, dataset=cross))
    identity = {
      'checkpoint': which,
      'step': int(meta.get('step', -1)),
      'dataset': config.dataset,
      'split': split,
      'model': json.loads(config.model.to_json()),
    }
    sims = scorer.pair_scores(image_rep, text_rep, partial, identity)
  seconds = time.perf_counter() - start
  n_img = sims.shape[0]
  if metric == 'map':
    labels = np.asarray(data.images['label'])
    metrics, protocol = metrics_lib.map_metrics(sims, labels, labels[data.caption_to_image]), 'map'
  else:
    metrics, protocol = metrics_lib.metrics_for(sims, protocol, data.caption_to_image)
    if rerank_k:
      metrics = rerank.two_way_recall(sims_i2t, sims, data.caption_to_image)
  result = {
    **metrics,
    'kind': 'single',
    'protocol': name or protocol,
    'dataset': config.dataset,
    'split': split,
    'n_images': n_img,
    'n_captions': sims.shape[1],
    'model': config.model.name,
    'checkpoint': which,
    'checkpoint_step': int(meta.get('step', -1)),
    'rerank_k': int(rerank_k),
    'scoring_seconds': round(seconds, 3),
  }
  if cross:
    result['trained_on'] = trained_on
  if jax.process_index() > 0:  # every process holds the same matrix; process 0 writes
    return result
  os.makedirs(workdirs.eval_dir(workdir), exist_ok=True)
  with open(workdirs.result_path(workdir, split, rerank_k, dataset=cross), 'w') as f:
    json.dump(result, f, indent=2)
  if topk:
    image_ids = np.asarray(data.images.get('image_id', np.arange(n_img)))
    lists = top_k(sims if not rerank_k else sims_i2t, topk, image_ids, data.captions)
    if rerank_k:  # each direction from its own re-ranked matrix
      lists['t2i'] = top_k(sims, topk, image_ids, data.captions)['t2i']
    with open(workdirs.topk_path(workdir, split, rerank_k, dataset=cross), 'w') as f:
      json.dump({'dataset': config.dataset, 'split': split, 'k': int(topk), **lists}, f)
  if save_scores:
    np.save(workdirs.scores_path(workdir, split, cross), np.asarray(sims, np.float32))
    layout = {'caption_to_image': np.asarray(data.caption_to_image, np.int64)}
    if metric == 'map':
      layout['labels'] = np.asarray(data.images['label'])
    np.savez(workdirs.layout_path(workdir, split, cross), **layout)
  return result


def format_table(result: dict) -> str:
  head = (
    f'{result["model"]} on {result["dataset"]}/{result["split"]} ({result["n_images"]} images, '
    f'{result["n_captions"]} captions, protocol {result["protocol"]}, {result["checkpoint"]} checkpoint '
    f'step {result["checkpoint_step"]})'
  )
  keys = metrics_lib.MAP_KEYS if result['protocol'] == 'map' else metrics_lib.RESULT_KEYS
  names = '  '.join(f'{k:>8}' for k in keys)
  values = '  '.join(f'{result[k]:8.4f}' if result['protocol'] == 'map' else f'{result[k]:8.1f}' for k in keys)
  return f'{head}\n{names}\n{values}'


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
  f = flags.FLAGS
  parallel.initialize_from_flags()
  overrides = {key: f[f'config.{key}'].value for key in EVAL_FIELDS}
  with parallel.lost_process_stops_this_one():
    result = evaluate_workdir(
      f.workdir, f.split, f.protocol, save_scores=f.save_scores, rerank_k=f.rerank_k, overrides=overrides, topk=f.topk
    )
  if jax.process_index() > 0:
    return
  print(format_table(result))
  print(
    f'scoring took {result["scoring_seconds"]:.1f} s'
    + (f' (re-ranking the top {f.rerank_k})' if f.rerank_k else ' (exhaustive)')
  )
  cross = result['dataset'] if 'trained_on' in result else ''
  print(f'written to {workdirs.result_path(f.workdir, result["split"], f.rerank_k, dataset=cross)}')
  if f.topk:
    print(f'top {f.topk} lists written to {workdirs.topk_path(f.workdir, result["split"], f.rerank_k, dataset=cross)}')


if __name__ == '__main__':
  flags.DEFINE_string('workdir', None, 'Training workdir.')
  flags.DEFINE_string('split', None, "Split to evaluate (default: test, or the named protocol's split).")
  flags.DEFINE_enum(
    'protocol',
    None,
    sorted(metrics_lib.PROTOCOLS) + sorted(metrics_lib.NAMED_PROTOCOLS),
    'Evaluation protocol (default: from the split size).',
  )
  flags.DEFINE_bool('save_scores', False, 'Also write W/eval/<split>_scores.npy (for xmatch_jax.ensemble).')
  flags.DEFINE_integer(
    'rerank_k',
    0,
    'Two-stage retrieval: re-score only the top K candidates of the global score per query (0: score every pair).',
  )
  flags.DEFINE_integer('topk', 0, 'Also write W/eval/<split>_topk.json: the K best captions / images of every query.')
  flags.DEFINE_string('config.dataset', None, "Evaluate on this dataset instead of the run's (cross-dataset).")
  flags.DEFINE_string('config.data_dir', None, "Dataset directory (default: the run's, else $XMATCH_DATA_DIR).")
  flags.DEFINE_integer('config.eval_image_chunk', None, 'Images per scoring chunk (lower it on a smaller machine).')
  flags.DEFINE_integer('config.eval_text_batch', None, 'Captions per text-encoding batch.')
  parallel.define_flags()
  flags.adopt_module_key_flags(parallel)  # listed by --helpshort
  flags.mark_flags_as_required(['workdir'])
  cli.run_absl(main)
