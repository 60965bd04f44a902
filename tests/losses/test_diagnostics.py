"""Tests for rlhf_jax.losses.diagnostics: CHES scores and best-of-n KL."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses import diagnostics as diag
from rlhf_jax.losses import dpo

import helpers
from jitted import J


def _np_ches(hp, mp, hn, mn, normalise):
  hp, hn = np.asarray(hp, np.float64), np.asarray(hn, np.float64)
  out = []
  for b in range(hp.shape[0]):
    sp = hp[b][np.asarray(mp[b], bool)].sum(0)
    sn = hn[b][np.asarray(mn[b], bool)].sum(0)
    if normalise:
      sp, sn = sp / max(np.sum(mp[b]), 1), sn / max(np.sum(mn[b]), 1)
    out.append(sp @ sn - sp @ sp)
  return np.array(out)


def _ches_tol(hp, mp, hn, mn, normalise):
  """f32_tol of CHES = <S+, S-> - <S+, S+> (S a masked sum or mean of hidden states) against
  float64. With A_d = sum_k |h+_kd| and B_d = sum_k |h-_kd| (over the counts if normalised),
  the sums are off by <= T·eps·A_d and S·eps·B_d, and each D-term dot product adds D roundings
  at the size of its terms: <= (2·max(T, S) + D + 1)·eps·sum_d (A_d B_d + A_d^2) per pair,
  + 2 divides when normalised. CHES cancels, so this is an atol (Higham's bound)."""
  a = np.einsum("btd,bt->bd", np.abs(np.asarray(hp, np.float64)), np.asarray(mp, np.float64))
  b = np.einsum("bsd,bs->bd", np.abs(np.asarray(hn, np.float64)), np.asarray(mn, np.float64))
  if normalise:
    a = a / np.maximum(np.sum(mp, 1), 1)[:, None]
    b = b / np.maximum(np.sum(mn, 1), 1)[:, None]
  n = 2 * max(hp.shape[1], hn.shape[1]) + hp.shape[2] + 1 + (2 if normalise else 0)
  return helpers.f32_tol(n, scale=np.max(np.sum(a * b + a * a, axis=1)))


def _bon_tols(p, pi, n):
  """Float32 tolerances of best_of_n_exact against float64 (p, pi: the float64 reference).

  pi: relative (the expm1 form has no cancellation). p's cast, sum and divide (N + 2) and the
  cumsum of positive terms (N) leave F within (2N + 2)·eps; F^n multiplies that by n and its
  products add <= n; frac = p / F carries N + 2 + 2N + 2 + 1, and the factor
  -expm1(n log1p(-frac)) passes it on at most 1:1 (its elasticity in frac is <= 1), plus log1p
  and expm1 (2 ulp each), ·n and the product (6): n_pi = n(2N + 3) + 3N + 11.
  kl = sum pi (log pi - log p): pi's and p's relative errors at the size pi(1 + |log ratio|),
  the logs (2 ulp each, at |log pi| + |log p|), the subtraction, product and N-term sum.
  Returns (pi's f32_tol, kl's atol)."""
  N = len(p)
  n_pi = n * (2 * N + 3) + 3 * N + 11
  pos = (pi > 0) & (p > 0)
  lp, lq = np.log(np.where(pos, pi, 1.0)), np.log(np.where(pos, p, 1.0))
  s1 = np.sum(np.where(pos, pi * (1 + np.abs(lp - lq)), 0.0))
  s2 = np.sum(np.where(pos, pi * (np.abs(lp) + np.abs(lq) + np.abs(lp - lq)), 0.0))
  kl_atol = (helpers.f32_tol(n_pi + N + 2, scale=s1)["atol"]
             + helpers.f32_tol(N + 4, scale=s2)["atol"])
  return helpers.f32_tol(n_pi, scale=0.0), kl_atol


def _np_bon(p, r, n):
  """Independent reference: rank by (reward, index), pi(y) = F(y)^n - F(y-)^n."""
  p = np.asarray(p, np.float64) / np.sum(p)
  order = sorted(range(len(p)), key=lambda i: (r[i], i))
  pi, cdf = np.zeros_like(p), 0.0
  for i in order:
    pi[i] = (cdf + p[i]) ** n - cdf ** n
    cdf += p[i]
  kl = sum(pi[i] * np.log(pi[i] / p[i]) for i in range(len(p)) if pi[i] > 0)
  return kl, pi


def _random_hidden(seed, b=3, t=4, s=5, d=3):
  rng = np.random.default_rng(seed)
  hp, hn = rng.normal(size=(b, t, d)), rng.normal(size=(b, s, d))
  mp, mn = rng.random((b, t)) < 0.7, rng.random((b, s)) < 0.7
  mp[:, 0] = mn[:, 0] = True
  return hp.astype(np.float32), mp, hn.astype(np.float32), mn


class TestChesScore:

  def test_hand_case(self):
    # chosen tokens (1,0), (0,1) [third masked] -> sum h+ = (1,1), ||.||^2 = 2;
    # rejected (1,1), (1,0) -> sum h- = (2,1); <(1,1),(2,1)> = 3 -> CHES = 3 - 2 = 1.
    hp = jnp.array([[[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]])
    hn = jnp.array([[[1.0, 1.0], [1.0, 0.0]]])
    out = jax.jit(diag.ches_score)(hp, jnp.array([[1, 1, 0]]), hn, jnp.array([[1, 1]]))
    np.testing.assert_array_equal(out, [1.0])  # small integers: exact in float32

  @pytest.mark.parametrize("seed", [0, 1])
  def test_numpy_reference(self, seed):
    hp, mp, hn, mn = _random_hidden(seed)
    np.testing.assert_allclose(J(diag.ches_score)(hp, mp, hn, mn), _np_ches(hp, mp, hn, mn, False),
                               **_ches_tol(hp, mp, hn, mn, False))

  def test_properties(self):
    hp, mp, hn, mn = _random_hidden(2, t=4, s=4)
    # Identical responses: <S, S> - ||S||^2 = 0; CHES is maximal-ish when y- aligns with y+.
    # Two float32 evaluations of the same sum and of ||S||^2 that cancel: _ches_tol's atol.
    np.testing.assert_allclose(J(diag.ches_score)(hp, mp, hp, mp), 0.0,
                               **_ches_tol(hp, mp, hp, mp, False))
    # Scaling all hidden states by c scales CHES by c^2. c = 2 scales every float32 value and
    # rounding exactly (same program, same order): bit for bit.
    np.testing.assert_array_equal(J(diag.ches_score)(2 * hp, mp, 2 * hn, mn),
                                  4 * J(diag.ches_score)(hp, mp, hn, mn))

  def test_extreme_all_masked_and_shape_errors(self):
    hp, mp, hn, mn = _random_hidden(3)
    mp[1] = False
    out = J(diag.ches_score)(hp * 1e3, mp, hn * 1e3, mn)
    assert np.all(np.isfinite(out))
    with pytest.raises(ValueError, match="hidden_chosen_BxT.*chosen_mask_BxT"):
      jax.jit(diag.ches_score)(hp, mp[:, :2], hn, mn)
    with pytest.raises(ValueError, match="agree in B and D"):
      J(diag.ches_score)(hp, mp, hn[..., :2], mn)
    with pytest.raises(ValueError, match="rank 3"):
      J(diag.ches_score)(hp[..., 0], mp, hn, mn)


class TestNormalizedChesScore:

  def test_hand_case(self):
    # means: h+ = (0.5, 0.5), h- = (1, 0.5): <.,.> = 0.75, ||h+||^2 = 0.5 -> 0.25.
    hp = jnp.array([[[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]])
    hn = jnp.array([[[1.0, 1.0], [1.0, 0.0]]])
    out = jax.jit(diag.normalized_ches_score)(hp, jnp.array([[1, 1, 0]]), hn, jnp.array([[1, 1]]))
    np.testing.assert_array_equal(out, [0.25])  # halves and quarters: exact in float32

  @pytest.mark.parametrize("seed", [0, 1])
  def test_numpy_reference(self, seed):
    hp, mp, hn, mn = _random_hidden(seed)
    np.testing.assert_allclose(J(diag.normalized_ches_score)(hp, mp, hn, mn),
                               _np_ches(hp, mp, hn, mn, True), **_ches_tol(hp, mp, hn, mn, True))

  def test_length_invariance(self):
    # Repeating every token twice doubles the sums (CHES x4) but leaves the means unchanged.
    hp, mp, hn, mn = _random_hidden(4)
    rep = lambda x: np.concatenate([x, x], axis=1)
    # Two float32 evaluations, each within _ches_tol of the exact value (the repeated one with
    # twice the sum lengths; the sums' sizes x2, the means' unchanged): the sum of both atols.
    t1, t2 = _ches_tol(rep(hp), rep(mp), rep(hn), rep(mn), True), _ches_tol(hp, mp, hn, mn, True)
    np.testing.assert_allclose(J(diag.normalized_ches_score)(rep(hp), rep(mp), rep(hn), rep(mn)),
                               J(diag.normalized_ches_score)(hp, mp, hn, mn),
                               rtol=0, atol=t1["atol"] + t2["atol"])
    t1, t2 = _ches_tol(rep(hp), rep(mp), rep(hn), rep(mn), False), _ches_tol(hp, mp, hn, mn, False)
    np.testing.assert_allclose(J(diag.ches_score)(rep(hp), rep(mp), rep(hn), rep(mn)),
                               4 * J(diag.ches_score)(hp, mp, hn, mn),
                               rtol=0, atol=t1["atol"] + 4 * t2["atol"])

  def test_all_masked_finite(self):
    hp, mp, hn, mn = _random_hidden(5)
    out = J(diag.normalized_ches_score)(hp, np.zeros_like(mp), hn, np.zeros_like(mn))
    np.testing.assert_array_equal(out, 0.0)  # zero sums / 1: exactly 0


class TestBestOfNKlBound:

  def test_hand_values(self):
    # n = 1: log 1 - 0 = 0;  n = 2: log 2 - 1/2 = 0.19315;  n = 4: log 4 - 3/4 = 0.63629.
    f = jax.jit(diag.best_of_n_kl_bound)
    # The constants are given to 5 decimals.
    np.testing.assert_allclose([f(1), f(2), f(4)], [0.0, 0.19315, 0.63629], atol=1e-5)

  def test_increasing_in_n(self):
    vals = np.asarray(J(diag.best_of_n_kl_bound)(jnp.arange(1, 65)))
    assert np.all(np.diff(vals) > 0)


class TestBestOfNExact:

  def test_hand_case(self):
    # Uniform over 4 responses, rewards 0 < 1 < 2 < 3, n = 2: F = 1/4, 2/4, 3/4, 1
    # -> pi_bon = (1, 3, 5, 7)/16; KL = sum pi log(4 pi) = 0.17398.
    kl, pi = jax.jit(functools.partial(diag.best_of_n_exact, n=2))(jnp.full(4, 0.25), jnp.arange(4.0))
    ref_pi = np.array([1, 3, 5, 7]) / 16
    pi_tol, kl_atol = _bon_tols(np.full(4, 0.25), ref_pi, 2)
    np.testing.assert_allclose(pi, ref_pi, **pi_tol)
    np.testing.assert_allclose(kl, sum(k / 16 * np.log(4 * k / 16) for k in (1, 3, 5, 7)), rtol=0,
                               atol=kl_atol)

  def test_tie_rule(self):
    # rewards [1, 1, 0], uniform: order (idx2, idx0, idx1) -- ties go to the larger index.
    # pi_bon = (4/9 - 1/9, 1 - 4/9, 1/9) = (3/9, 5/9, 1/9).
    _, pi = J(diag.best_of_n_exact)(jnp.full(3, 1 / 3), jnp.array([1.0, 1.0, 0.0]), n=2)
    np.testing.assert_allclose(pi, [3 / 9, 5 / 9, 1 / 9],
                               **_bon_tols(np.full(3, 1 / 3), np.array([3, 5, 1]) / 9, 2)[0])

  @pytest.mark.parametrize("seed,n", [(0, 2), (1, 5), (2, 16)])
  def test_numpy_reference_and_bound(self, seed, n):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(12))
    r = rng.integers(0, 5, size=12).astype(np.float32)  # many ties
    kl, pi = J(diag.best_of_n_exact)(p.astype(np.float32), r, n=n)
    ref_kl, ref_pi = _np_bon(p, r, n)
    pi_tol, kl_atol = _bon_tols(p / p.sum(), ref_pi, n)
    np.testing.assert_allclose(pi, ref_pi, **pi_tol)
    np.testing.assert_allclose(kl, ref_kl, rtol=0, atol=kl_atol)
    # The exact pi sum to 1: each is within pi_tol's rtol, + a float64 N-term sum.
    np.testing.assert_allclose(np.sum(np.asarray(pi, np.float64)), 1.0, **pi_tol)
    # kl's float32 error, and the bound's own (log n: 2 ulp, the divide and subtraction: 4).
    bound = float(J(diag.best_of_n_kl_bound)(n))
    assert float(kl) <= bound + kl_atol + helpers.f32_tol(4)["rtol"] * bound

  def test_n1_is_reference(self):
    p = np.random.default_rng(3).dirichlet(np.ones(7)).astype(np.float32)
    kl, pi = J(diag.best_of_n_exact)(p, np.arange(7.0)[::-1].copy(), n=1)
    p64 = np.asarray(p, np.float64) / np.sum(p, dtype=np.float64)  # pi_bon = p, normalised
    pi_tol, kl_atol = _bon_tols(p64, p64, 1)
    np.testing.assert_allclose(pi, p64, **pi_tol)
    np.testing.assert_allclose(kl, 0.0, atol=kl_atol)

  @pytest.mark.parametrize("n", [2, 4, 8])
  def test_bound_tight_for_large_uniform_support(self, n):
    # N = 500: the float64 discrete KL is within 2e-5 (relative) of the bound (the gap shrinks
    # like 1/N^2), while the float32 error bound (_bon_tols, ~n·2N·eps) stays <= 3e-3; at
    # N = 20000 the gap is ~1e-8 but that worst-case bound would exceed 1e-2.
    big = 500
    r = np.random.default_rng(n).permutation(big).astype(np.float32)  # no ties
    kl, _ = J(diag.best_of_n_exact)(np.full(big, 1 / big, np.float32), r, n=n)
    bound = float(J(diag.best_of_n_kl_bound)(n))
    ref_kl, ref_pi = _np_bon(np.full(big, 1 / big), r, n)
    _, kl_atol = _bon_tols(np.full(big, 1 / big), ref_pi, n)
    bound_err = helpers.f32_tol(4)["rtol"] * bound  # log n (2 ulp), the divide and subtraction
    gap = np.log(n) - (n - 1) / n - ref_kl  # the discretization gap, float64
    assert 0 <= gap < 2e-5 * ref_kl
    assert float(kl) <= bound + kl_atol + bound_err
    np.testing.assert_allclose(kl, bound, rtol=0, atol=gap + kl_atol + bound_err)

  def test_matches_monte_carlo_best_of_n(self):
    rng = np.random.default_rng(4)
    p = np.array([0.4, 0.25, 0.2, 0.1, 0.05])
    r = np.array([0.0, 1.0, 1.0, 3.0, 2.0])  # responses 1 and 2 tie
    n, m = 3, 2_000_000
    rank = np.empty(5, int)
    rank[np.lexsort((np.arange(5), r))] = np.arange(5)  # (reward, index) order
    draws = rng.choice(5, size=(m, n), p=p)
    picked = draws[np.arange(m), np.argmax(rank[draws], axis=1)]
    freq = np.bincount(picked, minlength=5) / m
    kl, pi = J(diag.best_of_n_exact)(p.astype(np.float32), r.astype(np.float32), n=n)
    # Each frequency is a mean of m Bernoulli(pi_y): standard error sqrt(pi (1 - pi) / m)
    # (<= 3.4e-4); within 4 standard errors (float32's error, ~1e-6, is far below).
    pi64 = np.asarray(pi, np.float64)
    np.testing.assert_allclose((freq - pi64) / np.sqrt(pi64 * (1 - pi64) / m), 0.0, atol=4.0)
    mc_kl = np.sum(freq * np.log(freq / p))  # plug-in KL of the sampled best-of-n distribution
    # Delta method: the plug-in KL's standard error is sqrt(Var_pi[log(pi / p)] / m) (~5e-4),
    # its bias (K - 1) / (2m); within 4 standard errors + the bias.
    lr = np.log(pi64 / p)
    se_kl = np.sqrt((np.sum(pi64 * lr ** 2) - np.sum(pi64 * lr) ** 2) / m)
    np.testing.assert_allclose(kl, mc_kl, atol=4 * se_kl + (len(p) - 1) / (2 * m))

  def test_zero_probabilities_and_extreme_rewards(self):
    p = jnp.array([0.0, 0.5, 0.5, 0.0])
    kl, pi = J(diag.best_of_n_exact)(p, jnp.array([1e6, -1e6, 0.0, 5.0]), n=4)
    assert np.isfinite(kl) and np.all(np.isfinite(pi))
    pi_tol, _ = _bon_tols(np.array([0, 0.5, 0.5, 0]), np.array([0, 1, 15, 0]) / 16, 4)
    np.testing.assert_allclose(pi, [0.0, 1 / 16, 15 / 16, 0.0], **pi_tol)

  def test_errors(self):
    with pytest.raises(ValueError, match="n must be >= 1"):
      J(diag.best_of_n_exact)(jnp.ones(3) / 3, jnp.zeros(3), n=0)
    with pytest.raises(ValueError, match="p_ref_N.*rewards_N"):
      jax.jit(functools.partial(diag.best_of_n_exact, n=2))(jnp.ones(3) / 3, jnp.zeros(4))


class TestChesPredictsDisplacement:
  """CHES measured on hidden states predicts DPO's likelihood displacement in a linear model.

  Energy model over a finite response set: log pi(y) = <theta, phi(y)> - log Z with
  phi(y) = sum_k h_{y<k} (the hidden states CHES reads). One DPO step from pi = pi_ref moves
  theta by eta (beta/2) (phi+ - phi-), so to first order
    d log pi(y+) = eta (beta/2) <phi+ - E_pi phi, phi+ - phi-> = -eta (beta/2) CHES(y+, y-)
  when E_pi phi = 0 (ensured by adding each response's mirror, hidden states negated).
  """

  def test_first_order_displacement_is_minus_ches(self):
    rng = np.random.default_rng(7)
    m, t, d, beta, eta = 5, 3, 4, 1.0, 1e-3
    hidden_MxTxD = rng.normal(size=(m, t, d)).astype(np.float32)
    mask_MxT = np.ones((m, t), bool)
    mask_MxT[0, 2] = mask_MxT[3, 1:] = False
    phi_MxD = (hidden_MxTxD * mask_MxT[..., None]).sum(1)
    phi_all = jnp.asarray(np.concatenate([phi_MxD, -phi_MxD]))  # mirrors: E_uniform phi = 0
    pairs = np.array([(i, j) for i in range(m) for j in range(m) if i != j])
    ches = J(diag.ches_score)(hidden_MxTxD[pairs[:, 0]], mask_MxT[pairs[:, 0]],
                              hidden_MxTxD[pairs[:, 1]], mask_MxT[pairs[:, 1]])

    @jax.jit
    def displacement(i, j):
      def logp(theta):
        return jax.nn.log_softmax(phi_all @ theta)

      ref = jax.lax.stop_gradient(logp(jnp.zeros(d)))

      def loss(theta):
        lp = logp(theta)
        return J(dpo.dpo_loss)(lp[i][None], lp[j][None], ref[i][None], ref[j][None], beta=beta)[0]

      theta1 = -eta * jax.grad(loss)(jnp.zeros(d))
      return logp(theta1)[i] - ref[i]

    delta = jax.vmap(displacement)(jnp.asarray(pairs[:, 0]), jnp.asarray(pairs[:, 1]))
    ches_tol = _ches_tol(hidden_MxTxD[pairs[:, 0]], mask_MxT[pairs[:, 0]],
                         hidden_MxTxD[pairs[:, 1]], mask_MxT[pairs[:, 1]], False)
    ches = np.asarray(ches, np.float64)
    assert np.any(ches > 0) and np.any(ches < 0)  # both regimes present
    # Taylor remainder: log pi(y+) has Hessian -Cov_pi(phi), so at dtheta = eta (beta/2)
    # (phi+ - phi-) the second-order term is -dtheta^T Cov dtheta / 2 (computed, per pair);
    # x2 covers the higher orders (smaller by ~|dtheta|·max|phi| < 0.1).
    phi64 = np.asarray(phi_all, np.float64)
    dth = eta * beta / 2 * (phi64[pairs[:, 0]] - phi64[pairs[:, 1]])
    r2 = 0.5 * np.einsum("pd,de,pe->p", dth, phi64.T @ phi64 / len(phi64), dth)
    assert np.max(np.linalg.norm(dth, axis=1)) * np.max(np.linalg.norm(phi64, axis=1)) < 0.1
    # float32: two log-softmaxes of 2M logits (D-term dots, max, exp, 2M-term sum, log: 2M + D
    # + 4 each) at the size log(2M) + |logits|, their difference; the gradient's softmax means
    # cancel only to 2M + D + 4 roundings at eta (beta/2)·4 max|phi|^2; CHES's own error.
    lmax = np.max(np.abs(phi64 @ dth.T))  # the logits phi @ theta1
    # theta1's relative rounding (the same 2M + D + 4) moves delta relatively.
    k = 2 * len(phi64) + d + 4
    f32 = (helpers.f32_tol(2 * k + 1, scale=np.log(len(phi64)) + lmax)["atol"]
           + helpers.f32_tol(k, scale=eta * beta / 2 * 4 * np.max(np.sum(phi64 ** 2, 1)))["atol"]
           + eta * beta / 2 * ches_tol["atol"])
    want = -eta * beta / 2 * ches
    bound = 2 * r2 + f32 + helpers.f32_tol(k)["rtol"] * np.abs(want)
    np.testing.assert_allclose((delta - want) / bound, 0.0, atol=1.0)  # per pair, within bound
    assert np.all(np.sign(delta[np.abs(ches) > 0.5]) == -np.sign(ches[np.abs(ches) > 0.5]))
