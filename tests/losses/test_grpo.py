"""Tests for rlhf_jax.losses.grpo."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses import grpo, ppo

import helpers


def _mask(lengths, T):
  return (np.arange(T)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)


class TestGroupAdvantages:

  def test_closed_form_ddof0_and_ddof1(self):
    r = jnp.array([[1.0, 0.0, 1.0, 0.0]])
    # mean 0.5; population std 0.5 -> [+1, -1, +1, -1].
    a0 = jax.jit(grpo.group_advantages, static_argnames=("ddof", "eps"))(r, ddof=0, eps=0.0)
    # Mean 0.5, centred +-0.5, var 0.25, sqrt 0.5 and +-0.5 / 0.5: every value is exact and
    # each op correctly rounded, so the result is exact.
    np.testing.assert_array_equal(a0, [[1, -1, 1, -1]])
    # Bessel std sqrt(4 * 0.25 / 3) = sqrt(1/3) -> 0.5 / sqrt(1/3) = 0.866025.
    a1 = grpo.group_advantages(r, ddof=1, eps=0.0)
    # The constant is given to 6 decimals (4e-7 from sqrt(3) / 2): rtol 1e-5 is its precision.
    np.testing.assert_allclose(a1, [[0.866025, -0.866025, 0.866025, -0.866025]], rtol=1e-5)

  @pytest.mark.parametrize("ddof,eps", [(0, 0.0), (1, 1e-4), (0, 1e-2)])
  def test_matches_numpy_reference(self, ddof, eps):
    r = np.random.default_rng(0).normal(size=(5, 6))
    want = (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=ddof, keepdims=True) + eps)
    got = grpo.group_advantages(jnp.asarray(r, jnp.float32), ddof=ddof, eps=eps)
    # The cast (1), the mean (G + 1), r - mean (1), the variance (square, G-term sum, divide:
    # G + 2), sqrt, + eps, divide (3): f32_tol(2G + 7); r - mean cancels, so atol at the size
    # of its terms over the divisor.
    g, mean = r.shape[1], r.mean(1, keepdims=True)
    scale = np.max((np.abs(r) + np.abs(mean)) / (r.std(1, ddof=ddof, keepdims=True) + eps))
    np.testing.assert_allclose(got, want, **helpers.f32_tol(2 * g + 7, scale=scale))

  def test_zero_variance_group_is_exactly_zero(self):
    r = jnp.array([[0.1, 0.1, 0.1], [1e6, 1e6, 1e6], [1.0, 0.0, 0.0]])
    for ddof, eps in ((0, 0.0), (1, 1e-4)):
      a = grpo.group_advantages(r, ddof=ddof, eps=eps)
      assert np.all(np.asarray(a[:2]) == 0.0) and np.all(np.isfinite(a))
      g = jax.grad(lambda x: jnp.sum(grpo.group_advantages(x, ddof=ddof, eps=eps) ** 2))(r)
      assert np.all(np.isfinite(g))

  def test_properties_zero_mean_and_affine_invariance(self):
    r = jnp.asarray(np.random.default_rng(1).normal(size=(4, 8)), jnp.float32)
    a = grpo.group_advantages(r, ddof=0, eps=0.0)
    r64, g = np.asarray(r, np.float64), r.shape[1]
    mean, std = r64.mean(1, keepdims=True), r64.std(1, keepdims=True)
    # sum(r - fl(mean)) = G (mean - fl(mean)): the mean's G + 1 roundings at mean|r|, over std;
    # then the centring and divide (2) and jnp.mean's G-term sum of the a_i (cancels):
    # f32_tol(2G + 3) at mean|r| / std + mean|a|.
    scale = np.max((np.abs(r64).mean(1) + np.abs(r64 - mean).mean(1)) / std[:, 0])
    np.testing.assert_allclose(jnp.mean(a, axis=1), 0.0, **helpers.f32_tol(2 * g + 3, scale=scale))
    # Each a_i is off by <= f32_tol(2G + 6) at (|r| + |mean|) / std (test_matches_numpy_reference
    # less the cast), which moves the std by at most as much; jnp.std's own mean, centring,
    # square, sum, divide and sqrt add 2G + 4 at the size of a.
    scale = np.max((np.abs(r64) + np.abs(mean)) / std) + np.abs(a).max()
    np.testing.assert_allclose(jnp.std(a, axis=1), 1.0, **helpers.f32_tol(4 * g + 10, scale=scale))
    # 3r + 7 (2 roundings at 3|r| + 7) and two evaluations of group_advantages (2G + 6 each),
    # whose centring cancels: atol at the shifted terms' size over the shifted std 3·std.
    scale = np.max((3 * np.abs(r64) + 7 + np.abs(3 * mean + 7)) / (3 * std))
    np.testing.assert_allclose(grpo.group_advantages(3.0 * r + 7.0, ddof=0, eps=0.0), a,
                               **helpers.f32_tol(2 + 2 * (2 * g + 6), scale=scale))

  def test_large_rewards_finite(self):
    a = grpo.group_advantages(jnp.array([[1e6, -1e6, 0.0, 1e6]]), ddof=1, eps=1e-4)
    assert np.all(np.isfinite(a))

  def test_shape_errors(self):
    with pytest.raises(ValueError, match="rewards_BxG"):
      grpo.group_advantages(jnp.ones(4), ddof=0, eps=0.0)
    with pytest.raises(ValueError, match="G >= 2"):
      grpo.group_advantages(jnp.ones((3, 1)), ddof=1, eps=0.0)


class TestDrGrpoAdvantages:

  def test_hand_checked_and_numpy(self):
    # [1, 0, 1, 0] - 0.5 = [0.5, -0.5, 0.5, -0.5]: no std scaling.
    # Mean 0.5 and the differences are exact in float32.
    np.testing.assert_array_equal(jax.jit(grpo.dr_grpo_advantages)(jnp.array([[1.0, 0, 1, 0]])),
                                  [[0.5, -0.5, 0.5, -0.5]])
    r = np.random.default_rng(2).normal(size=(3, 5))
    # The cast (1), the mean (G + 1) and r - mean (1), which cancels: atol at |r| + |mean|.
    mean = r.mean(1, keepdims=True)
    np.testing.assert_allclose(grpo.dr_grpo_advantages(jnp.asarray(r, jnp.float32)), r - mean,
                               **helpers.f32_tol(r.shape[1] + 3,
                                                 scale=np.max(np.abs(r) + np.abs(mean))))

  def test_constant_group_zero_and_rank_error(self):
    np.testing.assert_array_equal(grpo.dr_grpo_advantages(jnp.full((1, 3), 1e6)), 0.0)
    with pytest.raises(ValueError, match="rewards_BxG"):
      grpo.dr_grpo_advantages(jnp.ones((2, 3, 4)))


class TestRlooAdvantages:

  def test_hand_checked(self):
    # r_0 = 1, others [0, 1, 0] mean 1/3 -> 2/3; r_1 = 0, others [1, 1, 0] mean 2/3 -> -2/3.
    out = jax.jit(grpo.rloo_advantages)(jnp.array([[1.0, 0.0, 1.0, 0.0]]))
    # The sum 2 and 2 - r are exact; the divide by 3 and r - others (2).
    np.testing.assert_allclose(out, [[2 / 3, -2 / 3, 2 / 3, -2 / 3]], **helpers.f32_tol(2))

  def test_matches_leave_one_out_loop_and_scaled_dr_grpo(self):
    r = np.random.default_rng(3).normal(size=(3, 5))
    want = np.array([[r[b, i] - np.mean(np.delete(r[b], i)) for i in range(5)] for b in range(3)])
    got = grpo.rloo_advantages(jnp.asarray(r, jnp.float32))
    # The cast (1), the G-term sum and - r (G + 1, cancels: at sum|r|), / (G - 1) (1), and
    # r - others (1, cancels: at |r| + |others|): f32_tol(G + 4) at those sizes.
    g = r.shape[1]
    scale = np.abs(r).sum(1).max() / (g - 1) + 2 * np.abs(r).max()
    np.testing.assert_allclose(got, want, **helpers.f32_tol(g + 4, scale=scale))
    # Property: RLOO = G / (G - 1) * (r - mean). Two float32 evaluations: the above and
    # dr_grpo's G + 3 (at |r| + |mean|) plus the product by 5/4.
    dr = grpo.dr_grpo_advantages(jnp.asarray(r, jnp.float32))
    np.testing.assert_allclose(got, 5 / 4 * dr, **helpers.f32_tol(
        (g + 4) + (g + 4), scale=scale + 5 / 4 * 2 * np.abs(r).max()))

  def test_needs_two_samples(self):
    with pytest.raises(ValueError, match="G >= 2"):
      grpo.rloo_advantages(jnp.ones((2, 1)))


def _agg_weights(mask, aggregation, max_len):
  """Per-token weights w of the aggregated loss sum_t w_t l_t (they sum to <= 1): a float32
  error e_t in l_t moves the loss by sum_t w_t e_t."""
  present = mask.sum(1) > 0
  if aggregation == "token":
    return mask / mask.sum()
  if aggregation == "sequence":
    return mask / np.maximum(mask.sum(1), 1)[:, None] / present.sum()
  return mask / (present.sum() * max_len)


def _numpy_grpo(logp, old, ref, adv, mask, eps_lo, eps_hi, kl_coef, aggregation, max_len):
  rho = np.exp(logp - old)
  a = adv[:, None]
  per = -np.minimum(rho * a, np.clip(rho, 1 - eps_lo, 1 + eps_hi) * a)
  if ref is not None:
    per = per + kl_coef * (np.exp(ref - logp) - (ref - logp) - 1)
  per = per * mask
  if aggregation == "token":
    return per.sum() / mask.sum()
  present = mask.sum(1) > 0  # responses with an empty mask are absent
  if aggregation == "sequence":
    return np.mean((per.sum(1) / np.maximum(mask.sum(1), 1))[present])
  return per.sum() / (present.sum() * max_len)


class TestGrpoLoss:
  loss = staticmethod(jax.jit(grpo.grpo_loss, static_argnames=(
      "clip_eps_low", "clip_eps_high", "kl_coef", "aggregation", "max_len", "normaliser")))

  @pytest.mark.parametrize("aggregation,want", [("token", -0.4), ("sequence", -0.05),
                                                ("constant", -0.3)])
  def test_hand_checked(self, aggregation, want):
    # Response 0: A = 1, ratios [1.5, 1.0]: max(-1.5, -1.2) = -1.2 and -1.0 -> sum -2.2 (2 tokens).
    # Response 1: A = -1, ratio 1 on its single token -> +1.0.
    # token: (-2.2 + 1) / 3 = -0.4; sequence: (-1.1 + 1) / 2 = -0.05;
    # constant (max_len = T = 2): -1.2 / (2 * 2) = -0.3.
    logp = jnp.array([[jnp.log(1.5), 0.0], [0.0, 0.0]])
    loss, m = self.loss(logp, jnp.zeros((2, 2)), logp, jnp.array([1.0, -1.0]),
                        jnp.array([[1, 1], [1, 0]], bool), clip_eps_low=0.2, clip_eps_high=0.2,
                        kl_coef=0.1, aggregation=aggregation)
    # log 1.5 and exp (2), 1 + 0.2 (1); the KL term is exactly 0 (ref = logp); the sums of
    # -1.2, -1.0 and +1.0 partly cancel (at most 3 roundings at 2.2), the divide (1):
    # f32_tol(7, scale=2.2) for each aggregation.
    np.testing.assert_allclose(loss, want, **helpers.f32_tol(7, scale=2.2))
    # Counts, and the k3 of a zero log-ratio: exact.
    np.testing.assert_array_equal([m["clipfrac_sum"], m["token_count"], m["count"], m["kl_sum"]],
                                  [1, 3, 2, 0])

  @pytest.mark.parametrize("aggregation", grpo.AGGREGATIONS)
  def test_matches_numpy_reference(self, aggregation):
    rng = np.random.default_rng(4)
    B, T = 6, 7
    logp, old, ref = (rng.normal(-2, 0.3, (B, T)) for _ in range(3))
    adv = grpo.group_advantages(jnp.asarray(rng.normal(size=(2, 3)), jnp.float32),
                                ddof=1, eps=1e-4).reshape(-1)
    mask = _mask([7, 3, 1, 0, 5, 6], T)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    loss, _ = self.loss(f32(logp), f32(old), f32(ref), adv, mask, clip_eps_low=0.2,
                        clip_eps_high=0.28, kl_coef=0.05, aggregation=aggregation, max_len=10)
    a64 = np.asarray(adv, np.float64)
    want = _numpy_grpo(logp, old, ref, a64, mask, 0.2, 0.28, 0.05, aggregation, 10)
    # Per token (13 roundings): the casts (3), logp - old (cancels: rho and the surrogate move
    # by u·(|logp| + |old|) relatively), exp, the clip bound, the product, the max (4); k3 of
    # ref - logp (3, at |lq| + |q - 1| and, through lq's rounding, |q - 1|·(|logp| + |ref|)),
    # ·kl_coef and the add (2). Then the aggregation's sums (B·T + B slots) and 2 divides,
    # with the per-token errors weighted by the aggregation (_agg_weights).
    rho, lq = np.exp(logp - old), ref - logp
    surr = np.maximum(-rho * a64[:, None], -np.clip(rho, 0.8, 1.28) * a64[:, None])
    s_t = (np.abs(surr) * (1 + np.abs(logp) + np.abs(old))
           + 0.05 * (np.abs(lq) + np.abs(np.expm1(lq))) * (1 + np.abs(logp) + np.abs(ref)))
    scale = np.sum(_agg_weights(mask, aggregation, 10) * s_t)
    np.testing.assert_allclose(loss, want, **helpers.f32_tol(13 + B * T + B + 2, scale=scale))

  @pytest.mark.parametrize("aggregation", grpo.AGGREGATIONS)
  def test_a_response_with_an_empty_mask_is_absent(self, aggregation):
    # DAPO's dynamic sampling drops a group by zeroing its mask: the loss and the counts must
    # be those of the batch without it, under every normaliser.
    rng = np.random.default_rng(8)
    logp, old = (jnp.asarray(rng.normal(-1, 0.4, (4, 5)), jnp.float32) for _ in range(2))
    adv, mask = jnp.asarray(rng.normal(size=4), jnp.float32), _mask([5, 2, 4, 3], 5)
    kw = dict(clip_eps_low=0.2, clip_eps_high=0.28, kl_coef=0.1, aggregation=aggregation,
              max_len=6)
    dropped = jnp.asarray(mask).at[1].set(0)
    keep = jnp.array([0, 2, 3])
    got, m = self.loss(logp, old, old, adv, dropped, **kw)
    want, w = self.loss(logp[keep], old[keep], old[keep], adv[keep], jnp.asarray(mask)[keep],
                        **kw)
    # Two float32 evaluations: the same per-token values (maybe an ulp apart between vector
    # widths: 10 roundings each, surrogate and k3 at their terms' size) summed over 20 or 15
    # slots in another grouping, + 2 divides; per-token sizes weighted by the aggregation.
    lp, ol, a = (np.asarray(x, np.float64) for x in (logp, old, adv))
    rho, lq = np.exp(lp - ol), ol - lp
    s_t = np.abs(rho * a[:, None]) * 1.28 + 0.1 * (np.abs(lq) + np.abs(np.expm1(lq)))
    scale = np.sum(_agg_weights(np.asarray(dropped, np.float64), aggregation, 6) * s_t)
    np.testing.assert_allclose(got, want, **helpers.f32_tol(10 + mask.size + 2, scale=scale))
    assert float(m["count"]) == float(w["count"]) == 3.0
    assert float(m["token_count"]) == float(w["token_count"]) == 12.0

  def test_step_zero_ratio_one_and_no_kl_without_reference(self):
    logp = jnp.asarray(np.random.default_rng(5).normal(-1, 1, (4, 3)), jnp.float32)
    adv = jnp.array([1.0, -2.0, 0.5, 0.0])
    loss, m = self.loss(logp, logp, None, adv, jnp.ones((4, 3)), clip_eps_low=0.2,
                        clip_eps_high=0.2, kl_coef=0.0, aggregation="token")
    # Ratio 1 exactly, so each token gives -A exactly; halves and small integers: the 12-term
    # sum 1.5 and 1.5 / 12 = 0.125 are exact.
    np.testing.assert_array_equal(loss, -np.mean(adv))
    assert float(m["clipfrac_sum"]) == 0.0 and "kl_sum" not in m

  def test_kl_needs_reference(self):
    with pytest.raises(ValueError, match="ref_logps_BxT"):
      grpo.grpo_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), None, jnp.zeros(2), jnp.ones((2, 3)),
                     clip_eps_low=0.2, clip_eps_high=0.2, kl_coef=0.1, aggregation="token")

  @pytest.mark.parametrize("ratio,adv,eps_hi,clipped", [
      (1.25, 1.0, 0.28, False),   # DAPO clip-higher lets the ratio reach 1.28
      (1.25, 1.0, 0.2, True),     # symmetric 0.2 clips it
      (0.75, -1.0, 0.28, True),   # the low side stays at 1 - 0.2
      (0.85, -1.0, 0.28, False),
  ])
  def test_asymmetric_clip_and_zero_gradient_when_clipped(self, ratio, adv, eps_hi, clipped):
    f = lambda lp: self.loss(lp, jnp.zeros((1, 1)), None, jnp.array([adv]), jnp.ones((1, 1)),
                             clip_eps_low=0.2, clip_eps_high=eps_hi, kl_coef=0.0,
                             aggregation="token")
    lp = jnp.full((1, 1), np.log(ratio), jnp.float32)
    (_, m), g = f(lp), jax.grad(lambda x: f(x)[0])(lp)
    assert float(m["clipfrac_sum"]) == float(clipped)
    if clipped:
      assert float(g[0, 0]) == 0.0
    else:
      # log(ratio)'s cast (u·|log ratio| < u in rho), exp, the product by A = +-1 (exact) and
      # the divide by 1: f32_tol(3), relative.
      np.testing.assert_allclose(g[0, 0], -ratio * adv, **helpers.f32_tol(3))

  def test_symmetric_token_mode_matches_ppo_policy_loss(self):
    rng = np.random.default_rng(6)
    logp, old = (jnp.asarray(rng.normal(-1, 0.4, (3, 4)), jnp.float32) for _ in range(2))
    adv, mask = jnp.asarray(rng.normal(size=3), jnp.float32), _mask([4, 2, 3], 4)
    g_loss, _ = self.loss(logp, old, None, adv, mask, clip_eps_low=0.2, clip_eps_high=0.2,
                          kl_coef=0.0, aggregation="token")
    p_loss, _ = ppo.ppo_policy_loss(logp, old, jnp.broadcast_to(adv[:, None], (3, 4)), mask,
                                    clip_eps=0.2)
    # The same per-token float32 ops (maybe an ulp apart between the two programs: 3 each),
    # the 12-slot masked sum in maybe another order (cancels: A has both signs), the divide.
    lp, ol, a = (np.asarray(x, np.float64) for x in (logp, old, adv))
    per = np.abs(np.exp(lp - ol) * a[:, None]) * 1.2 * mask
    np.testing.assert_allclose(g_loss, p_loss, **helpers.f32_tol(3 + mask.size + 1,
                                                                 scale=per.sum() / mask.sum()))

  @pytest.mark.parametrize("aggregation", grpo.AGGREGATIONS)
  def test_grad_matches_finite_differences(self, aggregation):
    with jax.enable_x64(True):
      rng = np.random.default_rng(7)
      logp = jnp.asarray(rng.normal(-1, 0.1, (3, 4)))
      old, ref = jnp.asarray(rng.normal(-1, 0.1, (3, 4))), jnp.asarray(rng.normal(-1, 0.5, (3, 4)))
      adv, mask = jnp.asarray(rng.normal(size=3)), jnp.asarray(_mask([4, 2, 3], 4), jnp.float64)
      f = jax.jit(lambda lp: grpo.grpo_loss(lp, old, ref, adv, mask, clip_eps_low=0.2,
                                            clip_eps_high=0.3, kl_coef=0.1,
                                            aggregation=aggregation)[0])
      g, h = jax.grad(f)(logp), 1e-6
      fd = np.zeros((3, 4))
      for i in np.ndindex(3, 4):
        fd[i] = (f(logp.at[i].add(h)) - f(logp.at[i].add(-h))) / (2 * h)
      # float64 gradient vs a float64 central difference, h = 1e-6: the difference's error
      # ~h^2·|f'''| + eps64/h ~ 1e-10 is what these bounds cover (not a float32 tolerance).
      np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-9)

  def test_extremes_and_all_masked_finite(self):
    logp = jnp.array([[-1e4, 0.0], [0.0, -1e4]])
    other = jnp.array([[0.0, -1e4], [-1e4, 0.0]])
    for aggregation in grpo.AGGREGATIONS:
      for mask in (jnp.array([[1, 1], [0, 0]], bool), jnp.zeros((2, 2), bool)):
        f = lambda lp: self.loss(lp, other, other, jnp.array([1e6, -1e6]), mask,
                                 clip_eps_low=0.2, clip_eps_high=0.2, kl_coef=0.1,
                                 aggregation=aggregation)[0]
        assert np.isfinite(f(logp)) and np.all(np.isfinite(jax.grad(f)(logp)))

  def test_microbatches_combine_with_global_normaliser(self):
    rng = np.random.default_rng(8)
    logp, old = (jnp.asarray(rng.normal(-1, 0.3, (4, 5)), jnp.float32) for _ in range(2))
    adv, mask = jnp.asarray(rng.normal(size=4), jnp.float32), jnp.asarray(_mask([5, 1, 3, 4], 5))
    kw = dict(clip_eps_low=0.2, clip_eps_high=0.2, kl_coef=0.0, aggregation="token")
    full, _ = self.loss(logp, old, None, adv, mask, **kw)
    parts = [self.loss(logp[s], old[s], None, adv[s], mask[s], normaliser=float(mask.sum()), **kw)[0]
             for s in (slice(0, 1), slice(1, 4))]
    # Two float32 groupings of the same 20-slot masked sum (per-token values maybe an ulp
    # apart: 3), + the parts' add and the divides; it cancels (A has both signs): atol at the
    # mean size of the terms.
    lp, ol, a = (np.asarray(x, np.float64) for x in (logp, old, adv))
    per = np.abs(np.exp(lp - ol) * a[:, None]) * 1.2 * np.asarray(mask)
    np.testing.assert_allclose(parts[0] + parts[1], full, **helpers.f32_tol(
        mask.size + 3 + 2, scale=per.sum() / float(mask.sum())))

  def test_shape_and_option_errors(self):
    kw = dict(clip_eps_low=0.2, clip_eps_high=0.2, kl_coef=0.0, aggregation="token")
    with pytest.raises(ValueError, match="advantages_B"):
      self.loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), None, jnp.zeros(3), jnp.ones((2, 3)), **kw)
    with pytest.raises(ValueError, match="ref_logps_BxT"):
      self.loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros((2, 2)), jnp.zeros(2),
                jnp.ones((2, 3)), **kw)
    with pytest.raises(ValueError, match="aggregation"):
      self.loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), None, jnp.zeros(2), jnp.ones((2, 3)),
                **{**kw, "aggregation": "group"})
