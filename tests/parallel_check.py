"""Run in a subprocess with 8 fake CPU devices (tests/test_parallel.py): one training step of SCAN and RDAN on a
batch sharded over a `data` mesh equals the same step on one device; the sharded run's checkpoint is saved for the
parent (one device) to restore. Prints a JSON report."""

import functools
import json
import os
import sys

os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top
from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import rdan as rdan_config  # pylint: disable=g-import-not-at-top
from configs import scan as scan_config  # pylint: disable=g-import-not-at-top
from xmatch_jax import checkpoints  # pylint: disable=g-import-not-at-top
from xmatch_jax import losses  # pylint: disable=g-import-not-at-top
from xmatch_jax.models import build_model  # pylint: disable=g-import-not-at-top
from xmatch_jax.trainers import contrastive
from xmatch_jax.trainers import optim


def batch(seed, b=16, k=6, n=7, img_dim=10, vocab=20):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(2, n + 1, b)
  mask = (np.arange(n)[None] < lengths[:, None]).astype(np.float32)
  return {
    'images': {'regions': rng.normal(size=(b, k, img_dim)).astype(np.float32)},
    'text': {'tokens': (rng.integers(4, vocab, (b, n)) * mask).astype(np.int32), 'mask': mask},
    'image_ids': np.arange(b, dtype=np.int32) // 2,
  }  # pairs of captions share an image


def run(module, out_dir):
  config = module.get_config('shapes_tiny')
  config.model.embed_size = 16
  config.model.word_dim = 8
  config.model.block_size = 3
  model = build_model(config.model, vocab_size=20, img_dim=10)
  data = batch(0)
  params = model.init(jax.random.key(0), data['images'], data['text'])['params']
  tx, schedule = optim.make_optimizer(config.optim, 10)
  state = {'params': params, 'opt_state': tx.init(params), 'step': jnp.zeros((), jnp.int32)}
  step = functools.partial(contrastive.train_step, model=model, tx=tx, schedule=schedule, loss_cfg=config.loss)
  grads_fn = lambda s, x: jax.grad(
    lambda p: losses.contrastive_loss(
      model.apply({'params': p}, x['images'], x['text']),
      config.loss.margin,
      config.loss.max_violation,
      image_ids=x['image_ids'],
    )
  )(s['params'])

  one = jax.devices()[0]
  single_state, single_metrics = jax.jit(step)(jax.device_put(state, one), jax.device_put(data, one))
  single_grads = jax.jit(grads_fn)(jax.device_put(state, one), jax.device_put(data, one))

  mesh = Mesh(np.array(jax.devices()), ('data',))
  replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  state8, data8 = jax.device_put(state, replicated), jax.device_put(data, sharded)
  multi_state, multi_metrics = jax.jit(
    step, in_shardings=(replicated, sharded), out_shardings=(replicated, replicated)
  )(state8, data8)
  multi_grads = jax.jit(grads_fn, in_shardings=(replicated, sharded))(state8, data8)
  diff = lambda a, b: max(
    float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )
  ckpts = checkpoints.RunCheckpoints(os.path.join(out_dir, config.model.name))
  ckpts.save(1, multi_state, {'step': 1}, is_best=True)
  ckpts.close()
  # The other way: a checkpoint written on one device restores onto the 8-device mesh (replicated) unchanged.
  one_dir = os.path.join(out_dir, f'{config.model.name}_one_device')
  ckpts_one = checkpoints.RunCheckpoints(one_dir)
  ckpts_one.save(1, single_state, {'step': 1})
  ckpts_one.close()
  restored8, _ = checkpoints.RunCheckpoints(one_dir).restore_latest(jax.device_put(single_state, replicated))
  restore_diff = diff(restored8, single_state)
  restored_sharding = jax.tree.leaves(restored8['params'])[0].sharding
  # Scoring with the images sharded over the mesh equals scoring on one device.
  score = lambda s, x: model.apply({'params': s['params']}, x['images'], x['text'])
  scores_one = jax.jit(score)(jax.device_put(single_state, one), jax.device_put(data, one))
  scores_multi = jax.jit(score, in_shardings=(replicated, sharded))(jax.device_put(single_state, replicated), data8)
  np.savez(
    os.path.join(out_dir, f'{config.model.name}_params.npz'),
    **{jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(multi_state['params'])},
  )
  # Adam's first step is lr * g / (|g| + eps): for entries with |g| near eps it amplifies float noise in g to a
  # sizeable fraction of lr, so the step is compared where |g| > 1e-4 (everything else is equal through g itself).
  step_diff = max(
    float(np.max(np.where(np.abs(np.asarray(g)) > 1e-4, np.abs(np.asarray(a) - np.asarray(b)), 0)))
    for a, b, g in zip(
      jax.tree.leaves(single_state['params']), jax.tree.leaves(multi_state['params']), jax.tree.leaves(single_grads)
    )
  )
  return {
    'devices': len(jax.devices()),
    'step_diff': step_diff,
    'loss_single': float(single_metrics['loss']),
    'loss_multi': float(multi_metrics['loss']),
    'grad_diff': diff(single_grads, multi_grads),
    'param_diff': diff(single_state['params'], multi_state['params']),
    'opt_diff': diff(single_state['opt_state'], multi_state['opt_state']),
    'grad_scale': max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(single_grads)),
    'restore_one_to_mesh_diff': restore_diff,
    'restored_on_mesh': restored_sharding == replicated,
    'scores_diff': float(np.max(np.abs(np.asarray(scores_one) - np.asarray(scores_multi)))),
  }


if __name__ == '__main__':
  out = sys.argv[1]
  print(json.dumps({'scan': run(scan_config, out), 'rdan': run(rdan_config, out)}))
