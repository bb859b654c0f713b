"""contrastive_loss against a loop transcription of SCAN's ContrastiveLoss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xmatch_jax import losses


def reference_loss(scores, margin, max_violation, image_ids=None):
  """Element by element, as SCAN's model.py ContrastiveLoss.forward (with same-image pairs cleared)."""
  b = scores.shape[0]
  ids = np.arange(b) if image_ids is None else np.asarray(image_ids)
  cost_s = np.zeros((b, b))
  cost_im = np.zeros((b, b))
  for i in range(b):
    for j in range(b):
      if ids[i] == ids[j]:  # the diagonal, and other captions of the same image
        continue
      cost_s[i, j] = max(0.0, margin + scores[i, j] - scores[i, i])
      cost_im[i, j] = max(0.0, margin + scores[i, j] - scores[j, j])
  if max_violation:
    return sum(max(cost_s[i, :]) for i in range(b)) + sum(max(cost_im[:, j]) for j in range(b))
  return cost_s.sum() + cost_im.sum()


@pytest.mark.parametrize('max_violation', [False, True])
@pytest.mark.parametrize('with_ids', [False, True])
def test_matches_loop_reference(max_violation, with_ids):
  rng = np.random.default_rng(0)
  for trial in range(5):
    b = 7
    scores = rng.normal(scale=0.3, size=(b, b)).astype(np.float32)
    ids = rng.integers(0, 4, size=b) if with_ids else None  # 7 captions of 4 images: duplicates certain
    margin = [0.0, 0.2, 0.5][trial % 3]
    got = losses.contrastive_loss(jnp.asarray(scores), margin, max_violation, image_ids=ids)
    want = reference_loss(scores.astype(np.float64), margin, max_violation, ids)
    np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6)


def test_duplicate_ids_change_the_loss():
  """A same-image off-diagonal pair with a high score is a violation without ids and not one with them."""
  scores = np.eye(3, dtype=np.float32)
  scores[0, 1] = 2.0
  ids = np.array([5, 5, 7])
  for max_violation in (False, True):
    plain = float(losses.contrastive_loss(scores, 0.2, max_violation))
    masked = float(losses.contrastive_loss(scores, 0.2, max_violation, image_ids=ids))
    assert plain > masked
    np.testing.assert_allclose(masked, reference_loss(scores, 0.2, max_violation, ids), rtol=1e-6)


def test_gradient_finite_and_matches_jit():
  rng = np.random.default_rng(1)
  scores = jnp.asarray(rng.normal(size=(6, 6)).astype(np.float32))
  ids = jnp.asarray([0, 0, 1, 2, 3, 3])
  for max_violation in (False, True):
    fn = lambda s: losses.contrastive_loss(s, 0.2, max_violation, image_ids=ids)
    grad = jax.grad(fn)(scores)
    assert np.all(np.isfinite(grad))
    assert np.abs(grad).sum() > 0
    np.testing.assert_allclose(jax.jit(fn)(scores), fn(scores), rtol=1e-6)


def test_gradient_of_sum_variant_counts_violations():
  """d loss / d s_ij (i != j) = [cost_s_ij > 0] + [cost_im_ij > 0]; the diagonal gets minus the row/column counts."""
  rng = np.random.default_rng(2)
  scores = rng.normal(scale=0.3, size=(5, 5)).astype(np.float32)
  margin = 0.2
  grad = np.asarray(jax.grad(lambda s: losses.contrastive_loss(s, margin, False))(jnp.asarray(scores)))
  d = np.diag(scores)
  active_s = (margin + scores - d[:, None] > 0) & ~np.eye(5, dtype=bool)
  active_im = (margin + scores - d[None, :] > 0) & ~np.eye(5, dtype=bool)
  want = active_s.astype(np.float32) + active_im
  want[np.diag_indices(5)] = -active_s.sum(axis=1) - active_im.sum(axis=0)
  np.testing.assert_allclose(grad, want, atol=1e-6)


@pytest.mark.parametrize('max_violation', [False, True])
def test_collapse_value(max_violation):
  margin, b = 0.2, 6
  equal_scores = jnp.full((b, b), 0.37)
  want = 2 * b * margin if max_violation else 2 * b * (b - 1) * margin
  assert losses.collapse_value(b, margin, max_violation) == pytest.approx(want)
  np.testing.assert_allclose(float(losses.contrastive_loss(equal_scores, margin, max_violation)), want, rtol=1e-5)
  ids = np.array([0, 0, 0, 1, 2, 2])
  np.testing.assert_allclose(
    losses.collapse_value(b, margin, max_violation, image_ids=ids),
    float(losses.contrastive_loss(equal_scores, margin, max_violation, image_ids=ids)),
    rtol=1e-5,
  )
  # One image only: no negatives at all.
  assert losses.collapse_value(1, margin, max_violation) == 0.0
  assert losses.collapse_value(3, margin, max_violation, image_ids=[4, 4, 4]) == 0.0


def test_errors():
  with pytest.raises(ValueError, match='square'):
    losses.contrastive_loss(jnp.zeros((3, 4)), 0.2, True)
  with pytest.raises(ValueError, match='square'):
    losses.contrastive_loss(jnp.zeros((3,)), 0.2, True)
  with pytest.raises(ValueError, match='margin'):
    losses.contrastive_loss(jnp.zeros((3, 3)), -0.1, True)
  with pytest.raises(ValueError, match='image_ids'):
    losses.contrastive_loss(jnp.zeros((3, 3)), 0.2, True, image_ids=np.zeros(4, int))
  with pytest.raises(ValueError, match='margin'):
    losses.collapse_value(4, -1.0, False)
  with pytest.raises(ValueError, match='batch'):
    losses.collapse_value(0, 0.2, False)
