"""VSE++ (Faghri et al., BMVC 2018) on region features: mean-pooled regions, GRU caption, hardest negatives.

python -m xmatch_jax.train --config=configs/vsepp.py:shapes --workdir=W
"""

import ml_collections

from configs import common


def get_config(arg: str = 'shapes') -> ml_collections.ConfigDict:
  dataset, _ = common.parse_arg(arg, 'vsepp')
  c = common.base_config(dataset)
  m = c.model = ml_collections.ConfigDict()
  m.name = 'vsepp'
  m.embed_size = 1024  # joint space D
  m.word_dim = 300
  m.num_layers = 1
  m.bidirectional = False  # VSE++ uses a uni-directional GRU and its last hidden state
  m.dtype = 'float32'  # compute dtype of the large matmuls: 'float32' or 'bfloat16' (mixed precision:
  # params, softmaxes, norms, scores and the loss stay float32)

  common.apply_schedule(c, dataset)
  return c
