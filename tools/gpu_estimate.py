"""On-paper GPU estimate of one training step at a paper batch size: FLOPs and bytes from XLA, time on a given GPU.

  python tools/gpu_estimate.py --config=configs/rdan.py:f30k
  python tools/gpu_estimate.py --config=configs/mmca.py:f30k --bert=base --batch=64 --json=mmca_h100.json

The step (encoders, all B x B pairs, hinge loss, backward, Adam) is compiled for the CPU with abstract inputs (no
arrays are allocated, nothing runs) at the paper's sizes: k regions of 2048-d features, captions of n tokens, the
config's block size with jax.checkpoint as in training. XLA's cost analysis of the compiled step gives its FLOPs and
the bytes its operations read and write; a while loop (the blocks of images) is counted once by XLA, so the step is
compiled as one block (block_size = batch) for the count (the FLOPs and bytes of all blocks together are the same).

The predicted time is max(FLOPs / (efficiency x peak), bytes / (efficiency x bandwidth)) with the GPU's datasheet
figures (default: H100 SXM, 989 TFLOP/s dense bf16, 495 TF32, 3.35 TB/s HBM3) and efficiencies 0.5 (matmul-heavy
steps rarely sustain more) and 0.7. The CPU compiler fuses less than the GPU one, so its bytes are an upper bound
on the GPU's memory traffic. It is an estimate of where the step is bound, not a measurement.
"""

import json
import os
import sys
import tempfile

from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from xmatch_jax import cli
from xmatch_jax import errors

# bert-base-uncased's config.json (the paper configs' BERT), for shapes only: no weights are read.
BERT_BASE = {
  'architectures': ['BertModel'],
  'attention_probs_dropout_prob': 0.1,
  'hidden_act': 'gelu',
  'hidden_dropout_prob': 0.1,
  'hidden_size': 768,
  'initializer_range': 0.02,
  'intermediate_size': 3072,
  'layer_norm_eps': 1e-12,
  'max_position_embeddings': 512,
  'model_type': 'bert',
  'num_attention_heads': 12,
  'num_hidden_layers': 12,
  'pad_token_id': 0,
  'type_vocab_size': 2,
  'vocab_size': 30522,
}

GPUS = {  # dense peak FLOP/s by compute dtype, HBM bytes/s (datasheets)
  'h100_sxm': {'bfloat16': 989e12, 'float32': 495e12, 'bandwidth': 3.35e12},  # float32 matmuls as TF32
  'a100_sxm': {'bfloat16': 312e12, 'float32': 156e12, 'bandwidth': 2.04e12},
}


def batch_shapes(model, b: int, k: int, n: int, img_dim: int) -> dict:
  """Abstract training batch of `b` pairs for `model`: the shapes of the benchmark's random batch (the model's own
  input fields, e.g. GLFN's block positions and tag tokens), as jax.ShapeDtypeStruct leaves."""
  import jax
  import numpy as np

  del img_dim  # the model's own
  images, text = model.example_inputs(batch=b, regions=k, words=n)
  batch = {'images': images, 'text': text, 'image_ids': np.arange(b, dtype=np.int32)}
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(np.shape(x), jax.dtypes.canonicalize_dtype(np.asarray(x).dtype)), batch
  )


def step_cost(config, b: int, k: int, n: int, img_dim: int) -> dict:
  """{'flops', 'bytes'} of one compiled training step (one block of b images), from XLA's cost analysis."""
  import functools

  import jax
  import jax.numpy as jnp

  from xmatch_jax import models
  from xmatch_jax.models import build_model
  from xmatch_jax.trainers import contrastive
  from xmatch_jax.trainers import optim

  if config.get('trainer', 'contrastive') != 'contrastive':
    raise errors.UserError(
      f'{config.model.name!r} trains with the {config.trainer!r} trainer; this estimate covers the contrastive '
      "trainer's step (xmatch_jax/trainers/contrastive.py)"
    )
  vocab_size = 10000
  if models.uses_bert(config.model.name):
    from xmatch_jax.data import bert_dir  # pylint: disable=g-import-not-at-top
    from xmatch_jax.models.bert import BertConfig  # pylint: disable=g-import-not-at-top

    bert_json = os.path.join(bert_dir.resolve_dir(config.model.bert_dir), 'config.json')
    vocab_size = BertConfig.from_json(bert_json).vocab_size
  if 'block_size' in config.model:
    config.model.block_size = b
  for field in ('conv_impl', 'attention_impl'):  # the compiled CPU kernels' switches (RDAN, MMCA)
    if field in config.model:
      config.model[field] = 'xla'  # what a GPU runs (and what XLA's cost analysis can count)
  model = build_model(config.model, vocab_size=vocab_size, img_dim=img_dim)
  batch = batch_shapes(model, b, k, n, img_dim)
  params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x['images'], x['text']), batch)['params']
  tx, schedule = optim.make_optimizer(config.optim, steps_per_epoch=1000)
  tx = optim.freeze(tx, params, model.frozen_params)
  state = {'params': params, 'opt_state': jax.eval_shape(tx.init, params), 'step': jax.ShapeDtypeStruct((), jnp.int32)}
  # Every caption here has n tokens, so scoring by caption width would save nothing, and the 3 B pairs go in one
  # batch, as a GPU would run them. XLA's cost analysis would undercount both: RDAN f30k counts 0.134 TFLOP with the
  # width chunks' lax.switch and 0.293 with the pair blocks' loop, against 0.318 (~0.33 analytically) without.
  loss_cfg = config.loss.copy_and_resolve_references()
  loss_cfg.width_chunk, loss_cfg.pair_block = 0, 0
  step = jax.jit(functools.partial(contrastive.train_step, model=model, tx=tx, schedule=schedule, loss_cfg=loss_cfg))
  cost = step.lower(state, batch).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  n_params = sum(int(x.size) for x in jax.tree.leaves(params))
  return {'flops': float(cost['flops']), 'bytes': float(cost['bytes accessed']), 'params': n_params}


def predict(cost: dict, gpu: str, dtype: str, flop_efficiency: float, byte_efficiency: float) -> dict:
  spec = GPUS[gpu]
  compute_s = cost['flops'] / (flop_efficiency * spec[dtype])
  memory_s = cost['bytes'] / (byte_efficiency * spec['bandwidth'])
  return {
    'compute_ms': 1e3 * compute_s,
    'memory_ms': 1e3 * memory_s,
    'step_ms': 1e3 * max(compute_s, memory_s),
    'bound': 'compute' if compute_s >= memory_s else 'memory',
  }


FLAGS = flags.FlagValues()
flags.DEFINE_string('config', None, 'e.g. configs/rdan.py:f30k', flag_values=FLAGS)
flags.DEFINE_integer('batch', 0, "pairs per step (default: the config's batch_size)", flag_values=FLAGS)
flags.DEFINE_integer('k', 36, 'regions per image', flag_values=FLAGS)
flags.DEFINE_integer('n', 16, 'caption length in tokens (the bucket F30K captions fill)', flag_values=FLAGS)
flags.DEFINE_integer('img_dim', 2048, 'region feature dimension', flag_values=FLAGS)
flags.DEFINE_string('bert', '', "'base' = bert-base-uncased's shape (paper configs), or a BERT dir", flag_values=FLAGS)
cli.define_enum('gpu', 'h100_sxm', sorted(GPUS), 'GPU whose datasheet figures predict the time', FLAGS)
flags.DEFINE_float('flop_efficiency', 0.5, 'fraction of the peak FLOP/s the step sustains', flag_values=FLAGS)
flags.DEFINE_float('byte_efficiency', 0.7, 'fraction of the memory bandwidth the step sustains', flag_values=FLAGS)
flags.DEFINE_string('json', '', 'also write the result here', flag_values=FLAGS)


def parse_args(argv):
  """Parses the command line (the arguments after the program name) into FLAGS and returns FLAGS."""
  cli.parse_flags(FLAGS, argv, __doc__.split('\n')[0], required=('config',))
  for name in ('batch', 'k', 'n', 'img_dim'):
    if FLAGS[name].value < 0 or (name != 'batch' and FLAGS[name].value < 1):
      cli.usage_error(f'--{name} must be >= 1, got {FLAGS[name].value}')
  for name in ('flop_efficiency', 'byte_efficiency'):
    if not 0 < FLAGS[name].value <= 1:
      cli.usage_error(f'--{name} must be in (0, 1], got {FLAGS[name].value}')
  return FLAGS


def run(args) -> dict:
  from xmatch_jax import run_setup  # pylint: disable=g-import-not-at-top

  config = run_setup.load_config_file(args.config, REPO)
  b = args.batch or config.batch_size
  with tempfile.TemporaryDirectory() as tmp:
    if args.bert == 'base':
      with open(os.path.join(tmp, 'config.json'), 'w') as f:
        json.dump(BERT_BASE, f)
      config.model.bert_dir = tmp
    elif args.bert:
      config.model.bert_dir = args.bert
    dtype = config.model.get('dtype', 'float32')
    cost = step_cost(config, b, args.k, args.n, args.img_dim)
  result = {
    'config': args.config,
    'model': config.model.name,
    'batch': b,
    'k': args.k,
    'n': args.n,
    'bert': args.bert,
    'dtype': dtype,
    'gpu': args.gpu,
    **cost,
    'flop_efficiency': args.flop_efficiency,
    'byte_efficiency': args.byte_efficiency,
  }
  result['prediction'] = {
    d: predict(cost, args.gpu, d, args.flop_efficiency, args.byte_efficiency) for d in ('float32', 'bfloat16')
  }
  return result


def format_result(r: dict) -> str:
  lines = [
    f'{r["model"]} ({r["config"]}), batch {r["batch"]}, k {r["k"]}, n {r["n"]}: '
    f'{r["flops"] / 1e12:.3f} TFLOP and {r["bytes"] / 1e9:.2f} GB accessed per training step (XLA, CPU '
    f'compile), {r["params"] / 1e6:.1f} M params'
  ]
  for dtype, p in r['prediction'].items():
    lines.append(
      f'  {r["gpu"]} {dtype:8s}: {p["step_ms"]:7.2f} ms/step ({p["bound"]}-bound: compute '
      f'{p["compute_ms"]:.2f} ms, memory {p["memory_ms"]:.2f} ms)'
    )
  return '\n'.join(lines)


def main(argv=None):
  args = parse_args(argv)
  result = run(args)
  print(format_result(result))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=2)


if __name__ == '__main__':
  sys.exit(cli.run_tool(main))
