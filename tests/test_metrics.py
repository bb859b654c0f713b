"""Recall against a transcription of SCAN's evaluation.py loops; mAP against a brute-force reference."""

import numpy as np
import pytest

from xmatch_jax import metrics


def scan_i2t(sims):
  """SCAN evaluation.py `i2t`, loop for loop (ranks and the printed metrics)."""
  npts = sims.shape[0]
  ranks = np.zeros(npts)
  for index in range(npts):
    inds = np.argsort(sims[index])[::-1]
    rank = 1e20
    for i in range(5 * index, 5 * index + 5, 1):
      tmp = np.where(inds == i)[0][0]
      if tmp < rank:
        rank = tmp
    ranks[index] = rank
  r1 = 100.0 * len(np.where(ranks < 1)[0]) / len(ranks)
  r5 = 100.0 * len(np.where(ranks < 5)[0]) / len(ranks)
  r10 = 100.0 * len(np.where(ranks < 10)[0]) / len(ranks)
  medr = np.floor(np.median(ranks)) + 1
  meanr = ranks.mean() + 1
  return (r1, r5, r10, medr, meanr), ranks


def scan_t2i(sims):
  """SCAN evaluation.py `t2i`, loop for loop."""
  npts = sims.shape[0]
  ranks = np.zeros(5 * npts)
  sims = sims.T
  for index in range(npts):
    for i in range(5):
      inds = np.argsort(sims[5 * index + i])[::-1]
      ranks[5 * index + i] = np.where(inds == index)[0][0]
  r1 = 100.0 * len(np.where(ranks < 1)[0]) / len(ranks)
  r5 = 100.0 * len(np.where(ranks < 5)[0]) / len(ranks)
  r10 = 100.0 * len(np.where(ranks < 10)[0]) / len(ranks)
  medr = np.floor(np.median(ranks)) + 1
  meanr = ranks.mean() + 1
  return (r1, r5, r10, medr, meanr), ranks


def random_sims(rng, n_img, kind):
  if kind == 'float32':
    return rng.normal(size=(n_img, 5 * n_img)).astype(np.float32)
  if kind == 'float64':
    return rng.normal(size=(n_img, 5 * n_img))
  if kind == 'ties_float':  # integer-valued floats: most rows are full of ties
    return rng.integers(0, 4, size=(n_img, 5 * n_img)).astype(np.float32)
  if kind == 'ties_int':
    return rng.integers(0, 3, size=(n_img, 5 * n_img))
  raise ValueError(kind)


@pytest.mark.parametrize('kind', ['float32', 'float64', 'ties_float', 'ties_int'])
@pytest.mark.parametrize('n_img', [1, 7, 40, 150])
def test_ranks_equal_scan_loops(kind, n_img):
  rng = np.random.default_rng(n_img)
  sims = random_sims(rng, n_img, kind)
  (r_i2t, ranks_i2t), (r_t2i, ranks_t2i) = scan_i2t(sims), scan_t2i(sims)
  # Small chunks so several chunks (including a ragged last one) are exercised.
  np.testing.assert_array_equal(metrics.i2t_ranks(sims, chunk_elements=3 * sims.shape[1]), ranks_i2t)
  np.testing.assert_array_equal(metrics.t2i_ranks(sims, chunk_elements=4 * n_img), ranks_t2i)
  np.testing.assert_array_equal(metrics.i2t_ranks(sims), ranks_i2t)
  np.testing.assert_array_equal(metrics.t2i_ranks(sims), ranks_t2i)
  got = metrics.recall_metrics(sims)
  want = dict(zip(['i2t_r1', 'i2t_r5', 'i2t_r10', 'i2t_medr', 'i2t_meanr'], r_i2t))
  want.update(zip(['t2i_r1', 't2i_r5', 't2i_r10', 't2i_medr', 't2i_meanr'], r_t2i))
  want['rsum'] = sum(r_i2t[:3]) + sum(r_t2i[:3])
  assert got.keys() == want.keys()
  for key in want:
    assert got[key] == pytest.approx(want[key], rel=1e-12), key


def test_ties_are_broken_as_scan_not_optimistically():
  """All-equal scores: SCAN's ranks depend on argsort's tie order; ours must be the same, not all 0."""
  sims = np.zeros((30, 150), np.float32)
  np.testing.assert_array_equal(metrics.i2t_ranks(sims), scan_i2t(sims)[1])
  np.testing.assert_array_equal(metrics.t2i_ranks(sims), scan_t2i(sims)[1])
  assert metrics.t2i_ranks(sims).max() > 0


def test_recall_monotone_in_k():
  rng = np.random.default_rng(3)
  for kind in ('float32', 'ties_float'):
    m = metrics.recall_metrics(random_sims(rng, 60, kind))
    for way in ('i2t', 't2i'):
      assert 0 <= m[f'{way}_r1'] <= m[f'{way}_r5'] <= m[f'{way}_r10'] <= 100


def test_perfect_diagonal_gives_100():
  n = 20
  sims = np.repeat(np.eye(n), 5, axis=1) + 0.01 * np.random.default_rng(0).normal(size=(n, 5 * n))
  m = metrics.recall_metrics(sims)
  for key in metrics.RECALL_KEYS:
    assert m[key] == 100.0
  assert m['rsum'] == 600.0
  assert m['i2t_medr'] == m['t2i_medr'] == m['i2t_meanr'] == m['t2i_meanr'] == 1.0


def test_hand_case():
  # Image 0: its captions 0-4 score 0, captions of image 1 score 1 -> best gt caption at position 5 (rank 5).
  sims = np.array([[0.0] * 5 + [1.0] * 5, [0.0] * 5 + [2.0] * 5])
  np.testing.assert_array_equal(metrics.i2t_ranks(sims), [5, 0])
  # Captions 0-4: image 0 scores 0 < image 1 scores 1 -> rank 1; captions 5-9: image 1 scores 2 > 1 -> rank 0.
  np.testing.assert_array_equal(metrics.t2i_ranks(sims), [1] * 5 + [0] * 5)
  m = metrics.recall_metrics(sims)
  assert m['i2t_r1'] == 50.0 and m['i2t_r5'] == 50.0 and m['i2t_r10'] == 100.0
  assert m['t2i_r1'] == 50.0 and m['t2i_r5'] == 100.0
  assert m['i2t_meanr'] == 3.5 and m['i2t_medr'] == 3.0


def test_fold_metrics_average_and_true_rsum():
  rng = np.random.default_rng(4)
  folds = [random_sims(rng, 12, 'float32') + 3 * np.repeat(np.eye(12), 5, axis=1) * rng.random() for _ in range(3)]
  per_fold = [metrics.recall_metrics(s) for s in folds]
  got = metrics.fold_metrics(folds)
  for key in per_fold[0]:
    assert got[key] == pytest.approx(np.mean([m[key] for m in per_fold])), key
  assert got['rsum'] == pytest.approx(sum(got[k] for k in metrics.RECALL_KEYS))
  # SCAN's fold-5 print: 6 x the mean of (r1 + r5 + r10) / 3 of i2t only. Differs unless i2t == t2i sums.
  scan_printed = 2 * (got['i2t_r1'] + got['i2t_r5'] + got['i2t_r10'])
  assert got['rsum'] != pytest.approx(scan_printed)
  with pytest.raises(ValueError, match='empty'):
    metrics.fold_metrics([])


def _loop_ranks_by_index(sims, owner):
  """Brute force over an arbitrary caption -> image index: per image the best position of any of its captions,
  per caption the position of its image, positions from the same np.argsort(row)[::-1] as SCAN."""
  i2t = [
    min(int(np.where(np.argsort(row)[::-1] == c)[0][0]) for c in np.where(owner == i)[0]) for i, row in enumerate(sims)
  ]
  t2i = [int(np.where(np.argsort(col)[::-1] == owner[c])[0][0]) for c, col in enumerate(sims.T)]
  return np.array(i2t), np.array(t2i)


@pytest.mark.parametrize('kind', ['float32', 'ties_float'])
def test_any_number_of_captions_per_image(kind):
  rng = np.random.default_rng(3)
  owner = np.concatenate([np.arange(12), rng.integers(0, 12, size=17)])  # 1 to ~4 captions each, shuffled
  rng.shuffle(owner)
  sims = random_sims(rng, 12, kind)[:, : len(owner)]
  want_i2t, want_t2i = _loop_ranks_by_index(sims, owner)
  np.testing.assert_array_equal(metrics.i2t_ranks(sims, caption_to_image=owner, chunk_elements=40), want_i2t)
  np.testing.assert_array_equal(metrics.t2i_ranks(sims, caption_to_image=owner, chunk_elements=40), want_t2i)
  got, protocol = metrics.metrics_for(sims, None, owner)
  assert protocol == 'all' and got['t2i_r1'] == pytest.approx(100 * np.mean(want_t2i < 1))
  # The 5-per-image layout given as an index is the protocols' own: same numbers as without it.
  square = random_sims(rng, 7, kind)
  same = np.arange(35) // 5
  assert metrics.recall_metrics(square, caption_to_image=same) == metrics.recall_metrics(square)
  with pytest.raises(ValueError, match='needs 5 consecutive captions per image'):
    metrics.metrics_for(sims, '1k', owner)
  with pytest.raises(ValueError, match='image row 11 has no caption'):
    metrics.recall_metrics(sims[:, owner != 11], caption_to_image=owner[owner != 11])
  with pytest.raises(ValueError, match=r'caption_to_image has shape \(28,\); expected \(29,\)'):
    metrics.recall_metrics(sims, caption_to_image=owner[:-1])


def test_recall_shape_errors():
  with pytest.raises(ValueError, match='5 captions per image'):
    metrics.recall_metrics(np.zeros((4, 19)))
  with pytest.raises(ValueError, match='2-D'):
    metrics.i2t_ranks(np.zeros(20))
  with pytest.raises(ValueError, match='2-D'):
    metrics.t2i_ranks(np.zeros((0, 0)))
  with pytest.raises(ValueError, match='NaN'):
    metrics.recall_metrics(np.full((2, 10), np.nan))


def brute_force_ap(scores, q_label, doc_labels):
  """AP by the definition: mean over relevant documents of precision at their (1-based) position."""
  order = sorted(range(len(scores)), key=lambda d: (-scores[d], d))
  hits, precisions = 0, []
  for position, d in enumerate(order, start=1):
    if doc_labels[d] == q_label:
      hits += 1
      precisions.append(hits / position)
  return sum(precisions) / len(precisions)


def test_map_against_brute_force():
  rng = np.random.default_rng(5)
  for ties in (False, True):
    sims = rng.integers(0, 3, size=(13, 31)).astype(np.float32) if ties else rng.normal(size=(13, 31))
    q_labels = rng.integers(0, 4, size=13)
    d_labels = np.concatenate([np.arange(4), rng.integers(0, 4, size=27)])  # every label has a document
    aps = metrics.average_precisions(sims, q_labels, d_labels, chunk_elements=2 * 31)
    want = [brute_force_ap(sims[q], q_labels[q], d_labels) for q in range(13)]
    np.testing.assert_allclose(aps, want, rtol=1e-12)
    assert metrics.mean_average_precision(sims, q_labels, d_labels) == pytest.approx(np.mean(want))


def test_map_hand_cases():
  # Relevant docs at positions 1 and 3 of 4: AP = (1/1 + 2/3) / 2.
  assert metrics.mean_average_precision([[0.9, 0.8, 0.7, 0.1]], [1], [1, 0, 1, 0]) == pytest.approx((1 + 2 / 3) / 2)
  # All relevant ranked first: AP = 1; all last: AP = mean(1/3, 2/4) for 2 relevant of 4.
  assert metrics.mean_average_precision([[4, 3, 2, 1]], ['a'], ['a', 'a', 'b', 'b']) == 1.0
  worst = metrics.mean_average_precision([[1, 2, 3, 4]], ['a'], ['a', 'a', 'b', 'b'])
  assert worst == pytest.approx((1 / 3 + 2 / 4) / 2)
  # Ties keep document order: doc 0 (irrelevant) before doc 1 (relevant) -> AP = 1/2.
  assert metrics.mean_average_precision([[1.0, 1.0]], [0], [1, 0]) == 0.5
  # Two queries averaged.
  assert metrics.mean_average_precision([[2, 1], [2, 1]], [0, 1], [0, 1]) == pytest.approx((1 + 0.5) / 2)


def test_map_metrics_both_ways():
  rng = np.random.default_rng(6)
  sims = rng.normal(size=(8, 10))
  img_labels, txt_labels = rng.integers(0, 3, 8), np.concatenate([np.arange(3), rng.integers(0, 3, 7)])
  img_labels[:3] = np.arange(3)
  m = metrics.map_metrics(sims, img_labels, txt_labels)
  assert m['i2t_map'] == pytest.approx(metrics.mean_average_precision(sims, img_labels, txt_labels))
  assert m['t2i_map'] == pytest.approx(metrics.mean_average_precision(sims.T, txt_labels, img_labels))
  assert m['mean_map'] == pytest.approx((m['i2t_map'] + m['t2i_map']) / 2)


def test_map_errors():
  with pytest.raises(ValueError, match='no relevant document'):
    metrics.mean_average_precision(np.zeros((2, 3)), [0, 9], [0, 1, 1])
  with pytest.raises(ValueError, match='query_labels'):
    metrics.mean_average_precision(np.zeros((2, 3)), [0], [0, 1, 1])
  with pytest.raises(ValueError, match='doc_labels'):
    metrics.mean_average_precision(np.zeros((2, 3)), [0, 1], [0, 1])
  with pytest.raises(ValueError, match='2-D'):
    metrics.mean_average_precision(np.zeros(3), [0], [0, 1, 1])
