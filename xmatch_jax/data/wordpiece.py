"""WordPiece captions for BERT-based matchers (MMCA, GLFN): the checkpoint's own tokenizer via `tokenizers`.

Same interface as `vocab.Vocabulary` where training and evaluation use it (`encode`, `decode`, `len`), so the
batcher pads WordPiece ids exactly as word ids ([PAD] is id 0 in BERT vocabularies; checked). A caption encodes
as [CLS] tokens [SEP]; nothing is truncated here (the batcher's buckets decide, and count truncations).
"""

import os
import shutil
from typing import Iterable

import numpy as np

from xmatch_jax import errors
from xmatch_jax.convert import hf_bert

# Copied into a workdir so that evaluation and the Retriever need nothing outside it.
BERT_SUBDIR = 'bert'


class WordPieceVocab:
  """A BERT checkpoint's WordPiece tokenizer."""

  def __init__(self, directory: str):
    self.directory = hf_bert.resolve_dir(directory)
    self._tokenizer = hf_bert.load_tokenizer(self.directory)
    pad = self._tokenizer.token_to_id('[PAD]')
    if pad != 0:
      raise errors.UserError(f"{self.directory}: the tokenizer's [PAD] id is {pad}; the batcher pads with id 0")

  def __len__(self) -> int:
    return self._tokenizer.get_vocab_size(with_added_tokens=True)

  def encode(self, caption: str) -> np.ndarray:
    """[n] int32 ids: [CLS], WordPiece ids, [SEP]."""
    if not isinstance(caption, str) or not caption.strip():
      raise errors.UserError(f'caption {caption!r} is empty; every caption needs at least one word.')
    return np.array(self._tokenizer.encode(caption).ids, np.int32)

  def decode(self, ids: Iterable[int]) -> list:
    out = []
    for i in ids:
      token = self._tokenizer.id_to_token(int(i))
      if token is None:
        raise errors.UserError(f'token id {int(i)} is outside the vocabulary [0, {len(self)}).')
      out.append(token)
    return out

  def save(self, workdir: str) -> str:
    """Copies the BERT's config.json and tokenizer files to W/bert (the weights go into the checkpoint)."""
    out = os.path.join(workdir, BERT_SUBDIR)
    os.makedirs(out, exist_ok=True)
    for name in ('config.json',) + hf_bert.TOKENIZER_FILES:
      source = os.path.join(self.directory, name)
      if os.path.exists(source) and os.path.abspath(source) != os.path.abspath(os.path.join(out, name)):
        shutil.copy(source, os.path.join(out, name))
    return out
