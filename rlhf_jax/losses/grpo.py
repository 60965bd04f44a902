"""GRPO and relatives: group advantages (GRPO, Dr. GRPO, RLOO) and the clipped token loss.

Layout: advantage functions take rewards_BxG (B prompts, G sampled responses each) and return
advantages_BxG. The loss takes FLATTENED per-response arrays: logps_BxT etc. with
B = prompts * G in prompt-major order, i.e. advantages_B = advantages_BxG.reshape(-1).
Every token of response i gets the same advantage A_i.

Equations (docs/math.md, "GRPO family"):
  GRPO (Shao 2024):    A_i = (r_i - mean(r)) / (std(r) + eps), std with explicit ddof
  Dr. GRPO (Liu 2025): A_i = r_i - mean(r)
  RLOO (Ahmadian 2024): A_i = r_i - (1/(G-1)) sum_{j != i} r_j
  per-token objective, rho = exp(clamp(logp - logp_old, +-20)):
    l_t = -min(rho A, clip(rho, 1 - clip_eps_low, 1 + clip_eps_high) A) + kl_coef D_t
    D_t = k3 against pi_ref = pi_ref/pi - log(pi_ref/pi) - 1 (log-ratio clamped to +-20)
  DAPO (Yu 2025) asymmetric clip: clip_eps_low != clip_eps_high; symmetric when equal.
  aggregation (explicit keyword, it only selects the normaliser):
    "token":    sum_{i,t} l / sum_{i,t} mask                (DAPO)
    "sequence": mean_i [ sum_t l_i,t / |o_i| ]              (original GRPO)
    "constant": sum_{i,t} l / (num_seqs * max_len)          (Dr. GRPO; max_len default T)
  A response with an empty mask is absent: it counts in no denominator (num_seqs counts
  responses with at least one token), so dropping a group by zeroing its mask (DAPO's
  dynamic sampling) is exactly the loss without it.
  `normaliser` overrides the denominator (global token count, global sequence count, or
  global num_seqs * max_len) so microbatches and hosts add exactly.

grpo_loss returns (loss, metrics); metrics are sums plus counts:
  policy_loss_sum (clipped surrogate, token sum), kl_sum (k3 token sum; only when
  ref_logps_BxT is given), clipfrac_sum, seq_mean_loss_sum (sum over responses of the
  per-response token mean of l), token_count, count (responses with a token).
"""
from typing import Optional

import jax
import jax.numpy as jnp

from rlhf_jax.losses import _shapes, kl

AGGREGATIONS = ("token", "sequence", "constant")


def _check_groups(rewards_BxG, min_g: int):
  _shapes.check_rank("rewards_BxG", rewards_BxG, 2)
  if rewards_BxG.shape[1] < min_g:
    raise ValueError(f"rewards_BxG needs a group size G >= {min_g}, got shape "
                     f"{tuple(rewards_BxG.shape)}")


def group_advantages(rewards_BxG, *, ddof: int, eps: float):
  """A_i = (r_i - mean(r)) / (std(r, ddof) + eps) per group (Shao 2024).

  A group whose rewards are all equal gets advantages exactly 0 (no NaN, whatever eps).
  The population form is ddof=0, eps=0; TRL uses ddof=1, eps=1e-4.
  """
  _check_groups(rewards_BxG, ddof + 1)
  mean = jnp.mean(rewards_BxG, axis=1, keepdims=True)
  centred = rewards_BxG - mean
  var = jnp.sum(jnp.square(centred), axis=1, keepdims=True) / (rewards_BxG.shape[1] - ddof)
  constant = (jnp.max(rewards_BxG, axis=1, keepdims=True)
              == jnp.min(rewards_BxG, axis=1, keepdims=True))
  std = jnp.sqrt(jnp.where(constant, 1.0, var))  # no sqrt(0): keeps gradients finite
  return jnp.where(constant, 0.0, centred / (std + eps))


def dr_grpo_advantages(rewards_BxG):
  """A_i = r_i - mean(r) per group, no std scaling (Liu 2025, Dr. GRPO)."""
  _check_groups(rewards_BxG, 1)
  return rewards_BxG - jnp.mean(rewards_BxG, axis=1, keepdims=True)


def rloo_advantages(rewards_BxG):
  """A_i = r_i - (1/(G-1)) sum_{j != i} r_j, leave-one-out baseline (Ahmadian 2024). G >= 2."""
  _check_groups(rewards_BxG, 2)
  G = rewards_BxG.shape[1]
  others = (jnp.sum(rewards_BxG, axis=1, keepdims=True) - rewards_BxG) / (G - 1)
  return rewards_BxG - others


def grpo_loss(logps_BxT, old_logps_BxT, ref_logps_BxT: Optional[jax.Array], advantages_B,
              mask_BxT, *, clip_eps_low: float, clip_eps_high: float, kl_coef: float,
              aggregation: str, max_len: Optional[int] = None, normaliser=None):
  """Clipped group policy loss with optional k3 KL (GRPO / DAPO / Dr. GRPO). See module doc.

  ref_logps_BxT may be None only when kl_coef == 0 (then no KL is computed). kl_coef is a
  Python float. Returns (loss, metrics).
  """
  if aggregation not in AGGREGATIONS:
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
  arrays = dict(logps_BxT=logps_BxT, old_logps_BxT=old_logps_BxT, mask_BxT=mask_BxT)
  if ref_logps_BxT is not None:
    arrays["ref_logps_BxT"] = ref_logps_BxT
  elif kl_coef != 0:
    raise ValueError("ref_logps_BxT is None but kl_coef != 0; pass the reference log-probs")
  for name, a in arrays.items():
    _shapes.check_rank(name, a, 2)
  _shapes.check_same_shape(**arrays)
  if tuple(advantages_B.shape) != (logps_BxT.shape[0],):
    raise ValueError(f"advantages_B must have shape ({logps_BxT.shape[0]},) to match "
                     f"logps_BxT{tuple(logps_BxT.shape)}, got {tuple(advantages_B.shape)}")
  m = mask_BxT.astype(logps_BxT.dtype)
  a = jax.lax.stop_gradient(advantages_B)[:, None]
  rho = jnp.exp(jnp.clip(logps_BxT - old_logps_BxT, -kl.LOG_RATIO_CLAMP, kl.LOG_RATIO_CLAMP))
  unclipped = -rho * a
  clipped = -jnp.clip(rho, 1.0 - clip_eps_low, 1.0 + clip_eps_high) * a
  surrogate = jnp.maximum(unclipped, clipped)
  per_token = surrogate
  metrics = {"policy_loss_sum": jnp.sum(surrogate * m),
             "clipfrac_sum": jnp.sum((clipped > unclipped) * m)}
  if ref_logps_BxT is not None:
    d = kl.k3(logps_BxT, ref_logps_BxT)
    metrics["kl_sum"] = jnp.sum(d * m)
    if kl_coef != 0:
      per_token = per_token + kl_coef * d
  len_B = jnp.sum(m, axis=1)
  seq_mean_B = jnp.sum(per_token * m, axis=1) / jnp.maximum(len_B, 1.0)
  total = jnp.sum(per_token * m)
  metrics.update(seq_mean_loss_sum=jnp.sum(seq_mean_B), token_count=jnp.sum(len_B),
                 count=jnp.sum((len_B > 0).astype(m.dtype)))
  if aggregation == "token":
    numer, denom = total, jnp.maximum(metrics["token_count"], 1.0)
  elif aggregation == "sequence":
    numer, denom = metrics["seq_mean_loss_sum"], jnp.maximum(metrics["count"], 1.0)
  else:
    numer = total
    denom = (jnp.maximum(metrics["count"], 1.0)
             * (logps_BxT.shape[1] if max_len is None else max_len))
  return numer / (denom if normaliser is None else normaliser), metrics
