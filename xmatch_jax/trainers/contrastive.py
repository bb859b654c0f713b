"""The contrastive trainer (SCAN, VSE++, RDAN, MMCA, GLFN): the hinge loss over the B x B scores of each batch.

Resumes from W's latest checkpoint; writes W/config.json, the vocabulary, W/metrics.jsonl, TensorBoard logs in W/tb,
checkpoints in W/checkpoints (latest) and W/best (best dev rsum). Each process loads its rows of every batch;
process 0 writes the logs.
"""

import functools
import os

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import optax

from xmatch_jax import checkpoints
from xmatch_jax import errors
from xmatch_jax import inference
from xmatch_jax import losses
from xmatch_jax import metrics as metrics_lib
from xmatch_jax import models
from xmatch_jax import pairwise
from xmatch_jax import parallel
from xmatch_jax import progress as progress_lib
from xmatch_jax import run_setup
from xmatch_jax import workdirs
from xmatch_jax.convert import hf_bert
from xmatch_jax.data import batching
from xmatch_jax.data import load_split
from xmatch_jax.trainers import loop
from xmatch_jax.trainers import optim


def train_batcher(config: ml_collections.ConfigDict, model, vocab, train) -> batching.TrainBatcher:
  """The training batches of a run: (seed, step) -> the same global batch on every process."""
  inputs = model.image_inputs(train.images)
  return batching.TrainBatcher(
    images=inputs,
    image_keys=tuple(inputs),
    captions=[vocab.encode(c) for c in train.captions],
    caption_to_image=train.caption_to_image,
    batch_size=config.batch_size,
    seed=config.seed,
    buckets=tuple(config.caption_buckets),
    truncate=bool(config.truncate_captions),
  )


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
    (
      'checkpoint_every_minutes',
      config.get('checkpoint_every_minutes', 0.0) >= 0,
      'a float >= 0 (0: no saves by wall time)',
    ),
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


def train_step(state, batch, *, model, tx, schedule, loss_cfg, max_violation=None):
  """One optimiser step on the B x B score matrix of a batch. Returns (state, metrics).

  max_violation: overrides loss_cfg.max_violation (False during the sum-of-violations warm-up epochs).
  """
  hardest = loss_cfg.max_violation if max_violation is None else max_violation

  image_ids = batch['image_ids'] if loss_cfg.mask_same_image else None

  def loss_fn(params):
    if hardest and loss_cfg.get('rescore_hardest', True):
      return rescored_hardest_loss(
        model,
        {'params': params},
        batch,
        loss_cfg.margin,
        image_ids,
        width_chunk=loss_cfg.get('width_chunk', 0),
        pair_block=loss_cfg.get('pair_block', 0),
      )
    scores = model.apply({'params': params}, batch['images'], batch['text'])
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


def rescored_hardest_loss(
  model,
  variables: dict,
  batch: dict,
  margin: float,
  image_ids=None,
  width_chunk: int = 0,
  width_step: int = inference.TOKEN_STEP,
  pair_block: int = 0,
) -> jax.Array:
  """The hardest-negative loss with gradients through the 3 B pairs it depends on, not all B^2 (same value).

  The B x B scores are computed without gradient (no stored or rematerialised intermediates) to choose each row's
  and column's hardest negative; the positives and the chosen negatives are then scored again, pair by pair, with
  gradient. The gradient equals the dense `losses.contrastive_loss`'s, whose max passes no gradient to the other
  B^2 - 3 B pairs, except on exact ties (docs/fidelity.md, LOSS-4). This makes a step of a cross-attention head
  cost one all-pairs forward plus a 3 B-pair forward and backward (docs/architecture.md, "A training step").
  With `width_chunk` > 0 and a model that can cut its text rep's token axis, that forward scores the length-sorted
  captions `width_chunk` at a time at their chunk's width, a multiple of `width_step` (as evaluation does,
  `pairwise.score_by_caption_width`). With `pair_block` > 0 the 3 B pairs are scored (and backpropagated) that
  many at a time (on a CPU, blocks whose maps stay in cache run faster than one batch of 3 B); a model with
  `has_paired_scores` scores each block in one `paired_scores` call, the others vmap `pair_scores` over its pairs.
  """
  image_rep = model.apply(variables, batch['images'], method=model.encode_image)
  text_rep = model.apply(variables, batch['text'], method=model.encode_text)
  frozen = jax.lax.stop_gradient

  def all_pairs(text):
    return model.apply(frozen(variables), frozen(image_rep), text, method=model.pair_scores)

  lengths = model.text_lengths(text_rep, xp=jnp) if width_chunk else None
  if lengths is None:
    scores = all_pairs(frozen(text_rep))
  else:
    width = text_rep['mask'].shape[1]
    scores = pairwise.score_by_caption_width(
      all_pairs, model.trim_text_rep, frozen(text_rep), lengths, width, width_chunk, width_step
    )
  hard_caption, row_has_negative, hard_image, column_has_negative = losses.hardest_negatives(scores, image_ids)
  own = jnp.arange(scores.shape[0])
  image_index = jnp.concatenate([own, own, hard_image])
  caption_index = jnp.concatenate([own, hard_caption, own])

  def one_pair(image, text):
    one = functools.partial(jax.tree.map, lambda x: x[None])
    return model.apply(variables, one(image), one(text), method=model.pair_scores)[0, 0]

  def take(rep, index):
    return jax.tree.map(lambda x: jnp.take(x, index, axis=0), rep)

  pair_reps = (take(image_rep, image_index), take(text_rep, caption_index))
  if model.has_paired_scores:
    pairs = _in_pair_blocks(
      lambda reps: model.apply(variables, *reps, method=model.paired_scores), pair_reps, pair_block
    )
  elif pair_block:  # blocks of pairs whose maps stay in cache, forward and backward
    pairs = jax.lax.map(lambda pair: one_pair(*pair), pair_reps, batch_size=pair_block)
  else:
    pairs = jax.vmap(one_pair)(*pair_reps)
  positive, hard_caption_scores, hard_image_scores = jnp.split(pairs, 3)
  return losses.hardest_negative_loss(
    positive, hard_caption_scores, hard_image_scores, row_has_negative, column_has_negative, margin
  )


def _in_pair_blocks(score_fn, reps, block: int) -> jax.Array:
  """score_fn(reps) -> [P], called on `block` pairs at a time (the last call takes the remainder; 0: all at once)."""
  count = jax.tree.leaves(reps)[0].shape[0]
  if not block or block >= count:
    return score_fn(reps)
  full = count // block * block
  blocks = jax.tree.map(lambda x: x[:full].reshape(count // block, block, *x.shape[1:]), reps)
  scores = jax.lax.map(score_fn, blocks).reshape(full)
  if full == count:
    return scores
  return jnp.concatenate([scores, score_fn(jax.tree.map(lambda x: x[full:], reps))])


def load_pretrained(config: ml_collections.ConfigDict, params: dict) -> dict:
  """Puts the pre-trained weights a model starts from into freshly initialised params (the BERT of MMCA/GLFN)."""
  if not models.uses_bert(config.model.name) or 'bert' not in params:
    return params
  _, bert, _ = hf_bert.load_checkpoint(config.model.bert_dir)
  bert.pop('pooler_dense', None)  # the matchers read token states, not the pooled [CLS]
  expected = jax.tree.map(lambda x: x.shape, params['bert'])
  got = jax.tree.map(lambda x: x.shape, bert)
  if expected != got:
    raise errors.UserError(f'{config.model.bert_dir}: BERT weights do not fit the model built from its config.json')
  return {**params, 'bert': jax.tree.map(jnp.asarray, bert)}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming if W has a checkpoint); returns the last dev metrics."""
  check_config(config)
  os.makedirs(workdir, exist_ok=True)
  ckpts = checkpoints.RunCheckpoints(workdir, keep=config.keep_checkpoints)
  resuming = ckpts.has_checkpoint()
  if resuming:
    workdirs.check_same_model(workdirs.load_config(workdir), config, workdir)

  # Process 0 first: it generates a built-in dataset that is not there yet; the others then read it.
  train, dev = parallel.first_on_process_zero(
    lambda: tuple(load_split(config.dataset, split, config.data_dir or None) for split in ('train', 'dev')), 'data'
  )
  # Process 0 keeps or writes W's vocabulary first, the others then read it (every process read W before that).
  vocab = parallel.first_on_process_zero(lambda: workdirs.prepare_vocab(config, workdir, train.captions), 'vocab')
  img_dim = run_setup.img_dim_of(train.images)
  if jax.process_index() == 0:
    workdirs.save_config(config, workdir, img_dim)
  model = run_setup.build_model(config, len(vocab), img_dim, workdir)

  batcher = train_batcher(config, model, vocab, train)
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
  tx, schedule = optim.make_optimizer(config.optim, steps_per_epoch)

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
  tx = optim.freeze(tx, params, model.frozen_params)
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

  def make_step(model, max_violation=None):
    return jax.jit(
      functools.partial(
        train_step, model=model, tx=tx, schedule=schedule, loss_cfg=config.loss, max_violation=max_violation
      ),
      in_shardings=(replicated, data_sharding),
      out_shardings=(replicated, replicated),
      donate_argnums=(0,),
    )

  start = int(state['step'])
  model, step_fn = loop.plan_memory(
    config.memory_budget_gb, model, make_step, state, parallel.shard_batch(batcher.batch(start), data_sharding)
  )
  # VSE++'s practice: the sum over all negatives for the first epochs, then the configured (hardest) loss.
  warmup_steps = config.loss.warmup_epochs * steps_per_epoch if config.loss.max_violation else 0
  warmup_fn = make_step(model, False) if warmup_steps else None
  n_params = sum(x.size for x in jax.tree.leaves(state['params']))
  if chief:
    print(
      f'{config.model.name} on {config.dataset}: {n_params:,} params, vocab {len(vocab)}, '
      f'{len(train.captions)} train captions, {steps_per_epoch} steps/epoch x {config.num_epochs} epochs'
      f'{f" (stop at step {total_steps})" if config.max_steps else ""}, {mesh.size} device(s) in '
      f'{jax.process_count()} process(es) ({jax.devices()[0].platform})'
    )

  def step(index, state):
    batch = parallel.shard_batch(batcher.batch(index), data_sharding)  # this process's rows of the global batch
    return (warmup_fn if index < warmup_steps else step_fn)(state, batch)

  def evaluate(done, end_of_epoch, state):
    # The images are split over every device of every process (inference.Scorer); process 0's numbers decide.
    scorer = inference.Scorer(
      model,
      {'params': parallel.local_copy(state['params'])},
      config.eval_image_chunk,
      config.eval_text_batch,
      desc='dev scoring',
    )
    sims = scorer.score(dev.images, dev_tokens, dev_mask)
    dev_metrics = parallel.agree(metrics_lib.recall_metrics(sims, caption_to_image=dev.caption_to_image))
    del scorer  # holds the params' buffers, which the next step donates
    writer.write(done, {f'dev_{k}': v for k, v in dev_metrics.items()})
    is_best = dev_metrics['rsum'] > meta['best_rsum']
    if is_best:
      meta['best_rsum'] = dev_metrics['rsum']
    epoch = done // steps_per_epoch
    meta.update(step=done, epoch=epoch if end_of_epoch else done / steps_per_epoch, dev=dev_metrics)
    ckpts.save(done, state, dict(meta), is_best=is_best)
    if chief:
      progress_lib.write(
        f'{f"epoch {epoch}" if end_of_epoch else f"step {done}"}: dev rsum '
        f'{dev_metrics["rsum"]:.1f} (R@1 i2t {dev_metrics["i2t_r1"]:.1f}, '
        f't2i {dev_metrics["t2i_r1"]:.1f}){"  *best*" if is_best else ""}'
      )

  def save(done, state):
    meta.update(step=done, epoch=done / steps_per_epoch)
    ckpts.save(done, state, dict(meta))

  writer = loop.MetricsWriter(workdir)
  collapse = loop.CollapseWatch(losses.collapse_value(config.batch_size, config.loss.margin, config.loss.max_violation))
  steps = loop.StepLoop(
    workdir=workdir,
    writer=writer,
    total=total_steps,
    steps_per_epoch=steps_per_epoch,
    log_every=config.log_every_steps,
    eval_every=config.eval_every_epochs,
    checkpoint_every=config.checkpoint_every_steps,
    checkpoint_every_minutes=config.get('checkpoint_every_minutes', 0.0),
    collapse=collapse,
    watch_after=warmup_steps,
    check_saves=ckpts.check,
  )
  try:
    steps.run(
      state,
      start,
      step,
      evaluate,
      save,
      lambda: f'The last good checkpoint (step {meta.get("step", "none")}) is kept in {workdir}/checkpoints.',
    )
  finally:
    writer.close()
    ckpts.close()
  return meta.get('dev', {})
