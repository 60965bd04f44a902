"""Tests for the pairwise preference model of rlhf_jax.losses.bradley_terry
(preference_probability, preference_model_loss): one class per function."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses import bradley_terry as bt

import helpers
from jitted import G, J, fd_grad


def _np_sigmoid(x):
  return 1 / (1 + np.exp(-np.asarray(x, np.float64)))


def _np_preference_loss(f_ab, f_ba, y, valid):
  """float64 reference from the equation: -[y log s(f_ab) + (1-y) log(1 - s(f_ab))]
  - [(1-y) log s(f_ba) + y log(1 - s(f_ba))], summed over valid pairs, / (2 x valid pairs)."""
  s_ab, s_ba = _np_sigmoid(f_ab), _np_sigmoid(f_ba)
  per = (-(y * np.log(s_ab) + (1 - y) * np.log(1 - s_ab))
         - ((1 - y) * np.log(s_ba) + y * np.log(1 - s_ba)))
  return (per * valid).sum() / (2 * valid.sum())


class TestPreferenceProbability:

  def test_hand_case_and_exact_antisymmetry(self):
    # f(a,b) = 2.0, f(b,a) = 0.5: (s(2) + 1 - s(0.5)) / 2 = (0.880797 + 1 - 0.622459) / 2
    # = 0.629169; swapped 0.370831; equal scores give exactly 1/2.
    fab, fba = jnp.array([2.0]), jnp.array([0.5])
    # The constants are given to 6 decimals.
    np.testing.assert_allclose(jax.jit(bt.preference_probability)(fab, fba), [0.629169],
                               rtol=1e-5)
    np.testing.assert_allclose(J(bt.preference_probability)(fba, fab), [0.370831], rtol=1e-5)
    np.testing.assert_allclose(J(bt.preference_probability)(fab, fab), [0.5])
    rng = np.random.default_rng(2)
    f_ab, f_ba = (jnp.asarray(rng.normal(0, 3, 8), jnp.float32) for _ in range(2))
    # Each P is two sigmoids (4 roundings each), an add, a subtract and a halving, of terms
    # of size <= 1; then the sum of the two P: f32_tol(2 * (2 * 4 + 3) + 1).
    np.testing.assert_allclose(J(bt.preference_probability)(f_ab, f_ba)
                               + J(bt.preference_probability)(f_ba, f_ab), 1.0,
                               **helpers.f32_tol(2 * (2 * 4 + 3) + 1))

  def test_shape_error(self):
    with pytest.raises(ValueError, match="f_ba_B"):
      J(bt.preference_probability)(jnp.zeros(2), jnp.zeros(3))


class TestPreferenceModelLoss:

  def test_hand_case(self):
    # f_ab = f_ba = 0: each order costs log 2 -> loss log 2; P = 1/2 is a tie (accuracy 1/2).
    loss, m = jax.jit(bt.preference_model_loss)(jnp.zeros(1), jnp.zeros(1), jnp.ones(1),
                                                jnp.ones(1, bool))
    # Two log-sigmoids (<= 3 roundings each), the label products and sums (4), a divide.
    np.testing.assert_allclose(loss, np.log(2), **helpers.f32_tol(2 * 3 + 4 + 1))
    assert float(m["count"]) == 2 and float(m["accuracy_sum"] / m["count"]) == 0.5
    # f_ab = 2, f_ba = -2, label 1: 2 softplus(-2) = 2 * 0.126928 per pair / 2 orders.
    loss, m = J(bt.preference_model_loss)(jnp.array([2.0]), jnp.array([-2.0]), jnp.ones(1))
    np.testing.assert_allclose(loss, 0.126928, rtol=1e-5)  # the constant is given to 6 decimals
    assert float(m["accuracy_sum"]) == 2.0 and float(m["pair_count"]) == 1.0

  def test_matches_float64_reference_soft_labels_and_padding(self):
    rng = np.random.default_rng(0)
    f_ab, f_ba = rng.normal(0, 2, 16), rng.normal(0, 2, 16)
    y = (rng.random(16) < 0.5).astype(float)
    y[:3] = [0.3, 0.8, 0.5]  # soft labels
    valid = rng.random(16) < 0.8
    loss, m = J(bt.preference_model_loss)(*(jnp.asarray(x, jnp.float32) for x in (f_ab, f_ba, y)),
                                          jnp.asarray(valid))
    # A B-term masked sum of positive per-pair terms (two log-sigmoids, 3 roundings each, label
    # products and sums, the mask: 11), the count and the divide. Casting a score to float32
    # moves a log-sigmoid by <= u·|f| (slope <= 1), hence atol at the scores' size.
    b = len(f_ab)
    np.testing.assert_allclose(loss, _np_preference_loss(f_ab, f_ba, y, valid),
                               **helpers.f32_tol(b + 11 + 2,
                                                 scale=max(np.abs(f_ab).max(), np.abs(f_ba).max())))
    # The same float32 division loss_sum / count as in the loss (count >= 1): one rounding.
    np.testing.assert_allclose(m["loss_sum"] / m["count"], loss, **helpers.f32_tol(1))
    p = 0.5 * (_np_sigmoid(f_ab) + 1 - _np_sigmoid(f_ba))
    acc = ((p > 0.5) == (y > 0.5)) * valid
    assert float(m["accuracy_sum"]) == 2 * acc.sum() and float(m["count"]) == 2 * valid.sum()

  def test_valid_none_is_all_valid_and_padding_rows_absent(self):
    rng = np.random.default_rng(3)
    fab, fba = (jnp.asarray(rng.normal(size=5), jnp.float32) for _ in range(2))
    y = jnp.asarray(rng.random(5) < 0.5, jnp.float32)
    full = J(bt.preference_model_loss)(fab, fba, y)
    assert float(full[1]["count"]) == 10
    # Two float32 evaluations of the same B-term positive sum (XLA may fold the all-ones mask
    # and reorder the sum) and the divide: f32_tol(B + 1).
    np.testing.assert_allclose(J(bt.preference_model_loss)(fab, fba, y, jnp.ones(5, bool))[0],
                               full[0], **helpers.f32_tol(5 + 1))
    keep = jnp.array([0, 2, 3])
    got = J(bt.preference_model_loss)(fab, fba, y, jnp.array([1, 0, 1, 1, 0], bool))
    want = J(bt.preference_model_loss)(fab[keep], fba[keep], y[keep])
    # The same 3 positive terms summed among 5 (two masked to 0) or alone, and the divide.
    np.testing.assert_allclose(got[0], want[0], **helpers.f32_tol(5 + 1))

  def test_swap_symmetry(self):
    # Swapping (a, b) and flipping the label leaves the loss unchanged (antisymmetric model).
    rng = np.random.default_rng(1)
    fab, fba = rng.normal(size=(2, 5)).astype(np.float32)
    y = (rng.random(5) < 0.5).astype(np.float32)
    np.testing.assert_allclose(J(bt.preference_model_loss)(fab, fba, y)[0],
                               J(bt.preference_model_loss)(fba, fab, 1 - y)[0],
                               **helpers.f32_tol(5 + 1))  # the same B positive terms, reordered

  def test_grad_vs_finite_differences(self):
    with jax.enable_x64(True):
      rng = np.random.default_rng(2)
      fab, fba, y = rng.normal(size=4), rng.normal(size=4), (rng.random(4) < 0.5) * 1.0
      valid = np.array([1, 1, 0, 1], bool)
      g = jax.jit(jax.grad(lambda a: bt.preference_model_loss(a, jnp.asarray(fba),
                                                              jnp.asarray(y), valid)[0]))(
                                                                  jnp.asarray(fab))
      ref = fd_grad(lambda a: _np_preference_loss(a, fba, y, valid), fab)
      # float64 gradient vs a float64 central difference, h = 1e-6: the difference's error is
      # ~h^2·|f'''| + eps64/h ~ 1e-10, which these bounds cover (not a float32 tolerance).
      np.testing.assert_allclose(g, ref, rtol=1e-6, atol=1e-10)

  def test_extreme_finite_and_shape_error(self):
    # Confidently wrong by 1e6 in both orders: 2 softplus(1e6) = 2e6 per pair, / 2 orders.
    loss, _ = J(bt.preference_model_loss)(jnp.array([1e6, -1e6]), jnp.array([-1e6, 1e6]),
                                          jnp.array([0.0, 1.0]))
    # Two softplus (their exps underflow), the label products and sums, a divide.
    np.testing.assert_allclose(loss, 1e6, **helpers.f32_tol(2 * 3 + 4 + 1))
    g = G(lambda a: J(bt.preference_model_loss)(a, jnp.zeros(2), jnp.ones(2))[0])(
        jnp.array([1e6, -1e6]))
    assert np.all(np.isfinite(g))
    with pytest.raises(ValueError, match="labels_B"):
      jax.jit(bt.preference_model_loss)(jnp.zeros(2), jnp.zeros(2), jnp.zeros(3))
    with pytest.raises(ValueError, match="valid_B"):
      J(bt.preference_model_loss)(jnp.zeros(2), jnp.zeros(2), jnp.zeros(2), jnp.ones(3, bool))
