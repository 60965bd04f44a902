"""Tests for rlhf_jax.losses.diagnostics: CHES scores and best-of-n KL."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses import diagnostics as diag
from rlhf_jax.losses import dpo

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
    np.testing.assert_allclose(out, [1.0])

  @pytest.mark.parametrize("seed", [0, 1])
  def test_numpy_reference(self, seed):
    hp, mp, hn, mn = _random_hidden(seed)
    np.testing.assert_allclose(J(diag.ches_score)(hp, mp, hn, mn), _np_ches(hp, mp, hn, mn, False),
                               rtol=1e-5, atol=1e-5)

  def test_properties(self):
    hp, mp, hn, mn = _random_hidden(2, t=4, s=4)
    # Identical responses: <S, S> - ||S||^2 = 0; CHES is maximal-ish when y- aligns with y+.
    np.testing.assert_allclose(J(diag.ches_score)(hp, mp, hp, mp), 0.0, atol=1e-5)
    # Scaling all hidden states by c scales CHES by c^2.
    np.testing.assert_allclose(J(diag.ches_score)(2 * hp, mp, 2 * hn, mn),
                               4 * J(diag.ches_score)(hp, mp, hn, mn), rtol=1e-5, atol=1e-5)

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
    np.testing.assert_allclose(out, [0.25])

  @pytest.mark.parametrize("seed", [0, 1])
  def test_numpy_reference(self, seed):
    hp, mp, hn, mn = _random_hidden(seed)
    np.testing.assert_allclose(J(diag.normalized_ches_score)(hp, mp, hn, mn),
                               _np_ches(hp, mp, hn, mn, True), rtol=1e-5, atol=1e-5)

  def test_length_invariance(self):
    # Repeating every token twice doubles the sums (CHES x4) but leaves the means unchanged.
    hp, mp, hn, mn = _random_hidden(4)
    rep = lambda x: np.concatenate([x, x], axis=1)
    np.testing.assert_allclose(J(diag.normalized_ches_score)(rep(hp), rep(mp), rep(hn), rep(mn)),
                               J(diag.normalized_ches_score)(hp, mp, hn, mn), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(J(diag.ches_score)(rep(hp), rep(mp), rep(hn), rep(mn)),
                               4 * J(diag.ches_score)(hp, mp, hn, mn), rtol=1e-5, atol=1e-5)

  def test_all_masked_finite(self):
    hp, mp, hn, mn = _random_hidden(5)
    out = J(diag.normalized_ches_score)(hp, np.zeros_like(mp), hn, np.zeros_like(mn))
    np.testing.assert_allclose(out, 0.0)


class TestBestOfNKlBound:

  def test_hand_values(self):
    # n = 1: log 1 - 0 = 0;  n = 2: log 2 - 1/2 = 0.19315;  n = 4: log 4 - 3/4 = 0.63629.
    f = jax.jit(diag.best_of_n_kl_bound)
    np.testing.assert_allclose([f(1), f(2), f(4)], [0.0, 0.19315, 0.63629], atol=1e-5)

  def test_increasing_in_n(self):
    vals = np.asarray(J(diag.best_of_n_kl_bound)(jnp.arange(1, 65)))
    assert np.all(np.diff(vals) > 0)


class TestBestOfNExact:

  def test_hand_case(self):
    # Uniform over 4 responses, rewards 0 < 1 < 2 < 3, n = 2: F = 1/4, 2/4, 3/4, 1
    # -> pi_bon = (1, 3, 5, 7)/16; KL = sum pi log(4 pi) = 0.17398.
    kl, pi = jax.jit(functools.partial(diag.best_of_n_exact, n=2))(jnp.full(4, 0.25), jnp.arange(4.0))
    np.testing.assert_allclose(pi, np.array([1, 3, 5, 7]) / 16, rtol=1e-6)
    np.testing.assert_allclose(kl, sum(k / 16 * np.log(4 * k / 16) for k in (1, 3, 5, 7)), rtol=1e-5)

  def test_tie_rule(self):
    # rewards [1, 1, 0], uniform: order (idx2, idx0, idx1) -- ties go to the larger index.
    # pi_bon = (4/9 - 1/9, 1 - 4/9, 1/9) = (3/9, 5/9, 1/9).
    _, pi = J(diag.best_of_n_exact)(jnp.full(3, 1 / 3), jnp.array([1.0, 1.0, 0.0]), n=2)
    np.testing.assert_allclose(pi, [3 / 9, 5 / 9, 1 / 9], rtol=1e-5)

  @pytest.mark.parametrize("seed,n", [(0, 2), (1, 5), (2, 16)])
  def test_numpy_reference_and_bound(self, seed, n):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(12))
    r = rng.integers(0, 5, size=12).astype(np.float32)  # many ties
    kl, pi = J(diag.best_of_n_exact)(p.astype(np.float32), r, n=n)
    ref_kl, ref_pi = _np_bon(p, r, n)
    np.testing.assert_allclose(pi, ref_pi, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(kl, ref_kl, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.sum(pi), 1.0, rtol=1e-5)
    assert float(kl) <= float(J(diag.best_of_n_kl_bound)(n)) + 1e-6

  def test_n1_is_reference(self):
    p = np.random.default_rng(3).dirichlet(np.ones(7)).astype(np.float32)
    kl, pi = J(diag.best_of_n_exact)(p, np.arange(7.0)[::-1].copy(), n=1)
    np.testing.assert_allclose(pi, p, rtol=1e-5)
    np.testing.assert_allclose(kl, 0.0, atol=1e-6)

  @pytest.mark.parametrize("n", [2, 4, 8])
  def test_bound_tight_for_large_uniform_support(self, n):
    big = 20000
    r = np.random.default_rng(n).permutation(big).astype(np.float32)  # no ties
    kl, _ = J(diag.best_of_n_exact)(np.full(big, 1 / big, np.float32), r, n=n)
    bound = float(J(diag.best_of_n_kl_bound)(n))
    assert float(kl) <= bound + 1e-4
    np.testing.assert_allclose(kl, bound, rtol=5e-3)

  def test_matches_monte_carlo_best_of_n(self):
    rng = np.random.default_rng(4)
    p = np.array([0.4, 0.25, 0.2, 0.1, 0.05])
    r = np.array([0.0, 1.0, 1.0, 3.0, 2.0])  # responses 1 and 2 tie
    n, m = 3, 200_000
    rank = np.empty(5, int)
    rank[np.lexsort((np.arange(5), r))] = np.arange(5)  # (reward, index) order
    draws = rng.choice(5, size=(m, n), p=p)
    picked = draws[np.arange(m), np.argmax(rank[draws], axis=1)]
    freq = np.bincount(picked, minlength=5) / m
    kl, pi = J(diag.best_of_n_exact)(p.astype(np.float32), r.astype(np.float32), n=n)
    np.testing.assert_allclose(pi, freq, atol=4e-3)
    mc_kl = np.sum(freq * np.log(freq / p))  # plug-in KL of the sampled best-of-n distribution
    np.testing.assert_allclose(kl, mc_kl, atol=5e-3)

  def test_zero_probabilities_and_extreme_rewards(self):
    p = jnp.array([0.0, 0.5, 0.5, 0.0])
    kl, pi = J(diag.best_of_n_exact)(p, jnp.array([1e6, -1e6, 0.0, 5.0]), n=4)
    assert np.isfinite(kl) and np.all(np.isfinite(pi))
    np.testing.assert_allclose(pi, [0.0, 1 / 16, 15 / 16, 0.0], rtol=1e-6)

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
    ches = np.asarray(ches, np.float64)
    assert np.any(ches > 0) and np.any(ches < 0)  # both regimes present
    np.testing.assert_allclose(delta, -eta * beta / 2 * ches, rtol=2e-2, atol=2e-5)
    assert np.all(np.sign(delta[np.abs(ches) > 0.5]) == -np.sign(ches[np.abs(ches) > 0.5]))
