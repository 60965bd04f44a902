"""Tests for rlhf_jax.losses.ppo's losses and KL controller: the clipped policy and value
losses, the entropy bonus and the adaptive KL coefficient (the per-token rewards, GAE and
whitening are in test_ppo.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses import ppo

import helpers


def _mask(lengths, T):
  return (np.arange(T)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)


class TestPpoPolicyLoss:
  loss = staticmethod(jax.jit(ppo.ppo_policy_loss, static_argnames=("clip_eps", "normaliser")))

  def test_hand_checked(self):
    # ratio 1.5 for both tokens, eps 0.2. A = 2: max(-3, -1.2*2 = -2.4) = -2.4 (clipped).
    # A = -1: max(1.5, 1.2) = 1.5 (unclipped). loss = (-2.4 + 1.5) / 2 = -0.45, clipfrac 1/2.
    lr = jnp.log(1.5)
    loss, m = self.loss(jnp.array([[lr, lr]]), jnp.zeros((1, 2)), jnp.array([[2.0, -1.0]]),
                        jnp.ones((1, 2)), clip_eps=0.2)
    # log 1.5 and exp (2), 1 + eps (1), the 2-term sum where -2.4 + 1.5 partly cancels (atol at
    # 2.4), the divide by 2 (exact): f32_tol(4, scale=2.4).
    np.testing.assert_allclose(loss, -0.45, **helpers.f32_tol(4, scale=2.4))
    np.testing.assert_array_equal([m["clipfrac_sum"], m["token_count"]], [1.0, 2.0])  # counts
    # Two ratios (log and exp: 2 roundings each) and their sum.
    np.testing.assert_allclose(m["ratio_sum"], 3.0, **helpers.f32_tol(2 + 1))

  def test_matches_numpy_reference(self):
    rng = np.random.default_rng(4)
    B, T, eps = 3, 5, 0.2
    logp, old = rng.normal(-2, 0.3, (B, T)), rng.normal(-2, 0.3, (B, T))
    adv, mask = rng.normal(size=(B, T)), _mask([5, 3, 1], T)
    rho = np.exp(logp - old)
    per = -np.minimum(rho * adv, np.clip(rho, 1 - eps, 1 + eps) * adv)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    loss, m = self.loss(f32(logp), f32(old), f32(adv), mask, clip_eps=eps)
    # Per token: the casts and logp - old (3 roundings at |logp| + |old|: the log-ratio
    # cancels, and rho and |per| move by the same relative amount), exp, 1 + eps, the products
    # by A and the max (4); then the N-term masked sum, which cancels (A has both signs), and
    # the divide: atol at the mean size of the terms.
    nt, lsize = mask.size, 1 + np.abs(logp) + np.abs(old)
    scale = (np.abs(per) * lsize * mask).sum() / mask.sum()
    np.testing.assert_allclose(loss, (per * mask).sum() / mask.sum(),
                               **helpers.f32_tol(3 + 4 + nt + 1, scale=scale))
    kl_old_new = (rho - 1) - np.log(rho)
    # k3 = expm1(lq) - lq cancels near lq = 0: 3 roundings at |lq| + |rho - 1| (see test_kl),
    # and the log-ratio's own rounding (3, at |logp| + |old|) moves it by |rho - 1| times that;
    # then an N-term sum of non-negative terms.
    scale = ((np.abs(np.log(rho)) + np.abs(rho - 1)) * lsize * mask).sum()
    np.testing.assert_allclose(m["approx_kl_sum"], (kl_old_new * mask).sum(),
                               **helpers.f32_tol(3 + 3 + nt, scale=scale))

  def test_step_zero_ratio_one_clipfrac_zero(self):
    rng = np.random.default_rng(5)
    logp = jnp.asarray(rng.normal(-2, 1, (3, 4)), jnp.float32)
    adv = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
    loss, m = self.loss(logp, logp, adv, jnp.ones((3, 4)), clip_eps=0.2)
    n = m["token_count"]
    # logp - logp = 0 exactly: ratio 1, k3 0, no clipping; 12 ones sum and divide exactly.
    np.testing.assert_array_equal([m["ratio_sum"] / n, m["clipfrac_sum"] / n, m["approx_kl_sum"] / n],
                                  [1, 0, 0])
    # -A exactly per token, then a 12-term mean that cancels (A has both signs), vs a float64
    # mean: f32_tol(12 + 1) at the terms' mean size.
    adv64 = np.asarray(adv, np.float64)
    np.testing.assert_allclose(loss, -np.mean(adv64),
                               **helpers.f32_tol(adv64.size + 1, scale=np.abs(adv64).mean()))

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
      # log_ratio's cast (u·|log_ratio| <= u in rho), exp, the product by A = +-1 (exact) and
      # the divide by 1: f32_tol(3), relative.
      np.testing.assert_allclose(g[0, 0], -np.exp(log_ratio) * adv, **helpers.f32_tol(3))

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
      # float64 gradient vs a float64 central difference, h = 1e-6: the difference's error
      # ~h^2·|f'''| + eps64/h ~ 1e-10 is what these bounds cover (not a float32 tolerance).
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
    # Two float32 groupings of the same 20-term masked sums (per-token values may differ by
    # an ulp or so between vector widths: 3 more roundings), + the parts' add. The policy sum
    # cancels (A has both signs): atol at sum|per|; k3 at its terms' size (see test_kl); the
    # ratio sum is positive (rtol); the counts are integers.
    lp, ol, a = (np.asarray(x, np.float64) for x in (logp, old, adv))
    rho, mk = np.exp(lp - ol), np.asarray(mask, np.float64)
    per = np.maximum(-rho * a, -np.clip(rho, 0.8, 1.2) * a)
    scale = {"policy_loss_sum": (np.abs(per) * mk).sum(),
             "approx_kl_sum": ((np.abs(lp - ol) + np.abs(rho - 1)) * mk).sum()}
    n_terms = mask.size + 3 + 1
    np.testing.assert_allclose(parts[0][0] + parts[1][0], full,
                               **helpers.f32_tol(n_terms + 1, scale=scale["policy_loss_sum"] / n))
    summed = jax.tree.map(lambda a, b: a + b, parts[0][1], parts[1][1])
    for k in m_full:
      np.testing.assert_allclose(summed[k], m_full[k],
                                 **helpers.f32_tol(n_terms, scale=scale.get(k, 0.0)), err_msg=k)

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
    # eps_v's rounding and 0.5 + 0.2 (2), 0.7 - 2 (1); the square doubles those and adds one;
    # 0.5· and the 1-term mean are exact: f32_tol(2·3 + 1), relative.
    np.testing.assert_allclose(loss, 0.845, **helpers.f32_tol(7))
    assert float(m["vf_clipfrac_sum"]) == 1.0

  def test_matches_numpy_reference_and_clipped_grad_is_zero(self):
    rng = np.random.default_rng(8)
    v, vo, r = (rng.normal(size=(3, 4)) for _ in range(3))
    mask, eps = _mask([4, 2, 3], 4), 0.3
    vc = np.clip(v, vo - eps, vo + eps)
    per = 0.5 * np.maximum((v - r) ** 2, (vc - r) ** 2)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    loss, _ = self.loss(f32(v), f32(vo), f32(r), mask, value_clip_eps=eps)
    # Per token: the casts, the clip bounds vo +- eps and the subtraction (4 roundings at
    # |v| + |vo| + |r| + eps: V - R cancels), which the square turns into 2|V - R| times that
    # (x 0.5), + the square's own; then an N-term sum of non-negative terms and the divide.
    d = np.maximum(np.abs(v - r), np.abs(vc - r))
    scale = (d * (np.abs(v) + np.abs(vo) + np.abs(r) + eps) * mask).sum() / mask.sum()
    np.testing.assert_allclose(loss, (per * mask).sum() / mask.sum(),
                               **helpers.f32_tol(4 + 1 + mask.size + 1, scale=scale))
    g = np.asarray(jax.grad(lambda x: self.loss(x, f32(vo), f32(r), mask, value_clip_eps=eps)[0])(
        f32(v)))
    use_unclipped = (v - r) ** 2 >= (vc - r) ** 2
    want = np.where(use_unclipped, (v - r) / mask.sum(), 0.0) * mask
    # float32 gradient (V - R) / N: the casts and V - R (3, cancels: atol at (|v| + |r|) / N),
    # the divide (1): f32_tol(4).
    np.testing.assert_allclose(g, want, **helpers.f32_tol(
        4, scale=np.max(np.abs(v) + np.abs(r)) / mask.sum()))

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
    # E[x^2] - E[x]^2 cancels: each var is off by <= k·eps·(E[x^2] + 2|E x| E|x|), k = the
    # n-slot sums, the parts' add, the divides and square (n + 5); the residual R - V (casts
    # and subtract, 3 at |r| + |v|) moves E[res^2] by 2 E[|res|(|r| + |v|)] times that. got
    # moves by dvar_res / var_r + var_res / var_r^2 · dvar_r, + the ratio and 1 - (2).
    res = rv - vv
    s_res = np.mean(res ** 2) + 2 * abs(res.mean()) * np.abs(res).mean() + 2 * np.mean(
        np.abs(res) * (np.abs(rv) + np.abs(vv)))
    s_r = np.mean(rv ** 2) + 2 * abs(rv.mean()) * np.abs(rv).mean()
    scale = (s_res + np.var(res) / np.var(rv) * s_r) / np.var(rv)
    np.testing.assert_allclose(got, want, **helpers.f32_tol(mask.size + 5 + 3 + 2, scale=scale))

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
    # Sums and counts of small integers are exact; the mean 2 is exact; 0.01's rounding and the
    # product: f32_tol(2).
    np.testing.assert_array_equal([m["entropy_sum"], m["token_count"]], [4.0, 2.0])
    np.testing.assert_allclose(loss, -0.02, **helpers.f32_tol(2))
    g = jax.grad(lambda e: f(e)[0])(jnp.array([[1.0, 3.0, 50.0]]))
    # 0.01's rounding and the product by 1/2 (exact) or divide; masked entries are exactly 0.
    np.testing.assert_allclose(g, [[-0.005, -0.005, 0.0]], **helpers.f32_tol(2))

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
    # 6.6's cast and the divide (2, at 1.1: after the exact - 1 they are <= 2.2u absolute in
    # e, scaled by n_steps / horizon in the result), e·n_steps / horizon (2), 1 + (1), 0.2's
    # cast and the product (2): f32_tol(7), relative. The constant is exact.
    np.testing.assert_allclose(out, 0.200512, **helpers.f32_tol(7))

  def test_error_clipped(self):
    # KL = 100 >> target: e clipped to 0.2 -> 0.2 * (1 + 0.2 * 10 / 100) = 0.204;
    # KL = 0: e = -0.2 -> 0.2 * 0.98.
    f = lambda kl_value: ppo.adaptive_kl_update_horizon(0.2, kl_value, kl_target=6.0,
                                                        n_steps=10, horizon=100)
    # The clip bound 0.2 (1), ·10 / 100 (2), 1 + (1), 0.2's cast and the product (2).
    np.testing.assert_allclose([f(100.0), f(0.0)], [0.2 * 1.02, 0.2 * 0.98], **helpers.f32_tol(6))

  def test_drives_kl_toward_target_and_unchanged_at_target(self):
    kw = dict(kl_target=6.0, n_steps=64, horizon=1000)
    # e = 6/6 - 1 = 0 exactly, so the result is kl_coef's float32 rounding, bit for bit.
    np.testing.assert_array_equal(ppo.adaptive_kl_update_horizon(0.3, 6.0, **kw), np.float32(0.3))
    beta = 0.1
    for kl_value in (8.0, 7.0, 6.5):  # above target: beta only grows
      new = float(ppo.adaptive_kl_update_horizon(beta, kl_value, **kw))
      assert new > beta
      beta = new
    for kl_value in (5.0, 3.0):  # below target: beta only shrinks
      new = float(ppo.adaptive_kl_update_horizon(beta, kl_value, **kw))
      assert new < beta
      beta = new
