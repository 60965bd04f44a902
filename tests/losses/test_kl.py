"""Tests for rlhf_jax.losses.kl: values, unbiasedness, and gradients as losses."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers

from rlhf_jax.losses import kl

ESTIMATORS = (kl.k1, kl.k2, kl.k3)


def _random_logps(seed, shape=(3, 7)):
  rng = np.random.default_rng(seed)
  return (np.log(rng.uniform(0.01, 1.0, shape)).astype(np.float32),
          np.log(rng.uniform(0.01, 1.0, shape)).astype(np.float32))


def _exact_expected_grad(estimator, theta, ref_logits):
  """E_{a~pi}[grad_theta k(a)] with a held fixed: sum over the support, weights stop_grad(pi)."""
  def surrogate(th):
    logp = jax.nn.log_softmax(th)
    ref = jax.nn.log_softmax(ref_logits)
    return jnp.sum(jax.lax.stop_gradient(jnp.exp(logp)) * estimator(logp, ref))
  return jax.grad(surrogate)(theta)


def _kl(p_logits, q_logits):
  logp, logq = jax.nn.log_softmax(p_logits), jax.nn.log_softmax(q_logits)
  return jnp.sum(jnp.exp(logp) * (logp - logq))


class _Common:
  fn = None

  def test_policy_equals_reference_gives_zero(self):
    logps, _ = _random_logps(0)
    np.testing.assert_array_equal(jax.jit(type(self).fn)(logps, logps), np.zeros_like(logps))

  def test_shape_mismatch_raises_at_trace_time(self):
    with pytest.raises(ValueError, match="logps_BxT.*ref_logps_BxT"):
      jax.jit(type(self).fn)(jnp.zeros((2, 3)), jnp.zeros((2, 4)))

  def test_extreme_logps_are_finite(self):
    logps = jnp.array([[-1e4, 0.0, -1e4], [0.0, -1e4, -5.0]])
    ref = jnp.array([[0.0, -1e4, -1e4], [-1e4, 0.0, -1e4]])
    out = jax.jit(type(self).fn)(logps, ref)
    g = jax.grad(lambda x: jnp.sum(type(self).fn(x, ref)))(logps)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(g))


class TestK1(_Common):
  fn = staticmethod(kl.k1)

  def test_hand_checked(self):
    # pi(a) = 0.5, pi_ref(a) = 0.25: log q = log 0.5 = -0.693147; k1 = -log q = 0.693147.
    out = kl.k1(jnp.log(jnp.array([0.5])), jnp.log(jnp.array([0.25])))
    np.testing.assert_allclose(out, [0.693147], rtol=1e-5)  # the constant is given to 6 decimals

  def test_matches_numpy_reference(self):
    logps, ref = _random_logps(1)
    # One correctly rounded float32 subtraction: relative error <= u, even where it cancels.
    np.testing.assert_allclose(jax.jit(kl.k1)(logps, ref),
                               logps.astype(np.float64) - ref.astype(np.float64),
                               **helpers.f32_tol(1))

  def test_expected_gradient_is_zero_on_policy(self):
    theta, ref = jnp.array([0.3, -1.0, 2.0, 0.1]), jnp.array([1.0, 0.0, -0.5, 0.2])
    # float32 log-softmax, expectation and its gradient over 4 actions (as below), summing
    # terms pi_a (e_a - pi) of size <= 1 to 0.
    np.testing.assert_allclose(_exact_expected_grad(kl.k1, theta, ref), 0.0, **helpers.f32_tol(3 * 4))


class TestK2(_Common):
  fn = staticmethod(kl.k2)

  def test_hand_checked(self):
    # log q = log(0.25 / 0.5) = -0.693147; k2 = 0.5 * 0.480453 = 0.240227.
    out = kl.k2(jnp.log(jnp.array([0.5])), jnp.log(jnp.array([0.25])))
    np.testing.assert_allclose(out, [0.240227], rtol=1e-5)  # the constant is given to 6 decimals

  def test_matches_numpy_reference(self):
    logps, ref = _random_logps(2)
    lq = ref.astype(np.float64) - logps.astype(np.float64)
    # A subtraction (relative u), a square (2u + u), an exact halving: relative.
    np.testing.assert_allclose(jax.jit(kl.k2)(logps, ref), 0.5 * lq**2, **helpers.f32_tol(3))

  def test_on_policy_gradient_equals_grad_of_forward_kl(self):
    theta, ref = jnp.array([0.3, -1.0, 2.0, 0.1]), jnp.array([1.0, 0.0, -0.5, 0.2])
    got = _exact_expected_grad(kl.k2, theta, ref)
    want = jax.grad(lambda th: _kl(th, ref))(theta)          # grad KL(pi || pi_ref)
    assert np.max(np.abs(want)) > 0.1
    # Both float32 over the 4 actions: log-softmax, expectation and its gradient, 4 terms each,
    # at the gradient's size (helpers.f32_tol).
    np.testing.assert_allclose(got, want, **helpers.f32_tol(3 * 4, scale=np.abs(want).max()))


class TestK3(_Common):
  fn = staticmethod(kl.k3)

  def test_hand_checked(self):
    # q = 0.25 / 0.5 = 0.5; k3 = (0.5 - 1) - log 0.5 = -0.5 + 0.693147 = 0.193147.
    out = kl.k3(jnp.log(jnp.array([0.5])), jnp.log(jnp.array([0.25])))
    np.testing.assert_allclose(out, [0.193147], rtol=1e-5)  # the constant is given to 6 decimals

  def test_matches_numpy_reference(self):
    logps, ref = _random_logps(3)
    q = np.exp(ref.astype(np.float64)) / np.exp(logps.astype(np.float64))
    # expm1(lq) - lq cancels near lq = 0 (k3 ~ lq^2 / 2): lq's rounding, expm1's and the
    # subtraction's are each <= u at the size |lq| + |expm1(lq)| of the terms, element by
    # element: f32_tol(3) per element at that scale.
    lq = np.log(q)
    err = (np.asarray(jax.jit(kl.k3)(logps, ref), np.float64) - ((q - 1) - lq)) / (np.abs(lq) + np.abs(q - 1))
    np.testing.assert_allclose(err, 0.0, rtol=0, atol=helpers.f32_tol(3)["atol"])

  def test_non_negative(self):
    rng = np.random.default_rng(4)
    logps = rng.uniform(-60, 0, (50, 20)).astype(np.float32)
    ref = rng.uniform(-60, 0, (50, 20)).astype(np.float32)
    assert np.all(np.asarray(kl.k3(logps, ref)) >= 0)

  def test_clamp_bounds_the_value(self):
    # log q = -1e4 clamps to -20: k3 = exp(-20) - 1 + 20 ~= 19; log q = +1e4 -> exp(20) - 21.
    out = kl.k3(jnp.array([0.0, -1e4]), jnp.array([-1e4, 0.0]))
    # expm1 and the subtraction, no cancellation at |lq| = 20 (+ the clamp constant's rounding).
    np.testing.assert_allclose(out, [np.exp(-20.0) + 19.0, np.exp(20.0) - 21.0], **helpers.f32_tol(3))

  def test_unbiased_monte_carlo(self):
    pi_logits, ref_logits = jnp.array([1.0, 0.2, -0.5, 0.0, 0.7]), jnp.array([0.0, 1.0, 0.3, -1.0, 0.0])
    a = jax.random.categorical(jax.random.key(0), pi_logits, shape=(200_000,))
    logp = jax.nn.log_softmax(pi_logits)[a]
    ref = jax.nn.log_softmax(ref_logits)[a]
    samples = np.asarray(kl.k3(logp, ref), np.float64)
    exact = float(_kl(pi_logits, ref_logits))
    stderr = samples.std() / np.sqrt(samples.size)
    assert exact > 0.1
    assert abs(samples.mean() - exact) < 4 * stderr

  def test_on_policy_gradient_equals_grad_of_reverse_kl(self):
    theta, ref = jnp.array([0.3, -1.0, 2.0, 0.1]), jnp.array([1.0, 0.0, -0.5, 0.2])
    got = _exact_expected_grad(kl.k3, theta, ref)
    want = jax.grad(lambda th: _kl(ref, th))(theta)          # grad KL(pi_ref || pi)
    forward = jax.grad(lambda th: _kl(th, ref))(theta)
    np.testing.assert_allclose(got, want, **helpers.f32_tol(3 * 4, scale=np.abs(want).max()))
    assert np.max(np.abs(got - forward)) > 0.05              # and not the forward KL's gradient

  def test_grad_matches_finite_differences(self):
    with jax.enable_x64(True):
      logps = jnp.array([-1.0, -2.5, -0.3], jnp.float64)
      ref = jnp.array([-1.5, -0.5, -0.3], jnp.float64)
      f = jax.jit(lambda x: jnp.sum(kl.k3(x, ref)))
      g, h = jax.grad(f)(logps), 1e-6
      fd = [(f(logps.at[i].add(h)) - f(logps.at[i].add(-h))) / (2 * h) for i in range(3)]
      # float64 gradient vs a float64 central difference, h = 1e-6: the difference's error
      # ~h^2·|f'''| + eps64/h ~ 1e-10 is what these bounds cover (not a float32 tolerance).
      np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-9)
