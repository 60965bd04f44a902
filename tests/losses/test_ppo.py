"""Tests for rlhf_jax.losses.ppo: per-token rewards, GAE and whitening (the clipped losses,
entropy bonus and adaptive KL are in test_ppo_losses.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses import ppo

import helpers


def _mask(lengths, T):
  return (np.arange(T)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)


def _gae_numpy(rewards, values, lengths, gamma, lam, truncated=None, boot=None):
  """Direct double-loop sum A_t = sum_l (gamma lam)^l delta_{t+l} (Schulman 2016), float64."""
  B, T = rewards.shape
  adv = np.zeros((B, T))
  for b in range(B):
    L = lengths[b]
    v_ext = np.zeros(L + 1)
    v_ext[:L] = values[b, :L]
    if truncated is not None and truncated[b]:
      v_ext[L] = values[b, L - 1] if boot is None else boot[b]
    delta = [rewards[b, t] + gamma * v_ext[t + 1] - v_ext[t] for t in range(L)]
    for t in range(L):
      adv[b, t] = sum((gamma * lam) ** l * delta[t + l] for l in range(L - t))
  return adv


def _gae_scale(rewards, values, mask, boot=None):
  """Size of the terms of A_t = sum_l (gamma lambda)^l (r + gamma V' - V): each r_t, V_t and
  V_{t+1} of a row enters with a weight <= 1, so the row's sum of |r| + 2|V| (+ |bootstrap|)
  bounds sum|terms| (Higham's atol scale, see helpers.f32_tol)."""
  row = np.sum((np.abs(rewards) + 2 * np.abs(values)) * mask, axis=1)
  return float(row.max() + (0.0 if boot is None else np.abs(boot).max()))


class TestLastTokenOnehot:

  def test_hand_checked_and_all_masked_row(self):
    mask = jnp.array([[1, 1, 0], [1, 1, 1], [0, 0, 0]], bool)
    np.testing.assert_array_equal(jax.jit(ppo.last_token_onehot)(mask),
                                  [[0, 1, 0], [0, 0, 1], [0, 0, 0]])

  def test_rank_error(self):
    with pytest.raises(ValueError, match="mask_BxT"):
      ppo.last_token_onehot(jnp.ones(3))


class TestRlhfTokenRewards:

  def test_hand_checked(self):
    # kl_coef 0.1, logp_old - logp_ref = [0.5, -1.0, 2.0(masked)]: KL part [-0.05, 0.1, 0];
    # sequence reward 3.0 goes on the last valid token (t = 1): [-0.05, 3.1, 0].
    out = jax.jit(ppo.rlhf_token_rewards, static_argnames="kl_coef")(
        jnp.array([[0.0, -1.0, 1.0]]), jnp.array([[-0.5, 0.0, -1.0]]), jnp.array([3.0]),
        jnp.array([[1.0, 1.0, 0.0]]), kl_coef=0.1)
    # Exact differences; 0.1's rounding and the product (2), + 3.0 (1).
    np.testing.assert_allclose(out, [[-0.05, 3.1, 0.0]], **helpers.f32_tol(3))

  def test_matches_numpy_reference_with_truncation_penalty(self):
    rng = np.random.default_rng(0)
    B, T = 4, 6
    old, ref = rng.normal(size=(B, T)), rng.normal(size=(B, T))
    rew, lengths = rng.normal(size=B), np.array([6, 3, 1, 4])
    truncated = np.array([True, False, False, True])
    want = np.zeros((B, T))
    for b in range(B):
      for t in range(lengths[b]):
        want[b, t] = -0.2 * (old[b, t] - ref[b, t])
      want[b, lengths[b] - 1] += rew[b] - (1.5 if truncated[b] else 0.0)
    got = ppo.rlhf_token_rewards(jnp.asarray(old, jnp.float32), jnp.asarray(ref, jnp.float32),
                                 jnp.asarray(rew, jnp.float32), _mask(lengths, T), kl_coef=0.2,
                                 truncated_B=jnp.asarray(truncated), truncation_penalty=1.5)
    # The three float32 casts, old - ref (cancels: atol at its terms' size), 0.2's rounding and
    # the product, rew - penalty and the add: f32_tol(8) at the size of the summed terms.
    scale = np.max(0.2 * (np.abs(old) + np.abs(ref)) + np.abs(rew)[:, None] + 1.5)
    np.testing.assert_allclose(got, want, **helpers.f32_tol(8, scale=scale))

  def test_zero_kl_at_reference_and_all_masked_row_is_zero(self):
    logps = jnp.full((2, 3), -1.0)
    out = ppo.rlhf_token_rewards(logps, logps, jnp.array([1.0, 1e6]),
                                 jnp.array([[1, 1, 1], [0, 0, 0]], bool), kl_coef=0.5)
    np.testing.assert_array_equal(out, [[0, 0, 1.0], [0, 0, 0]])

  def test_shape_errors(self):
    with pytest.raises(ValueError, match="rewards_B"):
      ppo.rlhf_token_rewards(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros(3),
                             jnp.ones((2, 3)), kl_coef=0.1)
    with pytest.raises(ValueError, match="ref_logps_BxT"):
      ppo.rlhf_token_rewards(jnp.zeros((2, 3)), jnp.zeros((2, 4)), jnp.zeros(2),
                             jnp.ones((2, 3)), kl_coef=0.1)


class TestGaeAdvantages:
  gae = staticmethod(jax.jit(ppo.gae_advantages, static_argnames=("gae_gamma", "gae_lambda")))

  def test_hand_checked_terminated_and_truncated(self):
    # r = [0, 1], V = [0.5, 0.2], gamma 0.9, lambda 0.8 (third slot padded).
    # Terminated: delta_1 = 1 + 0 - 0.2 = 0.8, delta_0 = 0 + 0.9*0.2 - 0.5 = -0.32,
    #   A = [-0.32 + 0.72*0.8, 0.8] = [0.256, 0.8], R = A + V = [0.756, 1.0].
    # Truncated (bootstrap V(s_last) = 0.2): delta_1 = 1 + 0.18 - 0.2 = 0.98,
    #   A_0 = -0.32 + 0.72*0.98 = 0.3856.
    r, v, m = jnp.array([[0.0, 1.0, 9.0]] * 2), jnp.array([[0.5, 0.2, 9.0]] * 2), _mask([2, 2], 3)
    adv, ret = self.gae(r, v, m, gae_gamma=0.9, gae_lambda=0.8,
                        truncated_B=jnp.array([False, True]))
    # Casts of 0.5, 0.2, gamma, lambda (4); two deltas (3 each), the 3-term bootstrap sum (3),
    # gamma·lambda, ·A_1, + delta_0 (3); + V for the returns (1): f32_tol(17) at the terms'
    # size 1 (-0.32 + 0.576 partly cancels). The constants are exact decimals.
    tol = helpers.f32_tol(17)
    np.testing.assert_allclose(adv, [[0.256, 0.8, 0], [0.3856, 0.98, 0]], **tol)
    np.testing.assert_allclose(ret[0], [0.756, 1.0, 0], **tol)

  @pytest.mark.parametrize("with_boot", [False, True])
  def test_matches_direct_double_loop_sum(self, with_boot):
    rng = np.random.default_rng(1)
    B, T = 5, 8
    lengths = np.array([8, 5, 1, 3, 7])
    mask = _mask(lengths, T)
    rewards, values = rng.normal(size=(B, T)) * mask, rng.normal(size=(B, T))
    truncated = np.array([True, False, True, True, False])
    boot = rng.normal(size=B) if with_boot else None
    adv, ret = self.gae(jnp.asarray(rewards, jnp.float32), jnp.asarray(values, jnp.float32), mask,
                        gae_gamma=0.95, gae_lambda=0.9, truncated_B=jnp.asarray(truncated),
                        bootstrap_values_B=None if boot is None else jnp.asarray(boot, jnp.float32))
    want = _gae_numpy(rewards, values, lengths, 0.95, 0.9, truncated, boot)
    # float32 vs float64: casts (3), delta (3), gamma, lambda and their product (3, the
    # product's rounding grows to l·u in (gamma lambda)^l), the T-step scan (2 per step);
    # the sum cancels: atol at the size of its terms (_gae_scale); + V for the returns.
    n, scale = 3 + 3 + 3 + 3 * T + 1, _gae_scale(rewards, values, mask, boot)
    np.testing.assert_allclose(adv, want, **helpers.f32_tol(n, scale=scale))
    np.testing.assert_allclose(ret, (want + values) * mask,
                               **helpers.f32_tol(n, scale=scale + np.abs(values).max()))
    # Without truncated_B every row is terminated (V beyond the end = 0).
    adv_term, _ = self.gae(jnp.asarray(rewards, jnp.float32), jnp.asarray(values, jnp.float32),
                           mask, gae_gamma=0.95, gae_lambda=0.9)
    np.testing.assert_allclose(adv_term, _gae_numpy(rewards, values, lengths, 0.95, 0.9),
                               **helpers.f32_tol(n, scale=_gae_scale(rewards, values, mask)))
    assert np.max(np.abs(np.asarray(adv_term) - want)) > 1e-2

  def test_lambda_one_gives_monte_carlo_returns_independent_of_values(self):
    rng = np.random.default_rng(2)
    rewards = rng.normal(size=(2, 4)).astype(np.float32)
    mask = _mask([4, 2], 4)
    rewards = rewards * mask
    values = rng.normal(size=(2, 4)).astype(np.float32)
    _, ret = self.gae(rewards, jnp.asarray(values), mask, gae_gamma=0.9, gae_lambda=1.0)
    want = np.zeros((2, 4))
    for b, L in enumerate([4, 2]):
      for t in range(L):
        want[b, t] = sum(0.9 ** (k - t) * rewards[b, k] for k in range(t, L))
    # The values cancel only in exact arithmetic: as in test_matches_direct_double_loop_sum,
    # delta (3), the constants (3), the T-step scan (2T), + V (1), at the terms' size.
    np.testing.assert_allclose(ret, want, **helpers.f32_tol(3 + 3 + 2 * 4 + 1, scale=_gae_scale(
        rewards, values, mask) + np.abs(values).max()))

  def test_lambda_zero_gives_td_errors(self):
    r, v, m = jnp.array([[1.0, 2.0, 3.0]]), jnp.array([[0.5, -1.0, 2.0]]), jnp.ones((1, 3))
    adv, _ = self.gae(r, v, m, gae_gamma=0.5, gae_lambda=0.0)
    # delta = [1 + 0.5*(-1) - 0.5, 2 + 0.5*2 + 1, 3 + 0 - 2] = [0, 4, 1]
    # Halves and integers, and gamma·lambda·A = 0: every step is exact in float32.
    np.testing.assert_array_equal(adv, [[0.0, 4.0, 1.0]])

  def test_extremes_and_all_masked_row_finite(self):
    r = jnp.array([[1e6, -1e6, 0.0], [1e6, 1e6, 1e6]])
    adv, ret = self.gae(r, jnp.full((2, 3), 1e4), jnp.array([[1, 1, 1], [0, 0, 0]], bool),
                        gae_gamma=1.0, gae_lambda=1.0)
    assert np.all(np.isfinite(adv)) and np.all(np.isfinite(ret))
    np.testing.assert_array_equal(adv[1], 0.0)

  def test_shape_errors(self):
    with pytest.raises(ValueError, match="values_BxT"):
      self.gae(jnp.zeros((2, 3)), jnp.zeros((2, 4)), jnp.ones((2, 3)), gae_gamma=1.0,
               gae_lambda=1.0)
    with pytest.raises(ValueError, match="truncated_B"):
      self.gae(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.ones((2, 3)), gae_gamma=1.0,
               gae_lambda=1.0, truncated_B=jnp.zeros(3, bool))


class TestMaskedWhiten:

  def test_hand_checked(self):
    # Valid entries [1, 3] (the 100 is masked): mean 2, var 1 -> [-1, 1].
    out = jax.jit(ppo.masked_whiten)(jnp.array([[1.0, 3.0, 100.0]]), jnp.array([[1, 1, 0]], bool))
    # Mean 2 and variance 1 are exact (1 + 1e-8 rounds to 1); the rsqrt (even where XLA
    # approximates it and refines it with a Newton step) and the product: f32_tol(4).
    np.testing.assert_allclose(out, [[-1.0, 1.0, 0.0]], **helpers.f32_tol(4))

  def test_matches_numpy_and_statistics(self):
    rng = np.random.default_rng(3)
    x = rng.normal(3.0, 5.0, size=(4, 6)).astype(np.float32)
    mask = _mask([6, 2, 4, 5], 6)
    out = np.asarray(ppo.masked_whiten(x, mask))
    valid = x[mask > 0].astype(np.float64)
    n, mean, std = mask.size, valid.mean(), valid.std()
    # The mean (n-term sum, divide: n + 1), the variance (subtract, square, n-term sum,
    # divide: n + 3), x - mean, rsqrt, product (3): f32_tol(2n + 7); x - mean cancels, so atol
    # at the size of its terms over std.
    tol = helpers.f32_tol(2 * n + 7, scale=(np.abs(valid).max() + abs(mean)) / std)
    np.testing.assert_allclose(out[mask > 0], (valid - mean) / std, **tol)
    # The mean and std of the outputs (in float64) move by at most the per-entry bound above.
    o = out[mask > 0].astype(np.float64)
    bound = tol["atol"] + tol["rtol"] * np.abs(o).max()
    np.testing.assert_allclose([o.mean(), o.std()], [0, 1], rtol=0, atol=bound)
    keep = np.asarray(ppo.masked_whiten(x, mask, shift_mean=False), np.float64)
    # keep = out + mean: the per-entry bound, the computed mean's n + 1 roundings at max|x|,
    # and the add: f32_tol(n + 2) at max|x| on top of `bound`.
    mean_err = helpers.f32_tol(n + 2, scale=np.abs(valid).max())["atol"]
    np.testing.assert_allclose(keep[mask > 0].mean(), mean, rtol=0, atol=bound + mean_err)

  def test_all_masked_is_finite(self):
    out = ppo.masked_whiten(jnp.array([[1e6, 2.0]]), jnp.zeros((1, 2)))
    np.testing.assert_array_equal(out, 0.0)
