"""Converts a Hugging Face BERT checkpoint directory into Flax params for xmatch_jax.

  python tools/convert_bert.py --checkpoint=path/to/bert-base-uncased --out=checkpoints/bert-base-uncased
  python tools/convert_bert.py --checkpoint=minilm --out=checkpoints/minilm     # the installed MiniLM package

Reads config.json and model.safetensors or pytorch_model.bin (with a safe unpickler: no pickled code runs),
writes OUT/config.json, OUT/flax_model.safetensors (Flax param paths joined by '/') and the tokenizer files.
The output directory is itself a checkpoint directory: point a config's BERT path at it. Prints the skipped keys
(pre-training heads, buffers) and, with --check and transformers + torch installed, the largest difference of
the hidden states from transformers' BertModel on a sample sentence.
"""

import os
import shutil
import sys

from absl import flags
import numpy as np

from xmatch_jax import cli
from xmatch_jax.convert import hf_bert
from xmatch_jax.data import bert_dir
from xmatch_jax.data import wordpiece


def check_against_transformers(directory: str, config, params, text: str) -> float:
  """Max |Flax - transformers| over the last hidden states of `text` padded by 3 tokens."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  from xmatch_jax.models.bert import BertModel  # pylint: disable=g-import-not-at-top

  ids = wordpiece.load_tokenizer(directory).encode(text).ids
  tokens = np.zeros((1, len(ids) + 3), np.int64)
  mask = np.zeros_like(tokens)
  tokens[0, : len(ids)], mask[0, : len(ids)] = ids, 1
  ours = BertModel(config).apply({'params': params}, tokens.astype(np.int32), mask.astype(np.float32))
  reference = transformers.BertModel.from_pretrained(directory).eval()
  with torch.no_grad():
    theirs = reference(input_ids=torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask))
  return float(np.max(np.abs(np.asarray(ours['last_hidden_state']) - theirs.last_hidden_state.numpy())))


FLAGS = flags.FlagValues()
flags.DEFINE_string('checkpoint', None, "Hugging Face BERT directory, or 'minilm'", flag_values=FLAGS)
flags.DEFINE_string('out', None, 'output directory', flag_values=FLAGS)
flags.DEFINE_boolean('check', False, 'compare with transformers (needs torch)', flag_values=FLAGS)
flags.DEFINE_string(
  'check_text', 'a small red circle to the left of a blue square', 'sentence of --check', flag_values=FLAGS
)


def main(argv=None) -> int:
  cli.parse_flags(FLAGS, argv, __doc__, required=('checkpoint', 'out'))
  source = bert_dir.resolve_dir(FLAGS.checkpoint)
  config, params, skipped = hf_bert.load_checkpoint(source)
  if os.path.abspath(source) == os.path.abspath(FLAGS.out):
    cli.usage_error('--out must differ from --checkpoint')
  os.makedirs(FLAGS.out, exist_ok=True)
  shutil.copy(os.path.join(source, 'config.json'), os.path.join(FLAGS.out, 'config.json'))
  copied = []
  for name in bert_dir.TOKENIZER_FILES:
    if os.path.exists(os.path.join(source, name)):
      shutil.copy(os.path.join(source, name), os.path.join(FLAGS.out, name))
      copied.append(name)
  hf_bert.write_flax_params(params, os.path.join(FLAGS.out, hf_bert.FLAX_WEIGHTS))
  n_params = sum(int(np.prod(v.shape)) for v in _leaves(params))
  print(
    f'{source}: BERT with {config.num_hidden_layers} layers, hidden {config.hidden_size}, '
    f'{n_params:,} params -> {os.path.join(FLAGS.out, hf_bert.FLAX_WEIGHTS)}'
  )
  print(f'tokenizer files: {copied}')
  if skipped:
    print(f'skipped (not part of the encoder): {skipped}')
  if FLAGS.check:
    try:
      diff = check_against_transformers(source, config, params, FLAGS.check_text)
    except ImportError as e:
      print(f'--check skipped: {e} (pip install torch==2.13.0 transformers)')
    else:
      print(f'max |Flax - transformers| of the last hidden states: {diff:.2e}')
      if diff > 1e-4:
        print('error: the converted model disagrees with transformers by more than 1e-4', file=sys.stderr)
        return 1
  return 0


def _leaves(tree):
  if isinstance(tree, dict):
    for value in tree.values():
      yield from _leaves(value)
  else:
    yield tree


if __name__ == '__main__':
  sys.exit(cli.run_tool(main))
