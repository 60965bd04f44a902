"""Tests for rlhf_jax.losses.nash_md."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

import helpers

from rlhf_jax.losses import kl, nash_md

# Asymmetric cyclic preference: A beats B 0.8, B beats C 0.65, C beats A 0.7. P[y, y'] = P(y > y').
CYCLIC = np.array([[0.5, 0.8, 0.3],
                   [0.2, 0.5, 0.65],
                   [0.7, 0.35, 0.5]])
MU = np.array([0.5, 0.3, 0.2])
PI0 = np.array([0.1, 0.2, 0.7])


def _f32(*arrays):
  return [jnp.asarray(a, jnp.float32) for a in arrays]


def _regularised_equilibrium(P, mu, tau, iters=20000, damping=0.02):
  """pi = normalise(mu exp(P pi / tau)) by damped fixed-point iteration in float64."""
  pi = mu.copy()
  for _ in range(iters):
    target = mu * np.exp(P @ pi / tau)
    pi = (1 - damping) * pi + damping * target / target.sum()
  residual = pi - mu * np.exp(P @ pi / tau) / np.sum(mu * np.exp(P @ pi / tau))
  assert np.max(np.abs(residual)) < 1e-10
  return pi


def _nash_lp(P):
  """max v s.t. sum_y pi_y P[y, y'] >= v for all y', pi in the simplex (scipy linprog)."""
  n = P.shape[0]
  c = np.zeros(n + 1)
  c[-1] = -1.0                                           # minimise -v
  A_ub = np.hstack([-P.T, np.ones((n, 1))])              # v - (P^T pi)_y' <= 0
  A_eq = np.hstack([np.ones((1, n)), np.zeros((1, 1))])
  res = optimize.linprog(c, A_ub=A_ub, b_ub=np.zeros(n), A_eq=A_eq, b_eq=[1.0],
                         bounds=[(0, None)] * n + [(None, None)])
  assert res.success
  return res.x[:n], res.x[-1]


class TestGeometricMixtureLogprobs:
  mix = staticmethod(jax.jit(nash_md.geometric_mixture_logprobs, static_argnames="mixture_coef"))

  def test_hand_checked(self):
    # pi = [0.8, 0.2], mu = [0.2, 0.8], alpha 0.5: sqrt(0.8 * 0.2) = 0.4 each -> [0.5, 0.5].
    out = self.mix(jnp.log(jnp.array([0.8, 0.2])), jnp.log(jnp.array([0.2, 0.8])),
                   mixture_coef=0.5)
    np.testing.assert_allclose(jnp.exp(out), [0.5, 0.5], rtol=1e-6)

  def test_matches_numpy_and_is_normalised(self):
    rng = np.random.default_rng(0)
    logits, ref = rng.normal(size=(2, 3, 5)) * 3, rng.normal(size=(2, 3, 5)) * 3
    lsm = lambda z: z - np.log(np.sum(np.exp(z), -1, keepdims=True))
    want = lsm(0.7 * lsm(logits) + 0.3 * lsm(ref))
    got = self.mix(*_f32(logits, ref), mixture_coef=0.3)
    # Three 5-term log-softmaxes and the mix, float32 vs float64, at the logits' size.
    np.testing.assert_allclose(got, want, **helpers.f32_tol(3 * 5 + 2, scale=np.abs(want).max()))
    np.testing.assert_allclose(jnp.sum(jnp.exp(got), -1), 1.0, rtol=1e-6)

  def test_endpoints(self):
    rng = np.random.default_rng(1)
    logits, ref = _f32(rng.normal(size=(2, 4, 6)), rng.normal(size=(2, 4, 6)))
    # The mixture re-normalises a log-softmax: two 6-term log-softmaxes, at the log-probs' size.
    for coef, want in ((0.0, jax.nn.log_softmax(logits)), (1.0, jax.nn.log_softmax(ref))):
      np.testing.assert_allclose(self.mix(logits, ref, mixture_coef=coef), want,
                                 **helpers.f32_tol(2 * 6, scale=np.abs(want).max()))

  def test_extreme_logits_finite_and_shape_error(self):
    logits = jnp.array([[[1e4, -1e4, 0.0]]])
    ref = jnp.array([[[-1e4, 1e4, 0.0]]])
    out = self.mix(logits, ref, mixture_coef=0.5)
    g = jax.grad(lambda x: jnp.sum(self.mix(x, ref, mixture_coef=0.5)[..., 0]))(logits)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(g))
    with pytest.raises(ValueError, match="ref_logits_BxTxV"):
      self.mix(jnp.zeros((1, 2, 3)), jnp.zeros((1, 2, 4)), mixture_coef=0.5)


class TestNashMdPgLoss:

  def test_hand_checked(self):
    # logp = [-1, -2] (sum -3), ref = [-1.5, -2.5]: k1 per token [0.5, 0.5], kl_seq = 1.
    # p = 0.8 -> reward 0.3. loss = -0.3 * (-3) + 0.1 * (1 * (-3) + 1) = 0.9 - 0.2 = 0.7.
    # With baseline 0.1: -0.2 * (-3) - 0.2 = 0.4.
    f = jax.jit(nash_md.nash_md_pg_loss, static_argnames=("nash_tau", "kl_fn"))
    args = (jnp.array([[-1.0, -2.0]]), jnp.array([[-1.5, -2.5]]), jnp.array([0.8]),
            jnp.ones((1, 2)))
    loss, m = f(*args, nash_tau=0.1)
    np.testing.assert_allclose([loss, m["kl_sum"], m["score_sum"]], [0.7, 1.0, 0.3], rtol=1e-6)
    loss_b, _ = f(*args, nash_tau=0.1, baseline_B=jnp.array([0.1]))
    np.testing.assert_allclose(loss_b, 0.4, rtol=1e-6)

  @pytest.mark.parametrize("kl_fn", [kl.k1, kl.k3])
  def test_matches_numpy_reference(self, kl_fn):
    rng = np.random.default_rng(2)
    logp, ref = rng.normal(-2, 0.5, (4, 5)), rng.normal(-2, 0.5, (4, 5))
    pref, mask = rng.uniform(size=4), (np.arange(5) < np.array([[5], [2], [0], [4]]))
    lq = ref - logp
    per_tok = -lq if kl_fn is kl.k1 else np.exp(lq) - 1 - lq
    kl_seq, lp = (per_tok * mask).sum(1), (logp * mask).sum(1)
    want = np.mean(-(pref - 0.5) * lp + 0.05 * (kl_seq * lp + kl_seq))
    loss, m = nash_md.nash_md_pg_loss(*_f32(logp, ref, pref), mask, nash_tau=0.05, kl_fn=kl_fn)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(m["kl_sum"], kl_seq.sum(), rtol=1e-5)

  @pytest.mark.parametrize("kl_fn", [kl.k1, kl.k3])
  def test_expected_gradient_is_exact_objective_gradient(self, kl_fn):
    # Categorical policy, one-token responses. E_{a~pi}[grad loss(a)] computed exactly by summing
    # over the support with weights stop_grad(pi) must equal the gradient of
    # J = -sum_a pi_a (p_a - 1/2) + tau KL(pi || mu); a constant baseline must not change it.
    theta, mu_logits = jnp.array([0.5, -0.3, 1.2, 0.0]), jnp.array([0.0, 0.8, -0.4, 0.3])
    pref, tau = jnp.array([0.9, 0.2, 0.6, 0.4]), 0.3
    log_mu = jax.nn.log_softmax(mu_logits)

    def expected_surrogate(th):
      logp = jax.nn.log_softmax(th)
      per_a = jax.vmap(lambda lp, lm, p: nash_md.nash_md_pg_loss(
          lp[None, None], lm[None, None], p[None], jnp.ones((1, 1)), nash_tau=tau,
          baseline_B=jnp.array([0.15]), kl_fn=kl_fn)[0])(logp, log_mu, pref)
      return jnp.sum(jax.lax.stop_gradient(jnp.exp(logp)) * per_a)

    def exact(th):
      logp = jax.nn.log_softmax(th)
      pi = jnp.exp(logp)
      return -jnp.sum(pi * (pref - 0.5)) + tau * jnp.sum(pi * (logp - log_mu))

    want = jax.grad(exact)(theta)
    assert np.max(np.abs(want)) > 0.05
    np.testing.assert_allclose(jax.grad(expected_surrogate)(theta), want, atol=1e-6)

  def test_extremes_and_all_masked_finite(self):
    logp = jnp.array([[-1e4, 0.0], [0.0, -1e4]])
    ref = jnp.array([[0.0, -1e4], [-1e4, 0.0]])
    for kl_fn in (kl.k1, kl.k3):
      for mask in (jnp.ones((2, 2)), jnp.zeros((2, 2))):
        f = lambda x: nash_md.nash_md_pg_loss(x, ref, jnp.array([1.0, 0.0]), mask,
                                              nash_tau=0.1, kl_fn=kl_fn)[0]
        assert np.isfinite(f(logp)) and np.all(np.isfinite(jax.grad(f)(logp)))

  def test_shape_errors(self):
    with pytest.raises(ValueError, match="preferences_B"):
      nash_md.nash_md_pg_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros(3),
                              jnp.ones((2, 3)), nash_tau=0.1)
    with pytest.raises(ValueError, match="ref_logps_BxT"):
      jax.jit(lambda a, b: nash_md.nash_md_pg_loss(a, b, jnp.zeros(2), jnp.ones((2, 3)),
                                                   nash_tau=0.1))(jnp.zeros((2, 3)),
                                                                  jnp.zeros((2, 4)))


class TestNashMdStep:

  def test_hand_checked(self):
    # pi = mu = uniform, P = [[.5, .7], [.3, .5]], tau = eta = 1: pi_mix uniform, P pi_mix =
    # [0.6, 0.4], pi' ∝ [e^0.6, e^0.4] -> pi'_0 = sigmoid(0.2) = 0.549834.
    out = jax.jit(nash_md.nash_md_step, static_argnames=("nash_tau", "eta"))(
        *_f32([0.5, 0.5], [[0.5, 0.7], [0.3, 0.5]], [0.5, 0.5]), nash_tau=1.0, eta=1.0)
    np.testing.assert_allclose(out, [0.549834, 0.450166], rtol=1e-5)

  def test_matches_numpy_reference(self):
    tau, eta = 0.4, 0.7
    mix = PI0 ** (1 - eta * tau) * MU ** (eta * tau)
    mix /= mix.sum()
    want = mix * np.exp(eta * CYCLIC @ mix)
    out = nash_md.nash_md_step(*_f32(PI0, CYCLIC, MU), nash_tau=tau, eta=eta)
    np.testing.assert_allclose(out, want / want.sum(), rtol=1e-5)

  def test_shape_error(self):
    with pytest.raises(ValueError, match="P_NxN"):
      nash_md.nash_md_step(jnp.ones(3) / 3, jnp.ones((3, 2)), jnp.ones(3) / 3, nash_tau=0.1,
                           eta=0.1)


class TestNashMdTabular:
  run = staticmethod(jax.jit(nash_md.nash_md_tabular,
                             static_argnames=("nash_tau", "eta", "steps")))

  def test_converges_to_regularised_equilibrium_from_non_uniform_start(self):
    tau = 0.5
    want = _regularised_equilibrium(CYCLIC, MU, tau)
    assert np.max(np.abs(want - PI0)) > 0.3 and np.max(np.abs(want - MU)) > 0.02
    got = self.run(*_f32(PI0, CYCLIC, MU), nash_tau=tau, eta=0.02, steps=6000)
    np.testing.assert_allclose(got, want, atol=1e-3)   # fixed-eta bias is O(eta)

  def test_small_tau_approaches_the_linear_programme_nash_equilibrium(self):
    nash, value = _nash_lp(CYCLIC)
    np.testing.assert_allclose(value, 0.5, atol=1e-8)  # symmetric game: value 1/2
    # Closed form for this cycle: pi ∝ (0.15, 0.2, 0.3), the margins of the opposite edges.
    np.testing.assert_allclose(nash, np.array([0.15, 0.2, 0.3]) / 0.65, atol=1e-6)
    got = np.asarray(self.run(*_f32(PI0, CYCLIC, MU), nash_tau=0.003, eta=0.3, steps=30000))
    assert np.max(np.abs(got - nash)) < 0.015
    assert float(nash_md.exploitability(jnp.asarray(got), jnp.asarray(CYCLIC, jnp.float32))) < 5e-3
    assert np.max(np.abs(MU - nash)) > 0.25            # the reference itself is far from Nash

  def test_no_scalar_bradley_terry_reward_fits_the_cycle(self):
    pairs = [(0, 1), (1, 2), (2, 0)]

    def nll(r):
      return -sum(CYCLIC[i, j] * np.log(1 / (1 + np.exp(r[j] - r[i])))
                  + CYCLIC[j, i] * np.log(1 / (1 + np.exp(r[i] - r[j]))) for i, j in pairs)

    r = optimize.minimize(nll, np.zeros(3), method="BFGS").x
    bt = 1 / (1 + np.exp(-(r[:, None] - r[None, :])))
    err = max(abs(bt[i, j] - CYCLIC[i, j]) for i, j in pairs)
    # The ML fit is nearly flat (a cycle has no consistent order): r ~= [0.13, -0.20, 0.07],
    # so it predicts P(A > B) ~= 0.58 against the true 0.8, an error of ~0.217.
    assert err > 0.2, err

  def test_rejects_too_large_step_and_bad_shapes(self):
    with pytest.raises(ValueError, match="eta"):
      nash_md.nash_md_tabular(*_f32(PI0, CYCLIC, MU), nash_tau=2.0, eta=1.0, steps=3)
    with pytest.raises(ValueError, match="mu_N"):
      nash_md.nash_md_tabular(*_f32(PI0, CYCLIC, [0.5, 0.5]), nash_tau=0.1, eta=1.0, steps=3)


class TestExploitability:

  def test_hand_checked(self):
    # Pure A: P(y > A) = column A = [0.5, 0.2, 0.7] -> max 0.7 - 0.5 = 0.2 (C exploits A).
    out = jax.jit(nash_md.exploitability)(*_f32([1.0, 0.0, 0.0], CYCLIC))
    np.testing.assert_allclose(out, 0.2, rtol=1e-6)

  def test_zero_at_nash_and_positive_elsewhere(self):
    nash, _ = _nash_lp(CYCLIC)
    np.testing.assert_allclose(nash_md.exploitability(*_f32(nash, CYCLIC)), 0.0, atol=1e-6)
    rng = np.random.default_rng(3)
    for pi in rng.dirichlet(np.ones(3), size=20):
      want = np.max(CYCLIC @ pi) - 0.5
      got = float(nash_md.exploitability(*_f32(pi, CYCLIC)))
      assert got > 0 and abs(got - want) < 1e-6

  def test_shape_error(self):
    with pytest.raises(ValueError, match="P_NxN"):
      nash_md.exploitability(jnp.ones(3) / 3, jnp.ones((2, 2)))
