"""Nash learning from human feedback (Munos et al. 2024): Nash-MD, tabular and deep (PG) forms.

Token-level geometric mixture (Nash-MD-PG's pi_mix), with alpha = eta * tau = mixture_coef:
  log pi_mix(. | s) = log_softmax((1 - alpha) log_softmax(logits) + alpha log_softmax(ref_logits))

Nash-MD-PG loss, one response y ~ pi_theta per row and an opponent y' ~ pi_mix, with the
preference p = P(y > y' | x) from a preference model, per-sequence reward p - 1/2 (minus an
optional baseline), and a KL(pi_theta || mu) penalty estimated per token by kl_fn (kl.k1 or
kl.k3), kl_seq = sum_t kl_fn(logp_t, ref_logp_t):
  loss_i = -sg(p_i - 1/2 - b_i) logp_seq_i + nash_tau (sg(kl_seq_i) logp_seq_i + kl_seq_i)
The KL enters both through the score function and pathwise, so on-policy the expected gradient
is exactly grad [ -E_{y~pi}(P(y > pi_mix) - 1/2) + nash_tau KL(pi || mu) ] for k1 and k3
alike (both are unbiased for KL(pi || mu); the test checks this exactly on a categorical).
Returns (loss, metrics): loss = mean over sequences (or / normaliser); metrics are sums:
  policy_loss_sum (per-sequence loss summed), score_sum (sum of p - 1/2), kl_sum (sum of
  kl_seq), count (sequences), token_count.

Tabular Nash-MD on a finite response set (N responses), P_NxN[y, y'] = P(y > y'),
P + P^T = 1, reference mu_N, regularisation nash_tau, step size eta (eta * nash_tau <= 1):
  pi_mix  ∝ pi_t^(1 - eta tau) mu^(eta tau)
  pi_t+1 ∝ pi_mix exp(eta P(y > pi_mix)),     P(y > pi) = (P @ pi)_y
It converges to the regularised equilibrium pi*_tau ∝ mu exp(P(y > pi*_tau) / tau) as eta -> 0
(with a fixed eta the limit is within O(eta) of it). exploitability(pi) = max_y P(y > pi) - 1/2,
0 exactly at the (unregularised) Nash equilibrium of the symmetric game.
"""
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from rlhf_jax.losses import _shapes, kl


def geometric_mixture_logprobs(logits_BxTxV, ref_logits_BxTxV, *, mixture_coef):
  """Token-level geometric mixture log pi_mix ∝ (1 - a) log pi + a log mu, renormalised.

  a = mixture_coef = eta * nash_tau in [0, 1]; a = 0 gives pi, a = 1 gives mu. Any matching
  shapes with the vocabulary last. Returns normalised log-probs of the same shape.
  """
  _shapes.check_same_shape(logits_BxTxV=logits_BxTxV, ref_logits_BxTxV=ref_logits_BxTxV)
  mixed = ((1.0 - mixture_coef) * jax.nn.log_softmax(logits_BxTxV, axis=-1)
           + mixture_coef * jax.nn.log_softmax(ref_logits_BxTxV, axis=-1))
  return jax.nn.log_softmax(mixed, axis=-1)


def nash_md_pg_loss(logps_BxT, ref_logps_BxT, preferences_B, mask_BxT, *, nash_tau: float,
                    baseline_B: Optional[jax.Array] = None,
                    kl_fn: Callable = kl.k1, normaliser=None):
  """Nash-MD-PG loss (Munos 2024, deep form); see the module docstring for the equation.

  logps_BxT, ref_logps_BxT: per-token log-probs of y ~ pi_theta under pi_theta and mu;
  preferences_B: P(y > y' | x) against y' ~ pi_mix; baseline_B: optional, subtracted from
  the reward p - 1/2 (no gradient); kl_fn: per-token KL estimator (kl.k1 or kl.k3).
  """
  arrays = dict(logps_BxT=logps_BxT, ref_logps_BxT=ref_logps_BxT, mask_BxT=mask_BxT)
  for name, a in arrays.items():
    _shapes.check_rank(name, a, 2)
  _shapes.check_same_shape(**arrays)
  for name, x in (("preferences_B", preferences_B), ("baseline_B", baseline_B)):
    if x is not None and tuple(x.shape) != (logps_BxT.shape[0],):
      raise ValueError(f"{name} must have shape ({logps_BxT.shape[0]},) to match "
                       f"logps_BxT{tuple(logps_BxT.shape)}, got {tuple(x.shape)}")
  m = mask_BxT.astype(logps_BxT.dtype)
  logp_seq_B = jnp.sum(logps_BxT * m, axis=1)
  kl_seq_B = jnp.sum(kl_fn(logps_BxT, ref_logps_BxT) * m, axis=1)
  score_B = preferences_B - 0.5
  advantage_B = score_B if baseline_B is None else score_B - baseline_B
  sg = jax.lax.stop_gradient
  loss_B = (-sg(advantage_B) * logp_seq_B
            + nash_tau * (sg(kl_seq_B) * logp_seq_B + kl_seq_B))
  count = jnp.asarray(logps_BxT.shape[0], m.dtype)
  metrics = {"policy_loss_sum": jnp.sum(loss_B), "score_sum": sg(jnp.sum(score_B)),
             "kl_sum": sg(jnp.sum(kl_seq_B)), "count": count, "token_count": jnp.sum(m)}
  denom = jnp.maximum(count, 1.0) if normaliser is None else normaliser
  return metrics["policy_loss_sum"] / denom, metrics


def _check_tabular(pi_N, P_NxN, mu_N):
  _shapes.check_rank("pi_N", pi_N, 1)
  _shapes.check_rank("mu_N", mu_N, 1)
  _shapes.check_rank("P_NxN", P_NxN, 2)
  n = pi_N.shape[0]
  if mu_N.shape != (n,) or P_NxN.shape != (n, n):
    raise ValueError(f"pi_N{tuple(pi_N.shape)}, mu_N{tuple(mu_N.shape)} and "
                     f"P_NxN{tuple(P_NxN.shape)} must be (N,), (N,), (N, N)")


def nash_md_step(pi_N, P_NxN, mu_N, *, nash_tau: float, eta: float):
  """One exact Nash-MD step: pi_mix ∝ pi^(1-eta tau) mu^(eta tau); pi' ∝ pi_mix exp(eta P pi_mix)."""
  _check_tabular(pi_N, P_NxN, mu_N)
  a = eta * nash_tau
  log_mix = jax.nn.log_softmax((1.0 - a) * jnp.log(pi_N) + a * jnp.log(mu_N))
  pi_mix = jnp.exp(log_mix)
  return jax.nn.softmax(log_mix + eta * (P_NxN @ pi_mix))


def nash_md_tabular(pi0_N, P_NxN, mu_N, *, nash_tau: float, eta: float, steps: int):
  """Runs `steps` exact Nash-MD steps from pi0_N (lax.scan). Returns the final policy pi_N."""
  _check_tabular(pi0_N, P_NxN, mu_N)
  if not 0.0 <= eta * nash_tau <= 1.0:
    raise ValueError(f"eta * nash_tau must lie in [0, 1], got {eta * nash_tau}")

  def body(pi_N, _):
    return nash_md_step(pi_N, P_NxN, mu_N, nash_tau=nash_tau, eta=eta), None

  pi_N, _ = jax.lax.scan(body, pi0_N, None, length=steps)
  return pi_N


def exploitability(pi_N, P_NxN):
  """max_y P(y > pi) - 1/2, P(y > pi) = (P @ pi)_y. >= 0 when P + P^T = 1; 0 at a Nash eq."""
  _shapes.check_rank("pi_N", pi_N, 1)
  if P_NxN.shape != (pi_N.shape[0], pi_N.shape[0]):
    raise ValueError(f"P_NxN{tuple(P_NxN.shape)} must be square matching pi_N{tuple(pi_N.shape)}")
  return jnp.max(P_NxN @ pi_N) - 0.5
