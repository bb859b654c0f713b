"""DAER's staged training (Algorithm 1): `python -m xmatch_jax.train --config=configs/daer.py:shapes --workdir=W`.

  stage 1 `text`:     text module + a linear classifier, cross-entropy on category labels;
  stage 2 `image`:    image module + MobileNetV3's classifier head, cross-entropy;
  stage 3 `relation`: the classifier heads dropped, the relation network trained with eq 11 on all B x B pairs of
                      a batch, text and image modules fine-tuned.

Stages 1-2 checkpoint into W/stages/<stage>/, stage 3 into W/checkpoints and W/best (best dev mean mAP), so
`xmatch_jax.evaluate` and the Retriever read it like any other run. Every stage resumes from its own latest
checkpoint; a finished stage (meta `done`) is skipped. Batches are a pure function of (seed, stage, step).

`config.stages_from = 'W0[,W1...]'` starts stages 1-2 from the first of those runs whose stage has every config field
it depends on equal to ours (a Table 3 sweep trains the text module once for DAER, DAER-T and DAER-I-T). Training is
deterministic, so the copy is the stage this run would have trained. Stages whose fields differ are trained here.
"""

import functools
import json
import os
import shutil
import time

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import optax

from xmatch_jax import checkpoints
from xmatch_jax import errors
from xmatch_jax import inference
from xmatch_jax import metrics as metrics_lib
from xmatch_jax import progress as progress_lib
from xmatch_jax import run_setup
from xmatch_jax.convert import torchvision_mobilenet
from xmatch_jax.data import batching
from xmatch_jax.data import load_split
from xmatch_jax.data import word_vectors
from xmatch_jax.models import daer as daer_lib
from xmatch_jax.models import mobilenet_v3

STAGES = ('text', 'image', 'relation')
OPTIMIZERS = ('sgd', 'adam')


def check_stage_config(config: ml_collections.ConfigDict) -> None:
  for stage in config.stages:
    if stage not in STAGES:
      raise errors.UserError(f'config.stages holds {stage!r}; expected a sub-sequence of {STAGES}.')
  for stage in STAGES:
    s = config.stage[stage]
    for field, ok, expected in (
      ('num_epochs', s.num_epochs >= 0, 'an int >= 0'),
      ('max_steps', s.get('max_steps', 0) >= 0, 'an int >= 0 (0: num_epochs only)'),
      ('batch_size', s.batch_size >= 2, 'an int >= 2'),
      ('learning_rate', s.learning_rate > 0, 'a float > 0'),
      ('optimizer', s.get('optimizer', 'adam') in OPTIMIZERS, f'one of {OPTIMIZERS}'),
    ):
      if not ok:
        raise errors.UserError(f'config.stage.{stage}.{field} = {s[field]!r} is impossible; expected {expected}.')


def _split_labels(split) -> tuple[np.ndarray, np.ndarray]:
  """(image labels [n_img], caption labels [n_cap]) of a category split."""
  if 'label' not in split.images:
    raise errors.UserError("DAER trains on category labels; this dataset's images have no 'label' field.")
  image_labels = np.asarray(split.images['label'], np.int64)
  return image_labels, image_labels[split.caption_to_image]


def image_batch_indices(n_images: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """Stage 2 batch `step`: images of the epoch permutation default_rng([seed, 2, epoch]) (last partial dropped)."""
  steps_per_epoch = n_images // batch_size
  epoch, index = divmod(step, steps_per_epoch)
  order = np.random.default_rng([seed, 2, epoch]).permutation(n_images)
  return order[index * batch_size : (index + 1) * batch_size]


def _cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _losses(model):
  """stage -> loss(variables, batch, rng) -> (loss, (metrics, new batch_stats or None)); rng drives dropout."""

  def text_loss(variables, batch, rng):
    del rng
    logits = model.apply(variables, batch['text'], method=model.classify_text)
    labels = batch['labels']
    return _cross_entropy(logits, labels), ({'accuracy': jnp.mean(logits.argmax(-1) == labels)}, None)

  def image_loss(variables, batch, rng):
    logits, updates = model.apply(
      variables,
      batch['images'],
      train=True,
      method=model.classify_image,
      mutable=['batch_stats'],
      rngs={'dropout': rng},
    )
    labels = batch['labels']
    return _cross_entropy(logits, labels), ({'accuracy': jnp.mean(logits.argmax(-1) == labels)}, updates['batch_stats'])

  def relation_loss(variables, batch, rng):
    scores, updates = model.apply(
      variables, batch['images'], batch['text'], train=True, mutable=['batch_stats'], rngs={'dropout': rng}
    )
    loss = daer_lib.relation_loss(scores.T, batch['labels'], batch['image_labels'])  # eq 11, [T, I]
    return loss, ({'mean_score': jnp.mean(scores)}, updates['batch_stats'])

  return {'text': text_loss, 'image': image_loss, 'relation': relation_loss}


def _train_step(state, batch, *, loss_fn, tx, seed: int):
  rng = jax.random.fold_in(jax.random.key(seed), state['step'])  # a pure function of (seed, step), as the batches

  def f(params):
    variables = {'params': params}
    if 'batch_stats' in state:
      variables['batch_stats'] = state['batch_stats']
    return loss_fn(variables, batch, rng)

  (loss, (metrics, batch_stats)), grads = jax.value_and_grad(f, has_aux=True)(state['params'])
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  new = {'params': optax.apply_updates(state['params'], updates), 'opt_state': opt_state, 'step': state['step'] + 1}
  if 'batch_stats' in state:
    new['batch_stats'] = batch_stats
  return new, {'loss': loss, 'grad_norm': optax.tree.norm(grads), **metrics}


def _optimizer(stage_config) -> optax.GradientTransformation:
  """The stage's optimiser: 'sgd' (the paper's, sec 3.1 and Algorithm 1 step 3.5) or 'adam'."""
  parts = [optax.clip_by_global_norm(stage_config.grad_clip)] if stage_config.grad_clip > 0 else []
  if stage_config.get('optimizer', 'adam') == 'sgd':
    return optax.chain(*parts, optax.sgd(stage_config.learning_rate))
  return optax.chain(*parts, optax.adam(stage_config.learning_rate))


def load_imagenet_mobilenet(path: str, width_mult: float) -> dict:
  """torchvision mobilenet_v3_large weights (.pth / .safetensors) -> {'params', 'batch_stats'} of the plain
  network and 'head': its classifier's first layer (FC 1280), without the classification layer (any number of
  classes)."""
  state = torchvision_mobilenet.read_state_dict(path)
  classes = int(np.shape(state['classifier.3.weight'])[0]) if 'classifier.3.weight' in state else 0
  net = mobilenet_v3.MobileNetV3Large(num_classes=classes, width_mult=width_mult)
  expected = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  variables = torchvision_mobilenet.convert_state_dict(state, expected, path)
  head = variables['params'].get('classifier_0')
  variables['params'] = {k: v for k, v in variables['params'].items() if not k.startswith('classifier_')}
  if head is not None:
    variables['head'] = head
  return variables


def _merge(tree: dict, update: dict, source: str) -> dict:
  """`tree` with the leaves of `update` put in (same paths and shapes required)."""
  out = dict(tree)
  for key, value in update.items():
    if key not in tree:
      raise errors.UserError(f'{source}: {key!r} is not in the model (has {sorted(tree)[:8]})')
    if isinstance(value, dict):
      out[key] = _merge(tree[key], value, f'{source}/{key}')
    else:
      if tuple(np.shape(value)) != tuple(tree[key].shape):
        raise errors.UserError(f'{source}/{key}: shape {np.shape(value)}, the model expects {tree[key].shape}')
      out[key] = jnp.asarray(value, tree[key].dtype)
  return out


# Config fields a stage does not depend on (beyond the ones every stage ignores).
_IGNORED_BY_ALL = (
  'stages_from',
  'data_dir',
  'stages',
  'stage.relation',
  'model.power',
  'model.relation_hidden',
  'model.block_size',
  'eval_image_chunk',
  'eval_text_batch',
  'eval_metric',
  'log_every_steps',
  'checkpoint_every_steps',
  'keep_checkpoints',
  'data_info',
)
_IGNORED_BY = {
  'text': (
    'stage.image',
    'model.spatial_attention',
    'model.spatial_attention_at',
    'model.width_mult',
    'model.image_head_hidden',
    'model.image_dropout',
    'mobilenet_weights',
  ),
  'image': (
    'stage.text',
    'model.region_attention',
    'model.word_dim',
    'model.lstm_size',
    'model.attention_hidden',
    'word_vectors',
    'vocab_path',
    'vocab_min_count',
    'caption_buckets',
    'truncate_captions',
  ),
}


def _flat(tree: dict, prefix: str = '') -> dict:
  out = {}
  for key, value in tree.items():
    name = f'{prefix}{key}'
    out.update(_flat(value, name + '.') if isinstance(value, dict) else {name: value})
  return out


def stage_fields(config: dict, name: str) -> dict:
  """The flattened config fields stage `name` (text / image) depends on; lists and tuples compare equal."""
  ignored = _IGNORED_BY_ALL + _IGNORED_BY[name]
  flat = _flat(json.loads(json.dumps(config)))
  return {k: v for k, v in flat.items() if not any(k == i or k.startswith(i + '.') for i in ignored)}


_MISSING = object()


def _same_field(a: dict, b: dict, key: str) -> bool:
  """Equal values; a field missing on one side (a config written before it existed) equals its neutral default,
  0 or '', on the other."""
  x, y = a.get(key, _MISSING), b.get(key, _MISSING)
  if x is _MISSING or y is _MISSING:
    return (y if x is _MISSING else x) in (0, '')
  return x == y


def reuse_stage(name: str, config: ml_collections.ConfigDict, source: str, workdir: str) -> bool:
  """Copies `source`'s checkpoints of stage `name` into `workdir` if its stage fields equal ours (and `workdir` has
  none yet). Returns whether it did; prints why not otherwise."""
  target = os.path.join(workdir, 'stages', name)
  if os.path.isdir(os.path.join(target, 'checkpoints')):
    return False  # this run's own stage (resumed or done) wins
  src = os.path.join(source, 'stages', name)
  if not os.path.isdir(os.path.join(src, 'checkpoints')):
    raise errors.MissingFileError(
      f'config.stages_from = {source!r}: {src}/checkpoints not found; expected a DAER workdir '
      f'whose stage {name!r} has been trained.'
    )
  theirs = stage_fields(run_setup.load_config(source).to_dict(), name)
  ours = stage_fields(config.to_dict(), name)
  differ = sorted(k for k in set(theirs) | set(ours) if not _same_field(theirs, ours, k))
  if differ:
    print(f'stage {name}: not taken from {source} (fields differ: {", ".join(differ)})')
    return False
  shutil.copytree(src, target)
  print(f'stage {name}: checkpoints copied from {source} (every field stage {name} depends on is equal)')
  return True


class _Stage:
  """One stage's data, model call, optimiser and checkpoints."""

  def __init__(self, name, config, model, train, vocab, workdir):
    self.name = name
    self.config = config
    self.stage_config = config.stage[name]
    self.workdir = workdir if name == 'relation' else os.path.join(workdir, 'stages', name)
    image_labels, caption_labels = _split_labels(train)
    self.image_labels = image_labels
    self.caption_labels = caption_labels
    batch_size = self.stage_config.batch_size
    if name == 'image':
      self.images = inference.image_inputs(model, train.images)
      self.steps_per_epoch = len(image_labels) // batch_size
      if self.steps_per_epoch < 1:
        raise errors.UserError(f'config.stage.image.batch_size = {batch_size} exceeds the {len(image_labels)} images.')
    else:
      keys = ('pixels',) if name == 'relation' else ()
      images = {**{k: train.images[k] for k in keys}, 'label': image_labels}
      self.batcher = batching.TrainBatcher(
        images=images,
        image_keys=keys + ('label',),
        captions=[vocab.encode(c) for c in train.captions],
        caption_to_image=train.caption_to_image,
        batch_size=batch_size,
        seed=config.seed + STAGES.index(name),
        buckets=tuple(config.caption_buckets),
        truncate=bool(config.truncate_captions),
      )
      self.steps_per_epoch = self.batcher.steps_per_epoch

  def batch(self, step: int) -> dict:
    if self.name == 'image':
      idx = image_batch_indices(len(self.image_labels), self.stage_config.batch_size, self.config.seed, step)
      return {'images': {k: v[idx] for k, v in self.images.items()}, 'labels': self.image_labels[idx]}
    b = self.batcher.batch(step)
    labels = b['images'].pop('label')
    out = {'text': b['text'], 'labels': labels}
    if self.name == 'relation':
      out['images'] = b['images']
      out['image_labels'] = labels  # caption b is paired with image b, so they share the label
    return out

  def init(self, model, rng) -> dict:
    first = self.batch(0)
    if self.name == 'text':
      return model.init(rng, first['text'], method=model.classify_text)
    if self.name == 'image':
      return model.init(rng, first['images'], method=model.classify_image)
    return model.init(rng, first['images'], first['text'])


def _stage_variables(name, config, model, stage, previous, vocab):
  """Initial variables of a stage: fresh init, with the earlier stages' modules (and pre-trained weights) put in."""
  variables = jax.device_get(stage.init(model, jax.random.key(config.seed + 10 * STAGES.index(name))))
  variables = {k: dict(v) for k, v in variables.items()}
  params = variables['params']
  if name == 'text' and config.word_vectors:
    table, found = word_vectors.load_for_vocab(config.word_vectors, vocab, params['text']['embed']['embedding'])
    print(f'word vectors: {found} of {len(vocab)} vocabulary words found in {config.word_vectors}')
    params['text'] = _merge(params['text'], {'embed': {'embedding': table}}, config.word_vectors)
  if name == 'image' and config.mobilenet_weights:
    imagenet = load_imagenet_mobilenet(config.mobilenet_weights, config.model.width_mult)
    image = params['image']
    image['mobilenet'] = _merge(image['mobilenet'], imagenet['params'], config.mobilenet_weights)
    if 'head' in imagenet:
      image['head'] = _merge(image['head'], imagenet['head'], f'{config.mobilenet_weights} (classifier.0)')
    variables['batch_stats']['image'] = {
      'mobilenet': _merge(
        variables['batch_stats']['image']['mobilenet'], imagenet['batch_stats'], config.mobilenet_weights
      )
    }
  for module, collections in previous.items():  # trained modules of stages 1-2
    for collection, value in collections.items():
      if module in variables.get(collection, {}):
        variables[collection][module] = _merge(variables[collection][module], value, f'stage {module}')
  return variables


def _evaluate(name, model, variables, config, dev, vocab) -> dict:
  """Dev metrics: classification accuracy (stages 1-2) or mAP both ways (stage 3)."""
  image_labels, caption_labels = _split_labels(dev)
  tokens, mask = run_setup.encode_captions(vocab, dev.captions, config)
  if name == 'relation':
    scorer = inference.Scorer(
      model, variables, config.eval_image_chunk, config.eval_text_batch, desc=f'stage {name} dev scoring'
    )
    return metrics_lib.map_metrics(scorer.score(dev.images, tokens, mask), image_labels, caption_labels)
  if name == 'text':
    fn = jax.jit(lambda v, t: model.apply(v, t, method=model.classify_text))
    inputs, labels, chunk = {'tokens': tokens, 'mask': mask}, caption_labels, config.eval_text_batch
    unit = 'caption'
  else:
    fn = jax.jit(lambda v, x: model.apply(v, x, method=model.classify_image))
    inputs, labels, chunk = inference.image_inputs(model, dev.images), image_labels, config.eval_image_chunk
    unit = 'image'
  logits = inference.map_chunks(lambda x: fn(variables, x), inputs, chunk, desc=f'stage {name} dev', unit=unit)
  return {'accuracy': float(np.mean(np.asarray(logits).argmax(-1) == labels))}


def run_stage(name, config, model, train, dev, vocab, workdir, previous: dict, writer) -> tuple[dict, dict]:
  """Trains one stage (resuming). Returns (trained variables by module {module: {collection: tree}}, the last
  dev metrics)."""
  stage = _Stage(name, config, model, train, vocab, workdir)
  sc = stage.stage_config
  total = sc.num_epochs * stage.steps_per_epoch
  if sc.get('max_steps', 0):
    total = min(total, sc.max_steps)
  tx = _optimizer(sc)
  ckpts = checkpoints.RunCheckpoints(stage.workdir, keep=config.keep_checkpoints)
  variables = _stage_variables(name, config, model, stage, previous, vocab)
  mesh = Mesh(np.array(jax.devices()), ('data',))
  replicated, data_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  state = {**variables, 'opt_state': tx.init(variables['params']), 'step': jnp.zeros((), jnp.int32)}
  if not state.get('batch_stats'):
    state.pop('batch_stats', None)
  meta = {'best': -1.0, 'done': False}
  restored = ckpts.restore_latest(state)
  if restored is not None:
    state, meta = restored
  state = jax.device_put(state, replicated)
  modules = ('text',) if name == 'text' else ('image',) if name == 'image' else ('text', 'image', 'relation')

  def trained():
    out = {}
    for module in modules:
      out[module] = {
        c: jax.device_get(state[c][module]) for c in ('params', 'batch_stats') if c in state and module in state[c]
      }
    return out

  if meta.get('done'):
    print(f'stage {name}: done (step {int(state["step"])}), skipped')
    ckpts.close()
    return trained(), meta.get('dev', {})
  step_fn = jax.jit(
    functools.partial(_train_step, loss_fn=_losses(model)[name], tx=tx, seed=config.seed + 100 + STAGES.index(name)),
    in_shardings=(replicated, data_sharding),
    out_shardings=(replicated, replicated),
    donate_argnums=(0,),
  )
  start = int(state['step'])
  stop = f' (stop at step {total})' if total < sc.num_epochs * stage.steps_per_epoch else ''
  print(
    f'stage {name}: {stage.steps_per_epoch} steps/epoch x {sc.num_epochs} epochs{stop}, batch {sc.batch_size}, '
    f'lr {sc.learning_rate}' + (f', resumed at step {start}' if start else '')
  )
  pending, t0 = [], time.time()
  progress = progress_lib.bar(
    total=total, desc=f'stage {name}', unit='step', initial=start, disable=jax.process_index() != 0, delay=0
  )
  in_flight = None  # the last dispatched step's metrics, not yet known to be computed (as in train.py)
  try:
    for step in range(start, total):
      state, metrics = step_fn(state, jax.device_put(stage.batch(step), data_sharding))
      pending.append(metrics)
      # One step runs ahead of the host; the bar (and its ETA) counts completed steps.
      if in_flight is not None:
        jax.block_until_ready(in_flight)
        progress.update(1)
      in_flight = metrics
      done = step + 1
      end_of_epoch = done % stage.steps_per_epoch == 0
      if done % config.log_every_steps == 0 or end_of_epoch or done == total:
        fetched = jax.device_get(pending)
        progress.update(done - progress.n)  # device_get waited for every pending step
        in_flight = None
        summary = {f'{name}/{k}': float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
        if not np.isfinite(summary[f'{name}/loss']):
          raise FloatingPointError(
            f'stage {name}: loss is {summary[f"{name}/loss"]} before step {done}; the last '
            f'good checkpoint is kept in {stage.workdir}.'
          )
        summary[f'{name}/steps_per_s'] = len(fetched) / max(time.time() - t0, 1e-9)
        writer.write(done, summary)
        progress.set_postfix(loss=f'{summary[f"{name}/loss"]:.4f}')
        pending, t0 = [], time.time()
      if end_of_epoch or done == total:  # dev evaluation and a checkpoint at every epoch end and at the last step
        variables = {c: state[c] for c in ('params', 'batch_stats') if c in state}
        dev_metrics = _evaluate(name, model, variables, config, dev, vocab)
        writer.write(done, {f'{name}/dev_{k}': v for k, v in dev_metrics.items()})
        value = dev_metrics['mean_map' if name == 'relation' else 'accuracy']
        is_best = value > meta['best']
        meta.update(
          step=done,
          epoch=done / stage.steps_per_epoch,
          dev=dev_metrics,
          done=done == total,
          best=max(value, meta['best']),
        )
        ckpts.save(done, state, dict(meta), is_best=is_best and name == 'relation')
        progress_lib.write(
          f'stage {name} epoch {meta["epoch"]:.3g}: dev '
          + ', '.join(f'{k} {v:.4f}' for k, v in dev_metrics.items())
          + ('  *best*' if is_best else '')
        )
    if total == 0:
      meta['done'] = True
      ckpts.save(0, state, dict(meta))
  finally:
    progress.close()
    ckpts.close()
  return trained(), meta.get('dev', {})


def train_stages(config: ml_collections.ConfigDict, workdir: str, writer) -> dict:
  """Runs config.stages in order; returns the last stage's dev metrics."""
  check_stage_config(config)
  from xmatch_jax import train as train_lib  # pylint: disable=g-import-not-at-top (train imports this module)

  train = load_split(config.dataset, 'train', config.data_dir or None)
  dev = load_split(config.dataset, 'dev', config.data_dir or None)
  vocab = train_lib.prepare_vocab(config, workdir, train.captions)
  image_labels, _ = _split_labels(train)
  if config.model.num_classes <= int(image_labels.max()):
    raise errors.UserError(
      f'config.model.num_classes = {config.model.num_classes}, but dataset {config.dataset} has label '
      f'{int(image_labels.max())}; expected num_classes > every label.'
    )
  if jax.process_index() == 0:
    run_setup.save_config(config, workdir, 0)
  model = run_setup.build_model(config, len(vocab), 0, workdir)
  previous, dev_metrics = {}, {}
  for name in config.stages:
    if config.get('stages_from') and name != 'relation':
      if jax.process_index() == 0:
        for source in config.stages_from.split(','):  # the first source whose stage fields equal ours
          if reuse_stage(name, config, source.strip(), workdir):
            break
      if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f'stages_from {name}')  # the copy is on disk before anyone restores
    trained, dev_metrics = run_stage(name, config, model, train, dev, vocab, workdir, previous, writer)
    previous.update(trained)
  return dev_metrics
