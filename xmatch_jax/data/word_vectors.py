"""Pre-trained word vectors (GloVe / word2vec text format) for a vocabulary's embedding table (DAER's 300-d words).

Format: one word per line followed by its D floats, separated by spaces; an optional first line `<count> <D>`
(word2vec's text header). Words of the vocabulary that the file lacks keep their initial (random) rows.
"""

import os

import numpy as np

from xmatch_jax import errors


def load_for_vocab(path: str, vocab, init_table: np.ndarray) -> tuple[np.ndarray, int]:
  """Rows of `init_table` [len(vocab), D] replaced by the file's vectors of vocabulary words.

  Returns (table [len(vocab), D] float32, number of vocabulary words found). Errors name the file and line.
  """
  table = np.array(init_table, np.float32, copy=True)
  if table.ndim != 2 or table.shape[0] != len(vocab):
    raise errors.UserError(f'init_table must be [{len(vocab)}, D] (one row per vocabulary word); got {table.shape}.')
  dim = table.shape[1]
  if not os.path.isfile(path):
    raise errors.MissingFileError(
      f'{path}: word vectors file not found (config.word_vectors); expected a GloVe / '
      'word2vec text file, one word and its values per line.'
    )
  found = set()
  try:
    with open(path, encoding='utf-8') as f:
      for line_no, line in enumerate(f, 1):
        parts = line.rstrip('\n').rstrip().split(' ')
        if line_no == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
          if int(parts[1]) != dim:
            raise errors.UserError(
              f'{path}: header says {parts[1]}-d vectors; the model embeds words in {dim} '
              'dimensions (config.model.word_dim).'
            )
          continue
        if len(parts) < 2:
          continue  # blank line
        word, values = parts[0], parts[1:]
        if len(values) != dim:
          raise errors.UserError(
            f'{path}, line {line_no}: word {word!r} has {len(values)} values; expected {dim} (config.model.word_dim).'
          )
        if word in vocab and word not in found:
          try:
            table[vocab(word)] = np.array(values, np.float32)
          except ValueError as e:
            raise errors.UserError(
              f'{path}, line {line_no}: word {word!r} has a value that is not a number ({e}); expected floats.'
            ) from e
          found.add(word)
  except UnicodeDecodeError as e:
    raise errors.UserError(
      f'{path}: not UTF-8 text ({e.reason}); expected a UTF-8 GloVe / word2vec text file.'
    ) from None
  return table, len(found)
