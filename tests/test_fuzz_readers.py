"""Fuzzed readers (tools/fuzz_readers.py): corrupted copies of valid files end in a documented error or load.

Every reader of outside files (torch.save checkpoints and the SCAN / VSE++ / GLFN importers, vocabularies, detector
features, the precomp and category dataset files, bundles, Hugging Face BERT directories, MobileNetV3 weights, word
vectors, saved reps) gets CASES truncated, bit-flipped and spliced copies of its seed files in a worker subprocess
with a memory cap and a time limit. Each must raise an `errors.UserError` naming the file, or load: no other
exception, hang, crash or memory blow-up. The canaries (pickles whose loading would run code, or make numpy read a
pointer the file chose) must each be refused without effect.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tools'))
import fuzz_readers  # noqa: E402  pylint: disable=g-import-not-at-top

CASES = 24  # per reader; the tool's default is 1000
READERS = [r for r in fuzz_readers.READERS if r != 'canary']


@pytest.fixture(scope='module')
def stats():
  return fuzz_readers.run(READERS + ['canary'], CASES, seed=0, timeout=120.0, memory_mb=2048, log=lambda *_: None)


@pytest.mark.slow
@pytest.mark.parametrize('reader', READERS)
def test_corrupted_files_end_in_a_documented_error_or_load(stats, reader):
  s = stats[reader]
  assert s.cases == CASES
  assert s.other == 0, fuzz_readers.table({reader: s}, show=10)
  assert s.error > 0, f'{reader}: no corruption reached a check'


@pytest.mark.slow
def test_malicious_pickles_are_refused_without_running(stats):
  s = stats['canary']
  assert s.cases >= 80 and s.ok == 0
  assert s.other == 0, fuzz_readers.table({'canary': s}, show=20)  # a fired canary is an "other" (CANARY FIRED)


def test_mutations_are_reproducible_and_change_the_file():
  seed = fuzz_readers.READERS['vocab_json']('')[0]
  data = seed.files[seed.target]
  first = [fuzz_readers.case_mutation(0, 'vocab_json', i, seed) for i in range(20)]
  assert first == [fuzz_readers.case_mutation(0, 'vocab_json', i, seed) for i in range(20)]
  assert all(mutated != data for mutated, _ in first)
  assert first != [fuzz_readers.case_mutation(1, 'vocab_json', i, seed) for i in range(20)]
