"""Tests for rlhf_jax.losses.grpo."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses import grpo, ppo


def _mask(lengths, T):
  return (np.arange(T)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)


class TestGroupAdvantages:

  def test_closed_form_ddof0_and_ddof1(self):
    r = jnp.array([[1.0, 0.0, 1.0, 0.0]])
    # mean 0.5; population std 0.5 -> [+1, -1, +1, -1].
    a0 = jax.jit(grpo.group_advantages, static_argnames=("ddof", "eps"))(r, ddof=0, eps=0.0)
    np.testing.assert_allclose(a0, [[1, -1, 1, -1]], rtol=1e-6)
    # Bessel std sqrt(4 * 0.25 / 3) = sqrt(1/3) -> 0.5 / sqrt(1/3) = 0.866025.
    a1 = grpo.group_advantages(r, ddof=1, eps=0.0)
    np.testing.assert_allclose(a1, [[0.866025, -0.866025, 0.866025, -0.866025]], rtol=1e-5)

  @pytest.mark.parametrize("ddof,eps", [(0, 0.0), (1, 1e-4), (0, 1e-2)])
  def test_matches_numpy_reference(self, ddof, eps):
    r = np.random.default_rng(0).normal(size=(5, 6))
    want = (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=ddof, keepdims=True) + eps)
    got = grpo.group_advantages(jnp.asarray(r, jnp.float32), ddof=ddof, eps=eps)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

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
    np.testing.assert_allclose(jnp.mean(a, axis=1), 0.0, atol=1e-6)
    np.testing.assert_allclose(jnp.std(a, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(grpo.group_advantages(3.0 * r + 7.0, ddof=0, eps=0.0), a,
                               rtol=1e-4, atol=1e-5)

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
    np.testing.assert_allclose(jax.jit(grpo.dr_grpo_advantages)(jnp.array([[1.0, 0, 1, 0]])),
                               [[0.5, -0.5, 0.5, -0.5]])
    r = np.random.default_rng(2).normal(size=(3, 5))
    np.testing.assert_allclose(grpo.dr_grpo_advantages(jnp.asarray(r, jnp.float32)),
                               r - r.mean(1, keepdims=True), rtol=1e-5, atol=1e-6)

  def test_constant_group_zero_and_rank_error(self):
    np.testing.assert_array_equal(grpo.dr_grpo_advantages(jnp.full((1, 3), 1e6)), 0.0)
    with pytest.raises(ValueError, match="rewards_BxG"):
      grpo.dr_grpo_advantages(jnp.ones((2, 3, 4)))


class TestRlooAdvantages:

  def test_hand_checked(self):
    # r_0 = 1, others [0, 1, 0] mean 1/3 -> 2/3; r_1 = 0, others [1, 1, 0] mean 2/3 -> -2/3.
    out = jax.jit(grpo.rloo_advantages)(jnp.array([[1.0, 0.0, 1.0, 0.0]]))
    np.testing.assert_allclose(out, [[2 / 3, -2 / 3, 2 / 3, -2 / 3]], rtol=1e-6)

  def test_matches_leave_one_out_loop_and_scaled_dr_grpo(self):
    r = np.random.default_rng(3).normal(size=(3, 5))
    want = np.array([[r[b, i] - np.mean(np.delete(r[b], i)) for i in range(5)] for b in range(3)])
    got = grpo.rloo_advantages(jnp.asarray(r, jnp.float32))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # Property: RLOO = G / (G - 1) * (r - mean).
    np.testing.assert_allclose(got, 5 / 4 * grpo.dr_grpo_advantages(jnp.asarray(r, jnp.float32)),
                               rtol=1e-5, atol=1e-6)

  def test_needs_two_samples(self):
    with pytest.raises(ValueError, match="G >= 2"):
      grpo.rloo_advantages(jnp.ones((2, 1)))


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
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose([m["clipfrac_sum"], m["token_count"], m["count"], m["kl_sum"]],
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
    want = _numpy_grpo(logp, old, ref, np.asarray(adv, np.float64), mask, 0.2, 0.28, 0.05,
                       aggregation, 10)
    np.testing.assert_allclose(loss, want, rtol=1e-5)

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
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert float(m["count"]) == float(w["count"]) == 3.0
    assert float(m["token_count"]) == float(w["token_count"]) == 12.0

  def test_step_zero_ratio_one_and_no_kl_without_reference(self):
    logp = jnp.asarray(np.random.default_rng(5).normal(-1, 1, (4, 3)), jnp.float32)
    adv = jnp.array([1.0, -2.0, 0.5, 0.0])
    loss, m = self.loss(logp, logp, None, adv, jnp.ones((4, 3)), clip_eps_low=0.2,
                        clip_eps_high=0.2, kl_coef=0.0, aggregation="token")
    np.testing.assert_allclose(loss, -np.mean(adv), rtol=1e-6)
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
      np.testing.assert_allclose(g[0, 0], -ratio * adv, rtol=1e-5)

  def test_symmetric_token_mode_matches_ppo_policy_loss(self):
    rng = np.random.default_rng(6)
    logp, old = (jnp.asarray(rng.normal(-1, 0.4, (3, 4)), jnp.float32) for _ in range(2))
    adv, mask = jnp.asarray(rng.normal(size=3), jnp.float32), _mask([4, 2, 3], 4)
    g_loss, _ = self.loss(logp, old, None, adv, mask, clip_eps_low=0.2, clip_eps_high=0.2,
                          kl_coef=0.0, aggregation="token")
    p_loss, _ = ppo.ppo_policy_loss(logp, old, jnp.broadcast_to(adv[:, None], (3, 4)), mask,
                                    clip_eps=0.2)
    np.testing.assert_allclose(g_loss, p_loss, rtol=1e-6)

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
    np.testing.assert_allclose(parts[0] + parts[1], full, rtol=1e-5, atol=1e-7)

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
