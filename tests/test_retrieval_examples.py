"""tools/retrieval_examples.py: the rankings drawn are xmatch_jax.retrieve's, the PNG has one row per query and k
framed images, the HTML stands alone and marks ground truth, and bad input is refused."""

import base64
import io
import os
import re
import sys

import numpy as np
from PIL import Image
import pytest

from xmatch_jax import Retriever
from xmatch_jax import retrieve
from xmatch_jax import trainers
from xmatch_jax.data import load_split

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tools'))
import retrieval_examples as rex  # pylint: disable=g-import-not-at-top
from test_train import tiny_config  # pylint: disable=g-import-not-at-top

SIDE = 64 * 4  # shapes pixels upscaled 4x


@pytest.fixture(scope='module')
def workdir(data_dir, tmp_path_factory):
  """A barely trained tiny SCAN: the tool needs a workdir, not a good model."""
  workdir = str(tmp_path_factory.mktemp('scan_run'))
  config = tiny_config(data_dir, num_epochs=1, max_steps=3, **{'model.embed_size': 32, 'model.word_dim': 16})
  trainers.train_and_evaluate(config, workdir)
  return workdir


@pytest.fixture(scope='module')
def split(data_dir):
  return load_split('shapes_tiny', 'test', data_dir)


@pytest.fixture(scope='module')
def retriever(workdir):
  return Retriever.from_workdir(workdir)


@pytest.fixture(scope='module')
def scores(retriever, split):
  return retriever.score(split.images, split.captions)  # [100, 500]


@pytest.mark.slow
def test_caption_png_draws_rank_images_rows(workdir, split, retriever, scores, tmp_path):
  # A caption whose image the model ranks in its top 3, so a green frame is drawn.
  t2i_rank = (scores > scores[split.caption_to_image, np.arange(500)]).sum(axis=0)
  hit = int(np.flatnonzero(t2i_rank < 3)[0])
  out = str(tmp_path / 'fig' / 'captions.png')
  examples = rex.run(
    [
      f'--workdir={workdir}',
      '--caption_index=0',
      f'--caption_index={hit}',
      '--caption=a red circle',
      '-k',
      '3',
      f'--out={out}',
    ]
  )
  texts = [split.captions[0], split.captions[hit], 'a red circle']
  assert [e.caption for e in examples] == texts
  for e, text in zip(examples, texts):
    expected = retrieve.rank_images(retriever, split.images, text, 3)
    assert [i for i, _ in e.results] == [i for i, _ in expected]
    np.testing.assert_allclose([s for _, s in e.results], [s for _, s in expected], rtol=1e-5, atol=1e-6)
    everything = [i for i, _ in retrieve.rank_images(retriever, split.images, text, 100)]
    if e.truth is not None:
      assert e.truth_rank == 1 + everything.index(e.truth)
  assert examples[1].truth == split.caption_to_image[hit] and examples[1].truth_rank <= 3
  assert examples[2].truth is None and examples[2].truth_rank is None

  png = Image.open(out)
  cell = SIDE + 2 * rex.FRAME
  row_h = rex.LABEL_HEIGHT + cell + rex.ROW_GAP
  assert png.size == (rex.TEXT_WIDTH + 3 * (cell + rex.GAP), rex.TITLE_HEIGHT + 3 * row_h)
  pixels = np.asarray(png.convert('RGB'))
  for row, e in enumerate(examples):  # frame colours: green = ground truth, red = not, grey = free text
    for j, (i, _) in enumerate(e.results):
      x, y = rex.TEXT_WIDTH + j * (cell + rex.GAP) + 1, rex.TITLE_HEIGHT + row * row_h + rex.LABEL_HEIGHT + 1
      expected = rex.GREY if e.truth is None else (rex.GREEN if i == e.truth else rex.RED)
      assert tuple(pixels[y, x]) == expected, (row, j)

  out = str(tmp_path / 'captions.html')  # the same queries as a standalone page
  rex.run([f'--workdir={workdir}', f'--caption_index={hit}', '-k', '3', f'--out={out}'])
  page = open(out, encoding='utf-8').read()
  figures = re.findall(
    r'<figure( class="truth")?><img src="data:image/png;base64,[^"]+" style="border-color: '
    r'rgb\(([\d, ]+)\)" alt="image (\d+)">',
    page,
  )
  assert [int(i) for _, _, i in figures] == [i for i, _ in examples[1].results]
  for mark, colour, i in figures:
    assert bool(mark) == (int(i) == examples[1].truth)
    assert colour == ', '.join(map(str, rex.GREEN if mark else rex.RED))


@pytest.mark.slow
def test_image_html_lists_rank_captions_and_marks_ground_truth(workdir, split, retriever, scores, tmp_path):
  own = scores[split.caption_to_image, np.arange(500)]
  best_own = np.array([(scores[i] > own[split.caption_to_image == i].max()).sum() for i in range(100)])
  hit = int(np.flatnonzero(best_own < 5)[0])  # an image with one of its captions in its top 5
  out = str(tmp_path / 'images.html')
  examples = rex.run([f'--workdir={workdir}', f'--image_index={hit}', '--image_index=7', '--k=5', f'--out={out}'])
  page = open(out, encoding='utf-8').read()
  sources = re.findall(r'<img src="([^"]*)"', page)
  assert len(sources) == 2 and all(s.startswith('data:image/png;base64,') for s in sources)  # standalone
  assert Image.open(io.BytesIO(base64.b64decode(sources[0].split(',', 1)[1]))).size == (SIDE, SIDE)
  items = re.findall(r'<li( class="truth")?>.*?\(caption (\d+)\)</small></li>', page)
  assert len(items) == 10
  for n, (e, i) in enumerate(zip(examples, [hit, 7])):
    expected = retrieve.rank_captions(retriever, split.images, split.captions, i, 5)
    assert e.image_index == i and [c for c, _ in e.results] == [c for c, _ in expected]
    shown = items[5 * n : 5 * n + 5]
    assert [int(c) for _, c in shown] == [c for c, _ in expected]
    assert [bool(mark) for mark, _ in shown] == [split.caption_to_image[c] == i for c, _ in expected]
    position = 0
    for c, _ in expected:  # the caption texts, in rank order
      position = page.index(split.captions[c], position)
  assert any(mark for mark, _ in items[:5])
  assert f'first own caption at rank {examples[0].truth_rank}' in page


@pytest.mark.slow
def test_image_png_size(workdir, tmp_path):
  out = str(tmp_path / 'images.png')
  rex.run(
    [
      f'--workdir={workdir}',
      '--image_index=0',
      '--image_index=1',
      '--image_index=99',
      '-k',
      '4',
      '--scale=2',
      f'--out={out}',
    ]
  )
  side = 64 * 2
  row_h = max(rex.LABEL_HEIGHT + side, 5 * rex.LINE_HEIGHT + rex.LABEL_HEIGHT) + rex.ROW_GAP
  assert Image.open(out).size == (side + 2 * rex.PAD + rex.CAPTIONS_WIDTH, rex.TITLE_HEIGHT + 3 * row_h)


@pytest.mark.slow
def test_bad_input_is_refused(workdir, tmp_path):
  out = str(tmp_path / 'x.png')
  with pytest.raises(
    ValueError,
    match=r'--caption_index=500 is out of range: shapes_tiny/test has 500 captions '
    r'\(valid 0 \.\. 499\)',
  ):
    rex.run([f'--workdir={workdir}', '--caption_index=3', '--caption_index=500', f'--out={out}'])
  with pytest.raises(
    ValueError,
    match=r'--image_index=-1 is out of range: shapes_tiny/test has 100 images '
    r'\(valid 0 \.\. 99\)',
  ):
    rex.run([f'--workdir={workdir}', '--image_index=-1', f'--out={out}'])
  with pytest.raises(ValueError, match='or image queries'):
    rex.run([f'--workdir={workdir}', '--caption_index=1', '--image_index=1', f'--out={out}'])
  with pytest.raises(ValueError, match='or image queries'):
    rex.run([f'--workdir={workdir}', f'--out={out}'])
  with pytest.raises(ValueError, match='expected a .png or .html'):
    rex.run([f'--workdir={workdir}', '--image_index=1', f'--out={tmp_path}/x.jpg'])
  with pytest.raises(ValueError, match='--scale must be >= 0'):
    rex.run([f'--workdir={workdir}', '--image_index=1', '--scale=-1', f'--out={out}'])
  with pytest.raises(ValueError, match='--caption is empty'):
    rex.run([f'--workdir={workdir}', '--caption= ', f'--out={out}'])
  with pytest.raises(ValueError, match='-k must be >= 1'):
    rex.run([f'--workdir={workdir}', '--image_index=1', '-k', '0', f'--out={out}'])
  with pytest.raises(FileNotFoundError, match='not a training workdir'):
    rex.run([f'--workdir={tmp_path}', '--image_index=1', f'--out={out}'])
  assert not os.path.exists(out)


@pytest.mark.slow
def test_split_without_pixels_is_refused(workdir, monkeypatch, tmp_path):
  real = rex.data_lib.load_split

  def no_pixels(*args, **kwargs):  # as a SCAN precomp split: region features only
    images, captions, caption_to_image = real(*args, **kwargs)
    return rex.data_lib.Split({'regions': images['regions']}, captions, caption_to_image)

  monkeypatch.setattr(rex.data_lib, 'load_split', no_pixels)
  out = str(tmp_path / 'x.png')
  with pytest.raises(
    ValueError,
    match=r'dataset shapes_tiny/test has no "pixels" field.*'
    r'python -m xmatch_jax\.retrieve --workdir=',
  ):
    rex.run([f'--workdir={workdir}', '--caption_index=0', f'--out={out}'])
  assert not os.path.exists(out)
