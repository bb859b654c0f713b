"""Training: `python -m xmatch_jax.train --config=configs/scan.py:shapes --workdir=W [--config.key=value ...]`.

Resumes automatically from W's latest checkpoint. Writes W/config.json, W/vocab.json, W/metrics.jsonl,
TensorBoard logs in W/tb, checkpoints in W/checkpoints (latest) and W/best (best dev rsum).
Several processes (hosts): add `--coordinator=host:port --num_processes=N --process_id=i` to each, or run under
srun (SLURM is detected); see launch/. Each process loads its rows of every batch; process 0 writes the logs.
"""

import functools
import json
import os
import signal
import sys
import time

from absl import app
from absl import flags
from absl import logging as absl_logging
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
from ml_collections import config_flags
import numpy as np
import optax

from xmatch_jax import checkpoints
from xmatch_jax import cli
from xmatch_jax import errors
from xmatch_jax import inference
from xmatch_jax import losses
from xmatch_jax import metrics as metrics_lib
from xmatch_jax import parallel
from xmatch_jax import progress as progress_lib
from xmatch_jax import run_setup
from xmatch_jax.convert import hf_bert
from xmatch_jax.data import batching
from xmatch_jax.data import load_split
from xmatch_jax.data import vocab as vocab_lib
from xmatch_jax.data import wordpiece


def check_config(config: ml_collections.ConfigDict) -> None:
  """Impossible values are errors before any work starts."""
  rules = [
    ('batch_size', config.batch_size >= 2, 'an int >= 2 (the loss needs negatives)'),
    ('num_epochs', config.num_epochs >= 1, 'an int >= 1'),
    ('max_steps', config.max_steps >= 0, 'an int >= 0 (0: no limit but num_epochs)'),
    ('loss.margin', config.loss.margin >= 0, 'a float >= 0'),
    ('loss.warmup_epochs', 0 <= config.loss.warmup_epochs <= config.num_epochs, 'an int in [0, num_epochs]'),
    ('optim.learning_rate', config.optim.learning_rate > 0, 'a float > 0'),
    ('optim.grad_clip', config.optim.grad_clip >= 0, 'a float >= 0 (0 disables clipping)'),
    ('optim.lr_decay_factor', config.optim.lr_decay_factor > 0, 'a float > 0'),
    ('optim.warmup_steps', config.optim.warmup_steps >= 0, 'an int >= 0'),
    ('log_every_steps', config.log_every_steps >= 1, 'an int >= 1'),
    ('eval_every_epochs', config.eval_every_epochs >= 1, 'an int >= 1'),
    ('checkpoint_every_steps', config.checkpoint_every_steps >= 1, 'an int >= 1'),
    ('memory_budget_gb', config.memory_budget_gb >= 0, 'a float >= 0 (0: no budget)'),
    ('keep_checkpoints', config.keep_checkpoints >= 1, 'an int >= 1'),
    (
      'caption_buckets',
      len(config.caption_buckets) > 0 and min(config.caption_buckets) >= 1,
      'a non-empty tuple of ints >= 1',
    ),
    ('optim.lr_decay_epochs', config.optim.lr_decay_epochs >= 0, 'an int >= 0'),
    ('vocab_min_count', config.vocab_min_count >= 1, 'an int >= 1 (words seen fewer times become <unk>)'),
    (
      'vocab_path',
      not config.vocab_path or os.path.isfile(config.vocab_path),
      "'' (build the vocabulary from the training captions) or an existing SCAN vocab json or VSE++ vocab .pkl file",
    ),
    ('eval_image_chunk', config.eval_image_chunk >= 1, 'an int >= 1 (images per scoring tile)'),
    ('eval_text_batch', config.eval_text_batch >= 1, 'an int >= 1 (captions per encoding batch)'),
    ('eval_metric', config.eval_metric in ('recall', 'map'), "'recall' or 'map'"),
  ]
  if 'block_size' in config.model:
    rules.append(('model.block_size', config.model.block_size >= 1, 'an int >= 1 (images per scoring block)'))
  for name, ok, expected in rules:
    if not ok:
      value = functools.reduce(lambda c, k: c[k], name.split('.'), config)
      raise errors.UserError(f'config.{name} = {value!r} is impossible; expected {expected}.')


def make_optimizer(optim: ml_collections.ConfigDict, steps_per_epoch: int):
  """Adam with the official step decay, lr x lr_decay_factor ** (epoch // lr_decay_epochs) (SCAN's and GLFN's
  adjust_learning_rate: a 40-epoch run decaying every 15 decays twice), optional linear warm-up and clipping.

  Returns (optax transformation, learning-rate schedule).
  """
  decay_step = max(optim.lr_decay_epochs * steps_per_epoch, 1)
  lr, factor, warmup = optim.learning_rate, optim.lr_decay_factor, optim.warmup_steps

  def schedule(count):
    periods = count // decay_step if optim.lr_decay_epochs else jnp.minimum(count, 1)  # 0: decayed from step 1
    decayed = lr * factor**periods
    return jnp.where(count < warmup, lr * count / warmup, decayed) if warmup else decayed

  parts = [optax.clip_by_global_norm(optim.grad_clip)] if optim.grad_clip > 0 else []
  parts.append(optax.scale_by_adam())
  parts.append(optax.scale_by_learning_rate(schedule))
  return optax.chain(*parts), schedule


def train_step(state, batch, *, model, tx, schedule, loss_cfg, max_violation=None):
  """One optimiser step on the B x B score matrix of a batch. Returns (state, metrics).

  max_violation: overrides loss_cfg.max_violation (False during the sum-of-violations warm-up epochs).
  """
  hardest = loss_cfg.max_violation if max_violation is None else max_violation

  def loss_fn(params):
    scores = model.apply({'params': params}, batch['images'], batch['text'])
    image_ids = batch['image_ids'] if loss_cfg.mask_same_image else None
    return losses.contrastive_loss(scores, loss_cfg.margin, hardest, image_ids=image_ids)

  loss, grads = jax.value_and_grad(loss_fn)(state['params'])
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  params = optax.apply_updates(state['params'], updates)
  metrics = {
    'loss': loss,
    'grad_norm': optax.tree.norm(grads),
    'update_norm': optax.tree.norm(updates),
    'param_norm': optax.tree.norm(params),
    'learning_rate': schedule(state['step']),
  }
  return {'params': params, 'opt_state': opt_state, 'step': state['step'] + 1}, metrics


class MetricsWriter:
  """metrics.jsonl and TensorBoard, written by process 0 only."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    if self.enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
      self._tb = SummaryWriter(os.path.join(workdir, 'tb'))

  def write(self, step: int, values: dict) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({'step': step, **{k: float(v) for k, v in values.items()}}) + '\n')
    self._jsonl.flush()
    for k, v in values.items():
      self._tb.add_scalar(k, float(v), step)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def prepare_vocab(config, workdir: str, train_captions: list):
  """The caption vocabulary: kept from W when resuming; else SCAN's word vocabulary (from config.vocab_path or
  built from the training captions), or for BERT-based models the BERT's WordPiece tokenizer (copied to W/bert)."""
  if run_setup.uses_bert(config):
    bert_dir = run_setup.workdir_bert_dir(workdir)
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
  path = os.path.join(workdir, run_setup.VOCAB_FILE)
  if os.path.exists(path):  # resuming: keep the vocabulary the checkpoint was trained with
    return vocab_lib.Vocabulary.from_json(path)
  if config.vocab_path:
    vocab = vocab_lib.Vocabulary.load(config.vocab_path)
  else:
    vocab = vocab_lib.Vocabulary.build(train_captions, min_count=config.vocab_min_count)
  if jax.process_index() == 0:
    vocab.to_json(path)
  return vocab


def load_pretrained(config, params: dict) -> dict:
  """Puts the pre-trained weights a model starts from into freshly initialised params (the BERT of MMCA/GLFN)."""
  if not run_setup.uses_bert(config) or 'bert' not in params:
    return params
  _, bert, _ = hf_bert.load_checkpoint(config.model.bert_dir)
  bert.pop('pooler_dense', None)  # the matchers read token states, not the pooled [CLS]
  expected = jax.tree.map(lambda x: x.shape, params['bert'])
  got = jax.tree.map(lambda x: x.shape, bert)
  if expected != got:
    raise errors.UserError(f'{config.model.bert_dir}: BERT weights do not fit the model built from its config.json')
  return {**params, 'bert': jax.tree.map(jnp.asarray, bert)}


def freeze(tx, params: dict, frozen: tuple):
  """Leaves the top-level param groups named in `frozen` untouched (no optimizer state, zero updates)."""
  if not frozen:
    return tx
  labels = {
    name: jax.tree.map(lambda _, n=name: 'frozen' if n in frozen else 'train', group) for name, group in params.items()
  }
  return optax.multi_transform({'train': tx, 'frozen': optax.set_to_zero()}, labels)


def evaluate_dev(scorer: inference.Scorer, dev_images: dict, dev_tokens, dev_mask) -> dict:
  sims = scorer.score(dev_images, dev_tokens, dev_mask)
  return metrics_lib.recall_metrics(sims)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming if W has a checkpoint); returns the last dev metrics."""
  if 'stages' in config:  # DAER: classification stages, then the relation network (Algorithm 1)
    return _train_in_stages(config, workdir)
  check_config(config)
  os.makedirs(workdir, exist_ok=True)
  ckpts = checkpoints.RunCheckpoints(workdir, keep=config.keep_checkpoints)
  resuming = ckpts.has_checkpoint()
  if resuming:
    run_setup.check_same_model(run_setup.load_config(workdir), config, workdir)

  # Process 0 first: it generates a built-in dataset that is not there yet; the others then read it.
  train, dev = parallel.first_on_process_zero(
    lambda: tuple(load_split(config.dataset, split, config.data_dir or None) for split in ('train', 'dev')), 'data'
  )
  # Process 0 keeps or writes W's vocabulary first, the others then read it (every process read W before that).
  vocab = parallel.first_on_process_zero(lambda: prepare_vocab(config, workdir, train.captions), 'vocab')
  img_dim = run_setup.img_dim_of(train.images)
  if jax.process_index() == 0:
    run_setup.save_config(config, workdir, img_dim)
  model = run_setup.build_model(config, len(vocab), img_dim, workdir)

  train_inputs = inference.image_inputs(model, train.images)
  batcher = batching.TrainBatcher(
    images=train_inputs,
    image_keys=tuple(train_inputs),
    captions=[vocab.encode(c) for c in train.captions],
    caption_to_image=train.caption_to_image,
    batch_size=config.batch_size,
    seed=config.seed,
    buckets=tuple(config.caption_buckets),
    truncate=bool(config.truncate_captions),
  )
  dev_tokens, dev_mask = run_setup.encode_captions(vocab, dev.captions, config)
  steps_per_epoch = batcher.steps_per_epoch
  if batcher.num_truncated and jax.process_index() == 0:
    print(
      f'note: {batcher.num_truncated} training caption(s) are longer than {max(config.caption_buckets)} tokens and '
      'are truncated to it (config.truncate_captions=True).'
    )
  total_steps = config.num_epochs * steps_per_epoch
  if config.max_steps:
    total_steps = min(total_steps, config.max_steps)
  tx, schedule = make_optimizer(config.optim, steps_per_epoch)

  mesh = parallel.data_mesh()
  replicated = NamedSharding(mesh, P())
  data_sharding = NamedSharding(mesh, P('data'))
  if config.batch_size % mesh.size:
    raise errors.UserError(
      f'config.batch_size = {config.batch_size} does not divide over {mesh.size} devices; expected '
      f'a multiple of {mesh.size}.'
    )
  chief = jax.process_index() == 0

  first = batcher.batch(0)
  init_rng = jax.random.PRNGKey(config.seed)
  params = jax.jit(model.init, out_shardings=replicated)(init_rng, first['images'], first['text'])['params']
  if not resuming:
    params = jax.device_put(load_pretrained(config, params), replicated)
  tx = freeze(tx, params, getattr(model, 'frozen_params', ()))
  # Replicated before restoring: the checkpoint is read into this sharding (a single-device array restored on
  # each process could not become a global one).
  state = jax.device_put({'params': params, 'opt_state': tx.init(params), 'step': jnp.zeros((), jnp.int32)}, replicated)
  meta = {'best_rsum': -1.0}
  if resuming:
    restored = ckpts.restore_latest(state)
    if restored is not None:
      state, meta = restored
      if chief:
        print(f'resumed from {workdir} at step {int(state["step"])}')

  def make_step(max_violation, model=model):
    return jax.jit(
      functools.partial(
        train_step, model=model, tx=tx, schedule=schedule, loss_cfg=config.loss, max_violation=max_violation
      ),
      in_shardings=(replicated, data_sharding),
      out_shardings=(replicated, replicated),
      donate_argnums=(0,),
    )

  model, step_fn = plan_memory(
    config, model, make_step, state, parallel.shard_batch(batcher.batch(int(state['step'])), data_sharding)
  )
  # VSE++'s practice: the sum over all negatives for the first epochs, then the configured (hardest) loss.
  warmup_steps = config.loss.warmup_epochs * steps_per_epoch if config.loss.max_violation else 0
  warmup_fn = make_step(False, model) if warmup_steps else None
  collapse = CollapseWatch(losses.collapse_value(config.batch_size, config.loss.margin, config.loss.max_violation))
  n_params = sum(x.size for x in jax.tree.leaves(state['params']))
  if chief:
    print(
      f'{config.model.name} on {config.dataset}: {n_params:,} params, vocab {len(vocab)}, '
      f'{len(train.captions)} train captions, {steps_per_epoch} steps/epoch x {config.num_epochs} epochs'
      f'{f" (stop at step {total_steps})" if config.max_steps else ""}, {mesh.size} device(s) in '
      f'{jax.process_count()} process(es) ({jax.devices()[0].platform})'
    )

  writer = MetricsWriter(workdir)
  pending = []  # per-step metrics on device, fetched once per log interval
  dev_metrics = meta.get('dev', {})
  start = int(state['step'])
  progress = progress_lib.bar(total=total_steps, desc='train', unit='step', initial=start, disable=not chief, delay=0)
  t0 = time.time()
  stop = parallel.StopRequest()
  saved_at = start
  in_flight = None  # the last dispatched step's metrics, not yet known to be computed
  try:
    for step in range(start, total_steps):
      batch = parallel.shard_batch(batcher.batch(step), data_sharding)  # this process's rows of the global batch
      state, step_metrics = (warmup_fn if step < warmup_steps else step_fn)(state, batch)
      pending.append(step_metrics)
      # At most one step runs ahead of the host: the next batch is prepared while this step computes, the bar
      # (and its ETA) counts completed steps, and a stop request is acted on within a step.
      if in_flight is not None:
        jax.block_until_ready(in_flight)
        progress.update(1)
      in_flight = step_metrics
      done = step + 1
      end_of_epoch = done % steps_per_epoch == 0
      epoch = done // steps_per_epoch
      if done % config.log_every_steps == 0 or end_of_epoch or done == total_steps:
        summary = _flush(pending, done, workdir, meta, t0)
        progress.update(done - progress.n)  # _flush waited for every pending step
        in_flight = None
        writer.write(done, summary)
        if done > warmup_steps and collapse.update(summary['loss']) and chief:
          progress_lib.write(collapse.message(done))
        progress.set_postfix(loss=f'{summary["loss"]:.3f}')
        pending, t0 = [], time.time()
      if (end_of_epoch and epoch % config.eval_every_epochs == 0) or done == total_steps:
        # Every process scores dev alone on its first device; process 0's numbers decide for all.
        scorer = inference.Scorer(
          model,
          {'params': parallel.local_copy(state['params'])},
          config.eval_image_chunk,
          config.eval_text_batch,
          desc='dev scoring',
        )
        dev_metrics = parallel.agree(evaluate_dev(scorer, dev.images, dev_tokens, dev_mask))
        del scorer  # holds the params' buffers, which the next step donates
        writer.write(done, {f'dev_{k}': v for k, v in dev_metrics.items()})
        is_best = dev_metrics['rsum'] > meta['best_rsum']
        if is_best:
          meta['best_rsum'] = dev_metrics['rsum']
        meta.update(step=done, epoch=epoch if end_of_epoch else done / steps_per_epoch, dev=dev_metrics)
        ckpts.save(done, state, dict(meta), is_best=is_best)
        saved_at = done
        if chief:
          progress_lib.write(
            f'{f"epoch {epoch}" if end_of_epoch else f"step {done}"}: dev rsum '
            f'{dev_metrics["rsum"]:.1f} (R@1 i2t {dev_metrics["i2t_r1"]:.1f}, '
            f't2i {dev_metrics["t2i_r1"]:.1f}){"  *best*" if is_best else ""}'
          )
      elif done % config.checkpoint_every_steps == 0:
        if pending:
          writer.write(done, _flush(pending, done, workdir, meta, t0))
          pending, t0 = [], time.time()
        meta.update(step=done, epoch=done / steps_per_epoch)
        ckpts.save(done, state, dict(meta))
        saved_at = done
      if done < total_steps and stop.should_stop(done, config.log_every_steps):
        if pending:
          writer.write(done, _flush(pending, done, workdir, meta, t0))
          pending = []
        if saved_at != done:
          meta.update(step=done, epoch=done / steps_per_epoch)
          ckpts.save(done, state, dict(meta))
        raise Interrupted(stop.signum, done, workdir)
  finally:
    stop.close()
    progress.close()
    writer.close()
    ckpts.close()
  return dev_metrics


class Interrupted(Exception):
  """Training stopped on a signal after saving a checkpoint at `step`; the same command resumes it."""

  def __init__(self, signum: int, step: int, workdir: str):
    self.signum, self.step = signum, step
    super().__init__(
      f'stopped by signal {signal.Signals(signum).name} at step {step}; checkpoint saved in '
      f'{workdir}/checkpoints. Run the same command to resume.'
    )


def _train_in_stages(config: ml_collections.ConfigDict, workdir: str) -> dict:
  from xmatch_jax import train_stages  # pylint: disable=g-import-not-at-top (imports this module)

  if jax.process_count() > 1:
    raise errors.UserError(
      f'staged training (DAER) runs in one process (any number of local devices); got {jax.process_count()} processes.'
    )
  os.makedirs(workdir, exist_ok=True)
  if os.path.exists(os.path.join(workdir, run_setup.CONFIG_FILE)):
    run_setup.check_same_model(run_setup.load_config(workdir), config, workdir)
  writer = MetricsWriter(workdir)
  try:
    return train_stages.train_stages(config, workdir, writer)
  finally:
    writer.close()


def step_memory_bytes(step_fn, state, batch) -> dict:
  """XLA's memory analysis of one compiled training step, per device: arguments (params, optimizer state, batch),
  outputs and temporaries (activations kept for the backward pass, the pair blocks' tensors)."""
  stats = step_fn.lower(state, batch).compile().memory_analysis()
  out = {
    'arguments': stats.argument_size_in_bytes,
    'outputs': stats.output_size_in_bytes,
    'temporaries': stats.temp_size_in_bytes,
    'aliased': stats.alias_size_in_bytes,
  }
  out['peak'] = out['arguments'] + out['outputs'] + out['temporaries'] - out['aliased']
  return out


def plan_memory(config, model, make_step, state, batch):
  """Prints the per-device memory estimate of a training step before the first one; with
  config.memory_budget_gb > 0 halves the model's block_size (images per block of the all-pairs scorer) until the
  estimate fits. Returns (model, compiled step function)."""
  budget = config.memory_budget_gb * 1e9
  block = getattr(model, 'block_size', None)
  while True:
    step_fn = make_step(None, model)
    memory = step_memory_bytes(step_fn, state, batch)
    fits = not budget or memory['peak'] <= budget
    if jax.process_index() == 0:
      print(
        f'memory per device for one training step (XLA estimate'
        f'{f", block_size {block}" if block else ""}): {memory["peak"] / 1e9:.2f} GB (arguments '
        f'{memory["arguments"] / 1e9:.2f}, temporaries {memory["temporaries"] / 1e9:.2f})'
        f'{"" if fits else f" > budget {config.memory_budget_gb} GB"}'
      )
    if fits:
      return model, step_fn
    if not block or block == 1:
      raise errors.UserError(
        f'config.memory_budget_gb = {config.memory_budget_gb}: a training step needs '
        f'{memory["peak"] / 1e9:.2f} GB per device even at block_size {block or "-"}; lower '
        'config.batch_size or raise the budget.'
      )
    block = max(block // 2, 1)
    model = model.clone(block_size=block)


class CollapseWatch:
  """Notices a loss that sits at the value every collapsed (all-equal) score matrix gives, 2 B margin with hardest
  negatives: the embeddings stopped separating pairs (too high a learning rate, no warm-up, a data bug)."""

  def __init__(self, collapsed_loss: float, intervals: int = 5, tolerance: float = 0.02):
    self.collapsed_loss, self.intervals, self.tolerance = collapsed_loss, intervals, tolerance
    self.run = 0
    self.warned = False

  def update(self, loss: float) -> bool:
    """Records a logged mean loss; True once, when it has been at the collapse value for `intervals` logs."""
    near = abs(loss - self.collapsed_loss) <= self.tolerance * max(self.collapsed_loss, 1e-9)
    self.run = self.run + 1 if near else 0
    if self.run >= self.intervals and not self.warned:
      self.warned = True
      return True
    return False

  def message(self, step: int) -> str:
    return (
      f'warning: at step {step} the loss has been {self.collapsed_loss:.2f} (= 2 x batch x margin, every score '
      f'equal) for {self.run} log intervals: training may have collapsed. Try a lower learning rate or '
      'config.loss.warmup_epochs=1 (sum over negatives first, as VSE++).'
    )


def _flush(pending: list, step: int, workdir: str, meta: dict, t0: float) -> dict:
  """Fetches pending step metrics; stops the run on a non-finite loss (the last checkpoint stays as it is)."""
  fetched = jax.device_get(pending)
  losses_seen = np.array([m['loss'] for m in fetched])
  if not np.isfinite(losses_seen).all():
    bad = step - len(fetched) + int(np.argmax(~np.isfinite(losses_seen))) + 1
    raise FloatingPointError(
      f'loss is {losses_seen[~np.isfinite(losses_seen)][0]} at step {bad}; training stopped. The last good '
      f'checkpoint (step {meta.get("step", "none")}) is kept in {workdir}/checkpoints.'
    )
  summary = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
  summary['steps_per_s'] = len(fetched) / max(time.time() - t0, 1e-9)
  return summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
  parallel.initialize(
    flags.FLAGS.coordinator, flags.FLAGS.num_processes, flags.FLAGS.process_id, flags.FLAGS.cpu_collectives
  )
  print(parallel.topology(), flush=True)
  try:
    train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
  except FloatingPointError as e:
    raise SystemExit(f'error: {e}') from e
  except Interrupted as e:
    print(e, flush=True)
    sys.exit(128 + e.signum)  # the shell convention for "ended by this signal", after a clean save


if __name__ == '__main__':
  # Flags are defined here, not at import, so train and evaluate can be imported together.
  config_flags.DEFINE_config_file('config', None, 'Model config file, e.g. configs/scan.py:shapes.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, logs, eval).')
  flags.DEFINE_string(
    'coordinator',
    '',
    'host:port of process 0 in a multi-process run (or $XMATCH_COORDINATOR); '
    'not needed under srun, where SLURM is detected.',
  )
  flags.DEFINE_integer('num_processes', 0, 'Processes in the run, with --coordinator (or $XMATCH_NUM_PROCESSES).')
  flags.DEFINE_integer('process_id', -1, 'This process, 0 ... num_processes - 1 (or $XMATCH_PROCESS_ID).')
  flags.DEFINE_string(
    'cpu_collectives',
    '',
    "Cross-process collectives on CPU: 'gloo' or 'mpi' (or "
    '$XMATCH_CPU_COLLECTIVES); for several CPU processes, e.g. launch/localhost_cpu.sh.',
  )
  flags.mark_flags_as_required(['config', 'workdir'])
  with cli.user_errors():
    run_setup.check_config_overrides(sys.argv[1:])
  cli.run_absl(main)
