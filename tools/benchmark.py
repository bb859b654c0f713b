"""Benchmark: all-pairs scoring and training steps, with analytic FLOP counts and the machine's matmul rate.

  python tools/benchmark.py --config=configs/rdan.py:f30k --n=20 --min_len=12 --json=rdan.json
  python tools/benchmark.py --config=configs/scan.py:f30k --n=14 --min_len=14 --compare-torch
  python tools/benchmark.py --config=configs/rdan.py:f30k --train_batch=0      # scoring only
  python tools/benchmark.py --config=configs/scan.py:f30k --dtype=bfloat16      # mixed precision (config.model.dtype)
  python tools/benchmark.py --config=configs/glfn.py:f30k --bert_dir=minilm --n=14 --train_batch=0
  python tools/benchmark.py --config=configs/daer.py:wikipedia --n_images=512 --n_captions=512 --train_batch=0

Every figure is measured after a warm-up (compilation) over `--repeats` runs and reported as the median with
min/max. Achieved GFLOP/s is set against the rate of a large float32 matmul through jax measured in the same
run (before and after the model measurements), so the ratio holds on a noisy or shared machine.

FLOPs are counted analytically, 2 per multiply-add, for the matmuls, convolutions (all taps, as an im2col
formulation computes them) and attention contractions of the pair head; element-wise work (softmax, norms) is
not counted. `similarity` is the batch-wide region-word similarity tensor alone (2 k n D per pair; twice for GLFN's
fused t2i + i2t score, whose two directions compute it in different layouts). Per-item work (Gram matrices; DAER's
first relation layer, which splits into a projection of each image and of each caption) is counted once per item.
The scoring benchmark initialises only the variables `pair_scores` reads. DAER's staged training has no
`--train_batch` benchmark.

Scoring and the training step each run in a fresh subprocess, so their peak host memory (ru_maxrss) is their own;
on a GPU the device's peak_bytes_in_use is reported too. `--compare-torch` times a plain PyTorch version of the
same head on the same inputs (SCAN t2i: the official code's loop over captions with materialised context
vectors; RDAN: batched channels_last convolutions) and checks that the outputs agree.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from xmatch_jax import cli
from xmatch_jax import errors


# ----------------------------------------------------------------------------------------------- FLOP counts
def _rdan_pair_flops(m: dict, k: int, n: int, d: int) -> dict:
  flops = {'similarity': 2 * k * n * d}
  if m.get('use_cnn', True):
    c = m['cnn_channels']
    out = 1 if m.get('one_path', False) else 2
    # 3x1 (1 -> c), 1x3 (c -> c), 3x3 (c -> c), 1x1 (c -> out) at every one of the k x n positions.
    flops['convolution'] = 2 * k * n * (3 * c + 3 * c * c + 9 * c * c + c * out)
  attention = 0
  if m['mu'] != 1:  # row-wise: alpha . (S |e|), alpha^T G_txt alpha
    attention += 2 * k * n + 2 * k * n * n + 2 * k * n
  if m['mu'] != 0:  # column-wise: beta . (S |v|), beta^T G_img beta
    attention += 2 * k * n + 2 * k * k * n + 2 * k * n
  flops['attention'] = attention
  return flops


def _scan_attention_flops(direction: str, k: int, n: int) -> int:
  # t2i: w . S over regions, w^T G_img w; i2t: w . S over words, w^T G_txt w.
  gram = 2 * k * k * n if direction == 't2i' else 2 * k * n * n
  return 2 * k * n + gram + 2 * k * n


def _scan_pair_flops(m: dict, k: int, n: int, d: int) -> dict:
  return {'similarity': 2 * k * n * d, 'attention': _scan_attention_flops(m['cross_attn'], k, n)}


_GLFN_DIRECTIONS = {'fused': ('t2i', 'i2t'), 't2i': ('t2i',), 'i2t': ('i2t',)}


def _glfn_pair_flops(m: dict, k: int, n: int, d: int) -> dict:
  # 'fused' computes S once ([I, k, C, n]) and hands i2t its transpose.
  directions = _GLFN_DIRECTIONS[m['score']]
  return {'similarity': 2 * k * n * d, 'attention': sum(_scan_attention_flops(x, k, n) for x in directions)}


def _vsepp_pair_flops(m: dict, k: int, n: int, d: int) -> dict:
  del m, k, n
  return {'similarity': 2 * d}


def _mmca_pair_flops(m: dict, k: int, n: int, d: int) -> dict:
  flops = {'self_score': 2 * d}
  if m['alpha']:
    f, t = m['cnn_filters'], k + n
    flops['attention'] = 2 * k * n * d * 2 + 2 * t * t * d  # Q_R K_E^T, Q_E K_R^T; weights x [V_R; V_E]
    flops['transformer_ffn'] = 2 * t * d * d * 3  # W^O and the two FFN layers, per token
    flops['text_cnn'] = sum(2 * (n - w + 1) * w * d * f for w in (1, 2, 3)) + 2 * 3 * f * d
    flops['cross_score'] = 2 * d
  return flops


def _daer_widths(m: dict) -> list:
  """[h0, ..., 1]: the relation MLP's widths after its first layer (DAER's default hidden (1024, 512))."""
  hidden = m.get('relation_hidden')
  if hidden is None:
    from xmatch_jax.models.daer import DAER  # pylint: disable=g-import-not-at-top

    hidden = DAER.relation_hidden
  return list(hidden) + [1]


def _daer_pair_flops(m: dict, k: int, n: int, d: int) -> dict:
  # The first layer is split per item (item_flops); per pair only its sum, then h0 -> h1 -> ... -> 1.
  del k, n, d
  widths = _daer_widths(m)
  return {'relation_mlp': sum(2 * a * b for a, b in zip(widths, widths[1:]))}


PAIR_FLOPS = {
  'rdan': _rdan_pair_flops,
  'scan': _scan_pair_flops,
  'vsepp': _vsepp_pair_flops,
  'mmca': _mmca_pair_flops,
  'glfn': _glfn_pair_flops,
  'daer': _daer_pair_flops,
}
# scoring_flops' key of the per-item FLOPs.
_ITEM_KEY = {'daer': 'item_first_layer'}


def item_flops(m: dict, k: int, n: int, d: int) -> tuple[int, int]:
  """FLOPs per image and per caption computed once per item, outside the pair loop: Gram matrices, or DAER's
  first relation layer (W_i R^e_i per image, W_t R^e_t per caption; d = embed_size)."""
  name = m['name']
  if name == 'rdan':
    return 2 * k * k * d, 2 * n * n * d
  if name == 'scan':
    return (2 * k * k * d, 0) if m['cross_attn'] == 't2i' else (0, 2 * n * n * d)
  if name == 'glfn':
    directions = _GLFN_DIRECTIONS[m['score']]
    return 2 * k * k * d * ('t2i' in directions), 2 * n * n * d * ('i2t' in directions)
  if name == 'daer':
    h0 = _daer_widths(m)[0]
    return 2 * d * h0, 2 * d * h0
  if name == 'mmca' and m['alpha']:
    return 2 * k * k * d, 2 * n * n * d  # Q_R K_R^T per image, Q_E K_E^T per caption
  return 0, 0


def scoring_flops(model_config: dict, n_images: int, n_captions: int, k: int, n: int, d: int) -> dict:
  """FLOPs of scoring every image against every caption: {'similarity', ..., 'total'} for the whole call."""
  name = model_config['name']
  if name not in PAIR_FLOPS:
    raise errors.UserError(f'no FLOP count for model {name!r}; known: {sorted(PAIR_FLOPS)}')
  per_pair = PAIR_FLOPS[name](model_config, k, n, d)
  pairs = n_images * n_captions
  out = {key: value * pairs for key, value in per_pair.items()}
  per_image, per_caption = item_flops(model_config, k, n, d)
  out[_ITEM_KEY.get(name, 'item_gram')] = per_image * n_images + per_caption * n_captions
  out['total'] = sum(out.values())
  return out


# ----------------------------------------------------------------------------------------------- set-up
def load_config(spec: str):
  """'configs/rdan.py:f30k' -> get_config('f30k') of that file (relative paths also under the repository)."""
  from xmatch_jax import run_setup  # pylint: disable=g-import-not-at-top

  return run_setup.load_config_file(spec, REPO)


def apply_overrides(config, args) -> None:
  for flag in ('block_size', 'embed_size', 'cnn_channels', 'bert_dir', 'dtype'):
    value = getattr(args, flag)
    if value:
      if flag not in config.model:
        raise errors.UserError(f'--{flag}: model {config.model.name!r} has no field {flag}')
      config.model[flag] = value


def random_reps(seed: int, n_images: int, n_captions: int, k: int, n: int, min_len: int, d: int) -> dict:
  """Encoder outputs of random items: regions [I, k, D], words [C, n, D], mask [C, n] with lengths in [min_len, n]."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(min_len, n + 1, size=n_captions)
  mask = (np.arange(n)[None] < lengths[:, None]).astype(np.float32)
  return {
    'regions': rng.standard_normal((n_images, k, d)).astype(np.float32),
    'words': rng.standard_normal((n_captions, n, d)).astype(np.float32) * mask[..., None],
    'mask': mask,
  }


def pair_inputs(model_name: str, reps: dict) -> tuple:
  """(image_rep, text_rep) of `pair_scores` from `random_reps`; global-embedding models take one vector per item
  (VSE++: {'embedding': [I, D]} / [C, D], DAER: arrays [I, D] / [C, D])."""
  if model_name == 'vsepp':
    return {'embedding': reps['regions'][:, 0]}, {'embedding': reps['words'][:, 0]}
  if model_name == 'daer':
    return reps['regions'][:, 0], reps['words'][:, 0]
  return {'regions': reps['regions']}, {'words': reps['words'], 'mask': reps['mask']}


_TAG_LEN = 4  # GLFN tag tokens: [CLS] + a two-word tag such as "white plate" + [SEP]


def random_inputs(model, seed: int, b: int, k: int, n: int, min_len: int, img_dim: int) -> tuple[dict, dict]:
  """A random dataset-format batch of b pairs as the model reads it (inference.image_inputs): images {'regions':
  [b, k, img_dim]} (GLFN: + pfan_blocks / pfan_weights [b, k, L] from random boxes, tag_tokens / tag_mask
  [b, k, 4]), text {'tokens', 'mask': [b, n]} with lengths in [min_len, n]."""
  from xmatch_jax import inference

  rng = np.random.default_rng(seed)
  lengths = rng.integers(min_len, n + 1, size=b)
  mask = (np.arange(n)[None] < lengths[:, None]).astype(np.float32)
  images = {'regions': rng.standard_normal((b, k, img_dim)).astype(np.float32)}
  text = {'tokens': (rng.integers(1, model.vocab_size, (b, n)) * mask).astype(np.int32), 'mask': mask}
  keys = getattr(model, 'image_keys', ('regions',))
  if 'pfan_blocks' in keys:  # x1, y1, x2, y2 in [0, 1]; the model's prepare_images finds the blocks
    corners = rng.uniform(0, 0.7, (b, k, 2))
    images['boxes'] = np.concatenate([corners, corners + rng.uniform(0.05, 0.3, (b, k, 2))], axis=-1)
  if 'tag_tokens' in keys:
    images['tag_tokens'] = rng.integers(1, model.vocab_size, (b, k, _TAG_LEN)).astype(np.int32)
    images['tag_mask'] = np.ones((b, k, _TAG_LEN), np.float32)
  return inference.image_inputs(model, images), text


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
  from xmatch_jax import run_setup
  from xmatch_jax.models import build_model

  if run_setup.uses_bert(config):
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
  return model, init(jax.random.key(config.seed), *random_inputs(model, 0, 1, k, n, n, img_dim))


def init_pair_head(model, seed: int, image_rep, text_rep):
  """The variables `pair_scores` reads (DAER: {'params': {'relation': ...}}; none for SCAN or GLFN). Flax derives
  each module's init RNG from its path, so they equal those of the full model's init with the same seed."""
  import jax

  return model.init(jax.random.key(seed), image_rep, text_rep, method=model.pair_scores)


def check_train_batch(config, train_batch: int) -> None:
  """Refuses a training step for models `child_train` cannot time."""
  if train_batch and config.model.name == 'daer':
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
  reps = random_reps(args.seed, args.n_images, args.n_captions, args.k, args.n, args.min_len, config.model.embed_size)
  if config.model.name == 'mmca':  # its reps hold per-item projections: encode random inputs (not timed)
    model, variables = _init_model(config, 100, 16, args.k, args.n)
    image_rep, text_rep = _encoded_reps(model, variables, reps, args.seed)
  else:  # the pair head's own variables: a full init would run DAER's MobileNet or GLFN's BERT for nothing
    model = build(config, 100, 16)
    image_rep, text_rep = jax.device_put(pair_inputs(config.model.name, reps))
    variables = init_pair_head(model, config.seed, image_rep, text_rep)
  score = jax.jit(lambda v, i, t: model.apply(v, i, t, method=model.pair_scores))
  t0 = time.perf_counter()
  scores = np.asarray(score(variables, image_rep, text_rep))
  compile_s = time.perf_counter() - t0
  times = _time(lambda: score(variables, image_rep, text_rep).block_until_ready(), args.repeats, warmup=0)
  out = {'score_time_s': _summary(times), 'first_call_s': compile_s, **_peak_memory()}
  if args.scores_out:
    np.save(args.scores_out, scores)
    np.savez(args.scores_out + '.params.npz', **flat_params(variables))
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
  tx = optim.freeze(tx, variables['params'], getattr(model, 'frozen_params', ()))
  state = {'params': variables['params'], 'opt_state': tx.init(variables['params']), 'step': 0}
  images, text = random_inputs(model, args.seed, b, args.k, args.n, args.min_len, img_dim)
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


def _encoded_reps(model, variables, reps: dict, seed: int):
  import jax

  rng = np.random.default_rng(seed)
  images = {'regions': rng.standard_normal(reps['regions'].shape[:2] + (16,)).astype(np.float32)}
  tokens = (rng.integers(1, model.vocab_size, reps['mask'].shape) * reps['mask']).astype(np.int32)
  encode_image = jax.jit(lambda v, x: model.apply(v, x, method=model.encode_image))
  encode_text = jax.jit(lambda v, x: model.apply(v, x, method=model.encode_text))
  return encode_image(variables, images), encode_text(variables, {'tokens': tokens, 'mask': reps['mask']})


def _run_child(kind: str, argv: list) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), f'--_child={kind}'] + argv
  proc = subprocess.run(cmd, capture_output=True, text=True)
  if proc.returncode != 0:
    raise RuntimeError(f'benchmark {kind} subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------- torch
def torch_scan_t2i_official(regions, words, lengths, lambda_softmax: float, lambda_lse: float):
  """SCAN's xattn_score_t2i (kuanghuei/SCAN model.py, clipped_l2norm + LogSumExp): a loop over captions."""
  import torch
  import torch.nn.functional as F

  def l2norm(x, dim, eps=1e-8):
    return x / (x.pow(2).sum(dim=dim, keepdim=True).sqrt() + eps)

  def func_attention(query, context, smooth):
    batch, query_len, source_len = context.size(0), query.size(1), context.size(1)
    attn = torch.bmm(context, query.transpose(1, 2))
    attn = l2norm(F.leaky_relu(attn, 0.1), 2)
    attn = attn.transpose(1, 2).contiguous().view(batch * query_len, source_len)
    attn = F.softmax(attn * smooth, dim=1).view(batch, query_len, source_len)
    weighted = torch.bmm(context.transpose(1, 2), attn.transpose(1, 2).contiguous())
    return weighted.transpose(1, 2)

  def cosine_similarity(x1, x2, dim, eps=1e-8):
    w12 = (x1 * x2).sum(dim)
    return w12 / (torch.norm(x1, 2, dim) * torch.norm(x2, 2, dim)).clamp(min=eps)

  similarities = []
  n_image = regions.size(0)
  for i in range(words.size(0)):
    cap = words[i, : int(lengths[i])].unsqueeze(0).repeat(n_image, 1, 1)
    context = func_attention(cap, regions, lambda_softmax)
    row = cosine_similarity(cap, context, dim=2)
    row = torch.log(torch.exp(row * lambda_lse).sum(dim=1, keepdim=True)) / lambda_lse
    similarities.append(row)
  return torch.cat(similarities, 1)


def torch_rdan(regions, words, mask, params: dict, m: dict, block: int):
  """RDAN's head (eqs 5-11) in PyTorch at its best on CPU: S as one einsum, the relation CNN as channels_last
  convolutions over a block of images x all captions, and the Gram-matrix cosines."""
  import torch
  import torch.nn.functional as F

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
  lam, mu = m['lambda_'], m['mu']
  c, k, n = words.size(0), regions.size(1), words.size(1)
  colmask = valid[None, :, None, :].float()
  out = []
  for start in range(0, regions.size(0), block):
    sim = torch.einsum('ikd,cnd->ickn', r_unit[start : start + block], w_unit)
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
    rn, wn = r_norm[start : start + b][:, None], w_norm[None]
    alpha = torch.softmax((lam * s2).masked_fill(~valid[None, :, None, :], float('-inf')), dim=-1)
    dots = rn * (alpha * sim * wn[:, :, None, :]).sum(-1)
    att = (alpha * torch.einsum('cnm,ickm->ickn', g_txt, alpha)).sum(-1)
    rr = dots / (rn * att.clamp(min=0).sqrt()).clamp(min=eps)
    beta = torch.softmax(lam * s1, dim=-2)
    dots = wn * (beta * sim * rn[..., None]).sum(-2)
    att = (beta * torch.einsum('ikl,icln->ickn', g_img[start : start + b], beta)).sum(-2)
    wr = (dots / (wn * att.clamp(min=0).sqrt()).clamp(min=eps)) * valid[None]
    out.append((1 - mu) * rr.mean(-1) + mu * wr.sum(-1) / valid.sum(-1)[None])
  return torch.cat(out, 0)


def compare_torch(args, config, reps: dict, scores: np.ndarray, params: dict) -> dict:
  try:
    import torch
  except ImportError:
    print('--compare-torch: torch is not installed; skipped (pip install torch==2.13.0).')
    return {}
  torch.set_num_threads(os.cpu_count())
  m = config.model.to_dict()
  regions, words = torch.from_numpy(reps['regions']), torch.from_numpy(reps['words'])
  mask = torch.from_numpy(reps['mask'])
  if (
    m['name'] == 'scan'
    and m['cross_attn'] == 't2i'
    and m['raw_feature_norm'] == 'clipped_l2norm'
    and m['agg_func'] == 'LogSumExp'
  ):
    lengths = mask.sum(1).int()
    fn = lambda: torch_scan_t2i_official(regions, words, lengths, m['lambda_softmax'], m['lambda_lse'])
    kind = 'official SCAN xattn_score_t2i loop'
  elif m['name'] == 'rdan' and m['use_cnn'] and m['use_residual'] and not m['one_path']:
    fn = lambda: torch_rdan(regions, words, mask, params, m, m['block_size'])
    kind = 'batched channels_last RDAN head'
  else:
    print(f'--compare-torch: no PyTorch reference for this model configuration ({m["name"]}); skipped.')
    return {}
  with torch.no_grad():
    reference = fn().numpy()
    times = _time(fn, args.repeats, warmup=0)
  return {
    'torch_implementation': kind,
    'torch_time_s': _summary(times),
    'max_abs_diff': float(np.max(np.abs(reference - scores))),
  }


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
  'train_batch',
  'repeats',
  'train_repeats',
  'seed',
)


def run(args) -> dict:
  config = load_config(args.config)
  apply_overrides(config, args)
  check_train_batch(config, args.train_batch)
  build(config, 100, 16)  # a config the children cannot build (e.g. no bert_dir) fails here, before any timing
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
      'train_batch': args.train_batch,
      'dtype': m.get('dtype', 'float32'),
    },
    'devices': _devices(),
  }
  rate_before = matmul_gflops(args.matmul_size, args.repeats)
  scores_file = os.path.join(args.tmpdir, f'benchmark_scores_{os.getpid()}.npy')
  score = _run_child('score', child_argv + [f'--scores_out={scores_file}'] if args.compare_torch else child_argv)
  train_result = _run_child('train', child_argv) if args.train_batch else {}
  rate_after = matmul_gflops(args.matmul_size, args.repeats)
  rate = float(np.median([rate_before, rate_after]))

  pairs = args.n_images * args.n_captions
  t = score['score_time_s']['median']
  flops = scoring_flops(m, args.n_images, args.n_captions, args.k, args.n, d)
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
    reps = random_reps(args.seed, args.n_images, args.n_captions, args.k, args.n, args.min_len, d)
    params = dict(np.load(scores_file + '.params.npz'))
    torch_result = compare_torch(args, config, reps, np.load(scores_file), params)
    for f in (scores_file, scores_file + '.params.npz'):
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
      + ('' if r['model']['name'] == 'daer' else f'k={s["k"]}, n={s["min_len"]}..{s["n"]}, ')
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
        f' (similarity tensor alone: {r["similarity_gflops_per_s"]:.1f} GFLOP/s = {r["similarity_pct_of_matmul"]:.0f}%)'
        if r['flops'].get('similarity')
        else ''
      ),
    ),
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
    rows.append(('speed-up over torch', f'{r["speedup_vs_torch"]:.2f}x (max |diff| {r["max_abs_diff"]:.2e})'))
  width = max(len(k) for k, _ in rows)
  return '\n'.join(f'{k:<{width}}  {v}' for k, v in rows)


def _fmt_time(t: dict) -> str:
  return f'{t["median"] * 1e3:.1f} ms median (min {t["min"] * 1e3:.1f}, max {t["max"] * 1e3:.1f}, {t["repeats"]} runs)'


def parse_args(argv):
  p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--config', default='configs/rdan.py:f30k', help='config file:arg, as for xmatch_jax.train')
  p.add_argument('--n_images', type=int, default=128)
  p.add_argument('--n_captions', type=int, default=128)
  p.add_argument('--k', type=int, default=36, help='regions per image')
  p.add_argument('--n', type=int, default=20, help='padded caption length')
  p.add_argument(
    '--min_len', type=int, default=None, help='shortest caption (lengths uniform in [min_len, n]); default n'
  )
  p.add_argument('--block_size', type=int, default=0, help="images per scoring block (0: the config's)")
  p.add_argument('--embed_size', type=int, default=0, help="D (0: the config's)")
  p.add_argument('--cnn_channels', type=int, default=0, help="RDAN relation CNN channels (0: the config's)")
  p.add_argument('--bert_dir', default='', help="BERT of a BERT-based model ('minilm', or a directory)")
  p.add_argument(
    '--dtype',
    default='',
    choices=['', 'float32', 'bfloat16'],
    help="config.model.dtype: compute dtype of the model's matmuls ('': the config's)",
  )
  p.add_argument('--train_batch', type=int, default=128, help='batch of the timed training step (0: skip)')
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--train_repeats', type=int, default=3)
  p.add_argument('--matmul_size', type=int, default=2048)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--compare-torch', dest='compare_torch', action='store_true')
  p.add_argument('--json', default='', help='also write the results to this JSON file')
  p.add_argument('--tmpdir', default='/tmp')
  p.add_argument('--scores_out', default='', help=argparse.SUPPRESS)
  p.add_argument('--_child', default='', choices=['', 'score', 'train'], help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.min_len is None:
    args.min_len = args.n
  for name in ('n_images', 'n_captions', 'k', 'n', 'min_len', 'repeats', 'train_repeats', 'matmul_size'):
    if getattr(args, name) < 1:
      p.error(f'--{name} must be >= 1, got {getattr(args, name)}')
  if args.min_len > args.n:
    p.error(f'--min_len ({args.min_len}) must be <= --n ({args.n})')
  if args.train_batch < 0 or args.block_size < 0:
    p.error('--train_batch and --block_size must be >= 0')
  return args


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  if args._child:
    result = child_score(args) if args._child == 'score' else child_train(args)
    print(json.dumps(result))
    return 0
  result = run(args)
  result['command'] = 'python tools/benchmark.py ' + ' '.join(a for a in argv if not a.startswith('--json'))
  print(format_table(result))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=2)
    print(f'wrote {args.json}')
  return 0


if __name__ == '__main__':
  sys.exit(cli.run_tool(main))
