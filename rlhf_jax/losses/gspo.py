"""GSPO: Group Sequence Policy Optimization (Zheng et al. 2025), and its GSPO-token variant.

Layout as losses/grpo.py: FLATTENED per-response arrays logps_BxT etc. with B = prompts * G in
prompt-major order; advantages_B are the group advantages (grpo.group_advantages(...)
.reshape(-1)), one per response.

Equations (Zheng et al. 2025; docs/math.md, "GRPO family"):
  sequence importance ratio, length-normalised:
    s_i = exp( (1/|y_i|) sum_t (log pi(y_i,t) - log pi_old(y_i,t)) )
        (the exponent clamped to +-LOG_RATIO_CLAMP = +-20 so s_i stays finite)
  per-sequence loss:
    l_i = -min(s_i A_i, clip(s_i, 1 - clip_eps_low, 1 + clip_eps_high) A_i) + kl_coef D_i
    D_i = (1/|y_i|) sum_t k3_t, k3 against pi_ref as in GRPO (optional)
  loss = (1/N) sum_i l_i over the N responses with at least one token.
  The paper's clip ranges are small because s_i is a per-token geometric mean:
  clip_eps_low = 3e-4, clip_eps_high = 4e-4.
GSPO-token (same paper) lets the advantage vary per token: s_i,t = sg[s_i] pi(y_i,t) /
  sg[pi(y_i,t)], equal to s_i in value; l_i = (1/|y_i|) sum_t -min(s_i,t A_i,t, clip(s_i,t) A_i,t)
  (+ kl_coef D_i). With A_i,t = A_i for every t its value and gradient equal GSPO's (inside
  the +-20 clamp).

A response with an empty mask is absent: it counts in no sum and no normaliser (as in
grpo.grpo_loss), so dropping a group by zeroing its mask is exactly the loss without it.
`normaliser` overrides N (pass the GLOBAL count of responses of the step so microbatches and
hosts add exactly).

Both losses return (loss, metrics); metrics are SUMS OVER RESPONSES plus counts (divide a sum
by count for its mean): loss_sum (sum_i l_i), policy_loss_sum (the clipped surrogate part),
clipfrac_sum (GSPO: 1 per clipped response; GSPO-token: each response's fraction of clipped
tokens), ratio_sum (s_i), kl_sum (D_i; only when ref_logps_BxT is given), count (responses
with a token), token_count.
"""
from typing import Optional

import jax
import jax.numpy as jnp

from rlhf_jax.losses import _shapes, kl


def _check(logps_BxT, old_logps_BxT, ref_logps_BxT, mask_BxT, kl_coef, adv_name, advantages,
           adv_shape):
  arrays = dict(logps_BxT=logps_BxT, old_logps_BxT=old_logps_BxT, mask_BxT=mask_BxT)
  if ref_logps_BxT is not None:
    arrays["ref_logps_BxT"] = ref_logps_BxT
  elif kl_coef != 0:
    raise ValueError("ref_logps_BxT is None but kl_coef != 0; pass the reference log-probs")
  for name, a in arrays.items():
    _shapes.check_rank(name, a, 2)
  _shapes.check_same_shape(**arrays)
  if tuple(advantages.shape) != adv_shape:
    raise ValueError(f"{adv_name} must have shape {adv_shape} to match "
                     f"logps_BxT{tuple(logps_BxT.shape)}, got {tuple(advantages.shape)}")


def sequence_log_ratio(logps_BxT, old_logps_BxT, mask_BxT):
  """log s_i = (1/|y_i|) sum_t (log pi - log pi_old) over the masked tokens, clamped to
  +-LOG_RATIO_CLAMP; 0 for an empty row. Returns (log_ratio_B, lengths_B)."""
  _shapes.check_rank("logps_BxT", logps_BxT, 2)
  _shapes.check_same_shape(logps_BxT=logps_BxT, old_logps_BxT=old_logps_BxT, mask_BxT=mask_BxT)
  valid = mask_BxT.astype(bool)
  len_B = jnp.sum(valid, axis=1).astype(logps_BxT.dtype)
  diff = jnp.where(valid, logps_BxT - old_logps_BxT, 0.0)  # padding may hold -inf
  log_s_B = jnp.sum(diff, axis=1) / jnp.maximum(len_B, 1.0)
  return jnp.clip(log_s_B, -kl.LOG_RATIO_CLAMP, kl.LOG_RATIO_CLAMP), len_B


def _finish(per_seq_B, len_B, metrics, ref_logps_BxT, logps_BxT, mask_BxT, kl_coef, normaliser):
  """Adds the optional per-sequence k3, masks absent rows, sums and normalises."""
  present_B = len_B > 0
  if ref_logps_BxT is not None:
    valid = mask_BxT.astype(bool)
    d = jnp.where(valid, kl.k3(logps_BxT, ref_logps_BxT), 0.0)
    kl_B = jnp.sum(d, axis=1) / jnp.maximum(len_B, 1.0)
    metrics["kl_sum"] = jnp.sum(kl_B)
    if kl_coef != 0:
      per_seq_B = per_seq_B + kl_coef * kl_B
  metrics["loss_sum"] = jnp.sum(jnp.where(present_B, per_seq_B, 0.0))
  metrics["count"] = jnp.sum(present_B.astype(per_seq_B.dtype))
  metrics["token_count"] = jnp.sum(len_B)
  denom = jnp.maximum(metrics["count"], 1.0) if normaliser is None else normaliser
  return metrics["loss_sum"] / denom, metrics


def gspo_loss(logps_BxT, old_logps_BxT, ref_logps_BxT: Optional[jax.Array], advantages_B,
              mask_BxT, *, clip_eps_low: float, clip_eps_high: float, kl_coef: float,
              normaliser=None):
  """GSPO sequence-level clipped loss (Zheng et al. 2025); see the module docstring.

  Args:
    logps_BxT: log pi(y_i,t) under the policy being trained, (B, T).
    old_logps_BxT: log pi_old(y_i,t) under the sampling policy, (B, T).
    ref_logps_BxT: log pi_ref(y_i,t), (B, T), or None when kl_coef == 0 (no KL computed).
    advantages_B: group advantages A_i, (B,) (no gradient flows through them).
    mask_BxT: response tokens, (B, T), bool or float.
    clip_eps_low, clip_eps_high: the clip range [1 - low, 1 + high] of s_i (paper: 3e-4, 4e-4).
    kl_coef: weight of the per-sequence mean k3 against pi_ref (Python float).
    normaliser: replaces the count of non-empty responses as the denominator.
  Returns (loss, metrics), metrics as sums over responses (module docstring).
  """
  _check(logps_BxT, old_logps_BxT, ref_logps_BxT, mask_BxT, kl_coef, "advantages_B",
         advantages_B, (logps_BxT.shape[0],))
  log_s_B, len_B = sequence_log_ratio(logps_BxT, old_logps_BxT, mask_BxT)
  s_B = jnp.exp(log_s_B)
  a_B = jax.lax.stop_gradient(advantages_B).astype(s_B.dtype)
  unclipped_B = -s_B * a_B
  clipped_B = -jnp.clip(s_B, 1.0 - clip_eps_low, 1.0 + clip_eps_high) * a_B
  surrogate_B = jnp.maximum(unclipped_B, clipped_B)
  present_B = len_B > 0
  sg = jax.lax.stop_gradient
  metrics = {
      "policy_loss_sum": jnp.sum(jnp.where(present_B, surrogate_B, 0.0)),
      "clipfrac_sum": sg(jnp.sum((present_B & (clipped_B > unclipped_B)).astype(s_B.dtype))),
      "ratio_sum": sg(jnp.sum(jnp.where(present_B, s_B, 0.0))),
  }
  return _finish(surrogate_B, len_B, metrics, ref_logps_BxT, logps_BxT, mask_BxT, kl_coef,
                 normaliser)


def gspo_token_loss(logps_BxT, old_logps_BxT, ref_logps_BxT: Optional[jax.Array],
                    advantages_BxT, mask_BxT, *, clip_eps_low: float, clip_eps_high: float,
                    kl_coef: float, normaliser=None):
  """GSPO-token (Zheng et al. 2025): per-token advantages A_i,t with the sequence ratio.

  s_i,t = sg[s_i] pi(y_i,t) / sg[pi(y_i,t)];  l_i = (1/|y_i|) sum_t -min(s_i,t A_i,t,
  clip(s_i,t) A_i,t) + kl_coef D_i;  loss = mean of l_i over non-empty responses.
  Arguments as gspo_loss, with advantages_BxT (B, T) instead of advantages_B.
  """
  _check(logps_BxT, old_logps_BxT, ref_logps_BxT, mask_BxT, kl_coef, "advantages_BxT",
         advantages_BxT, tuple(logps_BxT.shape))
  sg = jax.lax.stop_gradient
  log_s_B, len_B = sequence_log_ratio(logps_BxT, old_logps_BxT, mask_BxT)
  valid = mask_BxT.astype(bool)
  safe_logps = jnp.where(valid, logps_BxT, 0.0)
  s_BxT = jnp.exp(sg(log_s_B)[:, None] + safe_logps - sg(safe_logps))
  a = sg(advantages_BxT).astype(s_BxT.dtype)
  unclipped = -s_BxT * a
  clipped = -jnp.clip(s_BxT, 1.0 - clip_eps_low, 1.0 + clip_eps_high) * a
  surrogate = jnp.where(valid, jnp.maximum(unclipped, clipped), 0.0)
  inv_len_B = 1.0 / jnp.maximum(len_B, 1.0)
  surrogate_B = jnp.sum(surrogate, axis=1) * inv_len_B
  present_B = len_B > 0
  metrics = {
      "policy_loss_sum": jnp.sum(surrogate_B),
      "clipfrac_sum": sg(jnp.sum(jnp.sum((valid & (clipped > unclipped)).astype(s_BxT.dtype),
                                         axis=1) * inv_len_B)),
      "ratio_sum": sg(jnp.sum(jnp.where(present_B, jnp.exp(log_s_B), 0.0))),
  }
  return _finish(surrogate_B, len_B, metrics, ref_logps_BxT, logps_BxT, mask_BxT, kl_coef,
                 normaliser)
