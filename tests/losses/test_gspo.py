"""Tests for rlhf_jax.losses.gspo: GSPO and GSPO-token against the paper's equations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses import grpo, gspo

import helpers
from jitted import G, J, fd_grad

EPS32 = np.finfo(np.float32).eps
PAPER = dict(clip_eps_low=3e-4, clip_eps_high=4e-4)


def _mask(lengths, T):
  return (np.arange(T)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)


def _np_gspo(logp, old, ref, adv, mask, eps_lo, eps_hi, kl_coef):
  """float64 reference from the paper: s_i = exp(mean_t log ratio), per-sequence clipped
  objective, k3 per-sequence mean, mean over responses with a token. Returns (loss, s, l)."""
  logp, old, adv, mask = (np.asarray(a, np.float64) for a in (logp, old, adv, mask))
  present = mask.sum(1) > 0
  n = np.maximum(mask.sum(1), 1)
  s = np.exp(((logp - old) * mask).sum(1) / n)
  l = -np.minimum(s * adv, np.clip(s, 1 - eps_lo, 1 + eps_hi) * adv)
  if ref is not None:
    lq = np.asarray(ref, np.float64) - logp
    l = l + kl_coef * ((np.exp(lq) - 1 - lq) * mask).sum(1) / n
  return l[present].mean(), s, l


def _atol(logp, s, l):
  """float32 error bound of a mean of per-sequence terms: each s_i = exp(mean of differences of
  log-probs of size <= max|logp|) carries a relative error of a few ulp times max|logp|, and the
  mean of terms of either sign can cancel, so the bound is absolute: ulps x mean |term|."""
  return 16 * EPS32 * (1 + np.max(np.abs(logp))) * np.mean(np.abs(l) + np.abs(s))


class TestSequenceLogRatio:

  def test_hand_checked_and_empty_row(self):
    logp = jnp.array([[np.log(2.0), 0.0, -7.0], [1.0, 2.0, 3.0]])
    log_s, n = J(gspo.sequence_log_ratio)(logp, jnp.zeros((2, 3)), jnp.array([[1, 1, 0],
                                                                              [0, 0, 0]]))
    # (log 2 + 0) / 2 = log sqrt(2); the empty row gives 0.
    # float32 log 2 (1 rounding), a 3-term masked sum and a divide.
    np.testing.assert_allclose(log_s, [np.log(2.0) / 2, 0.0], **helpers.f32_tol(1 + 3 + 1))
    np.testing.assert_array_equal(n, [2, 0])


class TestGspoLoss:
  loss = staticmethod(J(gspo.gspo_loss))

  def test_hand_checked(self):
    # Response 0: log ratios [log 2, 0] -> s = sqrt(2) = 1.41421, A = 1: min(1.41421, 1.2) = 1.2,
    #   clipped, l = -1.2. Response 1: one token, ratio 0.9, A = -1: min(-0.9, -0.9) -> l = 0.9.
    # loss = (-1.2 + 0.9) / 2 = -0.15.
    logp = jnp.array([[np.log(2.0), 0.0], [np.log(0.9), 5.0]], jnp.float32)
    mask = jnp.array([[1, 1], [1, 0]], bool)
    loss, m = self.loss(logp, jnp.zeros((2, 2)), logp, jnp.array([1.0, -1.0]), mask,
                        clip_eps_low=0.2, clip_eps_high=0.2, kl_coef=0.1)
    # log 2, log 0.9 (1 each), the mean log ratio (2), exp (1), the clip and products by A (2),
    # the 2-term sum where -1.2 + 0.9 partly cancels (atol at 1.2), the divide: f32_tol(8).
    tol = helpers.f32_tol(8, scale=1.2)
    np.testing.assert_allclose(loss, -0.15, **tol)
    np.testing.assert_allclose([m["clipfrac_sum"], m["ratio_sum"], m["count"], m["token_count"],
                                m["kl_sum"], m["loss_sum"], m["policy_loss_sum"]],
                               [1, np.sqrt(2) + 0.9, 2, 3, 0, -0.3, -0.3], **tol)

  @pytest.mark.parametrize("kl_coef", [0.0, 0.05])
  def test_matches_numpy_reference_paper_clip(self, kl_coef):
    rng = np.random.default_rng(0)
    B, T = 6, 7
    logp = rng.normal(-2, 0.3, (B, T)).astype(np.float32)
    old = (logp + rng.normal(0, 1e-3, (B, T))).astype(np.float32)  # ratios near the clip range
    ref = rng.normal(-2, 0.3, (B, T)).astype(np.float32)
    adv = np.asarray(grpo.group_advantages(jnp.asarray(rng.normal(size=(2, 3)), jnp.float32),
                                           ddof=1, eps=1e-4)).reshape(-1)
    mask = _mask([7, 3, 1, 0, 5, 6], T)
    loss, m = self.loss(logp, old, ref, adv, mask, kl_coef=kl_coef, **PAPER)
    want, s, l = _np_gspo(logp, old, ref, adv, mask, 3e-4, 4e-4, kl_coef)
    present = mask.sum(1) > 0
    np.testing.assert_allclose(loss, want, rtol=0, atol=_atol(logp, s[present], l[present]))
    clipped = (-np.clip(s, 1 - 3e-4, 1 + 4e-4) * adv > -s * adv) & present
    assert 0 < clipped.sum() < present.sum()  # the case exercises both branches
    assert float(m["clipfrac_sum"]) == clipped.sum() and float(m["count"]) == 5
    np.testing.assert_allclose(m["ratio_sum"], s[present].sum(), rtol=8 * EPS32 * 3)

  def test_equals_token_ratio_and_grpo_sequence_mode_when_token_ratios_are_equal(self):
    # Every token of a row has the same log ratio c_i: s_i = e^{c_i} is the token ratio, and
    # GSPO is GRPO with the "sequence" aggregation (the KL term is the same per-sequence mean).
    rng = np.random.default_rng(1)
    old = jnp.asarray(rng.normal(-1, 0.4, (4, 5)), jnp.float32)
    c = jnp.asarray([0.1, -0.3, 0.02, 0.5], jnp.float32)
    logp, ref = old + c[:, None], jnp.asarray(rng.normal(-1, 0.4, (4, 5)), jnp.float32)
    adv, mask = jnp.array([1.0, -0.5, 2.0, -1.0]), _mask([5, 2, 4, 3], 5)
    kw = dict(clip_eps_low=0.2, clip_eps_high=0.28, kl_coef=0.1)
    loss, m = self.loss(logp, old, ref, adv, mask, **kw)
    want, _ = J(grpo.grpo_loss)(logp, old, ref, adv, mask, aggregation="sequence", **kw)
    np.testing.assert_allclose(loss, want, rtol=16 * EPS32)
    np.testing.assert_allclose(m["ratio_sum"], np.exp(np.asarray(c, np.float64)).sum(),
                               rtol=16 * EPS32)

  def test_ratio_invariant_to_repeating_the_sequence(self):
    # s_i is a geometric mean per token: the same token log ratios repeated twice (length 2L)
    # give the same ratio and the same loss as length L.
    rng = np.random.default_rng(2)
    d = rng.normal(0, 0.05, 3).astype(np.float32)
    short = jnp.asarray(np.concatenate([d, np.zeros(3, np.float32)])[None])
    long = jnp.asarray(np.concatenate([d, d])[None])
    kw = dict(clip_eps_low=0.2, clip_eps_high=0.2, kl_coef=0.0)
    a = self.loss(short, jnp.zeros((1, 6)), None, jnp.ones(1), _mask([3], 6), **kw)
    b = self.loss(long, jnp.zeros((1, 6)), None, jnp.ones(1), _mask([6], 6), **kw)
    np.testing.assert_allclose(a[1]["ratio_sum"], b[1]["ratio_sum"], rtol=8 * EPS32)
    np.testing.assert_allclose(a[0], b[0], rtol=8 * EPS32)

  def test_a_response_with_an_empty_mask_is_absent(self):
    rng = np.random.default_rng(3)
    logp, old = (jnp.asarray(rng.normal(-1, 0.1, (4, 5)), jnp.float32) for _ in range(2))
    adv, mask = jnp.asarray(rng.normal(size=4), jnp.float32), _mask([5, 2, 4, 3], 5)
    kw = dict(clip_eps_low=0.2, clip_eps_high=0.28, kl_coef=0.1)
    keep = jnp.array([0, 2, 3])
    got, m = self.loss(logp, old, old, adv, jnp.asarray(mask).at[1].set(0), **kw)
    want, w = self.loss(logp[keep], old[keep], old[keep], adv[keep], mask[keep], **kw)
    np.testing.assert_allclose(got, want, rtol=4 * EPS32)
    for key in ("count", "token_count", "clipfrac_sum"):
      assert float(m[key]) == float(w[key])
    np.testing.assert_allclose(m["ratio_sum"], w["ratio_sum"], rtol=4 * EPS32)
    g = G(lambda lp: self.loss(lp, old, old, adv, jnp.asarray(mask).at[1].set(0), **kw)[0])(logp)
    assert np.all(np.asarray(g[1]) == 0.0)

  def test_grad_matches_finite_differences(self):
    with jax.enable_x64(True):
      rng = np.random.default_rng(4)
      logp = rng.normal(-1, 0.1, (3, 4))
      old, ref = rng.normal(-1, 0.1, (3, 4)), rng.normal(-1, 0.5, (3, 4))
      adv, mask = rng.normal(size=3), _mask([4, 2, 3], 4).astype(np.float64)
      kw = dict(clip_eps_low=0.2, clip_eps_high=0.3, kl_coef=0.1)
      g = jax.jit(jax.grad(lambda lp: gspo.gspo_loss(lp, old, ref, adv, mask, **kw)[0]))(logp)
      fd = fd_grad(lambda lp: _np_gspo(lp, old, ref, adv, mask, 0.2, 0.3, 0.1)[0], logp)
      # float64 gradient vs a float64 central difference, h = 1e-6: the difference's error
      # ~h^2·|f'''| + eps64/h ~ 1e-10 is what these bounds cover (not a float32 tolerance).
      np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-9)

  def test_clipped_response_has_zero_policy_gradient(self):
    # A = 1 and s = e^{0.5} > 1 + eps: the clipped branch is active, no gradient.
    lp = jnp.full((1, 2), 0.5, jnp.float32)
    f = lambda x: self.loss(x, jnp.zeros((1, 2)), None, jnp.ones(1), jnp.ones((1, 2)),
                            kl_coef=0.0, **PAPER)[0]
    np.testing.assert_array_equal(G(f)(lp), 0.0)

  def test_extremes_and_all_masked_finite(self):
    logp = jnp.array([[-1e4, 0.0], [0.0, -1e4]])
    other = jnp.array([[0.0, -1e4], [-1e4, 0.0]])
    for mask in (jnp.array([[1, 1], [0, 0]], bool), jnp.zeros((2, 2), bool)):
      f = lambda lp: self.loss(lp, other, other, jnp.array([1e6, -1e6]), mask, kl_coef=0.1,
                               **PAPER)[0]
      assert np.isfinite(f(logp)) and np.all(np.isfinite(G(f)(logp)))
    assert float(self.loss(logp, other, None, jnp.ones(2), jnp.zeros((2, 2)), kl_coef=0.0,
                           **PAPER)[0]) == 0.0

  def test_microbatches_combine_with_global_normaliser(self):
    rng = np.random.default_rng(5)
    logp, old = (jnp.asarray(rng.normal(-1, 0.3, (4, 5)), jnp.float32) for _ in range(2))
    adv, mask = jnp.asarray(rng.normal(size=4), jnp.float32), _mask([5, 1, 0, 4], 5)
    kw = dict(clip_eps_low=0.2, clip_eps_high=0.2, kl_coef=0.0)
    full, fm = self.loss(logp, old, None, adv, mask, **kw)
    parts = [self.loss(logp[s], old[s], None, adv[s], mask[s], normaliser=float(fm["count"]),
                       **kw)[0] for s in (slice(0, 1), slice(1, 4))]
    np.testing.assert_allclose(parts[0] + parts[1], full, rtol=0,
                               atol=8 * EPS32 * float(jnp.sum(jnp.abs(adv)) * np.e))

  def test_shape_and_option_errors(self):
    kw = dict(kl_coef=0.0, **PAPER)
    with pytest.raises(ValueError, match="advantages_B"):
      self.loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), None, jnp.zeros(3), jnp.ones((2, 3)), **kw)
    with pytest.raises(ValueError, match="ref_logps_BxT"):
      self.loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros((2, 2)), jnp.zeros(2),
                jnp.ones((2, 3)), **kw)
    with pytest.raises(ValueError, match="ref_logps_BxT is None"):
      self.loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), None, jnp.zeros(2), jnp.ones((2, 3)),
                **{**kw, "kl_coef": 0.1})
    with pytest.raises(ValueError, match="logps_BxT must have rank 2"):
      self.loss(jnp.zeros(3), jnp.zeros(3), None, jnp.zeros(1), jnp.ones(3), **kw)


class TestGspoTokenLoss:
  loss = staticmethod(J(gspo.gspo_token_loss))

  def _case(self, seed, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    logp, old, ref = (jnp.asarray(rng.normal(-1, 0.15, (4, 5)), dtype) for _ in range(3))
    return logp, old, ref, jnp.asarray(_mask([5, 2, 0, 3], 5), dtype), rng

  def test_equals_gspo_value_and_gradient_with_a_shared_advantage(self):
    with jax.enable_x64(True):
      logp, old, ref, mask, rng = self._case(6, jnp.float64)
      adv = jnp.asarray(rng.normal(size=4))
      kw = dict(clip_eps_low=0.02, clip_eps_high=0.03, kl_coef=0.1)
      seq = lambda lp: gspo.gspo_loss(lp, old, ref, adv, mask, **kw)
      tok = lambda lp: gspo.gspo_token_loss(lp, old, ref, jnp.broadcast_to(adv[:, None], (4, 5)),
                                            mask, **kw)
      np.testing.assert_allclose(tok(logp)[0], seq(logp)[0], rtol=1e-12)
      np.testing.assert_allclose(jax.grad(lambda x: tok(x)[0])(logp),
                                 jax.grad(lambda x: seq(x)[0])(logp), rtol=1e-10, atol=1e-14)
      for key in ("clipfrac_sum", "ratio_sum", "kl_sum", "count", "token_count"):
        np.testing.assert_allclose(tok(logp)[1][key], seq(logp)[1][key], rtol=1e-12)

  def test_per_token_advantages_value_and_gradient(self):
    # Value: l_i = mean_t -min(s_i A_it, clip(s_i) A_it). Gradient of token t of response i:
    # -(1/|y_i|) s_i A_it where the unclipped branch is active, else 0 (the sg trick), / N.
    with jax.enable_x64(True):
      logp, old, _, mask, rng = self._case(7, jnp.float64)
      adv = jnp.asarray(rng.normal(size=(4, 5)))
      kw = dict(clip_eps_low=0.02, clip_eps_high=0.03, kl_coef=0.0)
      f = jax.jit(lambda lp: gspo.gspo_token_loss(lp, old, None, adv, mask, **kw))
      loss, m = f(logp)
      mk, a = np.asarray(mask), np.asarray(adv)
      n = np.maximum(mk.sum(1), 1)
      s = np.exp(((np.asarray(logp) - np.asarray(old)) * mk).sum(1) / n)[:, None]
      unclipped, clipped = -s * a, -np.clip(s, 0.98, 1.03) * a
      per = np.maximum(unclipped, clipped) * mk
      present = mk.sum(1) > 0
      np.testing.assert_allclose(loss, (per.sum(1) / n)[present].mean(), rtol=1e-12)
      want_g = np.where(unclipped >= clipped, -s * a, 0.0) * mk / n[:, None] / present.sum()
      np.testing.assert_allclose(jax.grad(lambda x: f(x)[0])(logp), want_g, rtol=1e-10,
                                 atol=1e-14)
      frac = (((clipped > unclipped) * mk).sum(1) / n)[present].sum()
      assert 0 < frac and float(m["clipfrac_sum"]) == pytest.approx(frac, rel=1e-12)

  def test_extremes_finite_and_shape_error(self):
    logp = jnp.array([[-1e4, 0.0], [0.0, -1e4]])
    other = jnp.array([[0.0, -1e4], [-1e4, 0.0]])
    for mask in (jnp.array([[1, 1], [0, 0]], bool), jnp.zeros((2, 2), bool)):
      f = lambda lp: self.loss(lp, other, other, jnp.full((2, 2), 1e6), mask, kl_coef=0.1,
                               **PAPER)[0]
      assert np.isfinite(f(logp)) and np.all(np.isfinite(G(f)(logp)))
    with pytest.raises(ValueError, match="advantages_BxT"):
      self.loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), None, jnp.zeros(2), jnp.ones((2, 3)),
                kl_coef=0.0, **PAPER)
