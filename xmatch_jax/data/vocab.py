"""SCAN's word vocabulary (vocab.py / data.py) and an nltk-free stand-in for its tokenizer.

The json format is SCAN's `serialize_vocab`: `{"idx2word": {"0": "<pad>", ...}, "word2idx": {...}, "idx": n}` with
string keys in `idx2word`. Ids 0-3 are `<pad>`, `<start>`, `<end>`, `<unk>`; a caption encodes as
`[<start>] + ids + [<end>]` (SCAN's PrecompDataset.__getitem__). VSE++ keeps the same fields in a pickled
`Vocabulary` object (`vocab/<data_name>_vocab.pkl`, int keys); `Vocabulary.load` reads either, the pickle without
running code.

Tokenizer. SCAN tokenises with `nltk.word_tokenize(caption.lower())`: Punkt sentence splitting, then NLTK's
Treebank-style word tokenizer on each sentence. `tokenize` reproduces the word tokenizer's regex cascade
(NLTKWordTokenizer, nltk 3.9, Apache-2.0): punctuation, brackets and quotes become tokens, an opening / closing
double quote becomes ``` `` ``` / `''`, clitics split as `'s 'm 'd 're 've 'll n't` (`don't` -> `do n't`,
`can't` -> `ca n't`, `cannot` -> `can not`), commas inside numbers stay (`1,000`), and only a sentence-final
period is split off. Punkt is replaced by a rule: a word ending in `.` and followed by more text ends a sentence
unless it looks like an abbreviation (a word with inner periods such as `u.s.`, one letter, a number, an
ellipsis, or a common title/abbreviation such as `mr.` or `st.`). On lower-cased captions this is what Punkt's
English model does in the common cases; rare Punkt decisions that depend on its learned statistics can differ.
"""

import collections
import json
import os
import pickle
import re
from typing import Iterable
from typing import Sequence

import numpy as np

from xmatch_jax import errors
from xmatch_jax import safe_pickle

PAD, START, END, UNK = '<pad>', '<start>', '<end>', '<unk>'
SPECIAL_TOKENS = (PAD, START, END, UNK)
PAD_ID, START_ID, END_ID, UNK_ID = 0, 1, 2, 3
DEFAULT_MIN_COUNT = 4  # SCAN's vocab.py --threshold default

# --- tokenizer -------------------------------------------------------------------------------------------------

_STARTING_QUOTES = [
  (re.compile('([«“‘„]|[`]+)'), r' \1 '),
  (re.compile(r'^\"'), r'``'),
  (re.compile(r'(``)'), r' \1 '),
  (re.compile(r'([ \(\[{<])(\"|\'{2})'), r'\1 `` '),
  (re.compile(r'(?i)(\')(?!re|ve|ll|m|t|s|d|n)(\w)\b'), r'\1 \2'),
]
_PUNCTUATION = [
  (re.compile(r'([^\.])(\.)([\]\)}>"\'' '»”’ ' r']*)\s*$'), r'\1 \2 \3 '),
  (re.compile(r'([:,])([^\d])'), r' \1 \2'),
  (re.compile(r'([:,])$'), r' \1 '),
  (re.compile(r'\.{2,}'), r' \g<0> '),
  (re.compile(r'[;@#$%&]'), r' \g<0> '),
  (re.compile(r'([^\.])(\.)([\]\)}>"\']*)\s*$'), r'\1 \2\3 '),  # the sentence-final period
  (re.compile(r'[?!]'), r' \g<0> '),
  (re.compile(r"([^'])' "), r"\1 ' "),
  (re.compile(r'[*]'), r' \g<0> '),
]
_BRACKETS = (re.compile(r'[\]\[\(\)\{\}\<\>]'), r' \g<0> ')
_DOUBLE_DASHES = (re.compile(r'--'), r' -- ')
_ENDING_QUOTES = [
  (re.compile('([»”’])'), r' \1 '),
  (re.compile(r"''"), " '' "),
  (re.compile(r'"'), " '' "),
  (re.compile(r'\s+'), ' '),
  (re.compile(r"([^' ])('[sS]|'[mM]|'[dD]|') "), r'\1 \2 '),
  (re.compile(r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) "), r'\1 \2 '),
]
_CONTRACTIONS = [
  re.compile(p)
  for p in (
    r'(?i)\b(can)(?#X)(not)\b',
    r"(?i)\b(d)(?#X)('ye)\b",
    r'(?i)\b(gim)(?#X)(me)\b',
    r'(?i)\b(gon)(?#X)(na)\b',
    r'(?i)\b(got)(?#X)(ta)\b',
    r'(?i)\b(lem)(?#X)(me)\b',
    r"(?i)\b(more)(?#X)('n)\b",
    r'(?i)\b(wan)(?#X)(na)(?=\s)',
    r"(?i) ('t)(?#X)(is)\b",
    r"(?i) ('t)(?#X)(was)\b",
  )
]

# Words that keep their period mid-caption (Punkt treats them as abbreviations before a lower-case word).
_ABBREVIATIONS = frozenset(
  'mr mrs ms dr st jr sr vs etc inc co ltd mt ft ave blvd rd prof gen gov sgt lt capt col rev no approx dept '
  'jan feb mar apr jun jul aug sep sept oct nov dec'.split()
)
_NUMBER = re.compile(r'^-?[\.,]?\d[\d,\.-]*$')
_CLOSING = '])}>"\'»”’'


def _ends_sentence(word: str) -> bool:
  """Whether a whitespace-delimited word ending in '.' closes a sentence (the Punkt stand-in)."""
  core = word.rstrip(_CLOSING)
  if not core.endswith('.'):
    return False
  stem = core[:-1]
  if not stem:  # a lone '.' token
    return True
  if stem.endswith('.') or '.' in stem:  # ellipsis, or inner periods (u.s., e.g.)
    return False
  return not (len(stem) == 1 and stem.isalpha()) and not _NUMBER.match(stem) and stem not in _ABBREVIATIONS


def _split_sentences(text: str) -> list:
  words = list(re.finditer(r'\S+', text))
  sentences, start = [], 0
  for match in words[:-1]:
    if _ends_sentence(match.group()):
      sentences.append(text[start : match.end()])
      start = match.end()
  sentences.append(text[start:])
  return sentences


def _word_tokenize(sentence: str) -> list:
  """NLTKWordTokenizer's cascade on one sentence."""
  text = sentence
  for regexp, repl in _STARTING_QUOTES + _PUNCTUATION + [_BRACKETS, _DOUBLE_DASHES]:
    text = regexp.sub(repl, text)
  text = ' ' + text + ' '
  for regexp, repl in _ENDING_QUOTES:
    text = regexp.sub(repl, text)
  for regexp in _CONTRACTIONS:
    text = regexp.sub(r' \1 \2 ', text)
  return text.split()


def tokenize(caption: str) -> list:
  """Lower-cases and tokenises a caption like SCAN's `nltk.word_tokenize(caption.lower())` (see module doc)."""
  if not isinstance(caption, str):
    raise errors.UserError(f'caption must be a str; got {type(caption).__name__} ({caption!r}).')
  return [token for sentence in _split_sentences(caption.lower()) for token in _word_tokenize(sentence)]


# --- vocabulary ------------------------------------------------------------------------------------------------


class Vocabulary:
  """Word <-> id map in SCAN's layout: `<pad>`=0, `<start>`=1, `<end>`=2, `<unk>`=3, then the words."""

  def __init__(self, words: Sequence[str]):
    """Args: words: every token in id order, starting with the four special tokens."""
    words = list(words)
    if tuple(words[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
      raise errors.UserError(f'vocabulary must start with {SPECIAL_TOKENS} at ids 0-3; got {tuple(words[:4])}.')
    bad = [w for w in words if not isinstance(w, str) or not w]
    if bad:
      raise errors.UserError(f'vocabulary words must be non-empty strings; got {bad[:5]}.')
    self._idx2word = words
    self._word2idx = {w: i for i, w in enumerate(words)}
    if len(self._word2idx) != len(words):
      dup = [w for w, c in collections.Counter(words).items() if c > 1]
      raise errors.UserError(f'vocabulary words must be unique; repeated: {dup[:5]}.')

  def __len__(self) -> int:
    return len(self._idx2word)

  def __contains__(self, word: str) -> bool:
    return word in self._word2idx

  def __eq__(self, other) -> bool:
    return isinstance(other, Vocabulary) and self._idx2word == other._idx2word

  def __repr__(self) -> str:
    return f'Vocabulary({len(self)} words)'

  def __call__(self, word: str) -> int:
    """Id of a word, `<unk>` for unknown words (SCAN's `vocab(word)`)."""
    return self._word2idx.get(word, UNK_ID)

  @property
  def words(self) -> tuple:
    """All tokens in id order."""
    return tuple(self._idx2word)

  def encode(self, caption: str) -> np.ndarray:
    """[n + 2] int32 ids: `<start>`, the caption's token ids (unknown -> `<unk>`), `<end>`."""
    tokens = tokenize(caption)
    if not tokens:
      raise errors.UserError(f'caption {caption!r} has no tokens; every caption needs at least one word.')
    return np.array([START_ID] + [self(t) for t in tokens] + [END_ID], np.int32)

  def decode(self, ids: Iterable[int]) -> list:
    """Tokens of an id sequence (ids out of range raise ValueError)."""
    out = []
    for i in ids:
      if not 0 <= int(i) < len(self):
        raise errors.UserError(f'token id {int(i)} is outside the vocabulary [0, {len(self)}).')
      out.append(self._idx2word[int(i)])
    return out

  @classmethod
  def build(cls, captions: Iterable[str], min_count: int = DEFAULT_MIN_COUNT) -> 'Vocabulary':
    """SCAN's build_vocab: words seen at least `min_count` times, after the special tokens.

    Words keep the order of their first occurrence (what SCAN's `Counter.items()` loop gives on Python 3.7+), so the
    same captions always give the same ids.
    """
    if int(min_count) != min_count or min_count < 1:
      raise errors.UserError(f'min_count must be an integer >= 1; got {min_count}.')
    counter = collections.Counter()
    for caption in captions:
      counter.update(tokenize(caption))
    words = [w for w, c in counter.items() if c >= min_count and w not in SPECIAL_TOKENS]
    return cls(list(SPECIAL_TOKENS) + words)

  @classmethod
  def from_json(cls, path: str) -> 'Vocabulary':
    """Reads and validates a SCAN vocabulary json (`idx2word` with string keys, `word2idx`, `idx`)."""
    if not os.path.isfile(path):
      raise errors.MissingFileError(
        f'{path}: vocabulary file not found; expected a SCAN vocabulary json (idx2word, '
        'word2idx, idx), e.g. the vocab.json of a training workdir.'
      )
    with open(path, encoding='utf-8') as f:
      try:
        data = json.load(f)
      except UnicodeDecodeError as e:
        raise errors.UserError(f'{path}: not UTF-8 text ({e}); expected a SCAN vocabulary json file.') from None
      except ValueError as e:  # JSONDecodeError, or an integer of too many digits
        raise errors.UserError(f'{path}: not valid json ({e}); expected a SCAN vocabulary file.') from None
    if not isinstance(data, dict):
      raise errors.UserError(
        f'{path}: expected a json object with fields idx2word, word2idx, idx; got {type(data).__name__}.'
      )
    return cls._from_fields(path, data, key=str, key_kind='string keys', mapping='json objects')

  @classmethod
  def from_pickle(cls, path: str) -> 'Vocabulary':
    """Reads VSE++'s `vocab/<data_name>_vocab.pkl` (a pickled `vocab.Vocabulary`) without running pickled code.

    The official files are Python 2 pickles of a class defined in `__main__` (vocab.py run as a script) holding
    `word2idx`, `idx2word` (int keys) and `idx`; only that class name and plain values are resolved.
    """
    if not os.path.isfile(path):
      raise errors.MissingFileError(f'{path}: vocabulary file not found; expected a VSE++ vocab .pkl.')
    with open(path, 'rb') as f:
      try:
        data = safe_pickle.AllowListUnpickler(
          f, _VOCAB_GLOBALS, 'only a pickled vocab.Vocabulary is read', encoding='utf-8'
        ).load()
      except safe_pickle.LOAD_ERRORS as e:  # RefusedPickleError (code, another class) is one: an UnpicklingError
        raise errors.UserError(f'{path}: not a readable VSE++ vocabulary pickle ({e}).') from None
    if not isinstance(data, _PickledVocabulary):
      raise errors.UserError(
        f'{path}: expected a pickled Vocabulary object (VSE++ vocab.py); got {type(data).__name__}.'
      )
    return cls._from_fields(path, data.state, key=int, key_kind='integer keys', mapping='dicts')

  @classmethod
  def load(cls, path: str) -> 'Vocabulary':
    """A SCAN json vocabulary, or a VSE++ pickle when the file is a pickle (told apart by its first byte)."""
    if os.path.isfile(path):
      with open(path, 'rb') as f:
        if f.read(1) == b'\x80':  # pickle protocol >= 2; json starts with '{'
          return cls.from_pickle(path)
    return cls.from_json(path)

  @classmethod
  def _from_fields(cls, path: str, data: dict, key, key_kind: str, mapping: str) -> 'Vocabulary':
    for field in ('idx2word', 'word2idx', 'idx'):
      if field not in data:
        raise errors.UserError(
          f'{path}: missing field "{field}" (a SCAN / VSE++ vocabulary has idx2word, word2idx, idx).'
        )
    idx2word, word2idx, idx = data['idx2word'], data['word2idx'], data['idx']
    if not isinstance(idx2word, dict) or not isinstance(word2idx, dict):
      raise errors.UserError(f'{path}: fields "idx2word" and "word2idx" must be {mapping}.')
    expected_keys = [key(i) for i in range(len(idx2word))]
    if set(idx2word) != set(expected_keys):
      raise errors.UserError(
        f'{path}: field "idx2word" must have the {key_kind} 0 .. {len(idx2word) - 1} without gaps.'
      )
    if not isinstance(idx, int) or isinstance(idx, bool) or idx != len(idx2word):
      raise errors.UserError(f'{path}: field "idx" is {idx!r}; expected the vocabulary size {len(idx2word)}.')
    words = [idx2word[k] for k in expected_keys]
    if not all(isinstance(w, str) and w for w in words):
      raise errors.UserError(f'{path}: field "idx2word" must map to non-empty strings.')
    if len(word2idx) != len(words) or any(
      type(word2idx.get(w)) is not int or word2idx[w] != i for i, w in enumerate(words)
    ):
      raise errors.UserError(
        f'{path}: fields "idx2word" and "word2idx" disagree; word2idx must be the exact inverse of idx2word.'
      )
    missing = [f'{t} at {i}' for i, t in enumerate(SPECIAL_TOKENS) if i >= len(words) or words[i] != t]
    if missing:
      raise errors.UserError(f'{path}: field "idx2word" lacks the special token(s) {missing}.')
    try:
      vocab = cls(words)
    except ValueError as e:
      raise errors.UserError(f'{path}: field "idx2word": {e}') from e
    # Same mapping; keep the file's key order so that to_json writes a SCAN file back byte for byte.
    vocab._word2idx = dict(word2idx)
    return vocab

  def to_json(self, path: str) -> None:
    """Writes SCAN's json format (as `json.dump` in SCAN's serialize_vocab)."""
    data = {'idx2word': {str(i): w for i, w in enumerate(self._idx2word)}, 'word2idx': self._word2idx, 'idx': len(self)}
    with open(path, 'w') as f:
      json.dump(data, f)


class _PickledVocabulary:
  """Stand-in for VSE++'s `vocab.Vocabulary` while unpickling: keeps the attribute dict, runs nothing."""

  state: dict = {}  # until BUILD gives the pickled attributes (NEWOBJ skips __init__)

  def __setstate__(self, state):
    if not isinstance(state, dict):
      raise pickle.UnpicklingError(f'Vocabulary state is a {type(state).__name__}; expected a dict')
    self.state = dict(state)


def _reconstruct(cls, base, state):
  """copy_reg._reconstructor of protocol 0/1 pickles, for the Vocabulary stand-in only."""
  del base, state  # object.__new__; the state comes through BUILD
  if cls is not _PickledVocabulary:
    raise pickle.UnpicklingError('copy_reg._reconstructor of a class other than Vocabulary')
  return _PickledVocabulary.__new__(_PickledVocabulary)


# What a VSE++ vocabulary pickle may name (Python 2 pickles build the class through copy_reg).
_VOCAB_GLOBALS = {
  ('__main__', 'Vocabulary'): _PickledVocabulary,
  ('vocab', 'Vocabulary'): _PickledVocabulary,
  ('copy_reg', '_reconstructor'): _reconstruct,
  ('copyreg', '_reconstructor'): _reconstruct,
  ('__builtin__', 'object'): object,
  ('builtins', 'object'): object,
}
