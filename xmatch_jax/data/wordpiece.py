"""WordPiece captions for BERT-based matchers (MMCA, GLFN): the checkpoint's own tokenizer via `tokenizers`.

Same interface as `vocab.Vocabulary` where training and evaluation use it (`encode`, `decode`, `len`), so the
batcher pads WordPiece ids exactly as word ids ([PAD] is id 0 in BERT vocabularies; checked). A caption encodes
as [CLS] tokens [SEP]; nothing is truncated here (the batcher's buckets decide, and count truncations).
"""

import json
import os
import shutil
from typing import Iterable

import numpy as np

from xmatch_jax import errors
from xmatch_jax.data import bert_dir


def load_tokenizer(directory: str):
  """The checkpoint's own WordPiece tokenizer (a `tokenizers.Tokenizer`) with padding and truncation off
  (the caller pads and decides about truncation)."""
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
  from tokenizers.implementations import BertWordPieceTokenizer  # pylint: disable=g-import-not-at-top

  directory = bert_dir.resolve_dir(directory)
  tokenizer_json = os.path.join(directory, 'tokenizer.json')
  vocab_txt = os.path.join(directory, 'vocab.txt')
  if os.path.exists(tokenizer_json):
    try:
      tokenizer = Tokenizer.from_file(tokenizer_json)
    except Exception as e:  # pylint: disable=broad-except - tokenizers raises plain Exception
      raise errors.UserError(
        f'{tokenizer_json}: not a readable tokenizer.json ({e}); expected the Hugging Face tokenizers file of a BERT'
      ) from None
  elif os.path.exists(vocab_txt):
    options = {}
    tokenizer_config = os.path.join(directory, 'tokenizer_config.json')
    if os.path.exists(tokenizer_config):
      with open(tokenizer_config, encoding='utf-8') as f:
        try:
          options = json.load(f)
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
          raise errors.UserError(f'{tokenizer_config}: not valid JSON ({e})') from None
      if not isinstance(options, dict):
        raise errors.UserError(f'{tokenizer_config}: a JSON {type(options).__name__}; expected an object')
      for key, kinds in (
        ('do_lower_case', (bool,)),
        ('strip_accents', (bool, type(None))),
        ('tokenize_chinese_chars', (bool,)),
      ):
        if key in options and not isinstance(options[key], kinds):
          raise errors.UserError(f'{tokenizer_config}: "{key}" is {options[key]!r:.40}; expected true or false')
    try:
      tokenizer = BertWordPieceTokenizer(
        vocab_txt,
        lowercase=options.get('do_lower_case', True),
        strip_accents=options.get('strip_accents'),
        handle_chinese_chars=options.get('tokenize_chinese_chars', True),
      )._tokenizer  # pylint: disable=protected-access
    except Exception as e:  # pylint: disable=broad-except - tokenizers raises plain Exception
      raise errors.UserError(
        f'{vocab_txt}: not a readable WordPiece vocabulary ({e}); expected one token per line'
      ) from None
  else:
    raise errors.MissingFileError(f'{directory}: no tokenizer.json or vocab.txt')
  tokenizer.no_padding()
  tokenizer.no_truncation()
  return tokenizer


class WordPieceVocab:
  """A BERT checkpoint's WordPiece tokenizer."""

  def __init__(self, directory: str):
    self.directory = bert_dir.resolve_dir(directory)
    self._tokenizer = load_tokenizer(self.directory)
    all_ids = self._tokenizer.get_vocab(with_added_tokens=True).values()
    if all_ids and not 0 <= min(all_ids) <= max(all_ids) < 2**31:
      raise errors.UserError(
        f'{self.directory}: the tokenizer has token ids {min(all_ids)} .. {max(all_ids)}; expected ids >= 0'
      )
    ids = {t: self._tokenizer.token_to_id(t) for t in ('[CLS]', '[SEP]', '[UNK]')}
    missing = [t for t, i in ids.items() if i is None or self._tokenizer.id_to_token(i) != t]
    if missing:
      raise errors.UserError(
        f'{self.directory}: the tokenizer has no {missing} token(s); expected a BERT WordPiece one'
      )
    probe = self._tokenizer.encode('a')  # the post-processor's [CLS] / [SEP] ids must be the vocabulary's
    wrong = [(t, i) for t, i in zip(probe.tokens, probe.ids) if self._tokenizer.token_to_id(t) != i]
    if wrong:
      raise errors.UserError(
        f'{self.directory}: the tokenizer encodes (token, id) {wrong[:3]}, ids its vocabulary does not give those '
        'tokens; expected a consistent tokenizer.json'
      )
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

  def save(self, out: str) -> str:
    """Copies the BERT's config.json and tokenizer files to directory `out` (a workdir's W/bert: evaluation and the
    Retriever then need nothing outside the workdir; the weights go into the checkpoint)."""
    os.makedirs(out, exist_ok=True)
    for name in ('config.json',) + bert_dir.TOKENIZER_FILES:
      source = os.path.join(self.directory, name)
      if os.path.exists(source) and os.path.abspath(source) != os.path.abspath(os.path.join(out, name)):
        shutil.copy(source, os.path.join(out, name))
    return out
