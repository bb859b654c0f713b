"""Benchmark: all-pairs scoring and training steps, with analytic FLOP counts and the machine's matmul rate.

  python tools/benchmark.py --config=configs/rdan.py:f30k --n=20 --min_len=12 --json=rdan.json
  python tools/benchmark.py --config=configs/scan.py:f30k --n=14 --min_len=14 --compare-torch
  python tools/benchmark.py --config=configs/rdan.py:f30k --n=20 --min_len=12 --compare-torch --torch-compile
  python tools/benchmark.py --config=configs/rdan.py:f30k --train_batch=0      # scoring only
  python tools/benchmark.py --config=configs/scan.py:f30k --dtype=bfloat16      # mixed precision (config.model.dtype)
  python tools/benchmark.py --config=configs/glfn.py:f30k --bert_dir=minilm --n=14 --train_batch=0
  python tools/benchmark.py --config=configs/daer.py:wikipedia --n_images=512 --n_captions=512 --train_batch=0

Every figure is measured after a warm-up (compilation) over `--repeats` runs and reported as the median with
min/max. Achieved GFLOP/s is set against the rate of a large float32 matmul through jax measured in the same
run (before and after the model measurements), so the ratio holds on a noisy or shared machine.

FLOPs are counted analytically, 2 per multiply-add, for the matmuls, convolutions (all taps, as an im2col
formulation computes them) and attention contractions of the pair head; element-wise work (softmax, norms) is
not counted. `similarity` is the batch-wide region-word similarity tensor alone (2 k n D per pair; GLFN's fused
t2i + i2t score computes it once for both directions). Per-item work (Gram matrices; DAER's first relation layer,
which splits into a projection of each image and of each caption) is counted once per item. The counts are at
the padded caption length, the work a dense head does; `at real lengths` sets the pair FLOPs of the captions'
real lengths against the same time (RDAN's CPU kernel computes each pair's maps only up to its last real word).
The scoring benchmark initialises only the variables `pair_scores` reads. DAER's staged training has no
`--train_batch` benchmark.

Scoring and the training step each run in a fresh subprocess, so their peak host memory (ru_maxrss) is their own;
on a GPU the device's peak_bytes_in_use is reported too. `--compare-torch` times a plain PyTorch version of the
same head on the same inputs (SCAN t2i / i2t and GLFN's t2i / i2t / eq 33 fusion: the official code's loops over
captions with materialised context vectors; RDAN: batched channels_last convolutions; MMCA: the cross branch
batched over a block of images x all captions with `scaled_dot_product_attention` and `conv1d`; DAER: the relation
network with its first layer per item and the rest as `addmm` over a block of images x all texts) and checks that
the outputs agree. `--torch-compile` also runs the batched heads' blocks (RDAN, MMCA, DAER) through `torch.compile`
(inductor's C++ code; compilation on the first call, not timed) and takes the speed-up against the faster of the
two; the official SCAN and GLFN loops are compared as their authors run them.
"""

import functools
import json
import os
import resource
import subprocess
import sys
import time
import types
from typing import Any
from typing import Callable
from typing import NamedTuple

from absl import flags
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from xmatch_jax import cli
from xmatch_jax import errors


# ----------------------------------------------------------------------------------------------- FLOP counts
def scoring_flops(model, n_images: int, n_captions: int, k: int, n: int) -> dict:
  """FLOPs of scoring every image against every caption: {'similarity', ..., 'total'} for the whole call, from the
  model's analytic counts (`pair_flops` per pair, `item_flops` per item; models/matcher.py)."""
  pairs = n_images * n_captions
  out = {key: value * pairs for key, value in model.pair_flops(k, n).items()}
  per_image, per_caption = model.item_flops(k, n)
  out[model.item_flops_key] = per_image * n_images + per_caption * n_captions
  out['total'] = sum(out.values())
  return out


def real_word_flops(model, n_images: int, k: int, lengths: list) -> float:
  """The pair FLOPs of scoring every image against captions of these real lengths (no padded word): what a head
  that skips padding must do (RDAN's CPU kernel stops each pair's maps at its last real word)."""
  return float(sum(n_images * sum(model.pair_flops(k, int(length)).values()) for length in lengths))


# ----------------------------------------------------------------------------------------------- set-up
def load_config(spec: str):
  """'configs/rdan.py:f30k' -> get_config('f30k') of that file (relative paths also under the repository)."""
  from xmatch_jax import run_setup  # pylint: disable=g-import-not-at-top

  return run_setup.load_config_file(spec, REPO)


def apply_overrides(config, args) -> None:
  for flag in ('block_size', 'embed_size', 'cnn_channels', 'bert_dir', 'dtype', 'conv_impl', 'attention_impl'):
    value = getattr(args, flag)
    if value:
      if flag not in config.model:
        raise errors.UserError(f'--{flag}: model {config.model.name!r} has no field {flag}')
      config.model[flag] = value


def _time(fn, repeats: int, warmup: int = 1) -> list:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return times


def _summary(times: list) -> dict:
  return {
    'median': float(np.median(times)),
    'min': float(np.min(times)),
    'max': float(np.max(times)),
    'repeats': len(times),
  }


def matmul_gflops(size: int, repeats: int) -> float:
  """The machine's float32 matmul rate through jax: median GFLOP/s of a [size, size] @ [size, size]."""
  import jax
  import jax.numpy as jnp

  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
  f = jax.jit(jnp.matmul)
  times = _time(lambda: f(a, b).block_until_ready(), repeats)
  return 2 * size**3 / np.median(times) / 1e9


def _peak_memory() -> dict:
  import jax

  out = {'peak_host_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
  stats = jax.local_devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    out['peak_device_bytes'] = int(stats['peak_bytes_in_use'])
  return out


def build(config, vocab_size: int, img_dim: int):
  """The config's (unbound) model; a BERT-based one takes the vocabulary of its own BERT (WordPiece ids)."""
  from xmatch_jax import models
  from xmatch_jax.models import build_model

  if models.uses_bert(config.model.name):
    from xmatch_jax.data import bert_dir
    from xmatch_jax.models.bert import BertConfig

    if not config.model.bert_dir:
      raise errors.UserError(
        f"model {config.model.name!r} needs a BERT: pass --bert_dir (a Hugging Face BERT directory, or 'minilm')"
      )
    vocab_size = BertConfig.from_json(
      os.path.join(bert_dir.resolve_dir(config.model.bert_dir), 'config.json')
    ).vocab_size
  return build_model(config.model, vocab_size=vocab_size, img_dim=img_dim)


def _init_model(config, vocab_size: int, img_dim: int, k: int, n: int):
  """The model and its full variables, initialised on a random batch of one pair."""
  import jax

  model = build(config, vocab_size, img_dim)
  init = jax.jit(model.init)  # eager init of a BERT takes longer than compiling it
  return model, init(jax.random.key(config.seed), *model.example_inputs(batch=1, regions=k, words=n))


def init_pair_head(model, seed: int, image_rep, text_rep):
  """The variables `pair_scores` reads (DAER: {'params': {'relation': ...}}; none for SCAN or GLFN). Flax derives
  each module's init RNG from its path, so they equal those of the full model's init with the same seed."""
  import jax

  return model.init(jax.random.key(seed), image_rep, text_rep, method=model.pair_scores)


def check_train_batch(config, train_batch: int) -> None:
  """Refuses a training step for models `child_train` cannot time."""
  if train_batch and config.get('trainer') == 'staged':
    raise errors.UserError(
      f'--train_batch={train_batch}: DAER trains in stages (xmatch_jax/trainers/staged.py: classifiers, '
      "then the relation network on eq 11's category loss, with BatchNorm statistics and per-stage "
      'optimisers), not with the contrastive trainer step timed here; use --train_batch=0 '
      '(scoring only).'
    )


def flat_params(variables) -> dict:
  """{'params/relation_cnn/conv1_kernel': numpy array, ...}."""
  import jax

  return {
    '/'.join(str(getattr(p, 'key', p)) for p in path): np.asarray(leaf)
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables)
  }


# ----------------------------------------------------------------------------------------------- children
def child_score(args) -> dict:
  """All-pairs scoring of random encoder outputs (the pair head alone)."""
  import jax

  config = load_config(args.config)
  apply_overrides(config, args)
  model = build(config, 100, 16)
  if not model.random_reps:  # its reps hold per-item projections (MMCA): encode random inputs (not timed)
    model, variables = _init_model(config, 100, 16, args.k, args.n)
    image_rep, text_rep = _encoded_reps(model, variables, args)
  else:  # the pair head's own variables: a full init would run DAER's MobileNet or GLFN's BERT for nothing
    reps = model.example_reps(args.seed, args.n_images, args.n_captions, args.k, args.n, args.min_len)
    image_rep, text_rep = jax.device_put(reps)
    variables = init_pair_head(model, config.seed, image_rep, text_rep)
  score = jax.jit(lambda v, i, t: model.apply(v, i, t, method=model.pair_scores))
  t0 = time.perf_counter()
  scores = np.asarray(score(variables, image_rep, text_rep))
  compile_s = time.perf_counter() - t0
  times = _time(lambda: score(variables, image_rep, text_rep).block_until_ready(), args.repeats, warmup=0)
  out = {'score_time_s': _summary(times), 'first_call_s': compile_s, **_peak_memory()}
  if isinstance(text_rep, dict) and 'mask' in text_rep:
    out['caption_lengths'] = np.asarray(text_rep['mask']).sum(axis=1).astype(int).tolist()
  if args.scores_out:
    np.save(args.scores_out, scores)
    np.savez(args.scores_out + '.params.npz', **flat_params(variables))
    np.savez(args.scores_out + '.reps.npz', **flat_params({'image': image_rep, 'text': text_rep}))
  return out


def child_train(args) -> dict:
  """One optimiser step (encoders + pair head + loss + Adam) on a random batch of `train_batch` pairs."""
  import jax

  from xmatch_jax.trainers import contrastive
  from xmatch_jax.trainers import optim

  config = load_config(args.config)
  apply_overrides(config, args)
  check_train_batch(config, args.train_batch)
  b, img_dim = args.train_batch, 2048
  model, variables = _init_model(config, 10000, img_dim, args.k, args.n)
  tx, schedule = optim.make_optimizer(config.optim, steps_per_epoch=1000)
  tx = optim.freeze(tx, variables['params'], model.frozen_params)
  state = {'params': variables['params'], 'opt_state': tx.init(variables['params']), 'step': 0}
  images, text = model.example_inputs(batch=b, regions=args.k, words=args.n, min_len=args.min_len, seed=args.seed)
  batch = {'images': images, 'text': text, 'image_ids': np.arange(b, dtype=np.int32)}
  step = jax.jit(lambda s, x: contrastive.train_step(s, x, model=model, tx=tx, schedule=schedule, loss_cfg=config.loss))
  t0 = time.perf_counter()
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0

  def run():
    nonlocal state
    state, m = step(state, batch)
    jax.block_until_ready(m)

  times = _time(run, args.train_repeats, warmup=0)
  return {'train_step_s': _summary(times), 'train_first_call_s': compile_s, **_peak_memory()}


def _encoded_reps(model, variables, args):
  """Encoder outputs of random inputs: n_images images and n_captions captions (lengths in [min_len, n])."""
  import jax

  encode_image = jax.jit(lambda v, x: model.apply(v, x, method=model.encode_image))
  encode_text = jax.jit(lambda v, x: model.apply(v, x, method=model.encode_text))
  images, _ = model.example_inputs(batch=args.n_images, regions=args.k, words=args.n, seed=args.seed)
  _, text = model.example_inputs(
    batch=args.n_captions, regions=args.k, words=args.n, min_len=args.min_len, seed=args.seed
  )
  return encode_image(variables, images), encode_text(variables, text)


def _run_child(kind: str, argv: list) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), f'--_child={kind}'] + argv
  proc = subprocess.run(cmd, capture_output=True, text=True)
  if proc.returncode != 0:
    raise RuntimeError(f'benchmark {kind} subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------- torch
def _official_aggregate(x, agg_func: str, lambda_lse: float):
  """SCAN's / GLFN's aggregation of row_sim over the query axis (dim 1), keepdim."""
  import torch

  if agg_func == 'LogSumExp':
    return torch.log(torch.exp(x * lambda_lse).sum(dim=1, keepdim=True)) / lambda_lse
  if agg_func == 'Max':
    return x.max(dim=1, keepdim=True)[0]
  if agg_func == 'Sum':
    return x.sum(dim=1, keepdim=True)
  if agg_func == 'Mean':
    return x.mean(dim=1, keepdim=True)
  raise ValueError(f'unknown agg_func {agg_func!r}')


def torch_xattn_official(
  regions,
  words,
  lengths,
  direction: str,
  lambda_softmax: float,
  agg_func: str,
  lambda_lse: float,
  max_attention_weight: float = 0.0,
):
  """xattn_score_t2i / xattn_score_i2t of kuanghuei/SCAN's and smileslabsh/Generative-Label-Fused-Network's
  model.py (clipped_l2norm): a loop over captions, each cut to its length. GLFN's t2i adds
  `max_attention_weight` (0.5 there) x the aggregated per-word maximum attention over regions.

  regions [I, k, d], words [C, n, d], lengths [C] -> [I, C].
  """
  import torch
  import torch.nn.functional as F

  def l2norm(x, dim, eps=1e-8):
    return x / (x.pow(2).sum(dim=dim, keepdim=True).sqrt() + eps)

  def func_attention(query, context, smooth):
    """query [b, q, d], context [b, s, d] -> (weighted context [b, q, d], max attention over context [b, q])."""
    batch, query_len, source_len = context.size(0), query.size(1), context.size(1)
    attn = torch.bmm(context, query.transpose(1, 2))
    attn = l2norm(F.leaky_relu(attn, 0.1), 2)
    attn = attn.transpose(1, 2).contiguous().view(batch * query_len, source_len)
    attn = F.softmax(attn * smooth, dim=1).view(batch, query_len, source_len)
    weighted = torch.bmm(context.transpose(1, 2), attn.transpose(1, 2).contiguous())
    return weighted.transpose(1, 2), attn.max(dim=2)[0]

  def cosine_similarity(x1, x2, dim, eps=1e-8):
    w12 = (x1 * x2).sum(dim)
    return w12 / (torch.norm(x1, 2, dim) * torch.norm(x2, 2, dim)).clamp(min=eps)

  similarities = []
  n_image = regions.size(0)
  for i in range(words.size(0)):
    cap = words[i, : int(lengths[i])].unsqueeze(0).repeat(n_image, 1, 1)
    if direction == 't2i':
      context, max_attn = func_attention(cap, regions, lambda_softmax)
      row = _official_aggregate(cosine_similarity(cap, context, dim=2), agg_func, lambda_lse)
      if max_attention_weight:
        row = row + max_attention_weight * _official_aggregate(max_attn, agg_func, lambda_lse)
    else:
      context, _ = func_attention(regions, cap, lambda_softmax)
      row = _official_aggregate(cosine_similarity(regions, context, dim=2), agg_func, lambda_lse)
    similarities.append(row)
  return torch.cat(similarities, 1)


def torch_scan_t2i_official(regions, words, lengths, lambda_softmax: float, lambda_lse: float):
  """SCAN's published t2i head (clipped_l2norm + LogSumExp), the official loop."""
  return torch_xattn_official(regions, words, lengths, 't2i', lambda_softmax, 'LogSumExp', lambda_lse)


def torch_glfn_official(regions, words, lengths, m: dict):
  """GLFN's scores with the official scoring functions: S_t2i, S_i2t, or eq 33's alpha S_i2t + (1 - alpha) S_t2i,
  each direction with its own lambda_softmax, aggregation and lambda_lse (m: the model config's fields)."""
  scores = {
    direction: torch_xattn_official(
      regions,
      words,
      lengths,
      direction,
      m[f'{direction}_lambda_softmax'],
      m[f'{direction}_agg_func'],
      m[f'{direction}_lambda_lse'],
      m['t2i_max_attention_weight'] if direction == 't2i' else 0.0,
    )
    for direction in (('t2i', 'i2t') if m['score'] == 'fused' else (m['score'],))
  }
  if m['score'] != 'fused':
    return scores[m['score']]
  return m['alpha'] * scores['i2t'] + (1 - m['alpha']) * scores['t2i']


@functools.cache
def _block_fn(fn, compiled: bool):
  """fn, or fn through `torch.compile` (one compiled program per block shape, kept across calls)."""
  if not compiled:
    return fn
  import torch

  return torch.compile(fn, dynamic=False)


def _daer_block(first_i, first_t, layers):
  """[b, h0] image and [C, h0] text first-layer outputs -> [b, C] relation scores through the remaining layers."""
  import torch

  h = torch.relu(first_i[:, None] + first_t[None])  # [b, C, h0]
  for kernel, bias in layers[:-1]:
    h = torch.relu(torch.addmm(bias, h.reshape(-1, h.size(-1)), kernel).reshape(*h.shape[:2], -1))
  kernel, bias = layers[-1]
  return torch.sigmoid(h @ kernel[:, 0] + bias[0])


def torch_daer(image, text, params: dict, m: dict, block: int, compiled: bool = False):
  """DAER's relation network (eqs 7-10) on every pair in PyTorch: the first layer split into per-item projections
  of sign(R) |R|^k, then blocks of images x all texts through the remaining layers and the sigmoid (each block
  through `torch.compile` if `compiled`).

  image [I, d], text [C, d] (torch tensors); params: `flat_params` of the model -> [I, C].
  """
  import torch

  def param(name):
    return torch.from_numpy(np.array(params[f'params/relation/{name}']))

  def power(x):
    return torch.sign(x) * x.abs() ** m['power']

  first_t = power(text) @ param('fc0_text/kernel') + param('fc0_text/bias')
  first_i = power(image) @ param('fc0_image/kernel')
  depth = sum(1 for key in params if key.startswith('params/relation/fc') and key.endswith('/kernel')) - 2
  names = [f'fc{i}' for i in range(1, depth + 1)] + ['out']  # after fc0_text / fc0_image
  layers = [(param(f'{name}/kernel'), param(f'{name}/bias')) for name in names]
  fn = _block_fn(_daer_block, compiled)
  return torch.cat([fn(first_i[start : start + block], first_t, layers) for start in range(0, image.size(0), block)])


def _rdan_block(r_unit, r_norm, g_img, w_unit, w_norm, g_txt, valid, convs, lam: float, mu: float):
  """RDAN's eqs 5-11 for a block of b images x all C captions -> [b, C] (the inputs as `torch_rdan` makes them)."""
  import torch
  import torch.nn.functional as F

  eps = 1e-8
  c, k, n = w_unit.size(0), r_unit.size(1), w_unit.size(1)
  colmask = valid[None, :, None, :].float()
  sim = torch.einsum('ikd,cnd->ickn', r_unit, w_unit)
  b = sim.size(0)
  x = (sim * colmask).reshape(b * c, 1, k, n).contiguous(memory_format=torch.channels_last)
  pm = colmask.expand(b, c, 1, n).reshape(b * c, 1, 1, n)
  for i, (kernel, bias) in enumerate(convs):
    pad = (kernel.size(2) // 2, kernel.size(3) // 2)
    x = F.conv2d(x, kernel, bias, padding=pad)
    if i < 3:
      x = F.relu(x) * pm
  maps = x.reshape(b, c, -1, k, n)
  s1, s2 = maps[:, :, 0] + sim, maps[:, :, -1] + sim
  rn, wn = r_norm[:, None], w_norm[None]
  alpha = torch.softmax((lam * s2).masked_fill(~valid[None, :, None, :], float('-inf')), dim=-1)
  dots = rn * (alpha * sim * wn[:, :, None, :]).sum(-1)
  att = (alpha * torch.einsum('cnm,ickm->ickn', g_txt, alpha)).sum(-1)
  rr = dots / (rn * att.clamp(min=0).sqrt()).clamp(min=eps)
  beta = torch.softmax(lam * s1, dim=-2)
  dots = wn * (beta * sim * rn[..., None]).sum(-2)
  att = (beta * torch.einsum('ikl,icln->ickn', g_img, beta)).sum(-2)
  wr = (dots / (wn * att.clamp(min=0).sqrt()).clamp(min=eps)) * valid[None]
  return (1 - mu) * rr.mean(-1) + mu * wr.sum(-1) / valid.sum(-1)[None]


def torch_rdan(regions, words, mask, params: dict, m: dict, block: int, compiled: bool = False):
  """RDAN's head (eqs 5-11) in PyTorch at its best on CPU: S as one einsum, the relation CNN as channels_last
  convolutions over a block of images x all captions, and the Gram-matrix cosines (each block through
  `torch.compile` if `compiled`)."""
  import torch

  eps = 1e-8
  valid = mask > 0
  words = words * valid[..., None]
  r_norm, w_norm = regions.norm(dim=-1), words.norm(dim=-1)
  r_unit, w_unit = regions / r_norm.clamp(min=eps)[..., None], words / w_norm.clamp(min=eps)[..., None]
  g_img, g_txt = regions @ regions.transpose(1, 2), words @ words.transpose(1, 2)
  convs = []
  for name in ('conv1', 'conv2', 'conv3', 'out'):
    kernel = torch.from_numpy(np.array(params[f'params/relation_cnn/{name}_kernel'])).permute(3, 2, 0, 1).contiguous()
    convs.append(
      (
        kernel.contiguous(memory_format=torch.channels_last),
        torch.from_numpy(np.array(params[f'params/relation_cnn/{name}_bias'])),
      )
    )
  fn = _block_fn(_rdan_block, compiled)
  out = []
  for start in range(0, regions.size(0), block):
    end = start + block
    out.append(
      fn(
        r_unit[start:end],
        r_norm[start:end],
        g_img[start:end],
        w_unit,
        w_norm,
        g_txt,
        valid,
        convs,
        m['lambda_'],
        m['mu'],
      )
    )
  return torch.cat(out, 0)


def _mmca_block(image: dict, text: dict, weights: dict, convs: list, scale: float, text_norm: str):
  """MMCA's cross branch (eqs 8-14, 6-7) for a block of b images x all C captions -> [b, C] i_1 . c_1.

  image: {'regions' [b, k, d], 'q', 'k', 'v' [b, k, h, d/h]}; text as `torch_mmca`'s; weights: {name: tensor or
  None} of the cross unit and the text CNN; convs: [(width, kernel [filters, d, width], bias)].
  """
  import torch
  import torch.nn.functional as F

  def linear(x, name):
    bias = weights[f'{name}_bias']
    y = x @ weights[f'{name}_kernel']
    return y if bias is None else y + bias

  def layer_norm(x, name):
    return F.layer_norm(x, x.shape[-1:], weights[f'{name}_scale'], weights[f'{name}_bias'], eps=1e-5)

  valid = text['mask'] > 0
  lengths = valid.sum(-1)
  c, n, d = text['words'].shape
  b, k, h = image['q'].shape[:3]
  dh = d // h

  def joint(name):  # [b, C, k + n, h, dh] -> [b * C, h, k + n, dh]
    seq = torch.cat([image[name][:, None].expand(b, c, k, h, dh), text[name][None].expand(b, c, n, h, dh)], 2)
    return seq.reshape(b * c, k + n, h, dh).transpose(1, 2)

  keys = torch.cat([torch.ones(c, k, dtype=torch.bool), valid], 1)  # [C, k + n]
  attn_mask = keys[None].expand(b, c, k + n).reshape(b * c, 1, 1, k + n)
  attended = F.scaled_dot_product_attention(joint('q'), joint('k'), joint('v'), attn_mask=attn_mask, scale=scale)
  attended = attended.transpose(1, 2).reshape(b, c, k + n, d)
  x = torch.cat([image['regions'][:, None].expand(b, c, k, d), text['words'][None].expand(b, c, n, d)], 2)
  y = layer_norm(x + linear(attended, 'cross_unit/o'), 'cross_unit/ln1')
  y = layer_norm(y + linear(F.relu(linear(y, 'cross_unit/ffn1')), 'cross_unit/ffn2'), 'cross_unit/ln2')
  i1 = y[:, :, :k].mean(2)
  i1 = i1 / (i1.norm(dim=-1, keepdim=True) + 1e-8)
  words = y[:, :, k:].reshape(b * c, n, d).transpose(1, 2)  # [b * C, d, n]
  pair_lengths = lengths[None].expand(b, c).reshape(b * c, 1)
  pooled = []
  for w, kernel, bias in convs:
    if n < w:
      pooled.append(torch.zeros(b * c, kernel.size(0)))
      continue
    p = F.relu(F.conv1d(words, kernel, bias))  # [b * C, filters, n - w + 1]
    inside = torch.arange(n - w + 1)[None] + w <= pair_lengths  # windows within the real tokens
    pooled.append((p * inside[:, None]).amax(-1))
  sentence = linear(torch.cat(pooled, -1), 'text_cnn1/fc')
  if text_norm == 'layernorm':
    c1 = layer_norm(sentence, 'text_cnn1/ln')
  else:
    c1 = sentence / (sentence.norm(dim=-1, keepdim=True) + 1e-8)
  return (i1 * c1.reshape(b, c, d)).sum(-1)


def torch_mmca(image: dict, text: dict, params: dict, m: dict, block: int, compiled: bool = False):
  """MMCA's pair head in PyTorch at its best on CPU: S = i_0 . c_0 + alpha i_1 . c_1 (sec 3.5), the cross branch
  (eqs 8-14) for a block of images x all captions at once from the per-item Q / K / V the encoders computed: one
  joint [R; E] sequence per pair through `scaled_dot_product_attention` (padded words masked as keys), W^O, the FFN
  and the LayerNorms as batched matmuls, then the cross 1d-CNN (eqs 6-7) as `conv1d` over every pair's words (each
  block through `torch.compile` if `compiled`).

  image: {'i0' [I, d], 'regions' [I, k, d], 'q', 'k', 'v' [I, k, h, d/h]}; text: {'c0' [C, d], 'words' [C, n, d],
  'mask' [C, n], 'q', 'k', 'v' [C, n, h, d/h]} (torch tensors); params: `flat_params` of the model -> [I, C].
  """
  import torch

  self_scores = image['i0'] @ text['c0'].T
  if not m['alpha']:
    return self_scores
  weights = {}  # {name_part: tensor}, None where the config has no such parameter (biases, the text LayerNorm)
  for name in (
    'cross_unit/o',
    'cross_unit/ffn1',
    'cross_unit/ffn2',
    'cross_unit/ln1',
    'cross_unit/ln2',
    'text_cnn1/fc',
    'text_cnn1/ln',
  ):
    for part in ('kernel', 'bias', 'scale'):
      key = f'params/{name}_{part}'
      weights[f'{name}_{part}'] = torch.from_numpy(np.array(params[key])) if key in params else None
  d = text['words'].size(-1)
  scale = (d if m['cross_attention_scale'] == 'model' else d // image['q'].size(2)) ** -0.5
  convs = []
  for w in (1, 2, 3):  # [w * d, filters] (window positions outer) -> conv1d's [filters, d, w]
    kernel = torch.from_numpy(np.array(params[f'params/text_cnn1/conv{w}_kernel']))
    bias = torch.from_numpy(np.array(params[f'params/text_cnn1/conv{w}_bias']))
    convs.append((w, kernel.reshape(w, d, -1).permute(2, 1, 0).contiguous(), bias))
  fn = _block_fn(_mmca_block, compiled)
  cross = [
    fn(
      {key: image[key][start : start + block] for key in ('regions', 'q', 'k', 'v')},
      text,
      weights,
      convs,
      scale,
      m['text_norm'],
    )
    for start in range(0, image['regions'].size(0), block)
  ]
  return self_scores + m['alpha'] * torch.cat(cross, 0)


class TorchReference(NamedTuple):
  """A PyTorch implementation of a pair head for `--compare-torch`: whether it covers a model config's fields, how
  to run it on the encoded reps (dicts of torch tensors as `encode_image` / `encode_text` return them; params;
  fields; whether its blocks go through `torch.compile`) -> [I, C]. Only the batched heads have compiled blocks:
  the official loops are compared as their authors run them."""

  applies: Callable[[dict], bool]
  run: Callable[..., Any]
  kind: str
  compilable: bool = False


TORCH_REFERENCES = {
  'scan': TorchReference(
    applies=lambda m: m['raw_feature_norm'] == 'clipped_l2norm',
    run=lambda image, text, params, m, compiled: torch_xattn_official(
      image['regions'],
      text['words'],
      text['mask'].sum(1).int(),
      m['cross_attn'],
      m['lambda_softmax'],
      m['agg_func'],
      m['lambda_lse'],
    ),
    kind='official SCAN xattn_score loop',
  ),
  'rdan': TorchReference(
    applies=lambda m: m['use_cnn'] and m['use_residual'] and not m['one_path'],
    run=lambda image, text, params, m, compiled: torch_rdan(
      image['regions'], text['words'], text['mask'], params, m, m['block_size'], compiled
    ),
    kind='batched channels_last RDAN head',
    compilable=True,
  ),
  'mmca': TorchReference(
    applies=lambda m: True,
    run=lambda image, text, params, m, compiled: torch_mmca(image, text, params, m, m['block_size'], compiled),
    kind='batched MMCA head (scaled_dot_product_attention, conv1d)',
    compilable=True,
  ),
  'glfn': TorchReference(
    applies=lambda m: m['raw_feature_norm'] == 'clipped_l2norm',
    run=lambda image, text, params, m, compiled: torch_glfn_official(
      image['regions'], text['words'], text['mask'].sum(1).int(), m
    ),
    kind='official GLFN xattn_score loops',
  ),
  'daer': TorchReference(
    applies=lambda m: True,
    run=lambda image, text, params, m, compiled: torch_daer(image, text, params, m, m['block_size'], compiled),
    kind='batched DAER relation network (per-item first layer, addmm)',
    compilable=True,
  ),
}


def compare_torch(args, config, reps: dict, scores: np.ndarray, params: dict) -> dict:
  """reps: the scoring child's encoded reps, {'image/<key>': array, 'text/<key>': array}."""
  try:
    import torch
  except ImportError:
    print('--compare-torch: torch is not installed; skipped (pip install torch==2.13.0).')
    return {}
  torch.set_num_threads(os.cpu_count())
  m = config.model.to_dict()
  reference = TORCH_REFERENCES.get(m['name'])
  if reference is None or not reference.applies(m):
    print(f'--compare-torch: no PyTorch reference for this model configuration ({m["name"]}); skipped.')
    return {}
  # A dict rep is saved as 'image/<key>' entries, an array rep (DAER's [I, d]) as 'image' itself.
  image, text = (
    torch.from_numpy(reps[side])
    if side in reps
    else {key.split('/', 1)[1]: torch.from_numpy(value) for key, value in reps.items() if key.startswith(side + '/')}
    for side in ('image', 'text')
  )
  fn = lambda: reference.run(image, text, params, m, False)
  with torch.no_grad():
    torch_scores = fn().numpy()
    times = _time(fn, args.repeats, warmup=0)
    result = {
      'torch_implementation': reference.kind,
      'torch_time_s': _summary(times),
      'max_abs_diff': float(np.max(np.abs(torch_scores - scores))),
    }
    if args.torch_compile and reference.compilable:
      # The faster of eager and compiled is the reference the speed-up is taken against; both are recorded.
      compiled = lambda: reference.run(image, text, params, m, True)
      start = time.perf_counter()
      compiled_scores = compiled().numpy()  # compiles each block shape once
      result['torch_compile_first_call_s'] = time.perf_counter() - start
      result['torch_compiled_max_abs_diff'] = float(np.max(np.abs(compiled_scores - scores)))
      result['torch_eager_time_s'] = result['torch_time_s']
      result['torch_compiled_time_s'] = _summary(_time(compiled, args.repeats, warmup=0))
      if result['torch_compiled_time_s']['median'] < result['torch_time_s']['median']:
        result['torch_implementation'] = f'{reference.kind}, torch.compile'
        result['torch_time_s'] = result['torch_compiled_time_s']
        result['max_abs_diff'] = result['torch_compiled_max_abs_diff']
    elif args.torch_compile:
      print(f'--torch-compile: the {reference.kind} is compared as written, not compiled.')
  return result


# ----------------------------------------------------------------------------------------------- report
_CHILD_FLAGS = (
  'config',
  'n_images',
  'n_captions',
  'k',
  'n',
  'min_len',
  'block_size',
  'embed_size',
  'cnn_channels',
  'bert_dir',
  'dtype',
  'conv_impl',
  'attention_impl',
  'train_batch',
  'repeats',
  'train_repeats',
  'seed',
)


def _kernels_used(m: dict, k: int, n: int) -> dict:
  """Which compiled CPU kernels (xmatch_jax/kernels) the model's scoring runs: {'relation_cnn' (RDAN) /
  'cross_attention' (MMCA): 'compiled kernel' or 'xla'}."""
  from xmatch_jax.models import layers  # pylint: disable=g-import-not-at-top
  from xmatch_jax.models import mmca  # pylint: disable=g-import-not-at-top
  from xmatch_jax.models import rdan  # pylint: disable=g-import-not-at-top

  dtype = layers.DTYPES[m.get('dtype', 'float32')]
  used = {}
  if 'conv_impl' in m and m.get('use_cnn', True):
    used['relation_cnn'] = rdan.uses_kernel(m['cnn_channels'], dtype, m['conv_impl'])
  if 'attention_impl' in m and m.get('alpha', 1):
    used['cross_attention'] = mmca.uses_kernel(m['embed_size'] // m['num_heads'], max(k, n), dtype, m['attention_impl'])
  return {name: 'compiled kernel' if on else 'xla' for name, on in used.items()}


def run(args) -> dict:
  config = load_config(args.config)
  apply_overrides(config, args)
  check_train_batch(config, args.train_batch)
  model = build(config, 100, 16)  # a config the children cannot build (e.g. no bert_dir) fails here, before any timing
  m = config.model.to_dict()
  d = m.get('embed_size')
  child_argv = [f'--{name}={getattr(args, name)}' for name in _CHILD_FLAGS]
  result = {
    'config': args.config,
    'model': m,
    'sizes': {
      'n_images': args.n_images,
      'n_captions': args.n_captions,
      'k': args.k,
      'n': args.n,
      'min_len': args.min_len,
      'embed_size': d,
      'block_size': m.get('block_size'),
      'regions_and_words': 'regions' in model.image_keys,
      'train_batch': args.train_batch,
      'dtype': m.get('dtype', 'float32'),
    },
    'devices': _devices(),
  }
  result['sizes'].update(_kernels_used(m, args.k, args.n))
  rate_before = matmul_gflops(args.matmul_size, args.repeats)
  scores_file = os.path.join(args.tmpdir, f'benchmark_scores_{os.getpid()}.npy')
  score = _run_child('score', child_argv + [f'--scores_out={scores_file}'] if args.compare_torch else child_argv)
  train_result = _run_child('train', child_argv) if args.train_batch else {}
  rate_after = matmul_gflops(args.matmul_size, args.repeats)
  rate = float(np.median([rate_before, rate_after]))

  pairs = args.n_images * args.n_captions
  t = score['score_time_s']['median']
  flops = scoring_flops(model, args.n_images, args.n_captions, args.k, args.n)
  result.update(
    {
      'matmul_gflops_per_s': rate,
      'matmul_gflops_per_s_before_after': [rate_before, rate_after],
      'pairs_per_s': pairs / t,
      'score_time_s': score['score_time_s'],
      'score_first_call_s': score['first_call_s'],
      'flops': flops,
      'pair_gflops_per_s': flops['total'] / t / 1e9,
      'similarity_gflops_per_s': flops.get('similarity', 0) / t / 1e9,
      'score_peak_host_bytes': score['peak_host_bytes'],
    }
  )
  result['pct_of_matmul'] = 100 * result['pair_gflops_per_s'] / rate
  if 'caption_lengths' in score:
    real = real_word_flops(model, args.n_images, args.k, score['caption_lengths']) + flops[model.item_flops_key]
    result['real_word_pair_flops'] = real
    result['real_word_pct_of_matmul'] = 100 * real / t / 1e9 / rate
  result['similarity_pct_of_matmul'] = 100 * result['similarity_gflops_per_s'] / rate
  peaks = [score['peak_host_bytes']]
  if train_result:
    result.update(
      {
        'train_step_s': train_result['train_step_s'],
        'train_first_call_s': train_result['train_first_call_s'],
        'train_peak_host_bytes': train_result['peak_host_bytes'],
      }
    )
    peaks.append(train_result['peak_host_bytes'])
    if 'peak_device_bytes' in train_result:
      result['train_peak_device_bytes'] = train_result['peak_device_bytes']
  result['peak_memory_bytes'] = max(peaks)
  if args.compare_torch:
    reps = dict(np.load(scores_file + '.reps.npz'))
    params = dict(np.load(scores_file + '.params.npz'))
    torch_result = compare_torch(args, config, reps, np.load(scores_file), params)
    for f in (scores_file, scores_file + '.params.npz', scores_file + '.reps.npz'):
      os.remove(f)
    if torch_result:
      result.update(torch_result)
      result['torch_pairs_per_s'] = pairs / torch_result['torch_time_s']['median']
      result['speedup_vs_torch'] = result['pairs_per_s'] / result['torch_pairs_per_s']
  return result


def _devices() -> str:
  import jax

  devices = jax.devices()
  return f'{len(devices)} x {devices[0].platform} ({devices[0].device_kind}), {os.cpu_count()} host cores'


def format_table(r: dict) -> str:
  s = r['sizes']
  gb = 1024**3
  rows = [
    ('config', r['config']),
    ('devices', r['devices']),
    (
      'sizes',
      f'{s["n_images"]} images x {s["n_captions"]} captions, '
      + (f'k={s["k"]}, n={s["min_len"]}..{s["n"]}, ' if s.get('regions_and_words', True) else '')
      + f'D={s["embed_size"]}, block={s["block_size"]}, {s["dtype"]}',
    ),
    (
      'matmul rate',
      f'{r["matmul_gflops_per_s"]:.1f} GFLOP/s (before/after: '
      f'{r["matmul_gflops_per_s_before_after"][0]:.1f} / {r["matmul_gflops_per_s_before_after"][1]:.1f})',
    ),
    ('scoring time', _fmt_time(r['score_time_s'])),
    ('pairs/s', f'{r["pairs_per_s"]:,.0f}'),
    (
      'pair head',
      f'{r["flops"]["total"] / (s["n_images"] * s["n_captions"]) / 1e6:.2f} MFLOP/pair: '
      + ', '.join(f'{k} {v / r["flops"]["total"]:.0%}' for k, v in r['flops'].items() if k != 'total'),
    ),
    (
      'achieved',
      f'{r["pair_gflops_per_s"]:.1f} GFLOP/s = {r["pct_of_matmul"]:.0f}% of matmul'
      + (
        f" (the similarity tensor's FLOPs over the whole head's time: {r['similarity_gflops_per_s']:.1f} GFLOP/s"
        f' = {r["similarity_pct_of_matmul"]:.0f}%)'
        if r['flops'].get('similarity')
        else ''
      ),
    ),
  ]
  if 'real_word_pair_flops' in r:
    rows.append(
      (
        'at real lengths',
        f'the FLOPs without padded words: {r["real_word_pair_flops"] / r["flops"]["total"]:.0%} of the '
        f'padded count, {r["real_word_pct_of_matmul"]:.0f}% of matmul',
      )
    )
  rows += [
    ('scoring peak host memory', f'{r["score_peak_host_bytes"] / gb:.2f} GB'),
  ]
  if 'train_step_s' in r:
    rows.append((f'train step (batch {s["train_batch"]})', _fmt_time(r['train_step_s'])))
    rows.append(('train step peak host memory', f'{r["train_peak_host_bytes"] / gb:.2f} GB'))
    if 'train_peak_device_bytes' in r:
      rows.append(('train step peak device memory', f'{r["train_peak_device_bytes"] / gb:.2f} GB'))
  if 'torch_pairs_per_s' in r:
    rows.append(
      ('torch', f'{r["torch_implementation"]}: {_fmt_time(r["torch_time_s"])}, {r["torch_pairs_per_s"]:,.0f} pairs/s')
    )
    if 'torch_compiled_time_s' in r:
      rows.append(('torch eager', _fmt_time(r['torch_eager_time_s'])))
      rows.append(
        (
          'torch.compile',
          f'{_fmt_time(r["torch_compiled_time_s"])}; first call {r["torch_compile_first_call_s"]:.1f} s',
        )
      )
    rows.append(('speed-up over torch', f'{r["speedup_vs_torch"]:.2f}x (max |diff| {r["max_abs_diff"]:.2e})'))
  width = max(len(k) for k, _ in rows)
  return '\n'.join(f'{k:<{width}}  {v}' for k, v in rows)


def _fmt_time(t: dict) -> str:
  return f'{t["median"] * 1e3:.1f} ms median (min {t["min"] * 1e3:.1f}, max {t["max"] * 1e3:.1f}, {t["repeats"]} runs)'


FLAGS = flags.FlagValues()
flags.DEFINE_string('config', 'configs/rdan.py:f30k', 'config file:arg, as for xmatch_jax.train', flag_values=FLAGS)
flags.DEFINE_integer('n_images', 128, 'images scored', flag_values=FLAGS)
flags.DEFINE_integer('n_captions', 128, 'captions scored against every image', flag_values=FLAGS)
flags.DEFINE_integer('k', 36, 'regions per image', flag_values=FLAGS)
flags.DEFINE_integer('n', 20, 'padded caption length', flag_values=FLAGS)
flags.DEFINE_integer(
  'min_len', None, 'shortest caption (lengths uniform in [min_len, n]); default n', flag_values=FLAGS
)
flags.DEFINE_integer('block_size', 0, "images per scoring block (0: the config's)", flag_values=FLAGS)
flags.DEFINE_integer('embed_size', 0, "D (0: the config's)", flag_values=FLAGS)
flags.DEFINE_integer('cnn_channels', 0, "RDAN relation CNN channels (0: the config's)", flag_values=FLAGS)
flags.DEFINE_string('bert_dir', '', "BERT of a BERT-based model ('minilm', or a directory)", flag_values=FLAGS)
cli.define_enum(
  'dtype',
  '',
  ('', 'float32', 'bfloat16'),
  "config.model.dtype: compute dtype of the model's matmuls ('': the config's)",
  FLAGS,
)
cli.define_enum(
  'conv_impl',
  '',
  ('', 'auto', 'xla'),
  "config.model.conv_impl of RDAN: 'auto' (the compiled CPU relation CNN kernel) or 'xla' ('': the config's)",
  FLAGS,
)
cli.define_enum(
  'attention_impl',
  '',
  ('', 'auto', 'xla'),
  "config.model.attention_impl of MMCA: 'auto' (the compiled CPU cross-attention kernel) or 'xla' ('': the config's)",
  FLAGS,
)
flags.DEFINE_integer('train_batch', 128, 'batch of the timed training step (0: skip)', flag_values=FLAGS)
flags.DEFINE_integer('repeats', 5, 'timed runs of the scoring (and of the matmul rate)', flag_values=FLAGS)
flags.DEFINE_integer('train_repeats', 3, 'timed training steps', flag_values=FLAGS)
flags.DEFINE_integer('matmul_size', 2048, 'side of the square matmul that measures the rate', flag_values=FLAGS)
flags.DEFINE_integer('seed', 0, 'seed of the random inputs', flag_values=FLAGS)
flags.DEFINE_boolean('compare-torch', False, 'also time a PyTorch version of the head (see above)', flag_values=FLAGS)
flags.DEFINE_boolean(
  'torch-compile',
  False,
  'with --compare-torch: also time the batched PyTorch heads (RDAN, MMCA, DAER) with torch.compile (needs a C++ '
  'compiler) and compare against the faster',
  flag_values=FLAGS,
)
flags.DEFINE_string('json', '', 'also write the results to this JSON file', flag_values=FLAGS)
flags.DEFINE_string('tmpdir', '/tmp', 'directory of the scores --compare-torch compares', flag_values=FLAGS)
flags.DEFINE_string('scores_out', '', 'internal: where a scoring child writes its scores', flag_values=FLAGS)
cli.define_enum('_child', '', ('', 'score', 'train'), 'internal: run as the scoring or training child', FLAGS)


def parse_args(argv) -> types.SimpleNamespace:
  """The command line (the arguments after the program name) as a namespace: one attribute per flag
  (`--compare-torch` as compare_torch), min_len filled in."""
  cli.parse_flags(FLAGS, argv, __doc__)
  args = types.SimpleNamespace(**{name.replace('-', '_'): value for name, value in FLAGS.flag_values_dict().items()})
  if args.min_len is None:
    args.min_len = args.n
  for name in ('n_images', 'n_captions', 'k', 'n', 'min_len', 'repeats', 'train_repeats', 'matmul_size'):
    if getattr(args, name) < 1:
      cli.usage_error(f'--{name} must be >= 1, got {getattr(args, name)}')
  if args.min_len > args.n:
    cli.usage_error(f'--min_len ({args.min_len}) must be <= --n ({args.n})')
  if args.torch_compile and not args.compare_torch:
    cli.usage_error('--torch-compile needs --compare-torch')
  if args.train_batch < 0 or args.block_size < 0:
    cli.usage_error('--train_batch and --block_size must be >= 0')
  return args


def command_args(argv: list) -> list:
  """argv without `--json=FILE` / `--json FILE`: the command a JSON result records."""
  kept, skip = [], False
  for arg in argv:
    if skip:
      skip = False
    elif arg in ('--json', '-json'):
      skip = True
    elif not arg.lstrip('-').startswith('json='):
      kept.append(arg)
  return kept


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  if args._child:
    result = child_score(args) if args._child == 'score' else child_train(args)
    print(json.dumps(result))
    return 0
  result = run(args)
  result['command'] = 'python tools/benchmark.py ' + ' '.join(command_args(argv))
  print(format_table(result))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=2)
    print(f'wrote {args.json}')
  return 0


if __name__ == '__main__':
  sys.exit(cli.run_tool(main))
