"""The staged trainer, DAER's Algorithm 1: `python -m xmatch_jax.train --config=configs/daer.py:shapes --workdir=W`.

  stage 1 `text`:     text module + a linear classifier, cross-entropy on category labels;
  stage 2 `image`:    image module + MobileNetV3's classifier head, cross-entropy;
  stage 3 `relation`: the classifier heads dropped, the relation network trained with eq 11 on all B x B pairs of
                      a batch, text and image modules fine-tuned.

Each stage is a small object (`TextStage`, `ImageStage`, `RelationStage`): its batches, loss, dev metric and the
modules it trains; one loop (trainers/loop.py) runs them all. Stages 1-2 checkpoint into W/stages/<stage>/, stage 3
into W/checkpoints and W/best (best dev mean mAP), so `xmatch_jax.evaluate` and the Retriever read it like any
other run. Every stage resumes from its own latest checkpoint; a finished stage (meta `done`) is skipped. Batches
and dropout are pure functions of (seed, stage, step). One process (any number of local devices).

`config.stages_from = 'W0[,W1...]'` starts stages 1-2 from the first of those runs whose stage has every config field
it depends on equal to ours (a Table 3 sweep trains the text module once for DAER, DAER-T and DAER-I-T). Training is
deterministic, so the copy is the stage this run would have trained. Stages whose fields differ are trained here.
"""

import functools
import json
import os
import shutil

import jax
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
from xmatch_jax import workdirs
from xmatch_jax.convert import torchvision_mobilenet
from xmatch_jax.data import batching
from xmatch_jax.data import load_split
from xmatch_jax.data import word_vectors
from xmatch_jax.models import daer as daer_lib
from xmatch_jax.trainers import loop
from xmatch_jax.trainers import optim

STAGE_ORDER = ('text', 'image', 'relation')


def check_stage_config(config: ml_collections.ConfigDict) -> None:
  for stage in config.stages:
    if stage not in STAGE_ORDER:
      raise errors.UserError(f'config.stages holds {stage!r}; expected a sub-sequence of {STAGE_ORDER}.')
  for stage in STAGE_ORDER:
    s = config.stage[stage]
    for field, ok, expected in (
      ('num_epochs', s.num_epochs >= 0, 'an int >= 0'),
      ('max_steps', s.get('max_steps', 0) >= 0, 'an int >= 0 (0: num_epochs only)'),
      ('batch_size', s.batch_size >= 2, 'an int >= 2'),
      ('learning_rate', s.learning_rate > 0, 'a float > 0'),
      ('optimizer', s.get('optimizer', 'adam') in optim.STAGE_OPTIMIZERS, f'one of {optim.STAGE_OPTIMIZERS}'),
    ):
      if not ok:
        raise errors.UserError(f'config.stage.{stage}.{field} = {s[field]!r} is impossible; expected {expected}.')


def split_labels(split) -> tuple[np.ndarray, np.ndarray]:
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


def merge(tree: dict, update: dict, source: str) -> dict:
  """`tree` with the leaves of `update` put in (same paths and shapes required)."""
  out = dict(tree)
  for key, value in update.items():
    if key not in tree:
      raise errors.UserError(f'{source}: {key!r} is not in the model (has {sorted(tree)[:8]})')
    if isinstance(value, dict):
      out[key] = merge(tree[key], value, f'{source}/{key}')
    else:
      if tuple(np.shape(value)) != tuple(tree[key].shape):
        raise errors.UserError(f'{source}/{key}: shape {np.shape(value)}, the model expects {tree[key].shape}')
      out[key] = jnp.asarray(value, tree[key].dtype)
  return out


class Stage:
  """One stage of Algorithm 1 over the training split: batches, loss, initial variables, dev metric.

  Subclasses set `name`, `modules` (the model's modules this stage trains and hands on) and `best_key` (the dev
  metric its checkpoints are ranked by).
  """

  name: str
  modules: tuple
  best_key: str

  def __init__(self, config: ml_collections.ConfigDict, model, train, vocab, workdir: str):
    self.config, self.model, self.vocab = config, model, vocab
    self.stage_config = config.stage[self.name]
    self.index = STAGE_ORDER.index(self.name)  # seeds of batches, init and dropout (kept from the first layout)
    self.workdir = workdirs.stage_dir(workdir, self.name)
    self.image_labels, self.caption_labels = split_labels(train)

  def _caption_batcher(self, train, image_keys: tuple) -> batching.TrainBatcher:
    images = {**{k: train.images[k] for k in image_keys}, 'label': self.image_labels}
    return batching.TrainBatcher(
      images=images,
      image_keys=image_keys + ('label',),
      captions=[self.vocab.encode(c) for c in train.captions],
      caption_to_image=train.caption_to_image,
      batch_size=self.stage_config.batch_size,
      seed=self.config.seed + self.index,
      buckets=tuple(self.config.caption_buckets),
      truncate=bool(self.config.truncate_captions),
    )

  def batch(self, step: int) -> dict:
    raise NotImplementedError

  def init(self, rng) -> dict:
    raise NotImplementedError

  @staticmethod
  def loss(model, variables, batch, rng):
    """-> (loss, (metrics, new batch_stats or None)); rng drives dropout."""
    raise NotImplementedError

  def evaluate(self, variables, dev) -> dict:
    raise NotImplementedError

  def pretrained(self, variables: dict) -> dict:
    """Puts the configured pre-trained weights into fresh variables (none by default)."""
    return variables

  def _classify_dev(self, variables, method, inputs, labels, chunk: int, unit: str) -> dict:
    fn = jax.jit(lambda v, x: self.model.apply(v, x, method=method))
    logits = inference.map_chunks(lambda x: fn(variables, x), inputs, chunk, desc=f'stage {self.name} dev', unit=unit)
    return {'accuracy': float(np.mean(np.asarray(logits).argmax(-1) == labels))}


class TextStage(Stage):
  """Stage 1: the text module and a linear classifier over its 1 x 300 representation."""

  name, modules, best_key = 'text', ('text',), 'accuracy'

  def __init__(self, config, model, train, vocab, workdir):
    super().__init__(config, model, train, vocab, workdir)
    self.batcher = self._caption_batcher(train, ())
    self.steps_per_epoch = self.batcher.steps_per_epoch

  def batch(self, step):
    b = self.batcher.batch(step)
    return {'text': b['text'], 'labels': b['images'].pop('label')}

  def init(self, rng):
    return self.model.init(rng, self.batch(0)['text'], method=self.model.classify_text)

  @staticmethod
  def loss(model, variables, batch, rng):
    del rng
    logits = model.apply(variables, batch['text'], method=model.classify_text)
    labels = batch['labels']
    return _cross_entropy(logits, labels), ({'accuracy': jnp.mean(logits.argmax(-1) == labels)}, None)

  def evaluate(self, variables, dev):
    tokens, mask = run_setup.encode_captions(self.vocab, dev.captions, self.config)
    _, caption_labels = split_labels(dev)
    inputs = {'tokens': tokens, 'mask': mask}
    return self._classify_dev(
      variables, self.model.classify_text, inputs, caption_labels, self.config.eval_text_batch, 'caption'
    )

  def pretrained(self, variables):
    if self.config.word_vectors:
      params = variables['params']
      table, found = word_vectors.load_for_vocab(
        self.config.word_vectors, self.vocab, params['text']['embed']['embedding']
      )
      print(f'word vectors: {found} of {len(self.vocab)} vocabulary words found in {self.config.word_vectors}')
      params['text'] = merge(params['text'], {'embed': {'embedding': table}}, self.config.word_vectors)
    return variables


class ImageStage(Stage):
  """Stage 2: the image module and a classification layer over its 1 x 300 representation (dropout, BatchNorm)."""

  name, modules, best_key = 'image', ('image',), 'accuracy'

  def __init__(self, config, model, train, vocab, workdir):
    super().__init__(config, model, train, vocab, workdir)
    batch_size = self.stage_config.batch_size
    self.images = model.image_inputs(train.images)
    self.steps_per_epoch = len(self.image_labels) // batch_size
    if self.steps_per_epoch < 1:
      raise errors.UserError(
        f'config.stage.image.batch_size = {batch_size} exceeds the {len(self.image_labels)} images.'
      )

  def batch(self, step):
    idx = image_batch_indices(len(self.image_labels), self.stage_config.batch_size, self.config.seed, step)
    return {'images': {k: v[idx] for k, v in self.images.items()}, 'labels': self.image_labels[idx]}

  def init(self, rng):
    return self.model.init(rng, self.batch(0)['images'], method=self.model.classify_image)

  @staticmethod
  def loss(model, variables, batch, rng):
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

  def evaluate(self, variables, dev):
    image_labels, _ = split_labels(dev)
    inputs = self.model.image_inputs(dev.images)
    return self._classify_dev(
      variables, self.model.classify_image, inputs, image_labels, self.config.eval_image_chunk, 'image'
    )

  def pretrained(self, variables):
    path = self.config.mobilenet_weights
    if path:
      imagenet = torchvision_mobilenet.load_imagenet_mobilenet(path, self.config.model.width_mult)
      image = variables['params']['image']
      image['mobilenet'] = merge(image['mobilenet'], imagenet['params'], path)
      if 'head' in imagenet and 'head' in image:  # no 'head' when `image_head_hidden` is 0 (DAER-2)
        image['head'] = merge(image['head'], imagenet['head'], f'{path} (classifier.0)')
      stats = variables['batch_stats']['image']['mobilenet']
      variables['batch_stats']['image'] = {'mobilenet': merge(stats, imagenet['batch_stats'], path)}
    return variables


class RelationStage(Stage):
  """Stage 3: the relation network on all B x B pairs of a batch (eq 11), both modules fine-tuned; the run's
  checkpoints (W/checkpoints, W/best)."""

  name, modules, best_key = 'relation', ('text', 'image', 'relation'), 'mean_map'

  def __init__(self, config, model, train, vocab, workdir):
    super().__init__(config, model, train, vocab, workdir)
    self.workdir = workdir
    self.batcher = self._caption_batcher(train, ('pixels',))
    self.steps_per_epoch = self.batcher.steps_per_epoch

  def batch(self, step):
    b = self.batcher.batch(step)
    labels = b['images'].pop('label')
    # caption b is paired with image b, so they share the label
    return {'text': b['text'], 'labels': labels, 'images': b['images'], 'image_labels': labels}

  def init(self, rng):
    first = self.batch(0)
    return self.model.init(rng, first['images'], first['text'])

  @staticmethod
  def loss(model, variables, batch, rng):
    scores, updates = model.apply(
      variables, batch['images'], batch['text'], train=True, mutable=['batch_stats'], rngs={'dropout': rng}
    )
    loss = daer_lib.relation_loss(scores.T, batch['labels'], batch['image_labels'])  # eq 11, [T, I]
    return loss, ({'mean_score': jnp.mean(scores)}, updates['batch_stats'])

  def evaluate(self, variables, dev):
    image_labels, caption_labels = split_labels(dev)
    tokens, mask = run_setup.encode_captions(self.vocab, dev.captions, self.config)
    scorer = inference.Scorer(
      self.model,
      variables,
      self.config.eval_image_chunk,
      self.config.eval_text_batch,
      desc='stage relation dev scoring',
    )
    return metrics_lib.map_metrics(scorer.score(dev.images, tokens, mask), image_labels, caption_labels)


STAGES = {cls.name: cls for cls in (TextStage, ImageStage, RelationStage)}


def train_step(state, batch, *, loss_fn, tx, seed: int):
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
  'checkpoint_every_minutes',
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
  target = workdirs.stage_dir(workdir, name)
  if os.path.isdir(workdirs.checkpoints_dir(target)):
    return False  # this run's own stage (resumed or done) wins
  src = workdirs.stage_dir(source, name)
  if not os.path.isdir(workdirs.checkpoints_dir(src)):
    raise errors.MissingFileError(
      f'config.stages_from = {source!r}: {src}/checkpoints not found; expected a DAER workdir '
      f'whose stage {name!r} has been trained.'
    )
  theirs = stage_fields(workdirs.load_config(source).to_dict(), name)
  ours = stage_fields(config.to_dict(), name)
  differ = sorted(k for k in set(theirs) | set(ours) if not _same_field(theirs, ours, k))
  if differ:
    print(f'stage {name}: not taken from {source} (fields differ: {", ".join(differ)})')
    return False
  shutil.copytree(src, target)
  print(f'stage {name}: checkpoints copied from {source} (every field stage {name} depends on is equal)')
  return True


def initial_variables(stage: Stage, previous: dict) -> dict:
  """Fresh variables of a stage with its pre-trained weights and the earlier stages' trained modules put in."""
  config = stage.config
  variables = jax.device_get(stage.init(jax.random.key(config.seed + 10 * stage.index)))
  variables = stage.pretrained({k: dict(v) for k, v in variables.items()})
  for module, collections in previous.items():  # trained modules of stages 1-2
    for collection, value in collections.items():
      if module in variables.get(collection, {}):
        variables[collection][module] = merge(variables[collection][module], value, f'stage {module}')
  return variables


def run_stage(stage: Stage, dev, writer: loop.MetricsWriter, previous: dict) -> tuple[dict, dict]:
  """Trains one stage (resuming). Returns (trained variables by module {module: {collection: tree}}, the last
  dev metrics)."""
  config, sc, name = stage.config, stage.stage_config, stage.name
  total = sc.num_epochs * stage.steps_per_epoch
  if sc.get('max_steps', 0):
    total = min(total, sc.max_steps)
  tx = optim.stage_optimizer(sc)
  ckpts = checkpoints.RunCheckpoints(stage.workdir, keep=config.keep_checkpoints)
  variables = initial_variables(stage, previous)
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

  def trained(state):
    return {
      module: {
        c: jax.device_get(state[c][module]) for c in ('params', 'batch_stats') if c in state and module in state[c]
      }
      for module in stage.modules
    }

  if meta.get('done'):
    print(f'stage {name}: done (step {int(state["step"])}), skipped')
    ckpts.close()
    return trained(state), meta.get('dev', {})
  step_fn = jax.jit(
    functools.partial(
      train_step, loss_fn=functools.partial(stage.loss, stage.model), tx=tx, seed=config.seed + 100 + stage.index
    ),
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

  def step(index, state):
    return step_fn(state, jax.device_put(stage.batch(index), data_sharding))

  def evaluate(done, end_of_epoch, state):
    del end_of_epoch
    dev_metrics = stage.evaluate({c: state[c] for c in ('params', 'batch_stats') if c in state}, dev)
    writer.write(done, {f'{name}/dev_{k}': v for k, v in dev_metrics.items()})
    value = dev_metrics[stage.best_key]
    is_best = value > meta['best']
    meta.update(
      step=done, epoch=done / stage.steps_per_epoch, dev=dev_metrics, done=done == total, best=max(value, meta['best'])
    )
    ckpts.save(done, state, dict(meta), is_best=is_best and isinstance(stage, RelationStage))
    progress_lib.write(
      f'stage {name} epoch {meta["epoch"]:.3g}: dev '
      + ', '.join(f'{k} {v:.4f}' for k, v in dev_metrics.items())
      + ('  *best*' if is_best else '')
    )

  def save(done, state):
    meta.update(step=done, epoch=done / stage.steps_per_epoch)
    ckpts.save(done, state, dict(meta))

  steps = loop.StepLoop(
    workdir=stage.workdir,
    writer=writer,
    total=total,
    steps_per_epoch=stage.steps_per_epoch,
    log_every=config.log_every_steps,
    checkpoint_every=config.checkpoint_every_steps,
    checkpoint_every_minutes=config.get('checkpoint_every_minutes', 0.0),
    desc=f'stage {name}',
    prefix=f'{name}/',
    check_saves=ckpts.check,
  )
  try:
    state = steps.run(
      state,
      start,
      step,
      evaluate,
      save,
      lambda: f'The last good checkpoint (step {meta.get("step", "none")}) is kept in {stage.workdir}/checkpoints.',
    )
    if total == 0:
      meta['done'] = True
      ckpts.save(0, state, dict(meta))
  finally:
    ckpts.close()
  return trained(state), meta.get('dev', {})


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs config.stages in order (each resuming or skipped when done); returns the last stage's dev metrics."""
  if jax.process_count() > 1:
    raise errors.UserError(
      f'staged training (DAER) runs in one process (any number of local devices); got {jax.process_count()} processes.'
    )
  check_stage_config(config)
  os.makedirs(workdir, exist_ok=True)
  if os.path.exists(workdirs.config_path(workdir)):
    workdirs.check_same_model(workdirs.load_config(workdir), config, workdir)
  train = load_split(config.dataset, 'train', config.data_dir or None)
  dev = load_split(config.dataset, 'dev', config.data_dir or None)
  vocab = workdirs.prepare_vocab(config, workdir, train.captions)
  image_labels, _ = split_labels(train)
  if config.model.num_classes <= int(image_labels.max()):
    raise errors.UserError(
      f'config.model.num_classes = {config.model.num_classes}, but dataset {config.dataset} has label '
      f'{int(image_labels.max())}; expected num_classes > every label.'
    )
  workdirs.save_config(config, workdir, 0)
  model = run_setup.build_model(config, len(vocab), 0, workdir)
  writer = loop.MetricsWriter(workdir)
  previous, dev_metrics = {}, {}
  try:
    for name in config.stages:
      if config.get('stages_from') and name != 'relation':
        for source in config.stages_from.split(','):  # the first source whose stage fields equal ours
          if reuse_stage(name, config, source.strip(), workdir):
            break
      stage = STAGES[name](config, model, train, vocab, workdir)
      trained, dev_metrics = run_stage(stage, dev, writer, previous)
      previous.update(trained)
  finally:
    writer.close()
  return dev_metrics
