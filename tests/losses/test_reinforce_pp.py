"""Tests for rlhf_jax.losses.reinforce_pp: REINFORCE++ and REINFORCE++-baseline advantages,
and the clipped token loss, against the paper's equations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses import ppo, reinforce_pp as rpp

import helpers
from jitted import J, fd_grad

EPS32 = np.finfo(np.float32).eps


def _mask(lengths, T):
  return (np.arange(T)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)


def _np_reinforce_pp(old, ref, rewards, mask, kl_coef, gamma, group_size=None, eps=0.0):
  """float64 reference, loops over the paper's equations: r_t = -beta (old - ref)_t
  + [t = last] r; G_t = sum_{s >= t} gamma^{s-t} r_s; A = (G - mean) / sqrt(var + eps) over
  every masked token of the batch. Returns (advantages, returns)."""
  old, ref, rewards, mask = (np.asarray(a, np.float64) for a in (old, ref, rewards, mask))
  if group_size is not None:
    g = rewards.reshape(-1, group_size)
    rewards = (g - g.mean(1, keepdims=True)).reshape(-1)
  B, T = old.shape
  returns = np.zeros((B, T))
  for b in range(B):
    L = int(mask[b].sum())
    r = [-kl_coef * (old[b, t] - ref[b, t]) + (rewards[b] if t == L - 1 else 0.0)
         for t in range(L)]
    for t in range(L):
      returns[b, t] = sum(gamma ** (s - t) * r[s] for s in range(t, L))
  vals = returns[mask > 0]
  adv = (returns - vals.mean()) / np.sqrt(vals.var() + eps) * mask
  return adv, returns


def _atol(returns, mask):
  """float32 error of a whitened value: each G_t is a sum of up to T terms of size <= max|r|,
  whitening divides by the std, so the absolute error is a few ulp x T x max|G| / std."""
  vals = np.asarray(returns)[np.asarray(mask) > 0]
  return 8 * EPS32 * returns.shape[1] * np.max(np.abs(vals)) / vals.std()


class TestReinforcePpAdvantages:
  adv = staticmethod(J(rpp.reinforce_pp_advantages))

  def test_hand_checked(self):
    # Row 0: old - ref = [0.1, 0, -0.2], beta 0.5, reward 1 -> r = [-0.05, 0, 1.1];
    #   gamma 1: G = [1.05, 1.1, 1.1]; gamma 0.5: G = [-0.05 + 0.5 * 0.55, 0.55, 1.1].
    # Row 1: one token, no KL, reward -1 -> G = [-1].
    old = jnp.array([[0.1, 0.0, -0.2], [0.0, 3.0, 3.0]])
    mask = jnp.array([[1, 1, 1], [1, 0, 0]], bool)
    kw = dict(kl_coef=0.5, eps=0.0)
    a, g = self.adv(old, jnp.zeros((2, 3)), jnp.array([1.0, -1.0]), mask, **kw)
    # Per token the KL penalty (a subtract and a product by beta: 2 roundings), then a T-term
    # reward-to-go sum of terms <= 1.1: f32_tol(T + 2) at that size.
    np.testing.assert_allclose(g, [[1.05, 1.1, 1.1], [-1.0, 0, 0]], **helpers.f32_tol(3 + 2, scale=1.1))
    # Batch of 4 tokens [1.05, 1.1, 1.1, -1]: mean 0.5625, population std 0.902341.
    # The constants are given to 6 decimals.
    np.testing.assert_allclose(a, [[0.540263, 0.595675, 0.595675], [-1.731614, 0, 0]],
                               rtol=1e-5)
    _, g = self.adv(old, jnp.zeros((2, 3)), jnp.array([1.0, -1.0]), mask, gamma=0.5, **kw)
    # As above, with a product by gamma per step of the T-term sum: f32_tol(2T + 2).
    np.testing.assert_allclose(g, [[0.225, 0.55, 1.1], [-1.0, 0, 0]], **helpers.f32_tol(2 * 3 + 2, scale=1.1))

  @pytest.mark.parametrize("gamma,group_size", [(1.0, None), (0.9, None), (1.0, 3)])
  def test_matches_numpy_reference(self, gamma, group_size):
    rng = np.random.default_rng(0)
    B, T = 6, 7
    old, ref = (rng.normal(-2, 0.5, (B, T)).astype(np.float32) for _ in range(2))
    rewards = rng.normal(size=B).astype(np.float32)
    mask = _mask([7, 3, 1, 0, 5, 6], T)
    a, g = self.adv(old, ref, rewards, mask, kl_coef=0.1, gamma=gamma, group_size=group_size,
                    eps=1e-8)
    want_a, want_g = _np_reinforce_pp(old, ref, rewards, mask, 0.1, gamma, group_size, 1e-8)
    np.testing.assert_allclose(g, want_g, rtol=0, atol=8 * EPS32 * T * np.max(np.abs(want_g)))
    np.testing.assert_allclose(a, want_a, rtol=0, atol=_atol(want_g, mask))

  def test_batch_normalised_zero_mean_unit_std_and_zero_on_padding(self):
    rng = np.random.default_rng(1)
    old, ref = (rng.normal(-1, 0.5, (5, 6)).astype(np.float32) for _ in range(2))
    mask = _mask([6, 2, 4, 1, 5], 6)
    a, g = self.adv(old, ref, rng.normal(size=5).astype(np.float32), mask, kl_coef=0.2, eps=0.0)
    vals = np.asarray(a, np.float64)[mask > 0]
    tol = _atol(np.asarray(g, np.float64), mask)
    np.testing.assert_allclose(vals.mean(), 0.0, atol=tol)
    np.testing.assert_allclose(vals.std(), 1.0, atol=tol)
    assert np.all(np.asarray(a)[mask == 0] == 0.0) and np.all(np.asarray(g)[mask == 0] == 0.0)

  def test_without_kl_affine_invariant_and_baseline_ignores_group_offsets(self):
    rng = np.random.default_rng(2)
    old, ref = (rng.normal(-1, 0.5, (6, 4)).astype(np.float32) for _ in range(2))
    mask, r = _mask([4, 2, 3, 1, 4, 2], 4), rng.normal(size=6).astype(np.float32)
    # kl_coef = 0, gamma = 1: G_t = r on every token, so a positive affine map of the rewards
    # leaves the whitened advantages unchanged.
    base, _ = self.adv(old, ref, r, mask, kl_coef=0.0, eps=0.0)
    scaled, _ = self.adv(old, ref, 3.0 * r + 7.0, mask, kl_coef=0.0, eps=0.0)
    np.testing.assert_allclose(scaled, base, rtol=0, atol=64 * EPS32 * 7 / np.std(r))
    # REINFORCE++-baseline: a constant added to a group's rewards cancels in the group mean.
    shift = np.repeat(np.array([5.0, -2.0], np.float32), 3)
    b0, _ = self.adv(old, ref, r, mask, kl_coef=0.1, group_size=3, eps=0.0)
    b1, _ = self.adv(old, ref, r + shift, mask, kl_coef=0.1, group_size=3, eps=0.0)
    np.testing.assert_allclose(b1, b0, rtol=0, atol=64 * EPS32 * 5 / np.std(r))

  def test_a_response_with_an_empty_mask_is_absent(self):
    rng = np.random.default_rng(3)
    old, ref = (rng.normal(-1, 0.5, (4, 5)).astype(np.float32) for _ in range(2))
    r, mask = rng.normal(size=4).astype(np.float32), _mask([5, 2, 4, 3], 5)
    mask[1] = 0
    keep = np.array([0, 2, 3])
    got, g = self.adv(old, ref, r, mask, kl_coef=0.1)
    want, _ = self.adv(old[keep], ref[keep], r[keep], mask[keep], kl_coef=0.1)
    np.testing.assert_array_equal(np.asarray(got)[1], 0.0)
    np.testing.assert_allclose(np.asarray(got)[keep], want, rtol=0,
                               atol=_atol(np.asarray(g, np.float64), mask))

  def test_extremes_and_constant_returns_finite(self):
    old = jnp.array([[-1e4, 0.0], [0.0, -1e4]])
    a, g = self.adv(old, -old, jnp.array([1e6, -1e6]), jnp.ones((2, 2)), kl_coef=0.1)
    assert np.all(np.isfinite(a)) and np.all(np.isfinite(g))
    # All returns equal (zero variance): the advantages are 0, not NaN.
    a, _ = self.adv(jnp.zeros((2, 2)), jnp.zeros((2, 2)), jnp.ones(2), jnp.array([[1, 0], [1, 0]]),
                    kl_coef=0.1)
    np.testing.assert_array_equal(a, 0.0)
    a, _ = self.adv(jnp.zeros((2, 2)), jnp.zeros((2, 2)), jnp.ones(2), jnp.zeros((2, 2)),
                    kl_coef=0.1)
    np.testing.assert_array_equal(a, 0.0)

  def test_shape_errors(self):
    with pytest.raises(ValueError, match="rewards_B"):
      self.adv(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros(3), jnp.ones((2, 3)), kl_coef=0.1)
    with pytest.raises(ValueError, match="ref_logps_BxT"):
      self.adv(jnp.zeros((2, 3)), jnp.zeros((2, 2)), jnp.zeros(2), jnp.ones((2, 3)), kl_coef=0.1)
    with pytest.raises(ValueError, match="group_size=4"):
      self.adv(jnp.zeros((6, 3)), jnp.zeros((6, 3)), jnp.zeros(6), jnp.ones((6, 3)),
               kl_coef=0.1, group_size=4)


class TestReinforcePpLoss:
  loss = staticmethod(J(rpp.reinforce_pp_loss))

  def test_hand_checked(self):
    # Token ratios [1.5, 1.0] with A = [1, -2]: max(-1.5, -1.2) = -1.2 and +2 -> mean 0.4.
    loss, m = self.loss(jnp.array([[np.log(1.5), 0.0]]), jnp.zeros((1, 2)),
                        jnp.array([[1.0, -2.0]]), jnp.ones((1, 2)), clip_eps=0.2)
    # log 1.5 and exp (2), the clip, products by A and max (3), the 2-term sum where
    # -1.2 + 2 partly cancels (atol at 2), the divide: f32_tol(7).
    np.testing.assert_allclose(loss, 0.4, **helpers.f32_tol(7, scale=2.0))
    assert float(m["clipfrac_sum"]) == 1 and float(m["token_count"]) == 2

  def test_end_to_end_matches_numpy_reference(self):
    rng = np.random.default_rng(4)
    B, T = 5, 6
    old, ref = (rng.normal(-2, 0.3, (B, T)).astype(np.float32) for _ in range(2))
    logp = (old + rng.normal(0, 0.2, (B, T))).astype(np.float32)
    rewards, mask = rng.normal(size=B).astype(np.float32), _mask([6, 3, 0, 5, 2], T)
    adv, _ = J(rpp.reinforce_pp_advantages)(old, ref, rewards, mask, kl_coef=0.05)
    loss, m = self.loss(logp, old, adv, mask, clip_eps=0.2)
    want_a, want_g = _np_reinforce_pp(old, ref, rewards, mask, 0.05, 1.0, eps=1e-8)
    rho = np.exp(np.asarray(logp, np.float64) - old)
    per = -np.minimum(rho * want_a, np.clip(rho, 0.8, 1.2) * want_a) * mask
    # Terms of either sign: bounded by ulps x (mean |term| + the advantages' own error).
    tol = 8 * EPS32 * np.mean(np.abs(per[mask > 0])) + 2 * _atol(want_g, mask)
    np.testing.assert_allclose(loss, per.sum() / mask.sum(), rtol=0, atol=tol)
    assert float(m["token_count"]) == mask.sum()

  def test_is_ppo_policy_loss(self):
    rng = np.random.default_rng(5)
    logp, old, adv = (jnp.asarray(rng.normal(size=(3, 4)), jnp.float32) for _ in range(3))
    mask = _mask([4, 1, 3], 4)
    got = self.loss(logp, old, adv, mask, clip_eps=0.2, normaliser=11.0)
    want = J(ppo.ppo_policy_loss)(logp, old, adv, mask, clip_eps=0.2, normaliser=11.0)
    np.testing.assert_array_equal(got[0], want[0])

  def test_grad_matches_finite_differences(self):
    with jax.enable_x64(True):
      rng = np.random.default_rng(6)
      logp, old = rng.normal(-1, 0.1, (3, 4)), rng.normal(-1, 0.1, (3, 4))
      adv, mask = rng.normal(size=(3, 4)), _mask([4, 2, 3], 4).astype(np.float64)

      def np_loss(lp):
        rho = np.exp(lp - old)
        return (-np.minimum(rho * adv, np.clip(rho, 0.75, 1.25) * adv) * mask).sum() / mask.sum()

      g = jax.jit(jax.grad(lambda lp: rpp.reinforce_pp_loss(lp, old, adv, mask,
                                                            clip_eps=0.25)[0]))(logp)
      # float64 gradient vs a float64 central difference, h = 1e-6: the difference's error
      # ~h^2·|f'''| + eps64/h ~ 1e-10 is what these bounds cover (not a float32 tolerance).
      np.testing.assert_allclose(g, fd_grad(np_loss, logp), rtol=1e-6, atol=1e-9)

  def test_extremes_finite_and_shape_error(self):
    f = lambda lp: self.loss(lp, jnp.array([[0.0, -1e4]]), jnp.array([[1e6, -1e6]]),
                             jnp.ones((1, 2)), clip_eps=0.2)[0]
    lp = jnp.array([[-1e4, 0.0]])
    assert np.isfinite(f(lp)) and np.all(np.isfinite(jax.grad(f)(lp)))
    with pytest.raises(ValueError, match="advantages_BxT"):
      self.loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros((2, 2)), jnp.ones((2, 3)),
                clip_eps=0.2)
