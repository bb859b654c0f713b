"""Fuzzes every reader of outside files with corrupted copies of valid files (README, "Input validation").

  python tools/fuzz_readers.py --cases=1000 --seed=0
  python tools/fuzz_readers.py --readers=torch_pickle,vocab_pickle --cases=200
  python tools/fuzz_readers.py --replay=torch_pickle:17     # one case again, in this process, with its traceback

Each reader gets valid seed files (small ones written here, and the real files of tests/fixtures: torch.save
checkpoints of both formats, the official SCAN / VSE++ / GLFN layouts, a Hugging Face BERT, torchvision MobileNetV3
weights, the Flickr30K vocabulary, captions and PFAN boxes). A case copies a seed, corrupts one of its files (a
truncation, bit flips, overwritten bytes or interesting integers, inserted random or copied bytes, deleted chunks,
and format-aware changes: one zip member, pickle opcode, JSON value, safetensors / .npy header field, text line or
base64 field) and runs the reader on it. Each case must end in one of two ways:

  documented error   an `errors.UserError` (or subclass) whose message names the corrupted file or another file
                     of the same input (a consistency check between two files may name either)
  loaded             the reader returns (a flipped value inside an array is still a valid file)

Anything else is counted as "other" and is a bug: another exception type, a UserError that does not name the file,
a hang (no answer within --timeout seconds), a crash of the worker process (e.g. killed when allocating more than
--memory_mb above its size after start-up: RLIMIT_AS caps it, so a memory blow-up shows as MemoryError or a crash
instead of taking the machine) or code execution. The reader `canary` runs malicious pickles (os.system, exec,
subprocess.Popen, ... in a `__reduce__`, also as the header pickles of a legacy torch file) through every reader
that unpickles, and pickles that crash or exhaust memory when unpickled naively (a numpy dtype whose object field
reads a pointer from raw bytes, an object array shorter than its shape, a huge memo index): each must be refused
with a documented error, and the file the code would create must not appear.

Cases run in a worker subprocess (--workers of them); a hung or crashed worker is killed (by its pid) and
replaced. Case i of a reader is reproducible from --seed alone (--replay=reader:i runs it here). The table lists per
reader: cases, documented errors, loads and other outcomes, then the first --show other cases with the mutation
that triggered them. Exit status 1 when any case ended otherwise.
"""

import argparse
import ast
import base64
import collections
import contextlib
import dataclasses
import io
import json
import os
import pickle
import pickletools
import random
import re
import resource
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile

from absl import flags
import numpy as np

TOOLS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TOOLS)
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from xmatch_jax import cli  # noqa: E402  pylint: disable=g-import-not-at-top
from xmatch_jax import errors  # noqa: E402  pylint: disable=g-import-not-at-top

FIXTURES = os.path.join(REPO, 'tests', 'fixtures')

# ------------------------------------------------------------------------------------------------------- seeds


@dataclasses.dataclass
class Seed:
  """A valid input of a reader: the files of one case directory, the one a case corrupts, and how to read them.

  Attributes:
    name: shown in reports.
    files: {path relative to the case directory: bytes}.
    target: the file a case corrupts.
    call: the reader (a key of CALLS).
    kind: how to corrupt `target` beyond plain bytes: 'zip', 'pickle', 'torch_legacy', 'json', 'safetensors',
      'npy', 'text', 'tsv', 'image' or 'bytes'.
    args: keyword arguments of the call (JSON values).
    expect: 'any' (documented error or load) or 'error' (the canaries: must be refused).
  """

  name: str
  files: dict
  target: str
  call: str
  kind: str = 'bytes'
  args: dict = dataclasses.field(default_factory=dict)
  expect: str = 'any'


def _fixture(name: str) -> bytes:
  with open(os.path.join(FIXTURES, name), 'rb') as f:
    return f.read()


def _fixture_dir(name: str, prefix: str) -> dict:
  root = os.path.join(FIXTURES, name)
  return {f'{prefix}/{n}': _fixture(f'{name}/{n}') for n in sorted(os.listdir(root))}


def _torch_zip(obj) -> bytes:
  """`obj` in torch.save's zip format, written without torch (convert/torch_writer.py)."""
  from xmatch_jax.convert import torch_writer  # pylint: disable=g-import-not-at-top

  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'x.pt')
    torch_writer.save(obj, path)
    with open(path, 'rb') as f:
      return f.read()


def _as_zip(name: str) -> bytes:
  """A legacy fixture checkpoint rewritten in the zip format."""
  from xmatch_jax.convert import torch_pickle  # pylint: disable=g-import-not-at-top

  checkpoint = torch_pickle.load(os.path.join(FIXTURES, name))
  if 'opt' in checkpoint:
    checkpoint['opt'] = argparse.Namespace(**vars(checkpoint['opt']))
  return _torch_zip(checkpoint)


def _real_torch_zip() -> bytes | None:
  """A SCAN-like checkpoint saved by torch itself (zip format), when torch is installed."""
  import importlib.util  # pylint: disable=g-import-not-at-top

  if importlib.util.find_spec('torch') is None:
    return None
  import torch  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  gru = torch.nn.GRU(3, 4, batch_first=True)
  state = {'model': [torch.nn.Linear(5, 4).state_dict(), gru.state_dict()], 'opt': argparse.Namespace(margin=0.2)}
  state['extra'] = {'half': torch.ones(3).half(), 'view': torch.arange(10)[2:7], 'flag': torch.tensor(True)}
  buffer = io.BytesIO()
  torch.save(state, buffer)
  return buffer.getvalue()


def vsepp_pickle_protocol2(words, idx=None) -> bytes:
  """What Python 2.7's pickle.dump(vocab, f, 2) writes for VSE++'s vocab.Vocabulary: attribute names as byte
  strings (SHORT_BINSTRING), the words (unicode from nltk on decoded captions) as BINUNICODE, integers as BININT."""

  def name(b):
    return b'U' + bytes([len(b)]) + b

  def word(w):
    e = w.encode('utf-8')
    return b'X' + struct.pack('<I', len(e)) + e

  def integer(n):
    return b'J' + struct.pack('<i', n)

  out = b'\x80\x02c__main__\nVocabulary\n)\x81}('
  out += name(b'word2idx') + b'}(' + b''.join(word(w) + integer(i) for i, w in enumerate(words)) + b'u'
  out += name(b'idx2word') + b'}(' + b''.join(integer(i) + word(w) for i, w in enumerate(words)) + b'u'
  out += name(b'idx') + integer(len(words) if idx is None else idx) + b'ub.'
  return out


class _VsePPVocabulary:
  """VSE++'s vocab.Vocabulary as its `python vocab.py` run pickled it (`__main__.Vocabulary`)."""

  def __init__(self, words):
    self.word2idx = {w: i for i, w in enumerate(words)}
    self.idx2word = dict(enumerate(words))
    self.idx = len(words)


def _vsepp_pickle(words, protocol: int) -> bytes:
  main = sys.modules['__main__']
  saved = (_VsePPVocabulary.__module__, _VsePPVocabulary.__qualname__, getattr(main, 'Vocabulary', None))
  _VsePPVocabulary.__module__, _VsePPVocabulary.__qualname__ = '__main__', 'Vocabulary'
  main.Vocabulary = _VsePPVocabulary
  try:
    return pickle.dumps(_VsePPVocabulary(words), protocol=protocol)
  finally:
    _VsePPVocabulary.__module__, _VsePPVocabulary.__qualname__ = saved[0], saved[1]
    if saved[2] is None:
      del main.Vocabulary
    else:
      main.Vocabulary = saved[2]


def _small_words() -> list:
  data = json.loads(_fixture('vocab_small.json'))
  return [data['idx2word'][str(i)] for i in range(data['idx'])]


def _npy(array, allow_pickle: bool = False) -> bytes:
  buffer = io.BytesIO()
  np.save(buffer, array, allow_pickle=allow_pickle)
  return buffer.getvalue()


def _npz(**arrays) -> bytes:
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  return buffer.getvalue()


def _image(fmt: str, seed: int) -> bytes:
  from PIL import Image  # pylint: disable=g-import-not-at-top

  pixels = np.random.default_rng(seed).integers(0, 256, (12, 10, 3), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format=fmt)
  return buffer.getvalue()


def _safetensors(arrays: dict, metadata: dict | None = None) -> bytes:
  from safetensors.numpy import save  # pylint: disable=g-import-not-at-top

  return save({k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata=metadata)


def _seeds_torch_pickle() -> list:
  seeds = [
    Seed(
      'torch_state_zip.pt (torch zip)', {'ckpt.pt': _fixture('torch_state_zip.pt')}, 'ckpt.pt', 'torch_pickle', 'zip'
    ),
    Seed(
      'torch_state_legacy.pt (torch legacy)',
      {'ckpt.pt': _fixture('torch_state_legacy.pt')},
      'ckpt.pt',
      'torch_pickle',
      'torch_legacy',
    ),
    Seed('vsepp.pth.tar rewritten as zip', {'ckpt.pt': _as_zip('vsepp.pth.tar')}, 'ckpt.pt', 'torch_pickle', 'zip'),
  ]
  real = _real_torch_zip()
  if real is not None:
    seeds.append(Seed('GRU state saved by torch (zip)', {'ckpt.pt': real}, 'ckpt.pt', 'torch_pickle', 'zip'))
  return seeds


def _seeds_scan_checkpoint() -> list:
  seeds = []
  for name, fmt in (('scan_t2i.pth.tar', 'scan'), ('vsepp.pth.tar', 'vsepp')):
    seeds.append(
      Seed(f'{name} (legacy)', {name: _fixture(name)}, name, 'scan_checkpoint', 'torch_legacy', {'fmt': fmt})
    )
    seeds.append(Seed(f'{name} (zip)', {name: _as_zip(name)}, name, 'scan_checkpoint', 'zip', {'fmt': fmt}))
  return seeds


def _seeds_glfn_checkpoint() -> list:
  bert = _fixture_dir('tiny_bert', 'bert')
  name = 'glfn_t2i.pth.tar'
  return [
    Seed(f'{name} (legacy)', {name: _fixture(name), **bert}, name, 'glfn_checkpoint', 'torch_legacy'),
    Seed(f'{name} (zip)', {name: _as_zip(name), **bert}, name, 'glfn_checkpoint', 'zip'),
  ]


def _seeds_vocab_json() -> list:
  return [
    Seed('vocab_small.json', {'vocab.json': _fixture('vocab_small.json')}, 'vocab.json', 'vocab', 'json'),
    Seed(
      'f30k_vocab.json (real, 300 kB)',
      {'vocab.json': _fixture('f30k_sample/f30k_vocab.json')},
      'vocab.json',
      'vocab',
      'json',
    ),
    Seed('vocab_small.json as bytes', {'vocab.json': _fixture('vocab_small.json')}, 'vocab.json', 'vocab', 'text'),
  ]


def _seeds_vocab_pickle() -> list:
  words = _small_words()
  f30k = json.loads(_fixture('f30k_sample/f30k_vocab.json'))
  f30k_words = [f30k['idx2word'][str(i)] for i in range(200)]
  return [
    Seed('Python 2 protocol 2 pickle', {'vocab.pkl': vsepp_pickle_protocol2(words)}, 'vocab.pkl', 'vocab', 'pickle'),
    Seed('protocol 0 pickle', {'vocab.pkl': _vsepp_pickle(words, 0)}, 'vocab.pkl', 'vocab', 'pickle', {'pickle': True}),
    Seed('protocol 2 pickle', {'vocab.pkl': _vsepp_pickle(words, 2)}, 'vocab.pkl', 'vocab', 'pickle'),
    Seed(
      'protocol 5 pickle (200 f30k words)', {'vocab.pkl': _vsepp_pickle(f30k_words, 5)}, 'vocab.pkl', 'vocab', 'pickle'
    ),
  ]


def _detector_records(n: int, k: int, d: int, seed: int):
  rng = np.random.default_rng(seed)
  for i in range(n):
    w, h = 60 + 7 * i, 50 + 3 * i
    x1, y1 = rng.uniform(0, w / 2, k), rng.uniform(0, h / 2, k)
    boxes = np.stack([x1, y1, x1 + rng.uniform(5, w / 2, k), y1 + rng.uniform(5, h / 2, k)], 1).astype(np.float32)
    yield str(1000 + i), w, h, boxes, rng.standard_normal((k, d)).astype(np.float32), rng


def _b64(array) -> str:
  return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode()


def _detector_tsv(detections: bool) -> bytes:
  rows = []
  if detections:
    rows.append('\t'.join(('img_id', 'img_h', 'img_w', 'objects_id', 'objects_conf', 'attrs_id', 'attrs_conf')))
    rows[-1] += '\tnum_boxes\tboxes\tfeatures'
  for image_id, w, h, boxes, features, rng in _detector_records(3, 4, 6, 1 if detections else 0):
    if detections:
      objects, attrs = rng.integers(0, 5, 4), rng.integers(0, 3, 4)
      conf = rng.uniform(0, 1, 4).astype(np.float32)
      fields = [image_id, str(h), str(w), _b64(objects), _b64(conf), _b64(attrs.astype(np.int32)), _b64(conf)]
      fields += ['4', _b64(boxes), _b64(features)]
    else:
      fields = [image_id, str(w), str(h), '4', _b64(boxes), _b64(features)]
    rows.append('\t'.join(fields))
  return ('\n'.join(rows) + '\n').encode()


_OBJECTS = b'plate,plates\ndog\ncar,auto\nshirt\ntree\n'
_ATTRIBUTES = b'white\nred,reddish\nwooden\n'


def _seeds_detector_tsv() -> list:
  labels = {'objects': 'objects_vocab.txt', 'attributes': 'attributes_vocab.txt'}
  vocab_files = {'objects_vocab.txt': _OBJECTS, 'attributes_vocab.txt': _ATTRIBUTES}
  return [
    Seed('6-column TSV', {'f.tsv': _detector_tsv(False)}, 'f.tsv', 'detector_tsv', 'tsv'),
    Seed(
      '10-column TSV with detections, tags',
      {'f.tsv': _detector_tsv(True), **vocab_files},
      'f.tsv',
      'detector_tsv',
      'tsv',
      labels,
    ),
  ]


def _seeds_detector_vocab() -> list:
  labels = {'objects': 'objects_vocab.txt', 'attributes': 'attributes_vocab.txt'}
  files = {'f.tsv': _detector_tsv(True), 'objects_vocab.txt': _OBJECTS, 'attributes_vocab.txt': _ATTRIBUTES}
  return [
    Seed('objects_vocab.txt', files, 'objects_vocab.txt', 'detector_tsv', 'text', labels),
    Seed('attributes_vocab.txt', files, 'attributes_vocab.txt', 'detector_tsv', 'text', labels),
  ]


def _seeds_detector_npz() -> list:
  plain, info = {}, {}
  for image_id, w, h, boxes, features, rng in _detector_records(2, 4, 6, 2):
    plain[f'npz/{image_id}.npz'] = _npz(x=features, bbox=boxes, image_w=np.array(w), image_h=np.array(h))
    labels = {
      'objects_id': rng.integers(0, 5, 4),
      'attrs_id': rng.integers(0, 3, 4),
      'attrs_conf': rng.uniform(0, 1, 4),
    }
    info_array = np.empty((), object)
    info_array[()] = labels
    info[f'npz/{image_id}.npz'] = _npz(
      features=features, boxes=boxes, image_w=np.array(w), image_h=np.array(h), info=info_array
    )
  ids = ['1000', '1001']
  vocab_files = {'objects_vocab.txt': _OBJECTS, 'attributes_vocab.txt': _ATTRIBUTES}
  labels = {'ids': ids, 'objects': 'objects_vocab.txt', 'attributes': 'attributes_vocab.txt'}
  return [
    Seed('per-image npz (x, bbox)', plain, 'npz/1000.npz', 'detector_npz', 'zip', {'ids': ids}),
    Seed(
      'per-image npz with pickled info dict', {**info, **vocab_files}, 'npz/1001.npz', 'detector_npz', 'zip', labels
    ),
  ]


def _pfan_boxes(n: int, k: int, seed: int) -> np.ndarray:
  from xmatch_jax.data import pfan  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  x1, y1 = rng.uniform(0, 40, (n, k)), rng.uniform(0, 30, (n, k))
  boxes = np.stack([x1, y1, x1 + rng.uniform(5, 40, (n, k)), y1 + rng.uniform(5, 30, (n, k))], -1)
  return pfan.to_pfan_layout(*pfan.block_positions(boxes, np.tile([[80.0, 60.0]], (n, 1))))


def _precomp_files(caption_index: bool) -> dict:
  """A custom precomp manual dir: train = the 8 images of the real Flickr30K boxes (k = 36) with 40 real captions,
  ids per caption and tags; dev / test 2-3 images; with caption_index, dev has a caption_images file."""
  rng = np.random.default_rng(3)
  captions = _fixture('f30k_sample/train_caps.txt').decode('utf-8').split('\n')
  files = {
    'train_ims.npy': _npy(rng.standard_normal((8, 36, 4)).astype(np.float32)),
    'train_caps.txt': ('\n'.join(captions[:40]) + '\n').encode(),
    'train_ids.txt': ''.join(f'{5000 + i // 5}\n' for i in range(40)).encode(),
    'train_boxes.npy': _fixture('f30k_sample_train_boxes_8.npy'),
    'train_tags.txt': ''.join('\t'.join(f'tag {i} {r}' for r in range(36)) + '\n' for i in range(8)).encode(),
  }
  for split, n in (('dev', 3), ('test', 2)):
    files[f'{split}_ims.npy'] = _npy(rng.standard_normal((n, 36, 4)).astype(np.float32))
    files[f'{split}_boxes.npy'] = _npy(_pfan_boxes(n, 36, n))
    files[f'{split}_tags.txt'] = ''.join(
      '\t'.join(f'red thing{r}' for r in range(36)) + '\n' for _ in range(n)
    ).encode()
    files[f'{split}_ids.txt'] = ''.join(f'{i * 11}\n' for i in range(n)).encode()
    if split == 'dev' and caption_index:
      owners = [2, 0, 1, 1, 0, 2, 2]
      files['dev_caps.txt'] = ''.join(f'caption {c} of image {o}\n' for c, o in enumerate(owners)).encode()
      files['dev_caption_images.txt'] = ''.join(f'{o}\n' for o in owners).encode()
    else:
      files[f'{split}_caps.txt'] = ''.join(f'a photo number {c}\n' for c in range(5 * n)).encode()
  return files


def _precomp_seeds(*targets) -> list:
  seeds = []
  for target in targets:
    for caption_index in (False, True):
      if target == 'dev_caption_images.txt' and not caption_index:
        continue
      files = _precomp_files(caption_index)
      kind = 'npy' if target.endswith('.npy') else 'text'
      name = target + (' (with dev_caption_images.txt)' if caption_index else '')
      seeds.append(Seed(name, files, target, 'precomp', kind))
  return seeds


def _xml(text: str) -> bytes:
  return (
    f'<?xml version="1.0" encoding="UTF-8"?>\n<document>\n<title>t</title>\n<text>{text}</text>\n</document>\n'.encode()
  )


def _wikipedia_files() -> dict:
  files = {'categories.list': b'art\nbiology\nhistory\n'}
  train, test = [], []
  for i in range(10):
    category = i % 3
    name = f'img{i:02d}'
    files[f'images/{("art", "biology", "history")[category]}/{name}.jpg'] = _image('JPEG', i)
    files[f'texts/t{i}.xml'] = _xml(f'Article {i} about {("art", "biology", "history")[category]} &amp; more.')
    (train if i < 7 else test).append(f't{i}\t{name}\t{category + 1}')
  files['trainset_txt_img_cat.list'] = ('\n'.join(train) + '\n').encode()
  files['testset_txt_img_cat.list'] = ('\n'.join(test) + '\n').encode()
  return files


def _manifest_files() -> dict:
  files, lines = {}, ['image\ttext\tlabel']
  for i in range(10):
    files[f'img/{i}.png'] = _image('PNG', 10 + i)
    if i % 2:
      files[f'txt/{i}.txt'] = f'A text file for pair {i}.\nSecond line.\n'.encode()
      lines.append(f'img/{i}.png\ttxt/{i}.txt\t{i % 3}')
    else:
      lines.append(f'img/{i}.png\tan inline text {i}\t{i % 3}')
  files['pairs.tsv'] = ('\n'.join(lines) + '\n').encode()
  return files


_SPLITS_JSON = json.dumps({'train': [0, 1, 2, 3, 9, 8], 'dev': [4, 7], 'test': [5]}).encode()


def _category_seeds(which: str) -> list:
  wiki, manifest = _wikipedia_files(), _manifest_files()
  wiki_args = {'name': 'wikipedia', 'pairs': 10, 'classes': 3}
  manifest_args = {'name': 'category', 'pairs': 0, 'classes': 0}
  if which == 'lists':
    return [
      Seed('categories.list', wiki, 'categories.list', 'category', 'text', wiki_args),
      Seed('trainset_txt_img_cat.list', wiki, 'trainset_txt_img_cat.list', 'category', 'text', wiki_args),
      Seed('testset_txt_img_cat.list', wiki, 'testset_txt_img_cat.list', 'category', 'text', wiki_args),
      Seed('pairs.tsv', manifest, 'pairs.tsv', 'category', 'text', manifest_args),
    ]
  if which == 'texts':
    return [
      Seed('wikipedia texts/t1.xml', wiki, 'texts/t1.xml', 'category', 'text', wiki_args),
      Seed('manifest txt/3.txt', manifest, 'txt/3.txt', 'category', 'text', manifest_args),
    ]
  if which == 'images':
    return [
      Seed('wikipedia JPEG', wiki, 'images/biology/img01.jpg', 'category', 'image', wiki_args),
      Seed('manifest PNG', manifest, 'img/2.png', 'category', 'image', manifest_args),
    ]
  return [
    Seed(
      'splits.json (wikipedia)', {**wiki, 'splits.json': _SPLITS_JSON}, 'splits.json', 'category', 'json', wiki_args
    ),
    Seed(
      'splits.json (bytes)', {**manifest, 'splits.json': _SPLITS_JSON}, 'splits.json', 'category', 'text', manifest_args
    ),
  ]


def _bundle_files() -> dict:
  """A VSE++ bundle: the imported vsepp.pth.tar fixture saved by bundles.save."""
  from xmatch_jax import bundles  # pylint: disable=g-import-not-at-top
  from xmatch_jax.convert import scan_checkpoint  # pylint: disable=g-import-not-at-top
  from xmatch_jax.data import vocab as vocab_lib  # pylint: disable=g-import-not-at-top

  config, params, _ = scan_checkpoint.load(os.path.join(FIXTURES, 'vsepp.pth.tar'), 'vsepp')
  config.data_info = {'img_dim': int(params['image_encoder']['fc']['kernel'].shape[0])}
  vocab = vocab_lib.Vocabulary.from_json(os.path.join(FIXTURES, 'vocab_small.json'))
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, 'bundle')
    bundles.save(out, config, vocab, {'params': params}, checkpoint='best', step=3)
    return {n: open(os.path.join(out, n), 'rb').read() for n in ('config.json', 'vocab.json', 'model.safetensors')}


def _seeds_bundle(target: str) -> list:
  files = _bundle_files()
  if target == 'model.safetensors':
    return [
      Seed('model.safetensors', files, target, 'bundle', 'safetensors'),
      Seed('model.safetensors as bytes', files, target, 'bundle', 'bytes'),
    ]
  return [
    Seed('config.json', files, target, 'bundle', 'json'),
    Seed('config.json as text', files, target, 'bundle', 'text'),
  ]


def _bert_params_file(bert: dict) -> dict:
  """tiny_bert with flax_model.safetensors (tools/convert_bert.py's output) instead of model.safetensors."""
  from xmatch_jax.convert import hf_bert  # pylint: disable=g-import-not-at-top

  with tempfile.TemporaryDirectory() as tmp:
    _, params, _ = hf_bert.load_checkpoint(os.path.join(FIXTURES, 'tiny_bert'))
    path = os.path.join(tmp, hf_bert.FLAX_WEIGHTS)
    hf_bert.write_flax_params(params, path)
    with open(path, 'rb') as f:
      flax_bytes = f.read()
  files = {k: v for k, v in bert.items() if not k.endswith('/model.safetensors')}
  return {**files, f'bert/{hf_bert.FLAX_WEIGHTS}': flax_bytes}


def _seeds_bert_weights() -> list:
  from safetensors.numpy import load  # pylint: disable=g-import-not-at-top

  bert = _fixture_dir('tiny_bert', 'bert')
  state = load(bert['bert/model.safetensors'])
  as_bin = {k: v for k, v in bert.items() if not k.endswith('model.safetensors')}
  as_bin['bert/pytorch_model.bin'] = _torch_zip(dict(state))
  return [
    Seed('model.safetensors', bert, 'bert/model.safetensors', 'bert', 'safetensors'),
    Seed('model.safetensors as bytes', bert, 'bert/model.safetensors', 'bert', 'bytes'),
    Seed('pytorch_model.bin (torch zip)', as_bin, 'bert/pytorch_model.bin', 'bert', 'zip'),
    Seed('flax_model.safetensors', _bert_params_file(bert), 'bert/flax_model.safetensors', 'bert', 'safetensors'),
  ]


def _seeds_bert_config() -> list:
  bert = _fixture_dir('tiny_bert', 'bert')
  return [
    Seed('config.json', bert, 'bert/config.json', 'bert', 'json'),
    Seed('config.json as text', bert, 'bert/config.json', 'bert', 'text'),
  ]


def _seeds_bert_tokenizer() -> list:
  from tokenizers.implementations import BertWordPieceTokenizer  # pylint: disable=g-import-not-at-top

  bert = _fixture_dir('tiny_bert', 'bert')
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'vocab.txt')
    with open(path, 'wb') as f:
      f.write(bert['bert/vocab.txt'])
    tokenizer_json = BertWordPieceTokenizer(path)._tokenizer.to_str().encode()  # pylint: disable=protected-access
  with_json = {**bert, 'bert/tokenizer.json': tokenizer_json}
  return [
    Seed('vocab.txt', bert, 'bert/vocab.txt', 'bert_tokenizer', 'text'),
    Seed('tokenizer_config.json', bert, 'bert/tokenizer_config.json', 'bert_tokenizer', 'json'),
    Seed('tokenizer.json', with_json, 'bert/tokenizer.json', 'bert_tokenizer', 'json'),
    Seed('tokenizer.json as text', with_json, 'bert/tokenizer.json', 'bert_tokenizer', 'text'),
  ]


def _seeds_mobilenet() -> list:
  from safetensors.numpy import load  # pylint: disable=g-import-not-at-top

  raw = _fixture('mobilenet_v3_large_w025.safetensors')
  return [
    Seed('mobilenet_v3_large_w025.safetensors', {'w.safetensors': raw}, 'w.safetensors', 'mobilenet', 'safetensors'),
    Seed('the same as .pth (torch zip)', {'w.pth': _torch_zip(dict(load(raw)))}, 'w.pth', 'mobilenet', 'zip'),
  ]


def _seeds_word_vectors() -> list:
  rng = np.random.default_rng(5)
  words = _small_words()[4:] + ['zebra', 'the', 'émigré']
  lines = [f'{w} ' + ' '.join(f'{v:.5f}' for v in rng.standard_normal(5)) for w in words]
  glove = ('\n'.join(lines) + '\n').encode()
  word2vec = (f'{len(lines)} 5\n' + '\n'.join(lines) + '\n').encode()
  vocab = {'vocab.json': _fixture('vocab_small.json')}
  return [
    Seed('GloVe text', {**vocab, 'glove.txt': glove}, 'glove.txt', 'word_vectors', 'text', {'dim': 5}),
    Seed('word2vec text with header', {**vocab, 'w2v.txt': word2vec}, 'w2v.txt', 'word_vectors', 'text', {'dim': 5}),
  ]


def _seeds_reps() -> list:
  rng = np.random.default_rng(6)
  fields = _npz(regions=rng.standard_normal((3, 4, 5)).astype(np.float32), mask=np.ones((3, 4), np.float32))
  single = _npz(**{'.': rng.standard_normal((4, 8)).astype(np.float32)})
  return [
    Seed('rep with fields', {'rep.npz': fields}, 'rep.npz', 'reps', 'zip'),
    Seed('single-array rep', {'rep.npz': single}, 'rep.npz', 'reps', 'zip'),
  ]


# --- canaries: pickles whose loading would run code -------------------------------------------------------------


class _Reduce:
  """Pickles as `func(*args)`: what a malicious pickle runs on a plain pickle.load."""

  def __init__(self, func, args):
    self.func, self.args = func, args

  def __reduce__(self):
    return self.func, self.args


def _payloads(canary: str) -> dict:
  """{name: pickle bytes} that create `canary` (a file) when unpickled by pickle.load."""
  import builtins  # pylint: disable=g-import-not-at-top

  code = f'open({canary!r}, "w").close()'
  out = {
    'os.system': pickle.dumps(_Reduce(os.system, (f'touch {canary}',)), protocol=2),
    'builtins.exec': pickle.dumps(_Reduce(builtins.exec, (code,)), protocol=2),
    'builtins.eval': pickle.dumps(_Reduce(builtins.eval, (code,)), protocol=4),
    'subprocess.Popen': pickle.dumps(_Reduce(subprocess.Popen, (['touch', canary],)), protocol=2),
    'os.system (protocol 0, GLOBAL)': f'cos\nsystem\n(V touch {canary}\ntR.'.encode(),
    'posix.system (protocol 0, INST)': f'(Vtouch {canary}\niposix\nsystem\n.'.encode(),
    'os.system inside an OrderedDict': pickle.dumps(
      {'state_dict': _Reduce(collections.OrderedDict, ([('w', _Reduce(os.system, (f'touch {canary}',)))],))},
      protocol=2,
    ),
  }
  command = f'touch {canary}'.encode()
  # torch._tensor._rebuild_from_type_v2(os.system, torch.Tensor, ('touch ...',), {}): the allowed rebuild function
  # would call the function it is given.
  out['_rebuild_from_type_v2(os.system, ...)'] = (
    b'\x80\x02ctorch._tensor\n_rebuild_from_type_v2\n(cposix\nsystem\nctorch\nTensor\nX'
    + struct.pack('<I', len(command))
    + command
    + b'\x85}tR.'
  )
  return out


def _numpy_payloads() -> dict:
  """{name: pickle bytes} that crash numpy or the C unpickler, or allocate gigabytes, when unpickled by pickle.load
  with numpy's globals allowed."""
  multiarray = np._core.multiarray if hasattr(np, '_core') else np.core.multiarray  # pylint: disable=protected-access

  fields_state = (3, '|', None, ('a',), {'a': (np.dtype('O'), 0)}, 8, 1, 0)

  class _Build:  # pickles as func(*args) then BUILD state
    def __init__(self, func, args, state):
      self.func, self.args, self.state = func, args, state

    def __reduce__(self):
      return self.func, self.args, self.state

  pointer_dtype = _Build(np.dtype, ('V8', False, True), fields_state)
  pointer = _Build(multiarray._reconstruct, (np.ndarray, (0,), b'b'), (1, (1,), pointer_dtype, False, b'A' * 8))
  short = _Build(multiarray._reconstruct, (np.ndarray, (0,), b'b'), (1, (1 << 20,), np.dtype('O'), False, [1, 2]))
  return {
    'numpy dtype with an object field over raw bytes (a pointer 0x4141...)': pickle.dumps({'w': pointer}, protocol=2),
    'numpy object array with fewer items than its shape': pickle.dumps({'w': short}, protocol=2),
    'memo index 2**28 - 1 (the C unpickler allocates 4 GB)': b'\x80\x02Nr\xff\xff\xff\x0f.',
    'BUILD on the allowed torch.FloatStorage': b'\x80\x02ctorch\nFloatStorage\n}X\x05\x00\x00\x00dtypeK\x01sb.',
    'numpy.ndarray called with a 2**40 shape': b'\x80\x02cnumpy\nndarray\n\x8a\x06\x00\x00\x00\x00\x00\x01\x85\x85R.',
  }


def _legacy_torch(payload: bytes) -> bytes:
  out = b''.join(pickle.dumps(h, protocol=2) for h in (0x1950A86A20F9469CFC6C, 1001, {'little_endian': True}))
  return out + payload + pickle.dumps([], protocol=2)


def _zip(members: dict) -> bytes:
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, 'w', zipfile.ZIP_STORED) as archive:
    for name, data in members.items():
      archive.writestr(name, data)
  return buffer.getvalue()


def _npy_object_payload(payload: bytes) -> bytes:
  """An object-array .npy whose pickled data is `payload`."""
  header = io.BytesIO()
  np.lib.format.write_array_header_1_0(header, {'descr': '|O', 'fortran_order': False, 'shape': ()})
  return header.getvalue() + payload


def _seeds_canary(canary: str) -> list:
  seeds = []
  bert = _fixture_dir('tiny_bert', 'bert')
  bert_bin = {k: v for k, v in bert.items() if not k.endswith('model.safetensors')}
  for name, payload in _payloads(canary).items():
    zipped = _zip({'archive/data.pkl': payload, 'archive/byteorder': b'little', 'archive/version': b'3\n'})
    legacy = _legacy_torch(payload)
    npz_info = _zip(
      {
        'x.npy': _npy(np.zeros((2, 3), np.float32)),
        'bbox.npy': _npy(np.array([[0, 0, 5, 5], [1, 1, 6, 6]], np.float32)),
        'image_w.npy': _npy(np.array(10.0)),
        'image_h.npy': _npy(np.array(10.0)),
        'info.npy': _npy_object_payload(payload),
      }
    )
    npz_args = {'ids': ['1000'], 'objects': 'objects_vocab.txt'}
    seeds += [
      Seed(f'{name}: torch legacy', {'evil.pth': legacy}, 'evil.pth', 'torch_pickle', expect='error'),
      Seed(f'{name}: torch zip', {'evil.pt': zipped}, 'evil.pt', 'torch_pickle', expect='error'),
      Seed(
        f'{name}: SCAN checkpoint',
        {'evil.tar': zipped},
        'evil.tar',
        'scan_checkpoint',
        args={'fmt': 'scan'},
        expect='error',
      ),
      Seed(f'{name}: GLFN checkpoint', {'evil.tar': legacy, **bert}, 'evil.tar', 'glfn_checkpoint', expect='error'),
      Seed(
        f'{name}: VSE++ vocab pickle', {'evil.pkl': payload}, 'evil.pkl', 'vocab', args={'pickle': True}, expect='error'
      ),
      Seed(
        f'{name}: BERT pytorch_model.bin',
        {**bert_bin, 'bert/pytorch_model.bin': zipped},
        'bert/pytorch_model.bin',
        'bert',
        expect='error',
      ),
      Seed(f'{name}: MobileNet .pth', {'evil.pth': zipped}, 'evil.pth', 'mobilenet', expect='error'),
      Seed(
        f'{name}: npz info dict',
        {'npz/1000.npz': npz_info, 'objects_vocab.txt': _OBJECTS},
        'npz/1000.npz',
        'detector_npz',
        args=npz_args,
        expect='error',
      ),
      Seed(
        f'{name}: rep object array',
        {'rep.npz': _zip({'..npy': _npy_object_payload(payload)})},
        'rep.npz',
        'reps',
        expect='error',
      ),
    ]
  system = _payloads(canary)['os.system']
  headers = [pickle.dumps(h, protocol=2) for h in (0x1950A86A20F9469CFC6C, 1001, {'little_endian': True}, {})]
  for i, part in enumerate(('magic number', 'protocol', 'sys info', 'object', 'storage keys')):
    pickles = headers[:3] + [headers[3], pickle.dumps([], protocol=2)]
    pickles[i] = system
    seeds.append(
      Seed(
        f'os.system as the {part} of a legacy torch file',
        {'evil.pth': b''.join(pickles)},
        'evil.pth',
        'torch_pickle',
        expect='error',
      )
    )
  for name, payload in _numpy_payloads().items():
    zipped = _zip({'archive/data.pkl': payload, 'archive/byteorder': b'little', 'archive/version': b'3\n'})
    seeds.append(
      Seed(
        f'{name}: torch zip', {'evil.tar': zipped}, 'evil.tar', 'scan_checkpoint', args={'fmt': 'scan'}, expect='error'
      )
    )
  files = _precomp_files(False)
  files['train_ims.npy'] = _npy_object_payload(system)
  seeds.append(Seed('os.system: precomp object .npy', files, 'train_ims.npy', 'precomp', expect='error'))
  return seeds


# --------------------------------------------------------------------------------------------------- mutations

_INTERESTING = (0, 1, -1, 2, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 40)
_INTERESTING += ((1 << 62), (1 << 63) - 1, 1 << 63)
_TOKENS = (
  '', '0', '-1', '1', '7', '36', '99999999999999999999999', '1e309', '-1e309', 'nan', 'inf', '1.5', '-0', '0x10',
  '\u0663', 'x', ' ', '\t', '\x00', '\u00e9', '9' * 5000, '<unk>', '[PAD]', 'null', '{}', '[]', '"', '\\',
)  # fmt: skip
_JSON_VALUES = (
  None, True, False, 0, 1, -1, 2, 2**31, 2**63, 10**30, 1.5, -0.0, 1e308, float('nan'), float('inf'), '', 'x', '0',
  '-1', 'bert', '<pad>', [], {}, [1, 2], {'a': 1}, '9' * 60,
)  # fmt: skip


def _hot_ranges(data: bytes, kind: str) -> list:
  """Byte ranges where a format keeps its structure (headers, pickles), mutated more often than the bulk data."""
  try:
    if kind == 'torch_legacy':
      spans, start = [], 0
      for _ in range(5):  # magic, protocol, sys info, the object, the storage keys
        ops = list(pickletools.genops(data[start:]))
        end = start + ops[-1][2] + 1
        spans.append((start, end))
        start = end
      # The 8-byte element count before each storage (walked assuming 4-byte elements; stops where that fails).
      pos, counts = start, []
      while pos + 8 <= len(data) and len(counts) < 64:
        counts.append((pos, pos + 8))
        n = struct.unpack('<q', data[pos : pos + 8])[0]
        if n < 0 or pos + 8 + 4 * n > len(data):
          break
        pos += 8 + 4 * n
      return spans + counts
    if kind == 'safetensors':
      return [(0, 8 + int.from_bytes(data[:8], 'little'))]
    if kind == 'npy':
      return [(0, data.index(b'\n') + 1)]
    if kind == 'image':
      return [(0, min(len(data), 256))]
    if kind == 'pickle':
      return [(0, len(data))]
  except Exception:  # pylint: disable=broad-except  (a seed the guesses do not fit: no hot ranges)
    return []
  return []


def _position(rng: random.Random, n: int, hot: list) -> int:
  if hot and rng.random() < 0.6:
    a, b = rng.choice(hot)
    return min(rng.randrange(a, max(b, a + 1)), max(n - 1, 0))
  return rng.randrange(max(n, 1))


def _mutate_bytes(data: bytes, rng: random.Random, hot: list) -> tuple[bytes, str]:
  """One byte-level corruption."""
  n = len(data)
  if n == 0:
    junk = rng.randbytes(rng.randint(1, 16))
    return junk, f'replace the empty file by {junk!r}'
  op = rng.choice(('truncate', 'flip', 'set', 'int', 'insert', 'insert_copy', 'delete', 'overwrite_copy', 'append'))
  pos = _position(rng, n, hot)
  if op == 'truncate':
    cut = rng.choice((pos, n - rng.randint(1, min(16, n)), rng.randrange(min(n, 64))))
    return data[:cut], f'truncate {n} -> {cut} bytes'
  if op == 'flip':
    out = bytearray(data)
    positions = sorted({_position(rng, n, hot) for _ in range(rng.randint(1, 4))})
    for p in positions:
      out[p] ^= 1 << rng.randrange(8)
    return bytes(out), f'flip a bit at byte(s) {positions}'
  if op == 'set':
    out = bytearray(data)
    changes = []
    for _ in range(rng.randint(1, 4)):
      p = _position(rng, n, hot)
      out[p] = rng.choice((0, 0xFF, 0x7F, 0x80, 0x20, 0x0A, 0x09, rng.randrange(256)))
      changes.append(f'{p}={out[p]:#04x}')
    return bytes(out), f'set byte(s) {", ".join(changes)}'
  if op == 'int':
    width = rng.choice((1, 2, 4, 8))
    value = rng.choice(_INTERESTING) + rng.choice((0, 0, 1, -1))
    order = rng.choice(('little', 'big'))
    raw = (value % (1 << (8 * width))).to_bytes(width, order)
    pos = min(pos, max(n - width, 0))
    return data[:pos] + raw + data[pos + width :], f'write {value} as {width}-byte {order}-endian at {pos}'
  if op == 'insert':
    junk = rng.randbytes(rng.randint(1, 32))
    return data[:pos] + junk + data[pos:], f'insert {len(junk)} random bytes at {pos}'
  if op == 'insert_copy':
    a = rng.randrange(n)
    chunk = data[a : a + rng.randint(1, 512)]
    return data[:pos] + chunk + data[pos:], f'insert a copy of bytes {a}:{a + len(chunk)} at {pos}'
  if op == 'delete':
    length = rng.randint(1, max(1, min(512, n // 2)))
    return data[:pos] + data[pos + length :], f'delete bytes {pos}:{pos + length}'
  if op == 'overwrite_copy':
    a = rng.randrange(n)
    chunk = data[a : a + rng.randint(1, 64)]
    return data[:pos] + chunk + data[pos + len(chunk) :], f'copy bytes {a}:{a + len(chunk)} over {pos}'
  junk = rng.randbytes(rng.randint(1, 64))
  return data + junk, f'append {len(junk)} random bytes'


def _mutate_pickle(data: bytes, rng: random.Random) -> tuple[bytes, str]:
  """One opcode-level change of a pickle: drop, repeat or swap an opcode, or an interesting argument."""
  ops = list(pickletools.genops(data))
  bounds = [pos for _, _, pos in ops] + [len(data)]
  i = rng.randrange(len(ops))
  op, arg, pos = ops[i]
  end = bounds[i + 1]
  choice = rng.choice(('drop', 'repeat', 'swap', 'arg', 'arg'))
  if choice == 'drop':
    return data[:pos] + data[end:], f'pickle: drop opcode {op.name} at {pos}'
  if choice == 'repeat':
    return data[:end] + data[pos:end] + data[end:], f'pickle: repeat opcode {op.name} at {pos}'
  if choice == 'swap':
    j = rng.randrange(len(ops))
    other = data[bounds[j] : bounds[j + 1]]
    return data[:pos] + other + data[end:], f'pickle: replace opcode {op.name} at {pos} by {ops[j][0].name}'
  width = end - pos - 1
  if width <= 0 or op.arg is None:
    return data[:pos] + data[end:], f'pickle: drop opcode {op.name} at {pos}'
  if op.name in ('BININT1', 'BININT2', 'BININT', 'BINGET', 'BINPUT', 'LONG_BINGET', 'LONG_BINPUT'):
    value = rng.choice(_INTERESTING) + rng.choice((0, 1, -1))
    raw = (value % (1 << (8 * width))).to_bytes(width, 'little')
    return data[: pos + 1] + raw + data[end:], f'pickle: {op.name} at {pos} argument {arg!r} -> {value}'
  size = {'SHORT_BINUNICODE': 1, 'SHORT_BINBYTES': 1, 'SHORT_BINSTRING': 1, 'BINUNICODE': 4, 'BINBYTES': 4}.get(op.name)
  if size:  # the length prefix of a string
    value = rng.choice((0, 1, 0x7F, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, len(data)))
    raw = (value % (1 << (8 * size))).to_bytes(size, 'little')
    return data[: pos + 1] + raw + data[pos + 1 + size :], f'pickle: {op.name} at {pos} length -> {value}'
  mutated, what = _mutate_bytes(data[pos + 1 : end], rng, [])
  return data[: pos + 1] + mutated + data[end:], f'pickle: argument of {op.name} at {pos}: {what}'


def _mutate_torch_legacy(data: bytes, rng: random.Random, hot: list) -> tuple[bytes, str]:
  pickles = hot[:5]
  if len(pickles) == 5 and rng.random() < 0.6:
    k = rng.choice((0, 1, 2, 3, 3, 3, 4))
    a, b = pickles[k]
    mutated, what = _mutate_pickle(data[a:b], rng)
    names = ('magic number', 'protocol', 'sys info', 'object', 'storage keys')
    return data[:a] + mutated + data[b:], f'{names[k]} {what}'
  return _mutate_bytes(data, rng, hot)


def _member_kind(name: str) -> str:
  if name.endswith('.pkl'):
    return 'pickle'
  if name.endswith('.npy'):
    return 'npy'
  return 'bytes'


def _mutate_zip(data: bytes, rng: random.Random) -> tuple[bytes, str]:
  """One member corrupted (the archive rewritten with valid CRCs), or members dropped, renamed, added, compressed."""
  with zipfile.ZipFile(io.BytesIO(data)) as archive:
    members = [(info, archive.read(info)) for info in archive.infolist()]
  i = rng.randrange(len(members))
  info, content = members[i]
  choice = rng.choice(('member',) * 6 + ('drop', 'rename', 'duplicate', 'deflate', 'junk'))
  what = ''
  if choice == 'member':
    content, what = mutate(content, _member_kind(info.filename), rng)
    members[i] = (info, content)
    what = f'member {info.filename}: {what}'
  elif choice == 'drop':
    del members[i]
    what = f'drop member {info.filename}'
  elif choice == 'rename':
    new = rng.choice((info.filename + 'x', info.filename.rsplit('/', 1)[0] + '/', '../' + info.filename, 'data.pkl'))
    members[i] = (zipfile.ZipInfo(new, info.date_time), content)
    what = f'rename member {info.filename} to {new}'
  elif choice == 'duplicate':
    members.append((info, content))
    what = f'a second member named {info.filename}'
  elif choice == 'deflate':
    info.compress_type = zipfile.ZIP_DEFLATED
    what = f'compress member {info.filename} with deflate'
  else:
    members.append((zipfile.ZipInfo(rng.choice(('junk', 'archive/data.pkl', 'x.npy'))), rng.randbytes(40)))
    what = f'add member {members[-1][0].filename} of random bytes'
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, 'w') as archive, warnings_off():
    for member, payload in members:
      archive.writestr(member, payload)
  return buffer.getvalue(), what


@contextlib.contextmanager
def warnings_off():
  import warnings  # pylint: disable=g-import-not-at-top

  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    yield


def _json_paths(obj, path=()):
  yield path, obj
  if isinstance(obj, dict):
    for k, v in obj.items():
      yield from _json_paths(v, path + (k,))
  elif isinstance(obj, list):
    for i, v in enumerate(obj):
      yield from _json_paths(v, path + (i,))


def _mutate_json_value(obj, rng: random.Random) -> str:
  """Changes one node of a parsed JSON document in place (the root itself is not replaced); returns what."""
  paths = [p for p, _ in _json_paths(obj) if p]
  if not paths:
    return 'no node to change'
  path = rng.choice(paths)
  parent = obj
  for key in path[:-1]:
    parent = parent[key]
  key, value = path[-1], parent[path[-1]]
  where = '$' + ''.join(f'[{k!r}]' for k in path)
  choice = rng.choice(('replace',) * 4 + ('delete', 'rename', 'perturb', 'wrap'))
  if choice == 'delete':
    del parent[key]
    return f'json: delete {where}'
  if choice == 'rename' and isinstance(parent, dict):
    new = rng.choice(('', str(key) + 'x', str(key).upper(), '-1', ' ' + str(key)))
    parent[new] = parent.pop(key)
    return f'json: rename {where} to {new!r}'
  if choice == 'perturb' and isinstance(value, (int, float)) and not isinstance(value, bool):
    parent[key] = rng.choice((value + 1, value - 1, -value, value * 1000, value / 3))
    return f'json: {where} {value!r} -> {parent[key]!r}'
  if choice == 'wrap':
    parent[key] = [value]
    return f'json: {where} wrapped in a list'
  parent[key] = rng.choice(_JSON_VALUES)
  return f'json: {where} -> {parent[key]!r:.40}'


def _mutate_json(data: bytes, rng: random.Random) -> tuple[bytes, str]:
  obj = json.loads(data)
  what = _mutate_json_value(obj, rng)
  return json.dumps(obj).encode(), what


def _mutate_safetensors(data: bytes, rng: random.Random) -> tuple[bytes, str]:
  """A header field changed (the length prefix rewritten to fit, unless that is the change)."""
  n = int.from_bytes(data[:8], 'little')
  header, body = json.loads(data[8 : 8 + n]), data[8 + n :]
  names = [k for k in header if k != '__metadata__']
  name = rng.choice(names)
  entry = header[name]
  choice = rng.choice(
    ('dtype', 'shape', 'shape', 'offsets', 'offsets', 'rename', 'delete', 'alias', 'metadata', 'json', 'length')
  )
  if choice == 'dtype':
    entry['dtype'] = rng.choice(('F16', 'F64', 'I32', 'I64', 'U8', 'BOOL', 'BF16', 'I8', 'F8_E4M3', 'XX', ''))
    what = f'{name} dtype -> {entry["dtype"]}'
  elif choice == 'shape':
    shape = list(entry['shape'])
    op = rng.choice(('dim', 'append', 'drop'))
    if op == 'dim' and shape:
      shape[rng.randrange(len(shape))] = rng.choice((0, 1, 2, -1, 2**31, 2**62, 3))
    elif op == 'append':
      shape.append(rng.choice((1, 2, 0)))
    elif shape:
      shape.pop()
    entry['shape'] = shape
    what = f'{name} shape -> {shape}'
  elif choice == 'offsets':
    a, b = entry['data_offsets']
    entry['data_offsets'] = rng.choice(
      ([b, a], [a, b + 4], [a - 4, b], [a, len(body) + 8], [0, 2**62], [a + 4, b + 4], [-1, b])
    )
    what = f'{name} data_offsets -> {entry["data_offsets"]}'
  elif choice == 'rename':
    new = rng.choice((name.rsplit('/', 1)[0], name + '/x', '', name.replace('/', '//'), name + 'x'))
    header[new] = header.pop(name)
    what = f'rename {name} to {new!r}'
  elif choice == 'delete':
    del header[name]
    what = f'delete {name}'
  elif choice == 'alias':
    header[name.rsplit('/', 1)[0] + '/alias'] = dict(entry)
    what = f'a second tensor on the bytes of {name}'
  elif choice == 'metadata':
    header['__metadata__'] = rng.choice(({'format': 1}, [], 'x', {'checkpoint': None}, {'step': 'x' * 100}))
    what = f'__metadata__ -> {header["__metadata__"]!r:.40}'
  elif choice == 'json':
    what = _mutate_json_value(header, rng)
  else:
    delta = rng.choice((-1, 1, 8, n, 2**40))
    return (n + delta).to_bytes(8, 'little') + data[8:], f'header length {n} -> {n + delta}'
  raw = json.dumps(header).encode()
  return len(raw).to_bytes(8, 'little') + raw + body, f'safetensors header: {what}'


def _mutate_npy(data: bytes, rng: random.Random) -> tuple[bytes, str]:
  """A header field of a .npy changed (descr, fortran_order, shape), the header padded as numpy writes it."""
  version = data[6]
  size = 2 if version == 1 else 4
  length = int.from_bytes(data[8 : 8 + size], 'little')
  start = 8 + size
  header = ast.literal_eval(data[start : start + length].decode('latin1'))
  body = data[start + length :]
  choice = rng.choice(('descr', 'fortran', 'shape', 'shape', 'drop'))
  if choice == 'descr':
    header['descr'] = rng.choice(
      ('<f8', '<f2', '|u1', '<i8', '|O', '>f4', '<c8', '|V4', '<U3', '|b1', 'bogus', '<M8[s]')
    )
    what = f'descr -> {header["descr"]}'
  elif choice == 'fortran':
    header['fortran_order'] = not header.get('fortran_order', False)
    what = f'fortran_order -> {header["fortran_order"]}'
  elif choice == 'shape':
    shape = list(header.get('shape', ()))
    op = rng.choice(('dim', 'append', 'drop'))
    if op == 'dim' and shape:
      shape[rng.randrange(len(shape))] = rng.choice((0, 1, 2, -1, 2**31, 2**40, 7))
    elif op == 'append':
      shape.append(rng.choice((1, 2, 0)))
    elif shape:
      shape.pop()
    header['shape'] = tuple(shape)
    what = f'shape -> {tuple(shape)}'
  else:
    key = rng.choice(sorted(header))
    del header[key]
    what = f'drop header key {key}'
  text = repr(header)
  pad = -(start + len(text) + 1) % 64
  raw = (text + ' ' * pad + '\n').encode('latin1')
  prefix = data[:8] + len(raw).to_bytes(size, 'little')
  return prefix + raw + body, f'npy header: {what}'


def _mutate_text(data: bytes, rng: random.Random) -> tuple[bytes, str]:
  """A line- or token-level change of a text file."""
  text = data.decode('utf-8', 'surrogateescape')
  lines = text.split('\n')
  i = rng.randrange(len(lines))
  choice = rng.choice(('token',) * 5 + ('delete', 'duplicate', 'swap', 'empty', 'junk', 'join', 'crlf', 'bom', 'tab'))
  if choice == 'token':
    parts = re.split(r'([\t ,])', lines[i])
    j = rng.randrange(len(parts))
    if parts[j] in ('\t', ' ', ','):
      parts[j] = rng.choice(('\t', ' ', ',', '', '\t\t'))
    else:
      parts[j] = rng.choice(_TOKENS)
    lines[i] = ''.join(parts)
    what = f'line {i + 1}: a field -> {parts[j]!r:.30}'
  elif choice == 'delete':
    del lines[i]
    what = f'delete line {i + 1}'
  elif choice == 'duplicate':
    lines.insert(i, lines[i])
    what = f'repeat line {i + 1}'
  elif choice == 'swap':
    j = rng.randrange(len(lines))
    lines[i], lines[j] = lines[j], lines[i]
    what = f'swap lines {i + 1} and {j + 1}'
  elif choice == 'empty':
    lines.insert(i, rng.choice(('', ' ', '\t')))
    what = f'insert a blank line at {i + 1}'
  elif choice == 'junk':
    lines.insert(i, rng.choice(_TOKENS) + rng.choice(('', '\t', ' ')) + rng.choice(_TOKENS))
    what = f'insert line {i + 1}: {lines[i]!r:.30}'
  elif choice == 'join' and i + 1 < len(lines):
    lines[i : i + 2] = [lines[i] + lines[i + 1]]
    what = f'join lines {i + 1} and {i + 2}'
  elif choice == 'crlf':
    return data.replace(b'\n', b'\r\n'), 'CRLF line ends'
  elif choice == 'bom':
    return b'\xef\xbb\xbf' + data, 'a UTF-8 byte order mark'
  else:
    lines[i] = lines[i].replace('\t', ' ') if '\t' in lines[i] else lines[i].replace(' ', '\t')
    what = f'line {i + 1}: tabs <-> spaces'
  return '\n'.join(lines).encode('utf-8', 'surrogateescape'), what


def _mutate_tsv(data: bytes, rng: random.Random) -> tuple[bytes, str]:
  """The bytes inside one base64 field of a detector TSV changed (then re-encoded), or a text-level change."""
  lines = data.split(b'\n')
  rows = [i for i, line in enumerate(lines) if line and not line.startswith(b'img_id')]
  i = rng.choice(rows)
  fields = lines[i].split(b'\t')
  long = [j for j, f in enumerate(fields) if len(f) > 12]
  if not long or rng.random() < 0.4:
    return _mutate_text(data, rng)
  j = rng.choice(long)
  raw = bytearray(base64.b64decode(fields[j]))
  choice = rng.choice(('float', 'float', 'bytes'))
  if choice == 'float' and len(raw) >= 4:
    p = rng.randrange(len(raw) // 4) * 4
    value = rng.choice((float('nan'), float('inf'), -1.0, 0.0, 1e30, -1e30, 3.0e38, 1e-45))
    raw[p : p + 4] = struct.pack('<f', value)
    what = f'value {p // 4} -> {value}'
  else:
    mutated, what = _mutate_bytes(bytes(raw), rng, [])
    raw = bytearray(mutated)
  fields[j] = base64.b64encode(bytes(raw))
  lines[i] = b'\t'.join(fields)
  return b'\n'.join(lines), f'line {i + 1} base64 field {j + 1}: {what}'


_STRUCTURED = {
  'pickle': _mutate_pickle,
  'zip': _mutate_zip,
  'json': _mutate_json,
  'safetensors': _mutate_safetensors,
  'npy': _mutate_npy,
  'text': _mutate_text,
  'tsv': _mutate_tsv,
}


def mutate(data: bytes, kind: str, rng: random.Random) -> tuple[bytes, str]:
  """One corruption of `data`: a byte-level change (biased to the format's structure), or a format-aware one."""
  hot = _hot_ranges(data, kind)
  if kind == 'torch_legacy':
    return _mutate_torch_legacy(data, rng, hot)
  structured = _STRUCTURED.get(kind)
  if structured is not None and rng.random() < 0.6:
    try:
      return structured(data, rng)
    except Exception:  # pylint: disable=broad-except  (the file no longer parses: corrupt its bytes instead)
      pass
  return _mutate_bytes(data, rng, hot)


def mutate_case(data: bytes, kind: str, rng: random.Random) -> tuple[bytes, str]:
  """One to three stacked corruptions (a change that leaves the file as it was is drawn again)."""
  for _ in range(16):
    out, what = mutate(data, kind, rng)
    if out != data:
      break
  steps = [what]
  while rng.random() < 0.2 and len(steps) < 3:
    out, what = mutate(out, kind, rng)
    steps.append(what)
  return out, '; then '.join(steps)


# ------------------------------------------------------------------------------------------------------ readers

READERS = {
  'torch_pickle': lambda canary: _seeds_torch_pickle(),
  'scan_checkpoint': lambda canary: _seeds_scan_checkpoint(),
  'glfn_checkpoint': lambda canary: _seeds_glfn_checkpoint(),
  'vocab_json': lambda canary: _seeds_vocab_json(),
  'vocab_pickle': lambda canary: _seeds_vocab_pickle(),
  'detector_tsv': lambda canary: _seeds_detector_tsv(),
  'detector_vocab': lambda canary: _seeds_detector_vocab(),
  'detector_npz': lambda canary: _seeds_detector_npz(),
  'precomp_ims': lambda canary: _precomp_seeds('train_ims.npy', 'test_ims.npy'),
  'precomp_boxes': lambda canary: _precomp_seeds('train_boxes.npy', 'dev_boxes.npy'),
  'precomp_caps': lambda canary: _precomp_seeds('train_caps.txt', 'dev_caps.txt'),
  'precomp_ids': lambda canary: _precomp_seeds('train_ids.txt', 'dev_ids.txt'),
  'precomp_caption_images': lambda canary: _precomp_seeds('dev_caption_images.txt'),
  'precomp_tags': lambda canary: _precomp_seeds('train_tags.txt', 'test_tags.txt'),
  'category_lists': lambda canary: _category_seeds('lists'),
  'category_texts': lambda canary: _category_seeds('texts'),
  'category_images': lambda canary: _category_seeds('images'),
  'category_splits': lambda canary: _category_seeds('splits'),
  'bundle_weights': lambda canary: _seeds_bundle('model.safetensors'),
  'bundle_config': lambda canary: _seeds_bundle('config.json'),
  'bert_config': lambda canary: _seeds_bert_config(),
  'bert_weights': lambda canary: _seeds_bert_weights(),
  'bert_tokenizer': lambda canary: _seeds_bert_tokenizer(),
  'mobilenet_weights': lambda canary: _seeds_mobilenet(),
  'word_vectors': lambda canary: _seeds_word_vectors(),
  'reps': lambda canary: _seeds_reps(),
  'canary': _seeds_canary,  # not mutated: each malicious file once
}


def _call_torch_pickle(d, target):
  from xmatch_jax.convert import torch_pickle  # pylint: disable=g-import-not-at-top

  torch_pickle.load(os.path.join(d, target))


def _call_scan_checkpoint(d, target, fmt):
  from xmatch_jax.convert import scan_checkpoint  # pylint: disable=g-import-not-at-top

  scan_checkpoint.load(os.path.join(d, target), fmt)


def _call_glfn_checkpoint(d, target):
  from xmatch_jax.convert import glfn_checkpoint  # pylint: disable=g-import-not-at-top

  glfn_checkpoint.load(os.path.join(d, target), os.path.join(d, 'bert'))


def _call_vocab(d, target, pickle=False):  # pylint: disable=redefined-outer-name
  from xmatch_jax.data import vocab as vocab_lib  # pylint: disable=g-import-not-at-top

  path = os.path.join(d, target)
  vocab = vocab_lib.Vocabulary.from_pickle(path) if pickle else vocab_lib.Vocabulary.load(path)
  vocab.encode('a red circle left of a big blue square')


def _convert_features():
  if TOOLS not in sys.path:
    sys.path.insert(0, TOOLS)
  import convert_features  # pylint: disable=g-import-not-at-top

  return convert_features


def _tagger(d, objects=None, attributes=None):
  if not objects:
    return None
  attributes = os.path.join(d, attributes) if attributes else None
  return _convert_features().Tagger(os.path.join(d, objects), attributes)


def _call_detector_tsv(d, target, scratch, objects=None, attributes=None):
  del target
  cf = _convert_features()
  tagger = _tagger(d, objects, attributes)
  path = os.path.join(d, 'f.tsv')
  cf.convert(cf.read_tsv([path]), scratch, 'test', None, path, tagger)


def _call_detector_npz(d, target, scratch, ids, objects=None, attributes=None):
  del target
  cf = _convert_features()
  tagger = _tagger(d, objects, attributes)
  directory = os.path.join(d, 'npz')
  cf.convert(cf.read_npz(directory, ids, with_labels=tagger is not None), scratch, 'test', ids, directory, tagger)


def _call_precomp(d, target):
  del target
  from xmatch_jax.data import precomp  # pylint: disable=g-import-not-at-top

  files = precomp._check_files(d, precomp.CONFIGS['custom'])  # pylint: disable=protected-access
  for split, split_files in files.items():  # the build's reads, without TFDS writing the examples
    examples = precomp.XmatchPrecomp._generate_examples(None, split, d, split_files, 0, split_files.n_images)  # pylint: disable=protected-access
    for _ in examples:
      pass


def _call_category(d, target, name, pairs, classes):
  del target
  from xmatch_jax.data import category  # pylint: disable=g-import-not-at-top

  saved = category.EXPECTED_PAIRS, category.EXPECTED_CLASSES
  category.EXPECTED_PAIRS = {**saved[0], name: pairs} if pairs else {}
  category.EXPECTED_CLASSES = {**saved[1], name: classes} if classes else {}
  try:
    found = category.scan(name, d)
  finally:
    category.EXPECTED_PAIRS, category.EXPECTED_CLASSES = saved
  category.split_indices(len(found), d)
  for pair in found:
    category.load_image(pair.image, 16)


def _call_bundle(d, target):
  del target
  from xmatch_jax import bundles  # pylint: disable=g-import-not-at-top

  bundles.load(d)


def _call_bert(d, target):
  del target
  from xmatch_jax.convert import hf_bert  # pylint: disable=g-import-not-at-top

  hf_bert.load_checkpoint(os.path.join(d, 'bert'))


def _call_bert_tokenizer(d, target):
  del target
  from xmatch_jax.data import wordpiece  # pylint: disable=g-import-not-at-top

  vocab = wordpiece.WordPieceVocab(os.path.join(d, 'bert'))
  vocab.decode(vocab.encode('a red circle'))


def _call_mobilenet(d, target):
  from xmatch_jax.convert import torchvision_mobilenet  # pylint: disable=g-import-not-at-top

  torchvision_mobilenet.load_imagenet_mobilenet(os.path.join(d, target), 0.25)


def _call_word_vectors(d, target, dim):
  from xmatch_jax.data import vocab as vocab_lib  # pylint: disable=g-import-not-at-top
  from xmatch_jax.data import word_vectors  # pylint: disable=g-import-not-at-top

  vocab = vocab_lib.Vocabulary.from_json(os.path.join(d, 'vocab.json'))
  word_vectors.load_for_vocab(os.path.join(d, target), vocab, np.zeros((len(vocab), dim), np.float32))


def _call_reps(d, target):
  from xmatch_jax import api  # pylint: disable=g-import-not-at-top

  api.load_reps(os.path.join(d, target))


CALLS = {
  'torch_pickle': _call_torch_pickle,
  'scan_checkpoint': _call_scan_checkpoint,
  'glfn_checkpoint': _call_glfn_checkpoint,
  'vocab': _call_vocab,
  'detector_tsv': _call_detector_tsv,
  'detector_npz': _call_detector_npz,
  'precomp': _call_precomp,
  'category': _call_category,
  'bundle': _call_bundle,
  'bert': _call_bert,
  'bert_tokenizer': _call_bert_tokenizer,
  'mobilenet': _call_mobilenet,
  'word_vectors': _call_word_vectors,
  'reps': _call_reps,
}
_SCRATCH_CALLS = ('detector_tsv', 'detector_npz')  # calls that write outputs (into a scratch directory)


def _where(tb) -> str:
  """The innermost frame of the traceback inside this repository (file:line), else the innermost one."""
  frames = traceback.extract_tb(tb)
  inside = [f for f in frames if f.filename.startswith(REPO) and not f.filename.endswith('fuzz_readers.py')]
  frame = (inside or frames or [None])[-1]
  return '' if frame is None else f'{os.path.relpath(frame.filename, REPO)}:{frame.lineno}'


def execute(call: str, d: str, target: str, args: dict, scratch: str, canary: str, expect: str = 'any') -> dict:
  """Runs one case in this process -> {'outcome': 'error' | 'ok' | 'other', 'type', 'message', 'where'}."""
  kwargs = dict(args)
  if call in _SCRATCH_CALLS:
    shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(scratch)
    kwargs['scratch'] = scratch
  result = {'outcome': 'ok', 'type': '', 'message': '', 'where': ''}
  try:
    with warnings_off():
      CALLS[call](d, target, **kwargs)
  except BaseException as e:  # pylint: disable=broad-except  (every outcome is sorted here)
    if isinstance(e, KeyboardInterrupt):
      raise
    message = str(e)
    result.update(type=type(e).__name__, message=message[:400], where=_where(e.__traceback__))
    # The corrupted file, or another file of the input (a consistency check may name either side; a path derived
    # from a corrupted list names the file it looked for).
    named = os.path.basename(target) in message or d in message
    if isinstance(e, errors.UserError) and named:
      result['outcome'] = 'error'
    else:
      result['outcome'] = 'other'
      if isinstance(e, errors.UserError):
        result['type'] = f'{type(e).__name__} not naming {os.path.basename(target)}'
  if expect == 'error' and result['outcome'] == 'ok':
    result.update(outcome='other', type='loaded', message='a malicious file was read without an error')
  if canary and os.path.exists(canary):
    os.remove(canary)
    result.update(outcome='other', type='CANARY FIRED', message=f'the pickle ran code: it created {canary}')
  return result


# ------------------------------------------------------------------------------------------------------- worker


def _vm_bytes() -> int:
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('VmSize:'):
        return int(line.split()[1]) * 1024
  return 0


def worker_main() -> None:
  """The worker subprocess: reads one JSON request per line on stdin, answers one JSON line per case.

  The first request sets it up: {'memory_mb', 'scratch', 'canary'}; it imports every reader, caps its address space
  at its size then plus memory_mb (RLIMIT_AS) and answers {'ready': ...}.
  """
  results = os.fdopen(os.dup(1), 'w', buffering=1)
  os.dup2(2, 1)  # whatever a reader prints goes to stderr, not into the answers
  setup = json.loads(sys.stdin.readline())
  import jax  # pylint: disable=g-import-not-at-top

  jax.devices()
  for module in ('xmatch_jax.convert.glfn_checkpoint', 'xmatch_jax.convert.torchvision_mobilenet', 'xmatch_jax.api'):
    __import__(module)
  for module in ('xmatch_jax.bundles', 'xmatch_jax.data.precomp', 'xmatch_jax.data.category'):
    __import__(module)
  for module in ('xmatch_jax.data.wordpiece', 'xmatch_jax.data.word_vectors', 'configs.scan', 'configs.vsepp'):
    __import__(module)
  __import__('configs.glfn')
  _convert_features()
  limit = _vm_bytes() + setup['memory_mb'] * 2**20
  if setup['memory_mb'] > 0:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
  results.write(json.dumps({'ready': True, 'limit_mb': limit // 2**20}) + '\n')
  for line in sys.stdin:
    request = json.loads(line)
    result = execute(
      request['call'], request['dir'], request['target'], request['args'], setup['scratch'], setup['canary'],
      request.get('expect', 'any'),
    )  # fmt: skip
    results.write(json.dumps(result) + '\n')


class _Worker:
  """One worker subprocess and the case directories it reads."""

  def __init__(self, index: int, tmp: str, memory_mb: int, canary: str, log_path: str):
    self.index, self.root, self.memory_mb, self.canary = index, os.path.join(tmp, f'w{index}'), memory_mb, canary
    self.log_path = log_path
    self.proc = None
    self.buffer, self.eof = b'', False
    self.dirs = {}  # (reader, seed index) -> case directory
    self.case = None  # what it runs now: (case index, seed index, mutation, corrupted bytes, deadline)
    self.restarts = 0

  def start(self) -> None:
    code = f'import sys; sys.path.insert(0, {TOOLS!r}); import fuzz_readers; fuzz_readers.worker_main()'
    env = {**os.environ, 'PYTHONWARNINGS': 'ignore', 'TF_CPP_MIN_LOG_LEVEL': '3'}
    with open(self.log_path, 'ab') as log:
      self.proc = subprocess.Popen(
        [sys.executable, '-c', code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env
      )
    self.buffer, self.eof = b'', False
    setup = {'memory_mb': self.memory_mb, 'scratch': os.path.join(self.root, 'scratch'), 'canary': self.canary}
    self._send(setup)
    answer = self.read(600)
    if not answer or not answer.get('ready'):
      raise RuntimeError(f'the fuzz worker did not start (see {self.log_path})')

  def _send(self, request: dict) -> None:
    self.proc.stdin.write((json.dumps(request) + '\n').encode())
    self.proc.stdin.flush()

  def read(self, timeout: float):
    """The next answer, or None: none within `timeout` seconds, or the worker died (then self.eof)."""
    deadline = time.monotonic() + timeout
    while b'\n' not in self.buffer:
      if self.eof:
        return None
      ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
      if not ready:
        return None
      chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
      self.eof = not chunk
      self.buffer += chunk
    line, self.buffer = self.buffer.split(b'\n', 1)
    return json.loads(line)

  def kill(self) -> None:
    if self.proc is not None and self.proc.poll() is None:
      self.proc.kill()  # only this worker, by its pid
    if self.proc is not None:
      self.proc.wait()
      for stream in (self.proc.stdin, self.proc.stdout):
        with contextlib.suppress(OSError):
          stream.close()
    self.proc = None

  def case_dir(self, reader: str, index: int, seed: Seed) -> str:
    key = (reader, index)
    if key not in self.dirs:
      d = os.path.join(self.root, reader, str(index))
      for name, data in seed.files.items():
        _write(os.path.join(d, name), data)
      self.dirs[key] = d
    return self.dirs[key]


def _write(path: str, data: bytes) -> None:
  """Writes through a new file renamed into place: a reader's memory map of the old file stays valid."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + '.fuzz-tmp'
  with open(tmp, 'wb') as f:
    f.write(data)
  os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------------- runner


@dataclasses.dataclass
class Stats:
  """Outcomes of one reader's cases; `others`: the cases that ended otherwise, as dicts."""

  cases: int = 0
  error: int = 0
  ok: int = 0
  other: int = 0
  others: list = dataclasses.field(default_factory=list)
  seconds: float = 0.0


def case_mutation(seed_number: int, reader: str, index: int, seed: Seed) -> tuple[bytes, str]:
  """Case `index` of `reader`: its corrupted target bytes and what was done (reproducible from the seed number)."""
  rng = random.Random(f'{seed_number}:{reader}:{index}')
  if seed.expect == 'error':  # canaries are read as they are
    return seed.files[seed.target], 'none (a malicious file)'
  return mutate_case(seed.files[seed.target], seed.kind, rng)


def _cases(reader: str, seeds: list, cases: int):
  """(case index, seed index) of a reader's cases: the canaries once each, the others `cases` round robin."""
  if reader == 'canary':
    return [(i, i) for i in range(len(seeds))]
  return [(i, i % len(seeds)) for i in range(cases)]


def run(
  readers: list,
  cases: int,
  seed: int = 0,
  timeout: float = 30.0,
  memory_mb: int = 2048,
  workers: int = 1,
  save_failures: str = '',
  log=print,
) -> dict:
  """Runs `cases` corrupted cases of each reader (plus each valid seed once, which must load) -> {reader: Stats}."""
  unknown = sorted(set(readers) - set(READERS))
  if unknown:
    raise errors.UserError(f'--readers: unknown reader(s) {unknown}; expected some of {sorted(READERS)}')
  stats = {}
  with tempfile.TemporaryDirectory(prefix='xmatch-fuzz-') as tmp:
    canary = os.path.join(tmp, 'CANARY_FIRED')
    log_path = os.path.join(tmp, 'workers.log')
    pool = [_Worker(i, tmp, memory_mb, canary, log_path) for i in range(max(1, workers))]
    try:
      for worker in pool:
        worker.start()
      for reader in readers:
        started = time.monotonic()
        seeds = READERS[reader](canary)
        queue = [(-1 - k, k, None) for k in range(len(seeds)) if seeds[k].expect == 'any']  # the valid seeds first
        queue += [(i, k, None) for i, k in _cases(reader, seeds, cases)]
        stats[reader] = _run_reader(reader, seeds, queue, pool, seed, timeout, save_failures)
        stats[reader].seconds = time.monotonic() - started
        s = stats[reader]
        log(
          f'{reader}: {s.cases} cases, {s.error} documented errors, {s.ok} loaded, {s.other} other ({s.seconds:.0f} s)'
        )
    finally:
      for worker in pool:
        worker.kill()
  return stats


def _run_reader(reader, seeds, queue, pool, seed_number, timeout, save_failures) -> Stats:
  stats = Stats()
  queue = list(queue)
  busy = []
  while queue or busy:
    for worker in pool:
      if worker.case is None and queue:
        index, k, _ = queue.pop(0)
        s = seeds[k]
        d = worker.case_dir(reader, k, s)
        if index >= 0:
          data, what = case_mutation(seed_number, reader, index, s)
        else:
          data, what = s.files[s.target], 'none (the valid seed: must load)'
        _write(os.path.join(d, s.target), data)
        worker.case = (index, k, what, data, time.monotonic() + timeout)
        request = {'call': s.call, 'dir': d, 'target': s.target, 'args': s.args, 'expect': s.expect}
        worker._send(request)  # pylint: disable=protected-access
        busy.append(worker)
    # Wait for the first answer among the busy workers, or the first deadline.
    if all(b'\n' not in w.buffer and not w.eof for w in busy):
      wait = max(0.0, min(w.case[4] for w in busy) - time.monotonic())
      select.select([w.proc.stdout for w in busy], [], [], wait)
    for worker in list(busy):
      answer = worker.read(0.0)
      index, k, what, data, deadline = worker.case
      if answer is None:
        if not worker.eof and time.monotonic() < deadline:
          continue
        if worker.eof:
          code = worker.proc.wait()
          answer = {'outcome': 'other', 'type': 'CRASH', 'message': f'the worker died (exit status {code})'}
        else:
          answer = {'outcome': 'other', 'type': 'HANG', 'message': f'no answer within {timeout:g} s'}
        answer['where'] = ''
        worker.kill()
        worker.restarts += 1
        worker.start()
      s = seeds[k]
      _write(os.path.join(worker.case_dir(reader, k, s), s.target), s.files[s.target])  # the valid file back
      worker.case = None
      busy.remove(worker)
      if index < 0 and answer['outcome'] != 'ok':  # a valid seed that does not load: a bug of the reader or here
        answer = {**answer, 'outcome': 'other'}
      if index >= 0:
        stats.cases += 1
        setattr(stats, answer['outcome'], getattr(stats, answer['outcome']) + 1)
      elif answer['outcome'] == 'other':
        stats.other += 1
      if answer['outcome'] == 'other':
        stats.others.append({'case': index, 'seed': s.name, 'mutation': what, **answer})
        if save_failures:
          _write(os.path.join(save_failures, f'{reader}_{index}_{os.path.basename(s.target)}'), data)
  return stats


def table(stats: dict, show: int = 5) -> str:
  """The per-reader counts, then the first `show` other cases of each reader."""
  rows = [('reader', 'cases', 'documented errors', 'loaded', 'other', 'seconds')]
  for reader, s in stats.items():
    rows.append((reader, str(s.cases), str(s.error), str(s.ok), str(s.other), f'{s.seconds:.0f}'))
  total = Stats(*(sum(getattr(s, f) for s in stats.values()) for f in ('cases', 'error', 'ok', 'other')))
  rows.append(('total', str(total.cases), str(total.error), str(total.ok), str(total.other), ''))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = ['  '.join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
  lines.insert(1, '  '.join('-' * w for w in widths))
  lines.insert(len(lines) - 1, '  '.join('-' * w for w in widths))
  for reader, s in stats.items():
    for other in s.others[:show]:
      case = 'valid seed' if other['case'] < 0 else f'case {other["case"]}'
      lines.append(
        f'{reader} {case} ({other["seed"]}; {other["mutation"]:.200}): {other["type"]}: {other["message"]:.300}'
        + (f' [{other["where"]}]' if other['where'] else '')
      )
  return '\n'.join(lines)


def replay(reader: str, index: int, seed_number: int) -> None:
  """Runs one case in this process, so its traceback shows (canaries: the index-th malicious file)."""
  with tempfile.TemporaryDirectory(prefix='xmatch-fuzz-replay-') as tmp:
    canary = os.path.join(tmp, 'CANARY_FIRED')
    seeds = READERS[reader](canary)
    k = dict(_cases(reader, seeds, index + 1))[index]
    s = seeds[k]
    data, what = case_mutation(seed_number, reader, index, s)
    d = os.path.join(tmp, 'case')
    for name, content in s.files.items():
      _write(os.path.join(d, name), content)
    _write(os.path.join(d, s.target), data)
    print(f'{reader} case {index}: seed {s.name}, target {s.target}: {what}')
    kwargs = dict(s.args)
    if s.call in _SCRATCH_CALLS:
      kwargs['scratch'] = os.path.join(tmp, 'scratch')
      os.makedirs(kwargs['scratch'])
    CALLS[s.call](d, s.target, **kwargs)
    print('loaded' + (' (CANARY FIRED)' if os.path.exists(canary) else ''))


# --------------------------------------------------------------------------------------------------------- main

FLAGS = flags.FlagValues()
flags.DEFINE_integer('cases', 1000, 'corrupted cases per reader', lower_bound=0, flag_values=FLAGS)
flags.DEFINE_integer('seed', 0, 'random seed: case i of a reader depends only on it', flag_values=FLAGS)
flags.DEFINE_list('readers', [], f'readers to fuzz (default: all): {", ".join(READERS)}', flag_values=FLAGS)
flags.DEFINE_float('timeout', 30.0, 'seconds a case may take before it counts as a hang', flag_values=FLAGS)
flags.DEFINE_integer(
  'memory_mb',
  2048,
  'address space a case may add to the worker (RLIMIT_AS); 0: no cap',
  lower_bound=0,
  flag_values=FLAGS,
)
flags.DEFINE_integer('workers', 1, 'worker subprocesses running cases at once', lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer('show', 5, 'other cases to show per reader', lower_bound=0, flag_values=FLAGS)
flags.DEFINE_string(
  'save_failures', '', 'directory to write the corrupted file of every other case to', flag_values=FLAGS
)
flags.DEFINE_string('replay', '', 'READER:CASE: run that case in this process, with its traceback', flag_values=FLAGS)


def main(argv=None) -> int:
  cli.parse_flags(FLAGS, argv, __doc__)
  if FLAGS.replay:
    reader, _, index = FLAGS.replay.partition(':')
    if reader not in READERS or not index.lstrip('-').isdigit():
      raise errors.UserError(f'--replay={FLAGS.replay}: expected READER:CASE with READER one of {sorted(READERS)}')
    replay(reader, int(index), FLAGS.seed)
    return 0
  readers = FLAGS.readers or list(READERS)
  stats = run(readers, FLAGS.cases, FLAGS.seed, FLAGS.timeout, FLAGS.memory_mb, FLAGS.workers, FLAGS.save_failures)
  print(table(stats, FLAGS.show))
  return 1 if any(s.other for s in stats.values()) else 0


if __name__ == '__main__':
  sys.exit(cli.run_tool(main))
