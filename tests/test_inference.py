"""Scorer: tiled encoding and all-pairs scoring equal one unchunked call of the model."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from xmatch_jax import inference
from xmatch_jax.models import build_model


def _init(model):
  """`model.init` with `jax.random.key(0)`. The variables depend on the key, not on the inputs: init runs on the
  model's example inputs in every test, so its eager ops compile once per model."""
  return model.init(jax.random.key(0), *model.example_inputs())


@pytest.mark.parametrize('image_chunk,text_batch', [(2, 3), (4, 5), (16, 64)])
def test_tiled_scores_equal_one_call(image_chunk, text_batch):
  rng = np.random.default_rng(0)
  n_img, n_txt, k, n, vocab = 5, 11, 4, 6, 20
  config = ml_collections.ConfigDict({'name': 'scan', 'embed_size': 8, 'word_dim': 8, 'cross_attn': 't2i'})
  model = build_model(config, vocab_size=vocab, img_dim=7)
  images = {'regions': rng.normal(size=(n_img, k, 7)).astype(np.float32)}
  lengths = rng.integers(1, n + 1, size=n_txt)
  mask = (np.arange(n)[None] < lengths[:, None]).astype(np.float32)
  tokens = (rng.integers(1, vocab, size=(n_txt, n)) * mask).astype(np.int32)
  text = {'tokens': tokens, 'mask': mask}
  variables = _init(model)

  scorer = inference.Scorer(model, variables, image_chunk=image_chunk, text_batch=text_batch)
  got = scorer.score(images, tokens, mask)
  want = np.asarray(model.apply(variables, images, text))
  assert got.shape == (n_img, n_txt)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


TINY_BERT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'tiny_bert')
TRIMMING = {  # every model whose text rep has a token axis, with its vocabulary size
  'scan': ({'name': 'scan', 'word_dim': 8, 'block_size': 3}, 40),
  'rdan': ({'name': 'rdan', 'word_dim': 8, 'cnn_channels': 4, 'block_size': 3}, 40),
  'mmca': ({'name': 'mmca', 'bert_dir': TINY_BERT, 'num_heads': 2, 'cnn_filters': 8, 'block_size': 3}, 34),
  'glfn': ({'name': 'glfn', 'bert_dir': TINY_BERT, 'word_dim': 8, 'position_dim': 6, 'block_size': 3}, 34),
}


@pytest.mark.parametrize('name', list(TRIMMING))
def test_caption_tiles_cut_to_their_longest_caption_score_as_the_padded_split(name):
  """Captions of 1-30 tokens padded to 32 are scored at their length rounded up to TOKEN_STEP, in tiles of one
  width: the matrix, in the given caption order, equals one call of the model on the padded split, and two copies
  of a caption score exactly alike wherever they sit (ties rank as without trimming)."""
  fields, vocab = TRIMMING[name]
  model = build_model({**fields, 'embed_size': 8}, vocab_size=vocab, img_dim=7)
  rng = np.random.default_rng(3)
  images = model.example_images(rng, 5, 4)
  lengths = np.array([30, 1, 9, 2, 3, 29, 5, 7, 6, 12, 16, 17, 20, 24, 25, 26, 28, 7, 30, 11])
  mask = (np.arange(32)[None] < lengths[:, None]).astype(np.float32)
  tokens = (rng.integers(1, vocab, size=mask.shape) * mask).astype(np.int32)
  tokens[17] = tokens[7]  # a copy of a 7-token caption: of the 7 captions of width 8, the first tile holds 6
  variables = model.init(jax.random.key(0), *model.example_inputs(seed=1))
  scorer = inference.Scorer(model, variables, image_chunk=2, text_batch=6)
  image_rep, text_rep = scorer.encode_images(images), scorer.encode_text(tokens, mask)
  np.testing.assert_array_equal(model.text_lengths(text_rep), lengths)

  widths, real = [], scorer._pair_scores  # pylint: disable=protected-access
  scorer._pair_scores = lambda v, i, t: widths.append(t['mask'].shape[1]) or real(v, i, t)  # pylint: disable=protected-access
  got = scorer.pair_scores(image_rep, text_rep)
  want = np.asarray(model.apply(variables, image_rep, text_rep, method=model.pair_scores))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(got[:, 17], got[:, 7])
  # Widths 8 (7 captions: two tiles of 6), 16, 24 and 32 (= the split's padding).
  assert sorted(set(widths)) == [8, 16, 24, 32] and widths[0] == 8, widths


@pytest.mark.parametrize('name', ['scan', 'rdan'])
def test_pair_list_scores_equal_the_exhaustive_matrix_for_any_list(name):
  """Re-rank scoring: pairs in any order, repeated, several tiles of one image, captions of several widths."""
  rng = np.random.default_rng(4)
  n_img, n_txt, n, vocab = 5, 23, 26, 20
  config = ml_collections.ConfigDict({'name': name, 'embed_size': 8, 'word_dim': 8})
  if name == 'rdan':
    config.update(cnn_channels=4, block_size=2)
  model = build_model(config, vocab_size=vocab, img_dim=7)
  images = {'regions': rng.normal(size=(n_img, 4, 7)).astype(np.float32)}
  lengths = rng.integers(2, n + 1, size=n_txt)
  mask = (np.arange(n)[None] < lengths[:, None]).astype(np.float32)
  tokens = (rng.integers(1, vocab, size=(n_txt, n)) * mask).astype(np.int32)
  variables = _init(model)
  scorer = inference.Scorer(model, variables, image_chunk=4, text_batch=6)
  image_rep, text_rep = scorer.encode_images(images), scorer.encode_text(tokens, mask)
  full = scorer.pair_scores(image_rep, text_rep)
  images_of, captions_of = rng.integers(0, n_img, 70), rng.integers(0, n_txt, 70)
  images_of[:9], captions_of[:9] = 2, np.arange(9)  # image 2: more than one tile of 3 at some widths
  calls, real = [], scorer._tile_program  # pylint: disable=protected-access
  scorer._tile_program = lambda width, per_call: calls.append((width, per_call)) or real(width, per_call)  # pylint: disable=protected-access
  got = scorer.pair_list_scores(image_rep, text_rep, images_of, captions_of, tile=3)
  np.testing.assert_allclose(got, full[images_of, captions_of], rtol=1e-5, atol=1e-6)
  # One program per caption width present (8 / 16 / 24 / 32), each running block_size x text_batch / size tiles
  # of size 1, 2 or 3 (at most `tile`).
  widths = sorted({int(w) for w in inference.caption_widths(lengths[captions_of])})
  assert [w for w, _ in calls] == widths
  assert {p for _, p in calls} <= {model.block_size * 6 // size for size in (1, 2, 3)}
  assert scorer.pair_list_scores(image_rep, text_rep, [], []).shape == (0,)


def test_chunk_sizes_must_be_positive():
  with pytest.raises(ValueError, match='image_chunk and text_batch'):
    inference.Scorer(None, {}, image_chunk=0)


@pytest.mark.parametrize('name', ['scan', 'vsepp'])
def test_rerank_candidates_carry_full_scores_and_k_all_equals_exhaustive(name):
  from xmatch_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from xmatch_jax import rerank  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(1)
  n_img, k_regions, n, vocab = 6, 4, 5, 20
  config = ml_collections.ConfigDict({'name': name, 'embed_size': 8, 'word_dim': 8})
  model = build_model(config, vocab_size=vocab, img_dim=7)
  images = {'regions': rng.normal(size=(n_img, k_regions, 7)).astype(np.float32)}
  lengths = rng.integers(2, n + 1, size=5 * n_img)
  mask = (np.arange(n)[None] < lengths[:, None]).astype(np.float32)
  tokens = (rng.integers(1, vocab, size=(5 * n_img, n)) * mask).astype(np.int32)
  variables = _init(model)
  scorer = inference.Scorer(model, variables, image_chunk=4, text_batch=7)
  image_rep, text_rep = scorer.encode_images(images), scorer.encode_text(tokens, mask)
  full = scorer.pair_scores(image_rep, text_rep)

  i2t, t2i = rerank.rerank(scorer, image_rep, text_rep, k=3, tile=4)
  coarse = np.asarray(rerank.global_scores(model, image_rep, text_rep))
  for c in range(5 * n_img):  # each caption: its 3 shortlisted images hold full scores, ranked first
    top = np.argsort(-coarse[:, c], kind='stable')[:3]
    np.testing.assert_allclose(t2i[top, c], full[top, c], rtol=1e-5, atol=1e-6)
    rest = np.setdiff1d(np.arange(n_img), top)
    assert t2i[rest, c].max() < t2i[top, c].min()
    assert list(rest[np.argsort(-t2i[rest, c], kind='stable')]) == list(
      rest[np.argsort(-coarse[rest, c], kind='stable')]
    )
  for i in range(n_img):
    top = np.argsort(-coarse[i], kind='stable')[:3]
    np.testing.assert_allclose(i2t[i, top], full[i, top], rtol=1e-5, atol=1e-6)

  # Shortlisting everything is exhaustive scoring.
  _, t2i_all = rerank.rerank(scorer, image_rep, text_rep, k=n_img, tile=4)
  np.testing.assert_allclose(t2i_all, full, rtol=1e-5, atol=1e-6)
  i2t_every, t2i_every = rerank.rerank(scorer, image_rep, text_rep, k=5 * n_img, tile=4)
  np.testing.assert_allclose(i2t_every, full, rtol=1e-5, atol=1e-6)
  got = rerank.two_way_recall(i2t_every, t2i_every)
  want = metrics_lib.recall_metrics(full)
  for key in metrics_lib.RECALL_KEYS + ('rsum',):
    assert got[key] == pytest.approx(want[key])
  with pytest.raises(ValueError, match='rerank k must be >= 1'):
    rerank.rerank(scorer, image_rep, text_rep, k=0)


@pytest.mark.parametrize('name', ['rdan', 'mmca'])
def test_shortlist_scores_caption_groups_of_one_width_as_the_padded_split(name):
  from xmatch_jax import rerank  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(3)
  n_img, n_txt, width, dim = 11, 23, 33, 8
  lengths = rng.integers(1, 20, size=n_txt)
  lengths[5] = width  # one caption fills the split's padding
  mask = (np.arange(width)[None] < lengths[:, None]).astype(np.float32)
  image_rep = {'regions': jnp.asarray(rng.normal(size=(n_img, 5, dim)), jnp.float32)}
  text_rep = {'words': jnp.asarray(rng.normal(size=(n_txt, width, dim)) * mask[..., None], jnp.float32), 'mask': mask}
  extra = {'word_dim': dim} if name == 'rdan' else {'num_heads': 2}
  config = ml_collections.ConfigDict({'name': name, 'embed_size': dim, **extra})
  model = build_model(config, vocab_size=20 if name == 'rdan' else 30522, img_dim=7)  # MMCA: BERT's vocabulary
  if name == 'mmca':  # its own global score, i0 . c0, with c0 a key that trimming keeps whole
    image_rep['i0'] = jnp.asarray(rng.normal(size=(n_img, dim)), jnp.float32)
    text_rep = {**text_rep, 'c0': jnp.asarray(rng.normal(size=(n_txt, dim)), jnp.float32)}
  want = np.asarray(rerank.global_scores(model, image_rep, text_rep))  # one call at the padded width
  widths, real = [], rerank._global_fn  # pylint: disable=protected-access
  rerank._global_fn = lambda *a: lambda i, t: widths.append(t['mask'].shape[1]) or real(*a)(i, t)  # pylint: disable=protected-access
  scorer = inference.Scorer(model, {}, devices=jax.local_devices()[:1])
  try:
    got = rerank._shortlist_scores(scorer, image_rep, text_rep, desc='', block_size=2, chunk_blocks=2)  # pylint: disable=protected-access
  finally:
    rerank._global_fn = real  # pylint: disable=protected-access
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  assert got.shape == (n_img, n_txt) and got.dtype == np.float32
  # Widths 8, 16 and 24, and 33 for the caption of 33 tokens (40 is cut at the split's 33); each once per chunk.
  assert widths == [8, 16, 24, 33] * 3, widths


@pytest.mark.slow
def test_scores_split_over_eight_devices_equal_one_device():
  here = os.path.dirname(os.path.abspath(__file__))
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8', 'JAX_PLATFORMS': 'cpu'}
  run = subprocess.run(
    [sys.executable, os.path.join(here, 'sharded_scoring_check.py')],
    capture_output=True,
    text=True,
    env=env,
    timeout=600,
  )
  assert run.returncode == 0, run.stderr[-3000:]
  seen = json.loads(run.stdout.strip().splitlines()[-1])
  for name in ('rdan', 'mmca'):
    assert seen[name]['devices'] == 8 and seen[name]['shape'] == [37, 23], seen
    assert seen[name]['max_abs_diff'] == 0.0, seen  # the same program on the same shapes per device
    assert seen[name]['list_max_abs_diff'] == 0.0, seen  # re-rank tiles: the same program per tile
    assert seen[name]['list_vs_matrix'] <= 1e-5, seen
    assert seen[name]['shortlist_shape'] == [37, 23] and seen[name]['shortlist_max_abs_diff'] <= 1e-6, seen


class _Killed(Exception):
  pass


def test_interrupted_scoring_resumes_from_its_finished_columns(tmp_path):
  rng = np.random.default_rng(1)
  config = ml_collections.ConfigDict({'name': 'scan', 'embed_size': 8, 'word_dim': 8, 'cross_attn': 't2i'})
  model = build_model(config, vocab_size=20, img_dim=7)
  images = {'regions': rng.normal(size=(9, 4, 7)).astype(np.float32)}
  mask = (np.arange(6)[None] < rng.integers(1, 7, size=23)[:, None]).astype(np.float32)
  tokens = (rng.integers(1, 20, size=(23, 6)) * mask).astype(np.int32)
  variables = _init(model)
  scorer = inference.Scorer(model, variables, image_chunk=4, text_batch=5)  # 5 column blocks
  image_rep, text_rep = scorer.encode_images(images), scorer.encode_text(tokens, mask)
  want = scorer.pair_scores(image_rep, text_rep)

  calls, real, killed = [], scorer._pair_scores, []  # pylint: disable=protected-access

  def dies_in_the_third_block(*args):
    calls.append(1)
    if len(calls) == 7 and not killed:  # 3 image chunks per block: the third block's first chunk
      killed.append(1)
      raise _Killed
    return real(*args)

  scorer._pair_scores = dies_in_the_third_block  # pylint: disable=protected-access
  partial = str(tmp_path / 'partial')
  identity = {'checkpoint': 'best', 'step': 7}
  with pytest.raises(_Killed):
    scorer.pair_scores(image_rep, text_rep, partial, identity)
  assert len([n for n in os.listdir(partial) if n.startswith('columns_')]) == 2
  calls.clear()
  got = scorer.pair_scores(image_rep, text_rep, partial, identity)
  np.testing.assert_array_equal(got, want)
  assert len(calls) == 3 * 3 and not os.path.exists(partial)  # only blocks 3-5 computed; the store removed

  # Columns of another checkpoint are never reused.
  os.makedirs(partial)
  scorer._pair_scores = real  # pylint: disable=protected-access
  inference._ColumnStore(partial, {'checkpoint': 'best', 'step': 6, 'shape': [9, 23], 'text_batch': 5}).put(  # pylint: disable=protected-access
    0, np.zeros((9, 5), np.float32)
  )
  np.testing.assert_array_equal(scorer.pair_scores(image_rep, text_rep, partial, identity), want)
