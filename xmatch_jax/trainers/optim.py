"""Optimisers of the trainers: the SCAN-family step-decay Adam, DAER's per-stage SGD or Adam, frozen groups."""

import jax
import jax.numpy as jnp
import ml_collections
import optax

STAGE_OPTIMIZERS = ('sgd', 'adam')


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


def stage_optimizer(stage_config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """A DAER stage's optimiser: 'sgd' (the paper's, sec 3.1 and Algorithm 1 step 3.5) or 'adam', constant rate."""
  parts = [optax.clip_by_global_norm(stage_config.grad_clip)] if stage_config.grad_clip > 0 else []
  if stage_config.get('optimizer', 'adam') == 'sgd':
    return optax.chain(*parts, optax.sgd(stage_config.learning_rate))
  return optax.chain(*parts, optax.adam(stage_config.learning_rate))


def freeze(tx: optax.GradientTransformation, params: dict, frozen: tuple) -> optax.GradientTransformation:
  """Leaves the top-level param groups named in `frozen` untouched (no optimizer state, zero updates)."""
  if not frozen:
    return tx
  labels = {
    name: jax.tree.map(lambda _, n=name: 'frozen' if n in frozen else 'train', group) for name, group in params.items()
  }
  return optax.multi_transform({'train': tx, 'frozen': optax.set_to_zero()}, labels)
