"""Tests for rlhf_jax.losses.ppo."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses import ppo


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
    np.testing.assert_allclose(out, [[-0.05, 3.1, 0.0]], rtol=1e-6)

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
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

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
    np.testing.assert_allclose(adv, [[0.256, 0.8, 0], [0.3856, 0.98, 0]], rtol=1e-5)
    np.testing.assert_allclose(ret[0], [0.756, 1.0, 0], rtol=1e-5)

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
    np.testing.assert_allclose(adv, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, (want + values) * mask, rtol=1e-5, atol=1e-5)
    # Without truncated_B every row is terminated (V beyond the end = 0).
    adv_term, _ = self.gae(jnp.asarray(rewards, jnp.float32), jnp.asarray(values, jnp.float32),
                           mask, gae_gamma=0.95, gae_lambda=0.9)
    np.testing.assert_allclose(adv_term, _gae_numpy(rewards, values, lengths, 0.95, 0.9),
                               rtol=1e-5, atol=1e-5)
    assert np.max(np.abs(np.asarray(adv_term) - want)) > 1e-2

  def test_lambda_one_gives_monte_carlo_returns_independent_of_values(self):
    rng = np.random.default_rng(2)
    rewards = rng.normal(size=(2, 4)).astype(np.float32)
    mask = _mask([4, 2], 4)
    rewards = rewards * mask
    _, ret = self.gae(rewards, jnp.asarray(rng.normal(size=(2, 4)), jnp.float32), mask,
                      gae_gamma=0.9, gae_lambda=1.0)
    want = np.zeros((2, 4))
    for b, L in enumerate([4, 2]):
      for t in range(L):
        want[b, t] = sum(0.9 ** (k - t) * rewards[b, k] for k in range(t, L))
    np.testing.assert_allclose(ret, want, rtol=1e-5, atol=1e-6)

  def test_lambda_zero_gives_td_errors(self):
    r, v, m = jnp.array([[1.0, 2.0, 3.0]]), jnp.array([[0.5, -1.0, 2.0]]), jnp.ones((1, 3))
    adv, _ = self.gae(r, v, m, gae_gamma=0.5, gae_lambda=0.0)
    # delta = [1 + 0.5*(-1) - 0.5, 2 + 0.5*2 + 1, 3 + 0 - 2] = [0, 4, 1]
    np.testing.assert_allclose(adv, [[0.0, 4.0, 1.0]], atol=1e-6)

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
    np.testing.assert_allclose(out, [[-1.0, 1.0, 0.0]], rtol=1e-6)

  def test_matches_numpy_and_statistics(self):
    rng = np.random.default_rng(3)
    x = rng.normal(3.0, 5.0, size=(4, 6)).astype(np.float32)
    mask = _mask([6, 2, 4, 5], 6)
    out = np.asarray(ppo.masked_whiten(x, mask))
    valid = x[mask > 0].astype(np.float64)
    np.testing.assert_allclose(out[mask > 0], (valid - valid.mean()) / valid.std(), rtol=1e-4)
    np.testing.assert_allclose([out[mask > 0].mean(), out[mask > 0].std()], [0, 1], atol=1e-5)
    keep = np.asarray(ppo.masked_whiten(x, mask, shift_mean=False))
    np.testing.assert_allclose(keep[mask > 0].mean(), valid.mean(), rtol=1e-4)

  def test_all_masked_is_finite(self):
    out = ppo.masked_whiten(jnp.array([[1e6, 2.0]]), jnp.zeros((1, 2)))
    np.testing.assert_array_equal(out, 0.0)


class TestPpoPolicyLoss:
  loss = staticmethod(jax.jit(ppo.ppo_policy_loss, static_argnames=("clip_eps", "normaliser")))

  def test_hand_checked(self):
    # ratio 1.5 for both tokens, eps 0.2. A = 2: max(-3, -1.2*2 = -2.4) = -2.4 (clipped).
    # A = -1: max(1.5, 1.2) = 1.5 (unclipped). loss = (-2.4 + 1.5) / 2 = -0.45, clipfrac 1/2.
    lr = jnp.log(1.5)
    loss, m = self.loss(jnp.array([[lr, lr]]), jnp.zeros((1, 2)), jnp.array([[2.0, -1.0]]),
                        jnp.ones((1, 2)), clip_eps=0.2)
    np.testing.assert_allclose(loss, -0.45, rtol=1e-5)
    np.testing.assert_allclose([m["clipfrac_sum"], m["token_count"]], [1.0, 2.0])
    np.testing.assert_allclose(m["ratio_sum"], 3.0, rtol=1e-5)

  def test_matches_numpy_reference(self):
    rng = np.random.default_rng(4)
    B, T, eps = 3, 5, 0.2
    logp, old = rng.normal(-2, 0.3, (B, T)), rng.normal(-2, 0.3, (B, T))
    adv, mask = rng.normal(size=(B, T)), _mask([5, 3, 1], T)
    rho = np.exp(logp - old)
    per = -np.minimum(rho * adv, np.clip(rho, 1 - eps, 1 + eps) * adv)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    loss, m = self.loss(f32(logp), f32(old), f32(adv), mask, clip_eps=eps)
    np.testing.assert_allclose(loss, (per * mask).sum() / mask.sum(), rtol=1e-5)
    kl_old_new = (rho - 1) - np.log(rho)
    np.testing.assert_allclose(m["approx_kl_sum"], (kl_old_new * mask).sum(), rtol=1e-4)

  def test_step_zero_ratio_one_clipfrac_zero(self):
    rng = np.random.default_rng(5)
    logp = jnp.asarray(rng.normal(-2, 1, (3, 4)), jnp.float32)
    adv = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
    loss, m = self.loss(logp, logp, adv, jnp.ones((3, 4)), clip_eps=0.2)
    n = m["token_count"]
    np.testing.assert_allclose([m["ratio_sum"] / n, m["clipfrac_sum"] / n, m["approx_kl_sum"] / n],
                               [1, 0, 0])
    np.testing.assert_allclose(loss, -np.mean(adv), rtol=1e-5)

  @pytest.mark.parametrize("adv,log_ratio,zero", [
      (1.0, np.log(1.5), True),    # A > 0, ratio > 1 + eps: clipped, no gradient
      (-1.0, np.log(0.5), True),   # A < 0, ratio < 1 - eps: clipped, no gradient
      (1.0, np.log(1.1), False),   # inside the clip range
      (-1.0, np.log(0.9), False),
      (1.0, np.log(0.5), False),   # A > 0, ratio < 1 - eps: unclipped branch is the min
      (-1.0, np.log(1.5), False),
  ])
  def test_gradient_zero_only_in_clipped_direction(self, adv, log_ratio, zero):
    g = jax.grad(lambda lp: self.loss(lp, jnp.zeros((1, 1)), jnp.full((1, 1), adv),
                                      jnp.ones((1, 1)), clip_eps=0.2)[0])(
                                          jnp.full((1, 1), log_ratio, jnp.float32))
    if zero:
      assert float(g[0, 0]) == 0.0
    else:  # d/dlogp of -rho A = -rho A
      np.testing.assert_allclose(g[0, 0], -np.exp(log_ratio) * adv, rtol=1e-5)

  def test_grad_matches_finite_differences(self):
    with jax.enable_x64(True):
      rng = np.random.default_rng(6)
      logp = jnp.asarray(rng.normal(0, 0.1, (2, 3)))
      old, adv = jnp.zeros((2, 3), jnp.float64), jnp.asarray(rng.normal(size=(2, 3)))
      mask = jnp.asarray(_mask([3, 2], 3), jnp.float64)
      f = jax.jit(lambda lp: ppo.ppo_policy_loss(lp, old, adv, mask, clip_eps=0.3)[0])
      g, h = jax.grad(f)(logp), 1e-6
      fd = np.zeros((2, 3))
      for i in np.ndindex(2, 3):
        fd[i] = (f(logp.at[i].add(h)) - f(logp.at[i].add(-h))) / (2 * h)
      np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-9)

  def test_extremes_and_all_masked_finite(self):
    logp = jnp.array([[-1e4, 0.0], [0.0, -1e4]])
    old = jnp.array([[0.0, -1e4], [-1e4, 0.0]])
    f = lambda lp, m: self.loss(lp, old, jnp.full((2, 2), 1e6), m, clip_eps=0.2)[0]
    for m in (jnp.ones((2, 2)), jnp.zeros((2, 2))):
      assert np.isfinite(f(logp, m)) and np.all(np.isfinite(jax.grad(f)(logp, m)))

  def test_microbatches_combine_exactly_with_global_normaliser(self):
    rng = np.random.default_rng(7)
    logp, old = (jnp.asarray(rng.normal(-1, 0.3, (4, 5)), jnp.float32) for _ in range(2))
    adv = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
    mask = jnp.asarray(_mask([5, 1, 3, 4], 5))
    full, m_full = self.loss(logp, old, adv, mask, clip_eps=0.2)
    n = float(mask.sum())
    parts = [self.loss(logp[s], old[s], adv[s], mask[s], clip_eps=0.2, normaliser=n)
             for s in (slice(0, 2), slice(2, 4))]
    np.testing.assert_allclose(parts[0][0] + parts[1][0], full, rtol=1e-5, atol=1e-7)
    summed = jax.tree.map(lambda a, b: a + b, parts[0][1], parts[1][1])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), summed, m_full)

  def test_shape_mismatch(self):
    with pytest.raises(ValueError, match="advantages_BxT"):
      self.loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros((2, 2)), jnp.ones((2, 3)),
                clip_eps=0.2)


class TestPpoValueLoss:
  loss = staticmethod(jax.jit(ppo.ppo_value_loss, static_argnames="value_clip_eps"))

  def test_hand_checked(self):
    # V = 1.0, V_old = 0.5, R = 2.0, eps 0.2: clip(V) = 0.7; (1 - 2)^2 = 1, (0.7 - 2)^2 = 1.69;
    # 0.5 * max = 0.845, and the clipped branch is active.
    loss, m = self.loss(jnp.array([[1.0]]), jnp.array([[0.5]]), jnp.array([[2.0]]),
                        jnp.ones((1, 1)), value_clip_eps=0.2)
    np.testing.assert_allclose(loss, 0.845, rtol=1e-6)
    assert float(m["vf_clipfrac_sum"]) == 1.0

  def test_matches_numpy_reference_and_clipped_grad_is_zero(self):
    rng = np.random.default_rng(8)
    v, vo, r = (rng.normal(size=(3, 4)) for _ in range(3))
    mask, eps = _mask([4, 2, 3], 4), 0.3
    vc = np.clip(v, vo - eps, vo + eps)
    per = 0.5 * np.maximum((v - r) ** 2, (vc - r) ** 2)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    loss, _ = self.loss(f32(v), f32(vo), f32(r), mask, value_clip_eps=eps)
    np.testing.assert_allclose(loss, (per * mask).sum() / mask.sum(), rtol=1e-5)
    g = np.asarray(jax.grad(lambda x: self.loss(x, f32(vo), f32(r), mask, value_clip_eps=eps)[0])(
        f32(v)))
    use_unclipped = (v - r) ** 2 >= (vc - r) ** 2
    want = np.where(use_unclipped, (v - r) / mask.sum(), 0.0) * mask
    np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-6)

  def test_explained_variance_from_combined_sums(self):
    rng = np.random.default_rng(9)
    r = rng.normal(2.0, 3.0, (4, 6))
    v = r + rng.normal(0, 1.0, (4, 6))
    mask = _mask([6, 3, 5, 2], 6)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    parts = [self.loss(f32(v[s]), f32(v[s]), f32(r[s]), mask[s], value_clip_eps=0.2)[1]
             for s in (slice(0, 1), slice(1, 4))]
    summed = jax.tree.map(lambda a, b: a + b, *parts)
    rv, vv = r[mask > 0], v[mask > 0]
    want = 1 - np.var(rv - vv) / np.var(rv)
    assert 0.5 < want < 0.99
    n = summed["token_count"]
    var = lambda s, sq: summed[sq] / n - (summed[s] / n) ** 2
    got = 1 - var("residual_sum", "residual_sq_sum") / var("returns_sum", "returns_sq_sum")
    np.testing.assert_allclose(got, want, rtol=1e-4)

  def test_extremes_and_all_masked_finite(self):
    f = lambda v, m: self.loss(v, jnp.zeros((1, 2)), jnp.full((1, 2), 1e6), m,
                               value_clip_eps=0.2)[0]
    for m in (jnp.ones((1, 2)), jnp.zeros((1, 2))):
      v = jnp.array([[1e4, -1e4]])
      assert np.isfinite(f(v, m)) and np.all(np.isfinite(jax.grad(f)(v, m)))

  def test_shape_mismatch(self):
    with pytest.raises(ValueError, match="returns_BxT"):
      self.loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros((3, 3)), jnp.ones((2, 3)),
                value_clip_eps=0.2)


class TestEntropyBonus:

  def test_hand_checked_and_grad(self):
    # mean entropy over valid tokens (1 + 3) / 2 = 2; loss = -0.01 * 2 = -0.02.
    f = jax.jit(lambda e: ppo.entropy_bonus(e, jnp.array([[1, 1, 0]]), entropy_coef=0.01))
    loss, m = f(jnp.array([[1.0, 3.0, 50.0]]))
    np.testing.assert_allclose([loss, m["entropy_sum"], m["token_count"]], [-0.02, 4.0, 2.0],
                               rtol=1e-6)
    g = jax.grad(lambda e: f(e)[0])(jnp.array([[1.0, 3.0, 50.0]]))
    np.testing.assert_allclose(g, [[-0.005, -0.005, 0.0]], rtol=1e-6)

  def test_all_masked_finite_and_shape_error(self):
    loss, _ = ppo.entropy_bonus(jnp.ones((2, 2)), jnp.zeros((2, 2)), entropy_coef=0.1)
    assert float(loss) == 0.0
    with pytest.raises(ValueError, match="entropy_BxT"):
      ppo.entropy_bonus(jnp.ones((2, 3)), jnp.ones((2, 2)), entropy_coef=0.1)


class TestAdaptiveKlUpdateHorizon:

  def test_hand_checked(self):
    # e = 6.6/6 - 1 = 0.1; beta * (1 + 0.1 * 256 / 10000) = 0.2 * 1.00256 = 0.200512.
    out = jax.jit(ppo.adaptive_kl_update_horizon, static_argnames=("kl_target", "horizon"))(
        0.2, 6.6, kl_target=6.0, n_steps=256, horizon=10000)
    np.testing.assert_allclose(out, 0.200512, rtol=1e-6)

  def test_error_clipped(self):
    # KL = 100 >> target: e clipped to 0.2 -> 0.2 * (1 + 0.2 * 10 / 100) = 0.204;
    # KL = 0: e = -0.2 -> 0.2 * 0.98.
    f = lambda kl_value: ppo.adaptive_kl_update_horizon(0.2, kl_value, kl_target=6.0,
                                                        n_steps=10, horizon=100)
    np.testing.assert_allclose([f(100.0), f(0.0)], [0.2 * 1.02, 0.2 * 0.98], rtol=1e-6)

  def test_drives_kl_toward_target_and_unchanged_at_target(self):
    kw = dict(kl_target=6.0, n_steps=64, horizon=1000)
    np.testing.assert_allclose(ppo.adaptive_kl_update_horizon(0.3, 6.0, **kw), 0.3, rtol=1e-7)
    beta = 0.1
    for kl_value in (8.0, 7.0, 6.5):  # above target: beta only grows
      new = float(ppo.adaptive_kl_update_horizon(beta, kl_value, **kw))
      assert new > beta
      beta = new
    for kl_value in (5.0, 3.0):  # below target: beta only shrinks
      new = float(ppo.adaptive_kl_update_horizon(beta, kl_value, **kw))
      assert new < beta
      beta = new
