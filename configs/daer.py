"""DAER (Huang, Hu and Su, Entropy 2023, 25, 1216): dual attention + enhanced relation network, in three stages.

  python -m xmatch_jax.train --config=configs/daer.py:shapes --workdir=W          # all stages, then:
  python -m xmatch_jax.evaluate --workdir=W                                       # mAP both ways
  python -m xmatch_jax.train --config=configs/daer.py:wikipedia,c --workdir=W     # the DAER-C variant

Variants (Table 3): c = DAER-C (no attention, plain relation network), i = DAER-I (dual spatial attention in the
image module), t = DAER-T (dual region attention in the text module), i_t = DAER-I-T (both attentions, plain
relation network); no variant = DAER (both attentions and the power k = 0.6 of eqs 8-9).

The paper trains every stage by stochastic gradient descent (sec 3.1, Algorithm 1 step 3.5) and gives no learning
rate, batch size or epoch count (TensorFlow 2.4): the category datasets use plain SGD with Keras' default learning
rate 0.01; batch sizes and epochs below are ours, and so are the classification layers of stages 1-2 (one linear
layer on each 300-d representation, removed after its stage, sec 4.4). `shapes` trains from scratch on a small
budget with Adam (docs/fidelity.md, DAER). Set `mobilenet_weights` to a torchvision
`mobilenet_v3_large` ImageNet state_dict (.pth or .safetensors) to start stage 2 from it, and `word_vectors` to a
GloVe / word2vec text file of 300-d vectors for the word embeddings.
"""

import ml_collections

from configs import common

CATEGORY_DATASETS = ('wikipedia', 'pascal', 'xmedianet', 'category')
DATASETS = ('shapes', 'shapes_tiny') + CATEGORY_DATASETS
NUM_CLASSES = {'wikipedia': 10, 'pascal': 20, 'xmedianet': 200, 'shapes': 30, 'shapes_tiny': 30}
VARIANTS = ('c', 'i', 't', 'i_t')


def _stage(
  num_epochs: int, batch_size: int, learning_rate: float, optimizer: str = 'sgd', max_steps: int = 0
) -> ml_collections.ConfigDict:
  # max_steps > 0 stops the stage early (dev evaluation and checkpoint at that step).
  return ml_collections.ConfigDict(
    {
      'num_epochs': num_epochs,
      'batch_size': batch_size,
      'optimizer': optimizer,
      'learning_rate': learning_rate,
      'grad_clip': 0.0,
      'max_steps': max_steps,
    }
  )


def get_config(arg: str = 'shapes') -> ml_collections.ConfigDict:
  dataset, variants = common.parse_arg(arg, 'daer', variants=VARIANTS, datasets=DATASETS)
  if len(variants) > 1:
    raise ValueError(f'configs/daer.py: pick at most one variant of {VARIANTS}; got {sorted(variants)}.')
  c = common.base_config(dataset)
  for unused in ('batch_size', 'num_epochs', 'loss', 'optim'):  # the stages below have their own
    del c[unused]
  m = c.model = ml_collections.ConfigDict()
  m.name = 'daer'
  m.num_classes = NUM_CLASSES.get(dataset, 0)  # 'category' (your own data): set it
  m.word_dim = 300  # sec 4.4
  m.lstm_size = 300
  m.embed_size = 300  # text and image representations, 1 x 300
  m.region_attention = True  # eqs 1-3, kernels 3 and 7, MLP 512-1024-512
  m.spatial_attention = True  # eqs 4-6, convolutions 3x3 and 7x7
  m.spatial_attention_at = 'projection'  # its place in each bottleneck: 'projection' / 'expanded' (CBAM order) /
  # 'residual' (docs/fidelity.md#daer-5)
  m.power = 0.6  # eqs 8-9
  m.width_mult = 1.0  # MobileNetV3-large
  m.image_head_hidden = 1280  # MobileNetV3's head (FC 1280, hard-swish) before the FC to 300; 0: removed with
  # the classifier, the FC to 300 on the pooled 960-d features (docs/fidelity.md#daer-2)
  m.image_dropout = 0.2  # MobileNetV3's head dropout, before the FC to 300
  m.keras_init = True  # TensorFlow 2.4's Keras initialisers outside MobileNetV3 (docs/fidelity.md#daer-12)
  m.block_size = 256  # images per block of the all-pairs relation MLP
  if variants & {'c', 'i'}:
    m.region_attention = False
  if variants & {'c', 't'}:
    m.spatial_attention = False
  if variants & {'c', 'i', 't', 'i_t'}:
    m.power = 1.0

  c.trainer = 'staged'
  c.stages = ('text', 'image', 'relation')  # Algorithm 1, steps 1-3
  c.stage = ml_collections.ConfigDict()
  c.stage.text = _stage(20, 64, 1e-2)  # SGD (sec 3.1), Keras' default rate: the paper gives none
  c.stage.image = _stage(20, 32, 1e-2)
  c.stage.relation = _stage(20, 32, 1e-2)
  c.mobilenet_weights = ''  # torchvision mobilenet_v3_large ImageNet weights (.pth / .safetensors)
  c.word_vectors = ''  # GloVe / word2vec text file, 300-d
  c.stages_from = ''  # DAER workdirs (comma-separated) whose text / image stages to reuse where equal
  c.eval_metric = 'map'
  c.vocab_min_count = 1 if dataset.startswith('shapes') else 4
  c.caption_buckets = (16, 32, 64, 128, 256, 512, 1024)
  c.truncate_captions = dataset in ('wikipedia', 'xmedianet', 'category')  # whole articles: cut to 1024 words
  c.log_every_steps = 50
  if dataset.startswith('shapes'):
    # 64 x 64 canvas, from scratch; minutes per stage on 2 CPU cores.
    m.width_mult = 0.5
    c.stage.text = _stage(1, 64, 1e-3, 'adam')
    c.stage.image = _stage(4, 64, 2e-3, 'adam')
    c.stage.relation = _stage(1, 64, 2e-4, 'adam')
  return c
