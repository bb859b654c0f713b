"""Pieces shared by every model config (SCAN-family training setup).

Configs are Python files loaded with ml_collections' `config_flags`: `--config=configs/scan.py:f30k`
calls `get_config('f30k')`; fields are overridden with `--config.key=value` and unknown keys are errors.
"""

import ml_collections

# Datasets with the published SCAN-family schedule. `shapes` is the built-in synthetic dataset.
PAPER_DATASETS = ('f30k', 'coco')
DATASETS = ('shapes', 'shapes_tiny') + PAPER_DATASETS


def parse_arg(
  arg: str, model: str, variants: tuple[str, ...] = (), datasets: tuple[str, ...] = DATASETS
) -> tuple[str, set[str]]:
  """Parses the text after ':' in --config: 'dataset' or 'dataset,variant,...'.

  Returns (dataset, variants); raises naming the choices for an unknown dataset or variant.
  """
  dataset, *chosen = [part.strip() for part in (arg or 'shapes').split(',')]
  if dataset not in datasets:
    raise ValueError(f'configs/{model}.py: unknown dataset {dataset!r} after ":"; expected one of {datasets}.')
  unknown = sorted(set(chosen) - set(variants))
  if unknown:
    raise ValueError(f'configs/{model}.py: unknown variant(s) {unknown}; expected some of {variants}.')
  return dataset, set(chosen)


def base_config(dataset: str) -> ml_collections.ConfigDict:
  """Dataset, batching, loss, optimiser, logging and checkpoint fields shared by all models."""
  c = ml_collections.ConfigDict()
  c.trainer = 'contrastive'  # xmatch_jax.trainers: 'contrastive' (hinge loss over B x B scores) or 'staged' (DAER)
  c.dataset = dataset  # registry name in xmatch_jax.data.DATASETS
  c.data_dir = ''  # TFDS data dir; '' -> $XMATCH_DATA_DIR or ~/.cache/xmatch_jax/tfds
  c.vocab_path = ''  # SCAN vocab json or VSE++ vocab .pkl; '' -> built from the training captions
  c.vocab_min_count = 4  # SCAN's build_vocab threshold
  c.caption_buckets = (16, 24, 32, 48, 64, 96)  # captions are padded to the smallest bucket that fits
  c.truncate_captions = False  # longer than the largest bucket: error, or truncate (counted and logged)
  c.seed = 0  # params init and data order; the run is a pure function of (seed, step)

  c.batch_size = 128  # captions per step (each with its image), as SCAN
  c.num_epochs = 30
  c.max_steps = 0  # stop after this many steps in all (0: num_epochs x steps per epoch); the
  # last step evaluates dev and saves a checkpoint
  c.loss = ml_collections.ConfigDict()
  c.loss.margin = 0.2  # hinge margin alpha
  c.loss.max_violation = True  # hardest negative (VSE++) instead of the sum over negatives
  c.loss.mask_same_image = True  # captions of the same image in a batch are not negatives of each other
  c.loss.rescore_hardest = True  # with max_violation: gradients through the 3 B pairs the loss uses, not all B^2
  # (same loss and gradient; trainers/contrastive.rescored_hardest_loss). False: backpropagate the dense B x B scores
  c.loss.width_chunk = 32  # with rescore_hardest: the all-pairs forward that picks the hardest negatives scores the
  # length-sorted captions this many at a time at their chunk's width, not all at the batch's longest (0: off)
  c.loss.pair_block = 32  # with rescore_hardest: the 3 B rescored pairs are scored and backpropagated this many at a
  # time (0: all at once). On a CPU blocks that stay in cache are faster (RDAN at `shapes` sizes: 32 vs 3 B, 1.2x)
  c.loss.warmup_epochs = 0  # with max_violation: sum over all negatives for this many epochs first (VSE++)

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 2e-4  # Adam
  c.optim.lr_decay_epochs = 15  # multiply the learning rate by lr_decay_factor after this many epochs
  c.optim.lr_decay_factor = 0.1
  c.optim.grad_clip = 2.0  # clip by global norm; 0 disables
  c.optim.warmup_steps = 0  # linear warm-up of the learning rate

  c.memory_budget_gb = 0.0  # > 0: halve model.block_size until a training step's XLA estimate fits
  c.log_every_steps = 100  # metrics to workdir/metrics.jsonl and TensorBoard
  c.eval_every_epochs = 1  # dev recall + checkpoint (latest, and best on dev rsum)
  c.checkpoint_every_steps = 1000  # extra saves inside long epochs
  c.checkpoint_every_minutes = 10.0  # and whenever this much wall time passed since the last save (0: off)
  c.keep_checkpoints = 2
  c.eval_image_chunk = 128  # images per scoring tile in evaluation
  c.eval_text_batch = 256  # captions per encoding batch and per scoring tile in evaluation
  c.eval_metric = 'recall'  # 'recall' (R@K, 5 captions per image) or 'map' (category labels, DAER)
  return c


def apply_schedule(c: ml_collections.ConfigDict, dataset: str) -> None:
  """The published schedule on paper datasets; small, fast settings (one CPU, minutes) on shapes.

  Expects `c.model` to exist; shapes also shrinks its embed_size / word_dim.
  """
  if dataset in PAPER_DATASETS:
    apply_paper_schedule(c, dataset)
    return
  c.model.embed_size = 256
  c.model.word_dim = 128
  c.vocab_min_count = 1
  c.num_epochs = 3  # SCAN passes the bag-of-objects oracle after one epoch here
  c.optim.learning_rate = 5e-4
  c.optim.lr_decay_epochs = 2


def apply_paper_schedule(c: ml_collections.ConfigDict, dataset: str) -> None:
  """SCAN's published schedule: F30K lr 2e-4, 30 epochs, decay at 15; COCO lr 5e-4, 20 epochs, decay at 10.
  VSE++ (its train.py's defaults, on every dataset): lr 2e-4, 30 epochs, decay at 15 (docs/fidelity.md, VSEPP-3)."""
  if dataset == 'coco' and c.model.name != 'vsepp':
    c.optim.learning_rate = 5e-4
    c.num_epochs = 20
    c.optim.lr_decay_epochs = 10
  else:
    c.optim.learning_rate = 2e-4
    c.num_epochs = 30
    c.optim.lr_decay_epochs = 15
