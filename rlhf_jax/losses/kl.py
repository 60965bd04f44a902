"""Per-token KL estimators k1, k2, k3 (Schulman 2020, "Approximating KL Divergence").

With a ~ pi (the policy that sampled the tokens) and the log-ratio log q = log pi_ref(a) - log pi(a):

  k1 = -log q                  unbiased for KL(pi || pi_ref), can be negative
  k2 = 0.5 (log q)^2           biased, always >= 0, low variance
  k3 = (q - 1) - log q         unbiased for KL(pi || pi_ref), always >= 0

As VALUES all three estimate KL(pi || pi_ref). As differentiated LOSSES (a held fixed, on-policy)
they differ: E_pi[grad k1] = 0, E_pi[grad k2] = grad KL(pi || pi_ref) and
E_pi[grad k3] = grad KL(pi_ref || pi) (k3 is GRPO's D term; Shao 2024).

k3 exponentiates log q: the log-ratio is clamped to [-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP] (= +-20)
first, so log-probs like -1e4 give finite values; inside the clamp range k3 is exact, outside it
the value saturates and the gradient is zero. k1 and k2 need no clamp.

These are pure helpers: they return per-token arrays (any shape, the two inputs must match);
the caller masks and reduces.
"""
import jax.numpy as jnp

from rlhf_jax.losses import _shapes

LOG_RATIO_CLAMP = 20.0


def log_ratio(logps_BxT, ref_logps_BxT):
  """log q = log pi_ref - log pi per token. Shapes must match (checked at trace time)."""
  _shapes.check_same_shape(logps_BxT=logps_BxT, ref_logps_BxT=ref_logps_BxT)
  return ref_logps_BxT - logps_BxT


def k1(logps_BxT, ref_logps_BxT):
  """k1 = -log q = log pi(a) - log pi_ref(a) per token (Schulman 2020)."""
  return -log_ratio(logps_BxT, ref_logps_BxT)


def k2(logps_BxT, ref_logps_BxT):
  """k2 = 0.5 (log q)^2 per token (Schulman 2020)."""
  return 0.5 * jnp.square(log_ratio(logps_BxT, ref_logps_BxT))


def k3(logps_BxT, ref_logps_BxT, *, clamp: float = LOG_RATIO_CLAMP):
  """k3 = exp(log q) - 1 - log q per token, log q clamped to [-clamp, clamp] (Schulman 2020).

  Non-negative for every input (exp(x) - 1 - x >= 0), including after clamping.
  """
  lq = jnp.clip(log_ratio(logps_BxT, ref_logps_BxT), -clamp, clamp)
  return jnp.expm1(lq) - lq
