"""Vocabulary: SCAN json round trip on the real Flickr30K vocabulary, tokenizer, encoding, validation."""

import json
import os
import pickle
import sys

import numpy as np
import pytest

from xmatch_jax.data import vocab as vocab_lib

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tools'))
import fuzz_readers  # noqa: E402  pylint: disable=g-import-not-at-top

# Real files from the field, shipped so the tests run in any clone: SCAN's Flickr30K vocabulary and a slice of its
# train captions.
FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures', 'f30k_sample')
VOCAB_JSON = os.path.join(FIXTURES, 'f30k_vocab.json')
CAPTIONS_TXT = os.path.join(FIXTURES, 'train_caps.txt')


@pytest.fixture(scope='module')
def f30k_vocab():
  return vocab_lib.Vocabulary.from_json(VOCAB_JSON)


def read_captions():
  with open(CAPTIONS_TXT) as f:
    return [line.strip() for line in f]  # as SCAN's PrecompDataset reads them


def test_fixture_round_trip(f30k_vocab, tmp_path):
  with open(VOCAB_JSON) as f:
    original = json.load(f)
  assert len(f30k_vocab) == original['idx'] == len(original['idx2word'])
  for key, word in original['idx2word'].items():
    assert f30k_vocab(word) == int(key)
  out = tmp_path / 'vocab.json'
  f30k_vocab.to_json(str(out))
  with open(out) as f:
    assert json.load(f) == original
  assert vocab_lib.Vocabulary.from_json(str(out)) == f30k_vocab
  # SCAN's file was written by json.dump with default separators; we keep its key order, so bytes match too.
  with open(VOCAB_JSON, 'rb') as a, open(out, 'rb') as b:
    assert a.read() == b.read()


def test_special_tokens(f30k_vocab):
  assert f30k_vocab.words[:4] == ('<pad>', '<start>', '<end>', '<unk>')
  assert [f30k_vocab(t) for t in vocab_lib.SPECIAL_TOKENS] == [0, 1, 2, 3]
  assert f30k_vocab('no-such-word-xyz') == vocab_lib.UNK_ID


def test_encode_fixture_captions(f30k_vocab):
  captions = read_captions()
  assert len(captions) == 250
  encoded = [f30k_vocab.encode(c) for c in captions]
  n_words = sum(len(e) - 2 for e in encoded)
  n_unk = sum(int((e == vocab_lib.UNK_ID).sum()) for e in encoded)
  assert n_unk / n_words < 0.02  # the vocabulary was built on Flickr30K: only rare words are unknown
  for caption, ids in zip(captions, encoded):
    assert ids.dtype == np.int32
    assert ids[0] == vocab_lib.START_ID and ids[-1] == vocab_lib.END_ID
    tokens = vocab_lib.tokenize(caption)
    assert list(ids[1:-1]) == [f30k_vocab(t) for t in tokens]
    assert f30k_vocab.decode(ids[1:-1]) == [t if t in f30k_vocab else '<unk>' for t in tokens]
  # The fixture is SCAN's pre-tokenised text: tokenising it mostly gives back the space-separated words.
  assert vocab_lib.tokenize(captions[0]) == captions[0].lower().split()


# Outputs of nltk 3.9.1's NLTKWordTokenizer (word_tokenize's word step) on text.lower(), recorded with nltk at
# development time (nltk is not a dependency). Each input is one sentence for Punkt, so word_tokenize agrees.
NLTK_CASES = [
  ("A man's coat.", ['a', 'man', "'s", 'coat', '.']),
  ("Don't, can't, cannot", ['do', "n't", ',', 'ca', "n't", ',', 'can', 'not']),
  ("the boys' toys", ['the', 'boys', "'", 'toys']),
  ('"Hi" she said', ['``', 'hi', "''", 'she', 'said']),
  ('1,000 people, 50% off $5', ['1,000', 'people', ',', '50', '%', 'off', '$', '5']),
  ("I'm here; you're there!", ['i', "'m", 'here', ';', 'you', "'re", 'there', '!']),
  ('a (red) car [left]', ['a', '(', 'red', ')', 'car', '[', 'left', ']']),
  ('wait -- what?', ['wait', '--', 'what', '?']),
  ("they'll we've he'd", ['they', "'ll", 'we', "'ve", 'he', "'d"]),
  ('gonna wanna', ['gon', 'na', 'wan', 'na']),
  ('a dog...running', ['a', 'dog', '...', 'running']),
  ('the U.S. flag', ['the', 'u.s.', 'flag']),
  ('A man in St. Louis with Mr. Smith', ['a', 'man', 'in', 'st.', 'louis', 'with', 'mr.', 'smith']),
  ('a red t-shirt , blue jeans .', ['a', 'red', 't-shirt', ',', 'blue', 'jeans', '.']),
  ('Time: 3:30', ['time', ':', '3:30']),
]


@pytest.mark.parametrize('text,expected', NLTK_CASES)
def test_tokenize_like_nltk(text, expected):
  assert vocab_lib.tokenize(text) == expected


# Multi-sentence captions, our stand-in for Punkt (see vocab.py): a period ending an ordinary word ends a sentence,
# so it becomes a token; abbreviations, initials and numbers followed by more (lower-cased) text keep theirs.
PUNKT_CASES = [
  ('A dog runs. A cat sits.', ['a', 'dog', 'runs', '.', 'a', 'cat', 'sits', '.']),
  (
    'two dogs. one is brown . the other (a puppy.) sleeps',
    ['two', 'dogs', '.', 'one', 'is', 'brown', '.', 'the', 'other', '(', 'a', 'puppy', '.', ')', 'sleeps'],
  ),
  ('a boy, age 5. he plays with j. smith', ['a', 'boy', ',', 'age', '5.', 'he', 'plays', 'with', 'j.', 'smith']),
]


@pytest.mark.parametrize('text,expected', PUNKT_CASES)
def test_tokenize_sentence_split(text, expected):
  assert vocab_lib.tokenize(text) == expected


def test_build_like_scan():
  captions = ['A dog runs .', 'a Dog sits .', 'a cat runs', 'the dog .', 'a bird']
  vocab = vocab_lib.Vocabulary.build(captions, min_count=2)
  # counts: a 4, dog 3, runs 2, . 3, sits 1, cat 1, the 1, bird 1; first-occurrence order kept.
  assert vocab.words == ('<pad>', '<start>', '<end>', '<unk>', 'a', 'dog', 'runs', '.')
  assert vocab_lib.Vocabulary.build(captions, min_count=2) == vocab  # deterministic
  assert len(vocab_lib.Vocabulary.build(captions, min_count=1)) == 4 + 8
  np.testing.assert_array_equal(vocab.encode('A cat runs.'), [1, 4, 3, 6, 7, 2])


def test_build_and_save_round_trip(tmp_path):
  vocab = vocab_lib.Vocabulary.build(read_captions(), min_count=1)
  path = tmp_path / 'v.json'
  vocab.to_json(str(path))
  assert vocab_lib.Vocabulary.from_json(str(path)) == vocab


def test_encode_and_build_errors():
  vocab = vocab_lib.Vocabulary.build(['a dog'], min_count=1)
  for empty in ('', '   ', '\n'):
    with pytest.raises(ValueError, match='no tokens'):
      vocab.encode(empty)
  with pytest.raises(ValueError, match='str'):
    vocab.encode(b'a dog')
  with pytest.raises(ValueError, match='min_count'):
    vocab_lib.Vocabulary.build(['a'], min_count=0)
  with pytest.raises(ValueError, match='outside'):
    vocab.decode([99])
  with pytest.raises(ValueError, match='start with'):
    vocab_lib.Vocabulary(['a', 'b'])
  with pytest.raises(ValueError, match='unique'):
    vocab_lib.Vocabulary(list(vocab_lib.SPECIAL_TOKENS) + ['a', 'a'])


def write_vocab(tmp_path, data, name='bad.json'):
  path = tmp_path / name
  path.write_text(data if isinstance(data, str) else json.dumps(data))
  return str(path)


def good_data():
  words = list(vocab_lib.SPECIAL_TOKENS) + ['a', 'dog']
  return {
    'idx2word': {str(i): w for i, w in enumerate(words)},
    'word2idx': {w: i for i, w in enumerate(words)},
    'idx': len(words),
  }


@pytest.mark.parametrize(
  'corrupt,field',
  [
    (lambda d: d.pop('idx2word'), 'idx2word'),
    (lambda d: d.pop('word2idx'), 'word2idx'),
    (lambda d: d.pop('idx'), 'idx'),
    (lambda d: d.update(idx=7), 'idx'),
    (lambda d: d['word2idx'].update(dog=4), 'disagree'),
    (lambda d: d['word2idx'].pop('dog'), 'disagree'),
    (lambda d: d['word2idx'].update(cat=6), 'disagree'),
    (lambda d: d['idx2word'].update({'5': 'a'}), 'disagree'),  # duplicate word
    (lambda d: d.update(idx2word={'0': '<pad>', '1': '<start>', '3': '<end>'}), 'idx2word'),  # gap in keys
    (
      lambda d: (d['idx2word'].update({'3': 'unknown'}), d['word2idx'].pop('<unk>'), d['word2idx'].update(unknown=3)),
      '<unk>',
    ),
  ],
)
def test_from_json_errors_name_file_and_field(tmp_path, corrupt, field):
  data = good_data()
  assert vocab_lib.Vocabulary.from_json(write_vocab(tmp_path, data, 'good.json')).words[-1] == 'dog'
  corrupt(data)
  path = write_vocab(tmp_path, data)
  with pytest.raises(ValueError) as err:
    vocab_lib.Vocabulary.from_json(path)
  assert path in str(err.value) and field in str(err.value)


def test_from_json_not_json_or_not_object(tmp_path):
  with pytest.raises(ValueError, match='not valid json'):
    vocab_lib.Vocabulary.from_json(write_vocab(tmp_path, '{"idx2word": '))
  with pytest.raises(ValueError, match='json object'):
    vocab_lib.Vocabulary.from_json(write_vocab(tmp_path, [1, 2]))


# --- VSE++'s pickled vocabulary (vocab/<data_name>_vocab.pkl) ---------------------------------------------------


class _VsePPVocabulary:
  """VSE++ vocab.py's class (word2idx, idx2word with int keys, idx); pickled as `__main__.Vocabulary`, as its
  `python vocab.py` run did."""

  def __init__(self, words):
    self.word2idx = {w: i for i, w in enumerate(words)}
    self.idx2word = dict(enumerate(words))
    self.idx = len(words)


_VsePPVocabulary.__module__, _VsePPVocabulary.__qualname__ = '__main__', 'Vocabulary'


@pytest.mark.parametrize('protocol', [0, 2, pickle.HIGHEST_PROTOCOL])
def test_vsepp_pickle_reads_as_the_same_vocabulary(f30k_vocab, tmp_path, monkeypatch, protocol):
  monkeypatch.setattr(sys.modules['__main__'], 'Vocabulary', _VsePPVocabulary, raising=False)
  path = tmp_path / 'f30k_precomp_vocab.pkl'
  path.write_bytes(pickle.dumps(_VsePPVocabulary(f30k_vocab.words), protocol=protocol))
  loaded = vocab_lib.Vocabulary.from_pickle(str(path))
  assert loaded == f30k_vocab and len(loaded) == 8531
  if protocol >= 2:  # load() tells a pickle from json by its first byte
    assert vocab_lib.Vocabulary.load(str(path)) == f30k_vocab
  assert vocab_lib.Vocabulary.load(VOCAB_JSON) == f30k_vocab


def test_python2_vsepp_pickle(f30k_vocab, tmp_path):
  path = tmp_path / 'vocab.pkl'
  words = list(f30k_vocab.words[:50]) + ['café']
  path.write_bytes(fuzz_readers.vsepp_pickle_protocol2(words))
  loaded = vocab_lib.Vocabulary.load(str(path))
  assert loaded.words == tuple(words)
  np.testing.assert_array_equal(loaded.encode('a café dog'), [1, loaded('a'), 50, 3, 2])
  loaded.to_json(str(tmp_path / 'v.json'))  # what the checkpoint converter writes into the workdir
  assert vocab_lib.Vocabulary.from_json(str(tmp_path / 'v.json')) == loaded


class _Payload:
  def __reduce__(self):
    return (os.system, ('touch pwned',))


def test_vocab_pickle_refuses_code_and_bad_fields(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  evil = tmp_path / 'evil.pkl'
  evil.write_bytes(pickle.dumps(_Payload(), protocol=2))
  with pytest.raises(
    ValueError,
    match=r'evil.pkl: not a readable VSE\+\+ vocabulary pickle \(refusing to load '
    r'global (posix|os|nt).system',
  ):
    vocab_lib.Vocabulary.load(str(evil))
  assert not (tmp_path / 'pwned').exists()
  bad = tmp_path / 'bad.pkl'
  bad.write_bytes(fuzz_readers.vsepp_pickle_protocol2(list(vocab_lib.SPECIAL_TOKENS) + ['dog'], idx=7))
  with pytest.raises(ValueError, match=r'bad.pkl: field "idx" is 7; expected the vocabulary size 5'):
    vocab_lib.Vocabulary.load(str(bad))
  plain = tmp_path / 'dict.pkl'
  plain.write_bytes(pickle.dumps({'idx2word': {}}, protocol=2))
  with pytest.raises(ValueError, match=r'dict.pkl: expected a pickled Vocabulary object .*got dict'):
    vocab_lib.Vocabulary.load(str(plain))
  cut = tmp_path / 'cut.pkl'
  cut.write_bytes(fuzz_readers.vsepp_pickle_protocol2(list(vocab_lib.SPECIAL_TOKENS))[:40])
  with pytest.raises(ValueError, match=r'cut.pkl: not a readable VSE\+\+ vocabulary pickle'):
    vocab_lib.Vocabulary.load(str(cut))
