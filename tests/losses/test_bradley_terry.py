"""Tests for rlhf_jax.losses.bradley_terry (one class per function)."""
import itertools


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses import bradley_terry as bt

import helpers
from jitted import G, J, fd_grad


def _lse(x):
  x = np.asarray(x, np.float64)
  return x.max() + np.log(np.exp(x - x.max()).sum())


def _np_bt(rw, rl):
  return np.mean(np.logaddexp(0.0, -(np.float64(rw) - np.float64(rl))))


def _np_ranking(r, valid):
  per_prompt = []
  for rb, vb in zip(np.asarray(r, np.float64), valid):
    idx = np.flatnonzero(vb)
    pairs = list(itertools.combinations(idx, 2))  # i < j: i ranked above j
    if pairs:
      per_prompt.append(np.mean([np.logaddexp(0.0, -(rb[i] - rb[j])) for i, j in pairs]))
  return np.mean(per_prompt) if per_prompt else 0.0


def _np_plackett_luce(r, valid):
  out = []
  for rb, vb in zip(np.asarray(r, np.float64), valid):
    x = rb[np.flatnonzero(vb)]
    if len(x) >= 2:
      out.append(-sum(x[k] - _lse(x[k:]) for k in range(len(x))))
  return np.mean(out) if out else 0.0


class TestBtProbability:

  def test_hand_case(self):
    # r_w = 2.0, r_l = 0.5: P = s(1.5) = 1 / (1 + e^-1.5) = 1 / 1.22313 = 0.8176.
    p = jax.jit(bt.bt_probability)(jnp.array([2.0]), jnp.array([0.5]))
    np.testing.assert_allclose(p, [0.8176], atol=1e-4)  # the constant is given to 4 decimals

  def test_complementary_and_extreme(self):
    a, b = jnp.array([1e6, -3.0]), jnp.array([-1e6, 2.0])
    # Two float32 sigmoids (subtract, exp, add, divide: 4 roundings each) and their sum.
    np.testing.assert_allclose(J(bt.bt_probability)(a, b) + J(bt.bt_probability)(b, a), 1.0,
                               **helpers.f32_tol(2 * 4 + 1))
    np.testing.assert_allclose(J(bt.bt_probability)(a, b)[0], 1.0)

  def test_shape_mismatch(self):
    with pytest.raises(ValueError, match="chosen_rewards_B.*rejected_rewards_B"):
      J(bt.bt_probability)(jnp.zeros(2), jnp.zeros(3))


class TestBtLoss:

  def test_hand_case(self):
    # -log s(1.5) = -log 0.81757 = 0.20141; margin 1.5; accurate.
    loss, m = jax.jit(bt.bt_loss)(jnp.array([2.0]), jnp.array([0.5]))
    # The constants are given to 5 and 4 decimals.
    np.testing.assert_allclose(loss, 0.20141, atol=1e-5)
    np.testing.assert_allclose(np.exp(-loss), 0.8176, atol=1e-4)
    assert float(m["accuracy_sum"]) == 1.0 and float(m["margin_sum"]) == 1.5

  @pytest.mark.parametrize("seed", [0, 1])
  def test_numpy_reference_and_metrics(self, seed):
    rng = np.random.default_rng(seed)
    rw, rl = rng.normal(size=(2, 6)).astype(np.float32) * 3
    loss, m = jax.jit(bt.bt_loss)(rw, rl)
    b, margin = len(rw), rw - rl
    # B-term mean of softplus(-margin) (exp, log1p, negate, divide: 4 roundings): the margin's
    # own rounding moves each softplus by at most u·|margin| (slope <= 1), hence the scale.
    np.testing.assert_allclose(loss, _np_bt(rw, rl),
                               **helpers.f32_tol(b + 4, scale=np.abs(margin).max()))
    # loss_sum / count vs the mean: the same B positive terms, maybe in another order, + a divide.
    np.testing.assert_allclose(m["loss_sum"] / m["count"], loss, **helpers.f32_tol(b + 2))
    assert float(m["accuracy_sum"]) == float(np.sum(rw > rl))
    # float32 B-term sums that may cancel: f32_tol(B + 1) at sum|terms| (Higham's bound).
    np.testing.assert_allclose(m["margin_sum"], np.sum(rw - rl),
                               **helpers.f32_tol(b + 1, scale=np.abs(margin).sum()))
    np.testing.assert_allclose(m["rewards/chosen_sum"], rw.sum(),
                               **helpers.f32_tol(b + 1, scale=np.abs(rw).sum()))

  def test_shift_invariance_and_monotone(self):
    rw, rl = jnp.array([1.0, -2.0]), jnp.array([0.0, 0.5])
    # rw + 7 and rl + 7 are exact in float32 (integers and halves), so are the margins: the
    # two losses are the same float32 computation, bit for bit.
    np.testing.assert_array_equal(J(bt.bt_loss)(rw + 7.0, rl + 7.0)[0], J(bt.bt_loss)(rw, rl)[0])
    assert J(bt.bt_loss)(rw + 1.0, rl)[0] < J(bt.bt_loss)(rw, rl)[0]

  def test_grad_vs_finite_differences(self):
    rng = np.random.default_rng(2)
    rw, rl = rng.normal(size=(2, 4))
    g = G(lambda a: J(bt.bt_loss)(a, jnp.asarray(rl, jnp.float32))[0])(jnp.asarray(rw, jnp.float32))
    # float32 gradient -s(-m)/B vs a float64 central difference (its error, ~h^2 + eps64/h,
    # is ~1e-10): the input casts, subtract, exp, add, divide and 1/B, at the gradient's size.
    fd = fd_grad(lambda a: _np_bt(a, rl), rw)
    np.testing.assert_allclose(g, fd, **helpers.f32_tol(7, scale=np.abs(fd).max()))

  def test_extreme_rewards_finite(self):
    rw, rl = jnp.array([1e6, -1e6]), jnp.array([-1e6, 1e6])
    loss, _ = jax.jit(bt.bt_loss)(rw, rl)
    # (0 + 2e6) / 2: a softplus (its exp underflows), a 2-term sum and a divide.
    np.testing.assert_allclose(loss, 1e6, **helpers.f32_tol(4))
    g = G(lambda a: J(bt.bt_loss)(a, rl)[0])(rw)
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, [0.0, -0.5])

  def test_shape_errors(self):
    with pytest.raises(ValueError, match="chosen_rewards_B.*rejected_rewards_B"):
      jax.jit(bt.bt_loss)(jnp.zeros(2), jnp.zeros(3))
    with pytest.raises(ValueError, match="rank 1"):
      J(bt.bt_loss)(jnp.zeros((2, 2)), jnp.zeros((2, 2)))


class TestRankingLoss:

  def test_hand_case(self):
    # K = 3, rewards [2, 1, 0] best first: pairs margins 1, 2, 1; C(3,2) = 3.
    # loss = (sp(-1) + sp(-2) + sp(-1)) / 3 = (0.31326 + 0.12693 + 0.31326) / 3 = 0.25115.
    loss, m = jax.jit(bt.ranking_loss)(jnp.array([[2.0, 1.0, 0.0]]))
    np.testing.assert_allclose(loss, 0.25115, atol=1e-5)  # the constant is given to 5 decimals
    assert float(m["pair_count"]) == 3.0 and float(m["accuracy_sum"]) == 1.0

  def test_k2_equals_bt(self):
    r = jnp.array([[2.0, 0.5], [0.0, 1.0]])
    # Two float32 evaluations of a 2-term mean of softplus (4 roundings each term, the pair
    # weight, the divide).
    np.testing.assert_allclose(J(bt.ranking_loss)(r)[0], J(bt.bt_loss)(r[:, 0], r[:, 1])[0],
                               **helpers.f32_tol(2 * (2 + 4 + 2)))

  @pytest.mark.parametrize("seed", [0, 1])
  def test_numpy_reference_with_valid_mask(self, seed):
    rng = np.random.default_rng(seed)
    r = rng.normal(size=(4, 5)).astype(np.float32)
    valid = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 1, 1, 0], [1, 0, 0, 0, 0]], bool)
    loss, m = jax.jit(bt.ranking_loss)(r, valid)
    # Per prompt a <= C(K,2)-term weighted sum of softplus (4 roundings + the weight), then the
    # B-term sum and the divide; margin rounding moves a softplus by <= u·|margin|.
    k, b = r.shape[1], r.shape[0]
    np.testing.assert_allclose(loss, _np_ranking(r, valid),
                               **helpers.f32_tol(k * (k - 1) // 2 + 5 + b + 1, scale=np.ptp(r)))
    assert float(m["count"]) == 3.0 and float(m["pair_count"]) == 10 + 3 + 3

  def test_per_prompt_weighting(self):
    # Each prompt weighs the same, however many pairs it has: a K=5 prompt and a K=2
    # prompt with all margins equal to 1 both contribute sp(-1).
    r = jnp.array([[4.0, 3.0, 2.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0]])
    valid = jnp.array([[True] * 5, [True, True, False, False, False]])
    loss, m = J(bt.ranking_loss)(r, valid)
    per_pair = np.logaddexp(0, -np.array([1, 2, 3, 4, 1, 2, 3, 1, 2, 1.0])).mean()
    # Integer margins (exact); a 10-term and a 1-term weighted sum of softplus (4 roundings
    # each + the weight), the 2-term sum and the divide.
    np.testing.assert_allclose(loss, (per_pair + np.logaddexp(0, -1.0)) / 2,
                               **helpers.f32_tol(10 + 5 + 2 + 1))

  def test_grad_vs_finite_differences(self):
    rng = np.random.default_rng(3)
    r = rng.normal(size=(2, 4))
    valid = np.array([[1, 1, 1, 1], [1, 1, 1, 0]], bool)
    g = G(lambda x: J(bt.ranking_loss)(x, valid)[0])(jnp.asarray(r, jnp.float32))
    # float32 gradient vs a float64 central difference (error ~1e-10): per reward a signed
    # (K-1)-term sum of pair sigmoids (cast, subtract, exp, add, divide, weight, 1/count),
    # which may cancel: f32_tol at the gradient's size.
    fd = fd_grad(lambda x: _np_ranking(x, valid), r)
    np.testing.assert_allclose(g, fd, **helpers.f32_tol(r.shape[1] - 1 + 7, scale=np.abs(fd).max()))

  def test_extreme_and_all_invalid(self):
    r = jnp.array([[1e6, -1e6, 0.0], [5.0, 1.0, 2.0]])
    valid = jnp.array([[True, True, True], [False, False, False]])
    loss, m = jax.jit(bt.ranking_loss)(r, valid)
    assert np.isfinite(loss) and float(m["count"]) == 1.0
    g = G(lambda x: J(bt.ranking_loss)(x, valid)[0])(r)
    assert np.all(np.isfinite(g)) and np.all(g[1] == 0)

  def test_shape_errors(self):
    with pytest.raises(ValueError, match="rewards_BxK.*valid_BxK"):
      jax.jit(bt.ranking_loss)(jnp.zeros((2, 3)), jnp.ones((2, 4), bool))
    with pytest.raises(ValueError, match="rewards_BxK must have rank 2"):
      J(bt.ranking_loss)(jnp.zeros(3))


class TestPlackettLuceLoss:

  def test_hand_case(self):
    # K = 2 reduces to BT: -log s(1.5) = 0.20141.
    # K = 3, rewards [0, 0, 0]: P = 1/3 * 1/2 * 1 -> NLL = log 6 = 1.79176.
    loss2, _ = jax.jit(bt.plackett_luce_loss)(jnp.array([[2.0, 0.5]]))
    np.testing.assert_allclose(loss2, 0.20141, atol=1e-5)  # the constant is given to 5 decimals
    loss3, _ = J(bt.plackett_luce_loss)(jnp.zeros((1, 3)))
    # Three log-sum-exps of <= 3 terms (max, subtract, exp, 3-term sum, log, add) and a 3-term sum.
    np.testing.assert_allclose(loss3, np.log(6.0), **helpers.f32_tol(3 * (3 + 5) + 3))

  @pytest.mark.parametrize("seed", [0, 1])
  def test_numpy_reference(self, seed):
    rng = np.random.default_rng(seed)
    r = (rng.normal(size=(3, 4)) * 2).astype(np.float32)
    valid = np.array([[1, 1, 1, 1], [1, 0, 1, 1], [0, 0, 1, 0]], bool)
    loss, m = jax.jit(bt.plackett_luce_loss)(r, valid)
    # K log-sum-exps of <= K terms (K + 5 roundings each), K differences r_k - lse_k that may
    # cancel (hence atol at the rewards' size), the K-term sum, the B-term sum and the divide.
    b, k = r.shape
    np.testing.assert_allclose(loss, _np_plackett_luce(r, valid),
                               **helpers.f32_tol(k * (k + 5) + k + b + 1,
                                                 scale=np.abs(r).max() + np.log(k)))
    assert float(m["count"]) == 2.0

  def test_probabilities_of_all_rankings_sum_to_one(self):
    r = np.array([0.3, -1.0, 2.0], np.float32)
    perms = np.array(list(itertools.permutations(range(3))))
    nll_each = jax.vmap(lambda p: J(bt.plackett_luce_loss)(jnp.asarray(r)[p][None])[0])(perms)
    # Each float32 NLL is off by <= f32_tol(K(K + 5) + K) at the rewards' size (see
    # test_numpy_reference), which exp(-nll) turns into a relative error of the same size.
    np.testing.assert_allclose(np.exp(-np.asarray(nll_each, np.float64)).sum(), 1.0,
                               **helpers.f32_tol(3 * 8 + 3 + 1, scale=np.abs(r).max() + np.log(3)))

  def test_grad_vs_finite_differences(self):
    rng = np.random.default_rng(4)
    r = rng.normal(size=(2, 4))
    valid = np.array([[1, 1, 1, 1], [1, 1, 0, 1]], bool)
    g = G(lambda x: J(bt.plackett_luce_loss)(x, valid)[0])(jnp.asarray(r, jnp.float32))
    # float32 gradient vs a float64 central difference (error ~1e-10): per reward -1 plus up
    # to K softmax weights (K + 5 roundings each), which may cancel: atol at the terms' size 1.
    k = r.shape[1]
    np.testing.assert_allclose(g, fd_grad(lambda x: _np_plackett_luce(x, valid), r),
                               **helpers.f32_tol(k * (k + 5) + k + 2))

  def test_extreme_and_masked_finite(self):
    r = jnp.array([[1e6, -1e6, 0.0], [1e6, 3.0, -1e6]])
    valid = jnp.array([[True, True, True], [False, False, False]])
    loss, _ = jax.jit(bt.plackett_luce_loss)(r, valid)
    g = G(lambda x: J(bt.plackett_luce_loss)(x, valid)[0])(r)
    assert np.isfinite(loss) and np.all(np.isfinite(g))

  def test_shape_errors(self):
    with pytest.raises(ValueError, match="rewards_BxK.*valid_BxK"):
      J(bt.plackett_luce_loss)(jnp.zeros((2, 3)), jnp.ones((3, 3), bool))


REWARDS_ExB = np.array([[1.0, 2.0], [3.0, 2.0], [2.0, 5.0]], np.float32)  # 3 members, 2 responses


class TestEnsembleMean:

  def test_hand_case(self):
    # column means: (1 + 3 + 2)/3 = 2, (2 + 2 + 5)/3 = 3.
    # Exact integer sums, then one divide (or a multiply by a rounded 1/E): 2 roundings.
    np.testing.assert_allclose(jax.jit(bt.ensemble_mean)(REWARDS_ExB), [2.0, 3.0], **helpers.f32_tol(2))

  def test_numpy_reference_and_rank(self):
    x = np.random.default_rng(0).normal(size=(4, 6))
    # Input cast, E-term sum that may cancel, divide: f32_tol(E + 2) at the members' size.
    np.testing.assert_allclose(J(bt.ensemble_mean)(x.astype(np.float32)), x.mean(0),
                               **helpers.f32_tol(len(x) + 2, scale=np.abs(x).max()))
    with pytest.raises(ValueError, match="rewards_ExB must have rank 2"):
      J(bt.ensemble_mean)(jnp.zeros(3))


class TestEnsembleWco:

  def test_hand_case(self):
    np.testing.assert_allclose(jax.jit(bt.ensemble_wco)(REWARDS_ExB), [1.0, 2.0])

  def test_lower_bounds_mean_and_reference(self):
    x = np.random.default_rng(1).normal(size=(4, 6)).astype(np.float32)
    wco = J(bt.ensemble_wco)(x)
    np.testing.assert_allclose(wco, x.min(0))
    # The min is exact; the float32 mean is within f32_tol(E + 1) at the members' size.
    assert np.all(wco <= J(bt.ensemble_mean)(x) + helpers.f32_tol(len(x) + 1, scale=np.abs(x).max())["atol"])
    with pytest.raises(ValueError, match="rewards_ExB"):
      J(bt.ensemble_wco)(jnp.zeros((1, 2, 3)))


class TestEnsembleUwo:

  def test_hand_case(self):
    # column 0: mean 2, pop. var ((1)+(1)+0)/3 = 2/3; uwo_coef 1.5 -> 2 - 1 = 1.
    # column 1: mean 3, var (1 + 1 + 4)/3 = 2 -> 3 - 3 = 0.
    out = jax.jit(lambda x: J(bt.ensemble_uwo)(x, uwo_coef=1.5))(REWARDS_ExB)
    # mean (E-term sum, divide) - coef·var (E subtracts, squares, E-term sum, divide, multiply),
    # then a subtract where column 1's 3 - 3 cancels: f32_tol(2E + 5) at the terms' size 3.
    np.testing.assert_allclose(out, [1.0, 0.0], **helpers.f32_tol(2 * 3 + 5, scale=3.0))

  def test_numpy_reference_and_properties(self):
    x = np.random.default_rng(2).normal(size=(5, 7))
    out = J(bt.ensemble_uwo)(x.astype(np.float32), uwo_coef=0.3)
    # Input cast + mean - coef·var (see test_hand_case): f32_tol(2E + 6), which may cancel, at
    # the size of the mean's and the penalty's terms.
    e, s = len(x), np.abs(x).max()
    tol = helpers.f32_tol(2 * e + 6, scale=s + 0.3 * (2 * s) ** 2)
    np.testing.assert_allclose(out, x.mean(0) - 0.3 * ((x - x.mean(0)) ** 2).mean(0), **tol)
    np.testing.assert_allclose(J(bt.ensemble_uwo)(x.astype(np.float32), uwo_coef=0.0), x.mean(0),
                               **helpers.f32_tol(e + 2, scale=s))
    agree = np.tile(x[:1], (5, 1)).astype(np.float32)  # members agree: no penalty
    # E equal terms (no cancellation): cast, E-term sum, divide, relative; the variance of the
    # rounded deviations is O(eps^2).
    np.testing.assert_allclose(J(bt.ensemble_uwo)(agree, uwo_coef=10.0), x[0], **helpers.f32_tol(e + 2))
    assert np.all(J(bt.ensemble_uwo)(x.astype(np.float32), uwo_coef=1.0)
                  <= x.mean(0) + helpers.f32_tol(e + 2, scale=s)["atol"])
    with pytest.raises(ValueError, match="rewards_ExB must have rank 2"):
      J(bt.ensemble_uwo)(jnp.zeros(3), uwo_coef=1.0)


class TestFitRewardNormalization:

  def test_hand_case(self):
    # reference [1, 3]: mean 2, population std 1; [0, 0, 6]: mean 2, std sqrt(8) = 2.8284.
    mean, std = J(bt.fit_reward_normalization)(jnp.array([[1.0, 3.0, 2.0], [0.0, 0.0, 6.0]]))
    # N-term mean (N + 1 roundings); std: N subtracts and squares, N-term sum, divide, sqrt.
    n = 3
    np.testing.assert_allclose(mean, [2.0, 2.0], **helpers.f32_tol(n + 1))
    np.testing.assert_allclose(std, [np.sqrt(2 / 3), np.sqrt(8.0)], **helpers.f32_tol(2 * n + 5))

  def test_numpy_reference_per_member(self):
    rng = np.random.default_rng(0)
    ref = (rng.normal(size=(3, 200)) * np.array([[1.0], [10.0], [0.1]]) + 5.0).astype(np.float32)
    mean_E, std_E = J(bt.fit_reward_normalization)(ref)
    n = ref.shape[1]
    # N-term sums (N = 200): member 1's terms have both signs, hence atol at sum|x| / N.
    np.testing.assert_allclose(mean_E, ref.astype(np.float64).mean(1),
                               **helpers.f32_tol(n + 1, scale=np.abs(ref).mean(1).max()))
    # The variance is first-order insensitive to the mean's error; N subtracts, squares, the
    # N-term sum of positive terms, divide, sqrt: relative.
    np.testing.assert_allclose(std_E, ref.astype(np.float64).std(1), **helpers.f32_tol(2 * n + 5))

  def test_extreme_finite(self):
    mean, std = J(bt.fit_reward_normalization)(jnp.array([1e6, -1e6, 1e6, -1e6]))
    # +-1e6 and their partial sums are exact in float32: the mean is exactly 0; the std is
    # 4 squares, a 4-term positive sum, a divide and a sqrt (f32_tol(2N + 5)).
    np.testing.assert_array_equal(mean, 0.0)
    np.testing.assert_allclose(std, 1e6, **helpers.f32_tol(2 * 4 + 5))


class TestNormalizeRewards:

  def test_hand_case(self):
    # mean 2, std 1 (eps 0): 4 maps to (4 - 2)/1 = 2, 1 to -1.
    out = J(bt.normalize_rewards)(jnp.array([4.0, 1.0]), jnp.array(2.0), jnp.array(1.0), eps=0.0)
    np.testing.assert_allclose(out, [2.0, -1.0])

  def test_reference_sample_maps_to_zero_mean_unit_std_per_member(self):
    rng = np.random.default_rng(1)
    ref = (rng.normal(size=(3, 200)) * np.array([[1.0], [10.0], [0.1]]) + 5.0).astype(np.float32)
    mean_E, std_E = J(bt.fit_reward_normalization)(ref)
    z = np.asarray(J(bt.normalize_rewards)(ref, mean_E, std_E), np.float64)
    n, s = ref.shape[1], np.asarray(std_E, np.float64)
    # mean(z) = (mean(x) - m) / s: the float32 mean m is off by <= f32_tol(N + 1) at |x|,
    # divided by s; + the subtract and divide roundings of z, at |z|.
    # std(z) = s / (s + eps): the deliberate eps = 1e-6 biases it by eps / s; + the relative
    # rounding of s (f32_tol(2N + 5), see fit_reward_normalization) and of z (2).
    for e in range(len(ref)):
      zscale = np.abs(ref[e]).max() / s[e]
      np.testing.assert_allclose(z[e].mean(), 0.0, rtol=0, atol=(n + 3) * helpers.F32_EPS * zscale)
      np.testing.assert_allclose(z[e].std(), 1.0, rtol=0,
                                 atol=helpers.f32_tol(2 * n + 7)["rtol"] + 1e-6 / s[e])
    # Normalised, the members can be aggregated on one scale: the mean ensemble is unit-free.
    # Two float32 evaluations of (x - m) / s: m off by f32_tol(N + 1) at |x| on each side (the
    # atol, at |x| / s), s by f32_tol(2N + 5) relative on each side, + eps / s.
    tol = helpers.f32_tol(2 * (2 * n + 6), scale=np.abs(ref[1]).max() / ref[1].std())
    np.testing.assert_allclose(z[1], (ref[1] - ref[1].mean()) / ref[1].std(),
                               rtol=tol["rtol"] + 1e-6 / s[1], atol=tol["atol"])

  def test_constant_reference_finite_and_shape_error(self):
    mean, std = J(bt.fit_reward_normalization)(jnp.full((4,), 1e6))
    assert np.all(np.isfinite(J(bt.normalize_rewards)(jnp.array([1e6, 0.0]), mean, std)))
    with pytest.raises(ValueError, match="mean_E and std_E"):
      J(bt.normalize_rewards)(jnp.zeros((3, 4)), jnp.zeros(2), jnp.ones(2))
