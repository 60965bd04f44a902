"""Tests for rlhf_jax.losses.group_rewards: a float64 NumPy reference written from the module
docstring's definitions (loops over groups and functions, np.std), a hand-checked case, the
masking edge cases, equality with grpo.group_advantages, and shape errors. Every call is
jitted (tests/jitted.py)."""
import itertools

import numpy as np
import pytest

from rlhf_jax.losses import grpo, group_rewards

import helpers
from jitted import J

F = J(group_rewards.combined_group_advantages)


def np_reference(r, w, G, normalization, std_scale, ddof, eps):
  """(adv, valid, stats, size): float64 by the definitions. `size` is each row's sum of
  |terms| over its divisor, the scale of the float32 cancellation (for the tolerance)."""
  r, w = np.asarray(r, np.float64), np.asarray(w, np.float64)
  B, K = r.shape
  comp = np.isfinite(r)
  valid = comp.any(1)
  R = np.array([sum(w[k] * r[i, k] for k in range(K) if comp[i, k]) for i in range(B)])
  groups = [list(range(g * G, (g + 1) * G)) for g in range(B // G)]
  X, Y, terms = np.zeros(B), np.zeros(B), np.zeros(B)
  for rows in groups:
    ok = [i for i in rows if valid[i]]
    for i in ok:
      if normalization == "sum":
        X[i] = Y[i] = R[i] - np.mean(R[ok])
        terms[i] = np.sum(np.abs(w * np.where(comp[i], r[i], 0))) + abs(np.mean(R[ok]))
        continue
      for k in range(K):
        rk = [r[j, k] for j in rows if comp[j, k]]
        if comp[i, k] and len(set(rk)) > 1:
          z = (r[i, k] - np.mean(rk)) / (np.std(rk, ddof=ddof) + eps)
          X[i] += w[k] * z
          terms[i] += abs(w[k]) * (abs(r[i, k]) + abs(np.mean(rk))) / (np.std(rk, ddof=ddof) + eps)
      Y[i] = X[i]
    if normalization == "sum":
      Y[ok] = R[ok]  # Y is the reward itself for the scale; X is the centred one
  adv, size = np.zeros(B), np.zeros(B)
  all_ok = np.flatnonzero(valid)
  batch_std = (np.std(Y[all_ok], ddof=ddof) if len(set(Y[all_ok])) > 1 else 1.0) + eps
  constant = []
  for rows in groups:
    ok = [i for i in rows if valid[i]]
    if not ok:
      continue
    constant.append(len(set(Y[ok])) == 1)
    if constant[-1]:
      continue
    s = {"group": np.std(Y[ok], ddof=ddof) + eps, "batch": batch_std, "none": 1.0}[std_scale]
    adv[ok], size[ok] = X[ok] / s, terms[ok] / s
  stats = dict(reward_mean=np.mean(R[valid]) if valid.any() else 0.0,
               reward_std=np.std(R[valid]) if valid.any() else 0.0,
               unscored_frac=1 - valid.mean(),
               zero_variance_frac=np.mean(constant) if constant else 0.0,
               advantages_abs_mean=np.abs(adv).sum() / max(valid.sum(), 1),
               reward_means_K=np.array([np.mean(r[comp[:, k], k]) if comp[:, k].any() else 0.0
                                        for k in range(K)]),
               computed_frac_K=comp.mean(0))
  return adv, valid, stats, size


def random_rewards(seed, n_groups=7, G=5, K=3):
  """Rewards at different scales per function, 30% NaN, plus one all-NaN group (0), one group
  with a single valid row (1) and one constant group (3: every function and R equal)."""
  rng = np.random.default_rng(seed)
  r = rng.normal(size=(n_groups * G, K)) * np.array([1.0, 3.0, 0.2])[:K] + 0.5
  r[rng.random(r.shape) < 0.3] = np.nan
  r[0:G] = np.nan
  r[G:2 * G] = np.nan
  r[G + 2, 0] = 0.7
  r[3 * G:4 * G] = np.array([1.0, 0.0, 0.0])[:K]  # R = 1 in every row
  r[3 * G + 1, 1:] = np.nan  # not computed in one row of the constant group: still R = 1
  return r, np.array([1.0, -0.5, 2.0])[:K]


def tolerance(normalization, std_scale, G, B, K, size):
  """f32_tol of the chain. "sum": the cast and K-term weighted sum (K + 1), the group mean
  (G + 1) and the centring (1). "each": per function the cast, mean (G + 1), centring, variance
  (square, G-term sum, divide: G + 2), sqrt, + eps and divide (2G + 8), then the K-term sum.
  Scaling by a std over n rows (mean n + 1, centring, variance n + 2, sqrt, + eps, divide:
  2n + 6), n = G ("group") or B ("batch"). The centring cancels: atol at `size`."""
  chain = K + 1 + G + 2 if normalization == "sum" else 2 * G + 8 + K
  chain += {"group": 2 * G + 6, "batch": 2 * B + 6, "none": 0}[std_scale]
  return helpers.f32_tol(chain, scale=max(size.max(), 1e-30))


@pytest.mark.parametrize("normalization,std_scale,ddof,eps", [
    (n, s, d, e) for n, s in itertools.product(group_rewards.NORMALIZATIONS,
                                                group_rewards.STD_SCALES)
    for d, e in ((0, 1e-4), (1, 0.0))])
def test_matches_numpy_reference(normalization, std_scale, ddof, eps):
  G, K = 5, 3
  r, w = random_rewards(ddof, G=G, K=K)
  want, want_valid, want_stats, size = np_reference(r, w, G, normalization, std_scale, ddof, eps)
  adv, valid, stats = F(np.asarray(r, np.float32), np.asarray(w, np.float32), group_size=G,
                        normalization=normalization, std_scale=std_scale, std_ddof=ddof, eps=eps)
  np.testing.assert_array_equal(valid, want_valid)
  assert 0 < want_valid.sum() < len(r) and np.all(np.asarray(adv)[~want_valid] == 0)
  assert np.count_nonzero(want) > len(r) // 2  # most rows carry a nonzero advantage
  tol = tolerance(normalization, std_scale, G, len(r), K, size)
  np.testing.assert_allclose(adv, want, **tol)
  for key in ("unscored_frac", "zero_variance_frac", "computed_frac_K"):
    # Counts over B, 7 groups or B rows: exact up to the one rounding of a division.
    np.testing.assert_allclose(stats[key], want_stats[key], rtol=helpers.F32_EPS)
  mag = np.nanmax(np.abs(r))
  # Means and stds over <= B rows of K-term sums: f32_tol(K + 1 + 2B + 4) at the rewards' size.
  for key in ("reward_mean", "reward_std", "reward_means_K"):
    np.testing.assert_allclose(stats[key], want_stats[key],
                               **helpers.f32_tol(K + 1 + 2 * len(r) + 4, scale=mag * w.sum()))
  np.testing.assert_allclose(stats["advantages_abs_mean"], want_stats["advantages_abs_mean"],
                             rtol=tol["rtol"] + len(r) * helpers.F32_EPS, atol=tol["atol"])


def test_reference_exercises_every_branch():
  """The random input has what the tests above claim: an all-NaN group, a group with one
  valid row, a constant group, and functions whose values are NaN in some valid rows."""
  r, _ = random_rewards(0)
  valid_per_group = np.isfinite(r).any(1).reshape(-1, 5).sum(1)
  assert valid_per_group[0] == 0 and valid_per_group[1] == 1 and valid_per_group.min() == 0
  assert np.any(np.isnan(r) & np.isfinite(r).any(1, keepdims=True))
  adv, _, stats, _ = np_reference(r, np.ones(3), 5, "sum", "group", 0, 1e-4)
  assert np.all(adv[15:20] == 0) and stats["zero_variance_frac"] > 0


def test_hand_checked():
  # G = 3, K = 2, w = (1, 0.5), ddof = 1, eps = 0.
  # Group 0: R = (1 + 0.5*2, 0.5*2, 0) = (2, 1, 0); mean 1, centred (1, 0, -1);
  #   Bessel std sqrt(2 / 2) = 1 -> "group" advantages (1, 0, -1), "none" the same.
  # Group 1: row 3 has no value (invalid); R = (1, 1): constant -> advantages 0.
  # "each", "none": group 0 f0 = (1, -, 0): mean 0.5, std sqrt(0.5) -> z = +-1/sqrt(2);
  #   f1 = (2, 2, -) constant -> 0; A = (1/sqrt2, 0, -1/sqrt2). Group 1: f0 (1, 1) and
  #   f1 (0) constant -> 0.
  # stats: valid R = (2, 1, 0, 1, 1): mean 1, population std sqrt(2/5); 1 of 6 rows
  #   unscored; group 1 of 2 zero-variance; f0 mean (1+0+1+1)/4, f1 (2+2+0)/3.
  nan = np.nan
  r = np.array([[1, 2], [nan, 2], [0, nan], [nan, nan], [1, 0], [1, nan]], np.float32)
  w = np.array([1.0, 0.5], np.float32)
  kw = dict(group_size=3, std_ddof=1, eps=0.0)
  # Unit-scale values; the longest chain is the "group" advantage (K-term sum and cast 3, mean
  # G + 1, centring, variance G + 2, sqrt, + eps, divide: 16) or a 6-row stat (2*6 + 4 = 16).
  tol = helpers.f32_tol(16)
  for std_scale in ("group", "none"):
    adv, valid, stats = F(r, w, normalization="sum", std_scale=std_scale, **kw)
    np.testing.assert_allclose(adv, [1, 0, -1, 0, 0, 0], **tol)
  np.testing.assert_array_equal(valid, [True, True, True, False, True, True])
  np.testing.assert_allclose(stats["reward_mean"], 1.0, **tol)
  np.testing.assert_allclose(stats["reward_std"], np.sqrt(0.4), **tol)
  np.testing.assert_allclose(stats["unscored_frac"], 1 / 6, **tol)
  np.testing.assert_allclose(stats["zero_variance_frac"], 0.5, **tol)
  np.testing.assert_allclose(stats["reward_means_K"], [0.75, 4 / 3], **tol)
  np.testing.assert_allclose(stats["computed_frac_K"], [4 / 6, 3 / 6], **tol)
  adv, _, _ = F(r, w, normalization="each", std_scale="none", **kw)
  np.testing.assert_allclose(adv, [0.5**0.5, 0, -(0.5**0.5), 0, 0, 0], **tol)


@pytest.mark.parametrize("normalization,std_scale", itertools.product(
    group_rewards.NORMALIZATIONS, group_rewards.STD_SCALES))
def test_masked_edge_cases_are_zero_and_finite(normalization, std_scale):
  """All-NaN group, one valid row (also with ddof=1, where its std is undefined), a constant
  group, an inf (not computed, like NaN), and an all-NaN batch: no NaN anywhere."""
  nan, inf = np.nan, np.inf
  r = np.array([[nan, nan], [nan, nan], [nan, nan],  # nothing scored
                [nan, 3.0], [nan, nan], [nan, inf],  # one valid row
                [1.0, 2.0], [1.0, 2.0], [1.0, nan],  # constant per function and in R
                [0.0, 1.0], [1.0, 0.0], [5.0, 1.0]], np.float32)
  w = np.array([1.0, 1.0], np.float32)
  for ddof in (0, 1):
    kw = dict(group_size=3, normalization=normalization, std_scale=std_scale, std_ddof=ddof,
              eps=0.0)
    adv, valid, stats = F(r, w, **kw)
    np.testing.assert_array_equal(valid, [0, 0, 0, 1, 0, 0, 1, 1, 1, 1, 1, 1])
    if normalization == "sum":  # (2, 2, 1) is not constant in R: only that group is
      assert np.all(np.asarray(adv)[:6] == 0) and np.all(np.asarray(adv)[9:] != 0)
    else:  # "each": constant per function, so A = 0 there
      assert np.all(np.asarray(adv)[:9] == 0) and np.all(np.asarray(adv)[9:] != 0)
    assert all(np.all(np.isfinite(v)) for v in [adv, *stats.values()])
    adv, valid, stats = F(np.full_like(r, nan), w, **kw)
    assert not np.any(valid) and np.all(np.asarray(adv) == 0)
    assert float(stats["unscored_frac"]) == 1.0 and float(stats["zero_variance_frac"]) == 0.0
    assert all(np.all(np.asarray(v) == 0) for k, v in stats.items() if k != "unscored_frac")


@pytest.mark.parametrize("ddof,eps", [(0, 0.0), (1, 1e-4), (0, 1e-2)])
def test_single_function_sum_group_is_grpo(ddof, eps):
  """K = 1, no NaN: "sum" with "group" is grpo.group_advantages (eps added to the std, a
  constant group exactly 0), with weight 1."""
  G = 6
  r = np.random.default_rng(3).normal(size=(5, G)).astype(np.float32)
  r[2] = 0.25  # a zero-variance group
  adv, valid, _ = F(r.reshape(-1, 1), np.ones(1, np.float32), group_size=G,
                    normalization="sum", std_scale="group", std_ddof=ddof, eps=eps)
  want = np.asarray(J(grpo.group_advantages)(r, ddof=ddof, eps=eps)).reshape(-1)
  assert np.all(valid) and np.all(np.asarray(adv)[2 * G:3 * G] == 0)
  # Both are the same float32 chain (mean G + 1, centring, variance G + 2, sqrt, + eps,
  # divide); they may only sum in another order: f32_tol(2G + 6) at the centred terms' size.
  r64 = r.astype(np.float64)
  scale = np.max((np.abs(r64) + np.abs(r64.mean(1, keepdims=True)))
                 / (r64.std(1, ddof=ddof, keepdims=True) + eps + (r64.std(1, keepdims=True) == 0)))
  np.testing.assert_allclose(adv, want, **helpers.f32_tol(2 * G + 6, scale=scale))


def test_weights_scale_sum_and_each_differently():
  """Doubling every weight doubles "sum" / "none" advantages, and leaves "group"-scaled ones
  unchanged (up to eps): a sanity check that the weights enter where the definitions say."""
  r, w = random_rewards(5)
  r32, kw = np.asarray(r, np.float32), dict(group_size=5, std_ddof=0, eps=0.0)
  for normalization in group_rewards.NORMALIZATIONS:
    a1, _, _ = F(r32, w.astype(np.float32), normalization=normalization, std_scale="none", **kw)
    a2, _, _ = F(r32, 2 * w.astype(np.float32), normalization=normalization, std_scale="none",
                 **kw)
    # Doubling is exact in float32 at every step.
    np.testing.assert_array_equal(np.asarray(a2), 2 * np.asarray(a1))
    g1, _, _ = F(r32, w.astype(np.float32), normalization=normalization, std_scale="group", **kw)
    g2, _, _ = F(r32, 2 * w.astype(np.float32), normalization=normalization, std_scale="group",
                 **kw)
    np.testing.assert_array_equal(np.asarray(g2), np.asarray(g1))


@pytest.mark.parametrize("rewards,weights,kw,match", [
    (np.zeros(6), np.ones(1), {}, "rewards_BxK must have rank 2"),
    (np.zeros((6, 2)), np.ones((2, 1)), {}, "weights_K must have rank 1"),
    (np.zeros((6, 2)), np.ones(3), {}, r"weights_K\(3,\) must hold one weight per column of "
                                       r"rewards_BxK\(6, 2\)"),
    (np.zeros((7, 2)), np.ones(2), {}, r"rewards_BxK\(7, 2\): 7 rows do not split into groups "
                                       "of group_size=3"),
    (np.zeros((6, 2)), np.ones(2), dict(normalization="mean"), "normalization must be one of"),
    (np.zeros((6, 2)), np.ones(2), dict(std_scale="global"), "std_scale must be one of"),
    (np.zeros((6, 2)), np.ones(2), dict(std_ddof=2), "std_ddof must be 0 or 1"),
])
def test_shape_and_argument_errors(rewards, weights, kw, match):
  kw = dict(dict(group_size=3, normalization="sum", std_scale="group"), **kw)
  with pytest.raises(ValueError, match=match):
    F(rewards.astype(np.float32), weights.astype(np.float32), **kw)


def test_leave_one_out_baseline_is_rloo_and_masks_unscored_rows():
  """K = 1, no NaN, std_scale none: the leave-one-out baseline is grpo.rloo_advantages; with
  unscored rows, a float64 NumPy RLOO over each group's scored rows alone."""
  G = 4
  r = np.random.default_rng(5).normal(size=(6, G)).astype(np.float32)
  adv, _, _ = F(r.reshape(-1, 1), np.ones(1, np.float32), group_size=G, normalization="sum",
                std_scale="none", baseline="leave_one_out")
  want = np.asarray(J(grpo.rloo_advantages)(r)).reshape(-1)
  # Both: a G-term sum and a division; the terms are the rewards (size ~1).
  np.testing.assert_allclose(adv, want, **helpers.f32_tol(2 * G + 4, scale=2.0))
  masked = r.copy()
  masked[0, 1] = masked[2, :3] = np.nan  # group 2 keeps one scored row: no baseline
  adv, valid, _ = F(masked.reshape(-1, 1), np.ones(1, np.float32), group_size=G,
                    normalization="sum", std_scale="none", baseline="leave_one_out")
  expect = np.zeros_like(masked, np.float64)
  for g, row in enumerate(masked.astype(np.float64)):
    ok = ~np.isnan(row)
    if ok.sum() >= 2:
      expect[g, ok] = row[ok] - (row[ok].sum() - row[ok]) / (ok.sum() - 1)
  assert not np.asarray(valid).reshape(6, G)[2, :3].any()
  np.testing.assert_allclose(np.asarray(adv).reshape(6, G), expect,
                             **helpers.f32_tol(2 * G + 4, scale=2.0))
  with pytest.raises(ValueError, match="leave_one_out with normalization='sum'"):
    F(r.reshape(-1, 1), np.ones(1, np.float32), group_size=G, normalization="each",
      std_scale="none", baseline="leave_one_out")
