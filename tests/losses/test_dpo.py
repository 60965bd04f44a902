"""Tests for rlhf_jax.losses.dpo: DPO (+ label smoothing), IPO, KTO."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses import dpo

import helpers
from jitted import G, J, fd_grad


def _log_sigmoid(z):
  return -np.logaddexp(0.0, -z)


def _np_dpo(pw, pl, rw, rl, beta, eps=0.0):
  z = beta * ((pw - rw) - (pl - rl))
  return np.mean(-(1 - eps) * _log_sigmoid(z) - eps * _log_sigmoid(-z))


def _np_ipo(pw, pl, rw, rl, tau):
  return np.mean(((pw - rw) - (pl - rl) - 1 / (2 * tau)) ** 2)


def _np_kto(p, r, good, kl, beta, lam_d, lam_u):
  z0 = max(0.0, np.mean(kl))
  rho = p - r
  sig = lambda x: 1 / (1 + np.exp(-x))
  v = np.where(good, lam_d * sig(beta * (rho - z0)), lam_u * sig(beta * (z0 - rho)))
  return np.mean(np.where(good, lam_d, lam_u) - v)


def _zscale(beta, *logps):
  """Size of the terms of beta·((pw - rw) - (pl - rl)): its float32 rounding is within
  a few eps of this, and a log-sigmoid or sigmoid moves by at most as much (slope <= 1)."""
  return beta * float(np.max(sum(np.abs(np.asarray(x, np.float64)) for x in logps)))


def _pairs(seed, b=5):
  rng = np.random.default_rng(seed)
  return [(-rng.exponential(20.0, size=b)).astype(np.float32) for _ in range(4)]


class TestDpoLoss:

  def test_hand_case(self):
    # rho_w = -1 - (-2) = 1, rho_l = -3 - (-2) = -1, h = 2, beta = 0.5 -> beta h = 1.
    # loss = -log s(1) = log(1 + e^-1) = 0.31326; rewards 0.5 / -0.5; margin 1.
    loss, m = jax.jit(functools.partial(dpo.dpo_loss, beta=0.5))(
        jnp.array([-1.0]), jnp.array([-3.0]), jnp.array([-2.0]), jnp.array([-2.0]))
    np.testing.assert_allclose(loss, 0.31326, atol=1e-5)  # the constant is given to 5 decimals
    # Integer log-prob differences times 0.5: exact in float32.
    np.testing.assert_array_equal([m["rewards/chosen_sum"], m["rewards/rejected_sum"],
                                   m["rewards/margins_sum"], m["rewards/accuracies_sum"]],
                                  [0.5, -0.5, 1.0, 1.0])
    np.testing.assert_allclose([m["logps/chosen_sum"], m["logps/rejected_sum"]], [-1.0, -3.0])

  def test_step0_invariant(self):
    # policy == reference: h = 0 -> loss = -log s(0) = log 2 for every beta and eps.
    pw, pl, _, _ = _pairs(1)
    for eps in (0.0, 0.2):
      loss, m = J(dpo.dpo_loss)(pw, pl, pw, pl, beta=0.1, label_smoothing=eps)
      # h = 0 exactly; two log-sigmoids (3 roundings each), the smoothing mix (3), the B-term
      # mean of equal positive terms (B + 1).
      np.testing.assert_allclose(loss, np.log(2.0), **helpers.f32_tol(2 * 3 + 3 + len(pw) + 1))
      assert float(m["rewards/chosen_sum"]) == 0 and float(m["rewards/rejected_sum"]) == 0
      assert float(m["rewards/accuracies_sum"]) == 0

  @pytest.mark.parametrize("eps", [0.0, 0.1, 0.5])
  def test_numpy_reference(self, eps):
    pw, pl, rw, rl = _pairs(2)
    loss, m = jax.jit(functools.partial(dpo.dpo_loss, beta=0.1, label_smoothing=eps))(pw, pl, rw, rl)
    # Per pair: h (3 subtractions, at the log-probs' size: atol), beta·h, two log-sigmoids
    # (3 each), the smoothing mix (3); then the B-term mean of positive terms.
    b = len(pw)
    np.testing.assert_allclose(loss, _np_dpo(*map(np.float64, (pw, pl, rw, rl)), 0.1, eps),
                               **helpers.f32_tol(4 + 2 * 3 + 3 + b + 1,
                                                 scale=_zscale(0.1, pw, pl, rw, rl)))
    # Two evaluations (jnp.mean vs sum / count) of the same B positive terms.
    np.testing.assert_allclose(m["loss_sum"] / m["count"], loss, **helpers.f32_tol(b + 2))
    r_w, r_l = 0.1 * (pw - rw), 0.1 * (pl - rl)
    # Both float32: per pair 2 subtractions, 2 products and a difference, then a B-term sum
    # that may cancel: f32_tol(B + 5) at the sum of the terms' sizes.
    np.testing.assert_allclose(m["rewards/margins_sum"], np.sum(r_w - r_l),
                               **helpers.f32_tol(b + 5, scale=b * _zscale(0.1, pw, pl, rw, rl)))
    assert float(m["rewards/accuracies_sum"]) == float(np.sum(r_w > r_l))

  def test_label_smoothing_half_is_symmetric(self):
    pw, pl, rw, rl = _pairs(3)
    a, _ = J(dpo.dpo_loss)(pw, pl, rw, rl, beta=0.3, label_smoothing=0.5)
    b, _ = J(dpo.dpo_loss)(pl, pw, rl, rw, beta=0.3, label_smoothing=0.5)
    # Swapping negates h exactly and commutes the smoothing mix: the same B positive terms,
    # the mean maybe summed in another order: f32_tol(B + 1).
    np.testing.assert_allclose(a, b, **helpers.f32_tol(len(pw) + 1))

  def test_grad_closed_form_wrt_sequence_logps(self):
    # dL/dlogpi(y_w) = -beta/B s(r_hat_l - r_hat_w); dL/dlogpi(y_l) = +beta/B s(...).
    pw, pl, rw, rl = _pairs(4)
    beta = 0.2
    gw, gl = G(lambda a, b: J(dpo.dpo_loss)(a, b, rw, rl, beta=beta)[0], argnums=(0, 1))(pw, pl)
    s = 1 / (1 + np.exp(-(beta * ((pl - rl) - (pw - rw))).astype(np.float64)))
    # float32 gradient: h (3 subtractions, 1 rounding of beta·h, at _zscale: the sigmoid moves
    # by <= that), the sigmoid (4), beta / B (2), at the gradient's size beta / B.
    tol = helpers.f32_tol(4 + 4 + 2, scale=beta / len(pw) * (1 + _zscale(beta, pw, pl, rw, rl)))
    np.testing.assert_allclose(gw, -beta * s / len(pw), **tol)
    np.testing.assert_allclose(gl, beta * s / len(pw), **tol)
    # vs a float64 central difference (its error ~h^2 + eps64/h ~ 1e-10): as above, + the
    # smoothing mix of two sigmoids (4 + 3).
    fd = fd_grad(lambda a: _np_dpo(a, pl, rw, rl, beta, 0.1), pw)
    g_ls = G(lambda a: J(dpo.dpo_loss)(a, pl, rw, rl, beta=beta, label_smoothing=0.1)[0])(pw)
    np.testing.assert_allclose(g_ls, fd, **helpers.f32_tol(4 + 4 + 2 + 7,
                                                          scale=beta / len(pw) * (1 + _zscale(beta, pw, pl, rw, rl))))

  def test_grad_through_tabular_policy_matches_closed_form(self):
    # Linear-softmax policy over N responses: log pi(y) = theta . phi(y) - logsumexp.
    rng = np.random.default_rng(5)
    n, d, beta = 6, 3, 0.5
    phi = rng.normal(size=(n, d)).astype(np.float32)
    theta = rng.normal(size=d).astype(np.float32)
    ref_logp = jax.nn.log_softmax(jnp.asarray(rng.normal(size=n), jnp.float32))
    w, l = np.array([0, 1, 2, 3]), np.array([4, 5, 0, 1])

    def logp(t):
      return jax.nn.log_softmax(phi @ t)

    def loss(t):
      lp = logp(t)
      return J(dpo.dpo_loss)(lp[w], lp[l], ref_logp[w], ref_logp[l], beta=beta)[0]

    g = G(loss)(theta)
    lp, pi = np.asarray(logp(theta), np.float64), np.exp(np.asarray(logp(theta), np.float64))
    grad_logp = phi - pi @ phi  # grad_theta log pi(y) = phi(y) - E_pi[phi]
    rhat = beta * (lp - np.asarray(ref_logp, np.float64))
    s = 1 / (1 + np.exp(-(rhat[l] - rhat[w])))
    closed = -beta * np.mean(s[:, None] * (grad_logp[w] - grad_logp[l]), axis=0)
    # float32 backprop: phi @ theta (d terms), log-softmax and its backward (N-term sums, 2),
    # the DPO sigmoids (~10), the 4-pair mean, phi^T (N-term sum); the closed form is a mean of
    # differences that may cancel: atol at beta · max|phi(y) - E phi| <= beta · 2 max|phi|.
    np.testing.assert_allclose(g, closed, **helpers.f32_tol(d + 2 * n + 10 + 4 + n,
                                                           scale=beta * 2 * np.abs(phi).max()))

  def test_likelihood_displacement(self):
    # phi_w and phi_l nearly aligned; a third response y3 has feature (0, -1). The DPO step
    # moves theta along +(phi_w - phi_l) = (0, -0.2): y_l's logit falls by 0.2 per unit, y_w's
    # stays, y3's rises by 1. So pi(y3) takes mass and log pi(y_w) FALLS while the loss falls:
    # d log pi(y_w) ∝ (phi_w - E_pi phi) . (phi_w - phi_l) = (1/3, 0.267) . (0, -0.2) < 0.
    phi = jnp.array([[1.0, 0.0], [1.0, 0.2], [0.0, -1.0]])
    ref_logp = jax.nn.log_softmax(jnp.zeros(3))

    def loss_and_logpw(t):
      lp = jax.nn.log_softmax(phi @ t)
      return J(dpo.dpo_loss)(lp[:1], lp[1:2], ref_logp[:1], ref_logp[1:2], beta=1.0)[0], lp[0]

    step = jax.jit(lambda t: t - 1.0 * G(lambda x: loss_and_logpw(x)[0])(t))
    theta = jnp.zeros(2)
    losses, logpw = [], []
    for _ in range(6):
      l, lw = loss_and_logpw(theta)
      losses.append(float(l))
      logpw.append(float(lw))
      theta = step(theta)
    assert np.all(np.diff(losses) < 0), losses       # the DPO loss falls every step
    assert np.all(np.diff(logpw) < 0), logpw         # ... and so does log pi(y_w)
    assert logpw[-1] < np.log(1 / 3) - 0.05

  def test_extreme_inputs_finite(self):
    big = jnp.array([-1e4, 0.0])
    loss, m = jax.jit(functools.partial(dpo.dpo_loss, beta=1.0, label_smoothing=0.1))(
        big, -big - 1e4, jnp.zeros(2), jnp.zeros(2))
    g = G(lambda a: J(dpo.dpo_loss)(a, -big - 1e4, jnp.zeros(2), jnp.zeros(2), beta=1.0)[0])(big)
    assert np.isfinite(loss) and np.all(np.isfinite(g))
    assert all(np.isfinite(v) for v in m.values())

  def test_errors(self):
    z = jnp.zeros(3)
    with pytest.raises(ValueError, match="beta must be > 0"):
      J(dpo.dpo_loss)(z, z, z, z, beta=0.0)
    with pytest.raises(ValueError, match="beta must be > 0"):
      J(dpo.dpo_loss)(z, z, z, z, beta=-0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
      J(dpo.dpo_loss)(z, z, z, z, beta=0.1, label_smoothing=0.7)
    with pytest.raises(ValueError, match="ref_rejected_logps_B"):
      jax.jit(functools.partial(dpo.dpo_loss, beta=0.1))(z, z, z, jnp.zeros(4))


class TestIpoLoss:

  def test_hand_case_and_step0(self):
    # ipo_tau = 0.25 -> target 1/(2 tau) = 2. h = 1 - (-1) = 2 -> loss 0.
    # step 0 (h = 0): loss = (1/(2 tau))^2 = 4.
    f = jax.jit(functools.partial(dpo.ipo_loss, ipo_tau=0.25))
    loss, m = f(jnp.array([-1.0]), jnp.array([-3.0]), jnp.array([-2.0]), jnp.array([-2.0]))
    np.testing.assert_array_equal(loss, 0.0)  # small integers: (2 - 1 / (2 * 0.25))^2 is exact
    np.testing.assert_allclose(m["rewards/margins_sum"], 2.0)
    pw, pl, _, _ = _pairs(0)
    # h = 0 and (0 - 2)^2 = 4 exactly, the 5-term sum 20 exactly; one divide (maybe by a
    # multiply with a rounded 1/B).
    np.testing.assert_allclose(f(pw, pl, pw, pl)[0], 4.0, **helpers.f32_tol(2))

  @pytest.mark.parametrize("tau", [0.1, 1.0])
  def test_numpy_reference_and_grad(self, tau):
    pw, pl, rw, rl = (x / 20 for x in _pairs(6))
    loss, m = J(dpo.ipo_loss)(pw, pl, rw, rl, ipo_tau=tau)
    # Per pair: h - 1/(2 tau) (4 roundings at the log-probs' size z), squared: the square moves
    # by 2·|h - c|·z·eps per rounding; then the B-term mean of positive terms.
    b, z = len(pw), _zscale(1.0, pw, pl, rw, rl)
    hc = np.abs((pw - rw) - (pl - rl) - 1 / (2 * tau)).max()
    np.testing.assert_allclose(loss, _np_ipo(*map(np.float64, (pw, pl, rw, rl)), tau),
                               **helpers.f32_tol(4 + 1 + b + 1, scale=2 * hc * (z + 1 / (2 * tau))))
    np.testing.assert_allclose(m["loss_sum"] / m["count"], loss, **helpers.f32_tol(b + 2))
    g = G(lambda a: J(dpo.ipo_loss)(a, pl, rw, rl, ipo_tau=tau)[0])(pw)
    # float32 gradient 2 (h - c) / B vs a float64 central difference (error ~1e-10): h - c is
    # 4 roundings at its terms' size, may cancel; the products by 2 / B: 2 more.
    fd = fd_grad(lambda a: _np_ipo(a, pl, rw, rl, tau), pw)
    np.testing.assert_allclose(g, fd, **helpers.f32_tol(4 + 2, scale=2 / b * (z + 1 / (2 * tau))))

  def test_minimum_at_target_margin(self):
    # The loss is minimised (zero, zero gradient) exactly at h = 1/(2 tau).
    rw, rl, pl = jnp.zeros(1), jnp.zeros(1), jnp.zeros(1)
    g = G(lambda a: J(dpo.ipo_loss)(a, pl, rw, rl, ipo_tau=0.5)[0])(jnp.ones(1))
    np.testing.assert_array_equal(g, 0.0)  # h - 1/(2 tau) = 1 - 1 is exactly 0

  def test_extreme_and_errors(self):
    loss, _ = J(dpo.ipo_loss)(jnp.array([-1e4]), jnp.array([0.0]), jnp.array([0.0]), jnp.array([-1e4]),
                           ipo_tau=0.1)
    assert np.isfinite(loss)
    z = jnp.zeros(2)
    with pytest.raises(ValueError, match="ipo_tau"):
      J(dpo.ipo_loss)(z, z, z, z, ipo_tau=0.0)
    with pytest.raises(ValueError, match="policy_rejected_logps_B"):
      J(dpo.ipo_loss)(z, jnp.zeros(3), z, z, ipo_tau=0.1)


class TestKtoLoss:

  def test_hand_case_and_step0(self):
    # Step 0 (r = 0, z0 = 0): desirable -> lambda_D - lambda_D s(0) = lambda_D/2.
    # lambda_D = 1, lambda_U = 2, one of each: loss = (0.5 + 1.0) / 2 = 0.75.
    f = jax.jit(functools.partial(dpo.kto_loss, beta=0.1, desirable_weight=1.0, undesirable_weight=2.0))
    p = jnp.array([-5.0, -7.0])
    loss, m = f(p, p, jnp.array([True, False]), jnp.zeros(3))
    # Two sigmoids of 0 (4 roundings each), the weights and lambda - v (2 each), a 2-term sum
    # and a divide.
    np.testing.assert_allclose(loss, 0.75, **helpers.f32_tol(2 * (4 + 2) + 2))
    assert float(m["chosen_count"]) == 1 and float(m["rejected_count"]) == 1
    # Hand case: r = 2, beta = 0.5, kl mean = -1 -> z0 clamped to 0;
    # desirable loss = 1 - s(1) = 1 - 0.73106 = 0.26894.
    loss2, _ = J(dpo.kto_loss)(jnp.array([0.0]), jnp.array([-2.0]), jnp.array([1]), jnp.array([-1.0]),
                            beta=0.5)
    np.testing.assert_allclose(loss2, 0.26894, atol=1e-5)  # the constant is given to 5 decimals

  @pytest.mark.parametrize("seed", [0, 1])
  def test_numpy_reference(self, seed):
    rng = np.random.default_rng(seed)
    p, r = (-rng.exponential(5.0, size=(2, 6))).astype(np.float32)
    good = rng.random(6) < 0.5
    kl = rng.normal(0.5, 1.0, size=4).astype(np.float32)
    loss, m = J(dpo.kto_loss)(p, r, good, kl, beta=0.2, desirable_weight=1.0, undesirable_weight=1.5)
    ref = _np_kto(*map(np.float64, (p, r)), good, kl.astype(np.float64), 0.2, 1.0, 1.5)
    # Per example: rho = p - r and rho - z0 (z0: an M-term mean, M + 1), beta·, a sigmoid (4),
    # lambda·, lambda - v (may cancel); the argument's roundings, at beta·(|p| + |r| + |kl|),
    # move v by <= lambda_max/4 of them; then the B-term mean of positive terms.
    b, mm = len(p), len(kl)
    zs = 0.2 * (np.max(np.abs(p) + np.abs(r)) + np.abs(kl).max())
    np.testing.assert_allclose(loss, ref, **helpers.f32_tol(2 + mm + 1 + 1 + 4 + 2 + b + 1,
                                                          scale=1.5 * (1 + zs)))
    np.testing.assert_allclose(m["loss_sum"] / m["count"], loss, **helpers.f32_tol(b + 2))
    # float32 both: an M-term sum that may cancel and a divide, at the log-ratios' size.
    np.testing.assert_allclose(m["kl_sum"] / m["kl_count"], kl.mean(),
                               **helpers.f32_tol(2 * (mm + 1), scale=np.abs(kl).max()))

  def test_z0_has_no_gradient_and_grad_matches_fd(self):
    rng = np.random.default_rng(2)
    p, r = (-rng.exponential(5.0, size=(2, 4))).astype(np.float32)
    good = np.array([True, False, True, False])
    kl = np.array([0.5, 1.0], np.float32)
    g_kl = G(lambda k: J(dpo.kto_loss)(p, r, good, k, beta=0.5)[0])(kl)
    np.testing.assert_allclose(g_kl, 0.0)
    g = G(lambda a: J(dpo.kto_loss)(a, r, good, kl, beta=0.5)[0])(p)
    fd = fd_grad(lambda a: _np_kto(a, r, good, kl, 0.5, 1.0, 1.0), p)
    # float32 gradient -lambda·beta·s'(x)/B vs a float64 central difference (error ~1e-10):
    # the argument x (as in test_numpy_reference) moves s' by <= its error (|s''| <= |s'|),
    # s' itself ~6 roundings, lambda·beta / B 3: at the gradient's size.
    zs = 0.5 * (np.max(np.abs(p) + np.abs(r)) + np.abs(kl).max())
    np.testing.assert_allclose(g, fd, **helpers.f32_tol(2 + len(kl) + 1 + 1 + 6 + 3,
                                                      scale=np.abs(fd).max() * (1 + zs)))

  def test_z0_clamped_at_zero(self):
    p, r, good = jnp.array([-1.0]), jnp.array([-2.0]), jnp.array([True])
    a, _ = J(dpo.kto_loss)(p, r, good, jnp.array([-5.0]), beta=1.0)
    b, _ = J(dpo.kto_loss)(p, r, good, jnp.array([0.0]), beta=1.0)
    c, _ = J(dpo.kto_loss)(p, r, good, jnp.array([1.0]), beta=1.0)
    np.testing.assert_allclose(a, b)
    assert c > b  # a positive reference point raises the desirable loss

  def test_extreme_and_errors(self):
    loss, _ = J(dpo.kto_loss)(jnp.array([-1e4, 0.0]), jnp.array([0.0, -1e4]), jnp.array([1, 0]),
                           jnp.array([1e4]), beta=1.0)
    assert np.isfinite(loss)
    z = jnp.zeros(2)
    with pytest.raises(ValueError, match="beta must be > 0"):
      J(dpo.kto_loss)(z, z, z, z, beta=0.0)
    with pytest.raises(ValueError, match="desirable_weight"):
      J(dpo.kto_loss)(z, z, z, z, beta=0.1, desirable_weight=-1.0)
    with pytest.raises(ValueError, match="desirable_B"):
      jax.jit(functools.partial(dpo.kto_loss, beta=0.1))(z, z, jnp.zeros(3), z)
