"""RDAN (Hu et al., IJCAI 2019): relation CNN over the region-word cosine map, dual pathway attention.

  python -m xmatch_jax.train --config=configs/rdan.py:f30k --workdir=W           # the paper's model
  python -m xmatch_jax.train --config=configs/rdan.py:f30k,no_cnn --workdir=W    # a Table 3 ablation

Variants (Table 3): mu0 / mu1 (only the row-wise / column-wise pathway), one_path (one learned map for
both attentions), no_cnn (attend with the cosine map S), no_res (no residual S), no_hard (sum over all
negatives instead of the hardest).
"""

import ml_collections

from configs import common

VARIANTS = ('mu0', 'mu1', 'one_path', 'no_cnn', 'no_res', 'no_hard')


def get_config(arg: str = 'shapes') -> ml_collections.ConfigDict:
  dataset, variants = common.parse_arg(arg, 'rdan', variants=VARIANTS)
  c = common.base_config(dataset)  # margin 0.2, hardest negatives, batch 128, Adam + grad clip 2
  m = c.model = ml_collections.ConfigDict()
  m.name = 'rdan'
  m.embed_size = 1024  # joint space D (sec 3.1)
  m.word_dim = 300  # word embedding size (eq 2)
  m.num_layers = 1  # GRU layers
  m.bidirectional = True  # bi-GRU, directions averaged (eq 4)
  m.l2norm_features = False  # the paper's eqs 1 and 4 do not normalise (SCAN-family code does)
  m.lambda_ = 4.0  # inverse softmax temperature of both attentions (sec 3.5)
  m.mu = 0.1  # weight of the word relevance in F (eq 11)
  m.cnn_channels = 32  # channels of the 3x1, 1x3 and 3x3 relation convs (sec 3.2)
  m.use_cnn = True  # False: no-cnn ablation
  m.use_residual = True  # False: no-res ablation
  m.one_path = False  # True: one-path ablation
  m.block_size = 2  # images per block of the all-pairs scorer (bounds memory). tools/benchmark.py
  # at k=36, n=12..20, 128 x 128 pairs on 2 CPU cores: block 2 scores 7,975
  # pairs/s (block 8: 4,024, 32: 3,957) and trains in 10.4 s/step (8: 14.8 s);
  # the per-block maps then fit in cache. On a GPU a larger block fills the device.
  m.remat = True  # recompute each block in the backward pass instead of storing it
  m.dtype = 'float32'  # compute dtype of the large matmuls: 'float32' or 'bfloat16' (mixed precision:
  # params, softmaxes, norms, scores and the loss stay float32)
  m.conv_impl = 'auto'  # 'auto': the relation CNN runs the compiled CPU kernel where one builds, forward and
  # backward (xmatch_jax/kernels, docs/architecture.md); 'xla': always XLA's convolutions (same scores to float32
  # rounding)
  # The training step's 3 B rescored pairs in one `paired_scores` call: the kernel splits them over the threads
  # itself. Forward + backward of 384 pairs, 2 cores (AMD EPYC, 2026-12-06): `shapes` sizes 57 ms against 69 ms in
  # blocks of 32, paper sizes 378 against 418 ms; XLA's convolutions are faster in blocks of 32 (134 against 157 ms
  # and 604 against 869 ms), so with conv_impl='xla' on a CPU set loss.pair_block=32.
  c.loss.pair_block = 0

  common.apply_schedule(c, dataset)
  if dataset not in common.PAPER_DATASETS:
    m.cnn_channels = 16  # paper: 32; 16 makes a batch-128 step ~3x cheaper on CPU
    # Images per block: at k 12, 16 channels, 2 cores, block 4 scores 110 k pairs/s at width 16 against 95 k for
    # block 16 (evaluation: 256 captions a tile), and trains as fast (tools/benchmark.py, README "Performance").
    m.block_size = 4
  if dataset == 'shapes':
    # SCAN's shapes warm-up, for the same reason: without it the loss sits at the hardest-negative collapse value
    # (2 x batch x margin) for ~300 steps and the seed decides when a run leaves it (1 epoch, test rsum over 3
    # seeds: 350.1 +- 48.4, one seed still there at step 390; with 100 warm-up steps 372.6 +- 13.3, every seed
    # out by step 390). docs/fidelity.md#rdan-2.
    c.optim.warmup_steps = 100

  if 'mu0' in variants:
    m.mu = 0.0
  if 'mu1' in variants:
    m.mu = 1.0
  if 'one_path' in variants:
    m.one_path = True
  if 'no_cnn' in variants:
    m.use_cnn = False
  if 'no_res' in variants:
    m.use_residual = False
  if 'no_hard' in variants:
    c.loss.max_violation = False
  return c
