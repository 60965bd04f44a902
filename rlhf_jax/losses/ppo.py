"""PPO for RLHF: per-token rewards, GAE, whitening, clipped losses, adaptive KL control.

Shapes: B sequences (responses) of T token slots. mask_BxT marks response tokens (float or
bool), right-padded and contiguous: row b holds L_b = sum_t mask[b, t] tokens at t < L_b.
Token t is the action a_t taken in state s_t; values_BxT[b, t] = V(s_t).

Equations (docs/math.md, "PPO"):
  per-token reward (Ziegler 2019; Stiennon 2020):
    r_t = -kl_coef (log pi_old(a_t) - log pi_ref(a_t)) + [t == L-1] r_phi(x, y)
  GAE (Schulman 2016): delta_t = r_t + gae_gamma V(s_{t+1}) - V(s_t),
    A_t = sum_l (gae_gamma gae_lambda)^l delta_{t+l},  returns R_t = A_t + V(s_t)
  clipped surrogate (Schulman 2017), rho_t = exp(log pi - log pi_old):
    L_clip = -mean_t min(rho_t A_t, clip(rho_t, 1 - clip_eps, 1 + clip_eps) A_t)
  clipped value loss: 0.5 mean_t max((V - R)^2, (clip(V, V_old - eps_v, V_old + eps_v) - R)^2)
  adaptive KL controller (Ziegler 2019, horizon form of their code; TRL's AdaptiveKLController):
    e = clip(KL / KL_target - 1, -0.2, 0.2),  kl_coef <- kl_coef (1 + e n_steps / horizon).

Truncation rule (responses that hit the length limit without EOS, truncated_B = True):
  * reward: rlhf_token_rewards SUBTRACTS truncation_penalty (>= 0, default 0) from the
    sequence reward of truncated rows (TRL's missing_eos_penalty semantics);
  * GAE: a terminated row (EOS) has V beyond its last token = 0; a truncated row bootstraps
    from V(s_L), the value of the state after its last token: bootstrap_values_B if the caller
    computed it, otherwise the value of the last valid state, values_BxT[b, L_b - 1]
    (the last state the critic saw).

Log-ratios are clamped to [-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP] (+-20) before exp, so the
ratio stays finite for log-probs like -1e4 (the clamp has zero gradient outside that range).

Losses return (loss, metrics). loss is a token MEAN: the masked sum divided by the token count
of the call, or by `normaliser` when given (pass the GLOBAL token count of the step so
microbatches and hosts sum exactly). metrics are SUMS over tokens plus token_count; add them
across microbatches/hosts and divide by the total token_count for means:
  ppo_policy_loss: policy_loss_sum, clipfrac_sum, approx_kl_sum (k3 of KL(pi_old || pi)),
                   ratio_sum, token_count
  ppo_value_loss:  value_loss_sum, vf_clipfrac_sum, returns_sum, returns_sq_sum,
                   residual_sum, residual_sq_sum (residual = R - V; explained variance is
                   1 - Var(R - V) / Var(R) from these sums), token_count
  entropy_bonus:   entropy_sum, token_count
Advantage whitening uses the statistics of the arrays it is given: whiten the whole rollout
batch before splitting it into microbatches.
"""

import jax
import jax.numpy as jnp

from rlhf_jax.losses import _shapes, kl

LOG_RATIO_CLAMP = kl.LOG_RATIO_CLAMP


def _check_bxt(**arrays):
  for name, a in arrays.items():
    _shapes.check_rank(name, a, 2)
  _shapes.check_same_shape(**arrays)


def _check_b(name, x_B, ref_name, ref_BxT):
  if x_B is not None and tuple(x_B.shape) != (ref_BxT.shape[0],):
    raise ValueError(f"{name} must have shape ({ref_BxT.shape[0]},) to match "
                     f"{ref_name}{tuple(ref_BxT.shape)}, got {tuple(x_B.shape)}")


def last_token_onehot(mask_BxT):
  """1.0 at the last valid token of each row, 0 elsewhere (all-masked rows: all 0)."""
  _shapes.check_rank("mask_BxT", mask_BxT, 2)
  valid = mask_BxT.astype(bool)
  T = valid.shape[1]
  last_B = T - 1 - jnp.argmax(valid[:, ::-1], axis=1)
  onehot = jnp.arange(T)[None, :] == last_B[:, None]
  return (onehot & valid.any(axis=1, keepdims=True)).astype(jnp.float32)


def rlhf_token_rewards(old_logps_BxT, ref_logps_BxT, rewards_B, mask_BxT, *, kl_coef,
                       truncated_B=None, truncation_penalty: float = 0.0):
  """Per-token RLHF reward r_t = -kl_coef (logp_old - logp_ref) + [t == last] reward (Ziegler 2019).

  Args: old_logps_BxT, ref_logps_BxT: per-token log-probs of the sampled tokens under the
  sampling policy and the reference; rewards_B: sequence rewards r_phi(x, y); mask_BxT;
  truncated_B: bool, rows that hit the length limit without EOS; truncation_penalty (>= 0) is
  subtracted from their sequence reward. Returns rewards_BxT (0 on masked tokens).
  """
  _check_bxt(old_logps_BxT=old_logps_BxT, ref_logps_BxT=ref_logps_BxT, mask_BxT=mask_BxT)
  _check_b("rewards_B", rewards_B, "old_logps_BxT", old_logps_BxT)
  _check_b("truncated_B", truncated_B, "old_logps_BxT", old_logps_BxT)
  m = mask_BxT.astype(old_logps_BxT.dtype)
  seq_B = rewards_B
  if truncated_B is not None:
    seq_B = seq_B - truncation_penalty * truncated_B.astype(seq_B.dtype)
  kl_BxT = -kl_coef * kl.k1(old_logps_BxT, ref_logps_BxT)
  return kl_BxT * m + seq_B[:, None] * last_token_onehot(mask_BxT).astype(m.dtype)


def gae_advantages(rewards_BxT, values_BxT, mask_BxT, *, gae_gamma, gae_lambda,
                   truncated_B=None, bootstrap_values_B=None):
  """GAE (Schulman 2016) over right-padded rows. Returns (advantages_BxT, returns_BxT).

  delta_t = r_t + gae_gamma V(s_{t+1}) - V(s_t); A_t = sum_l (gae_gamma gae_lambda)^l delta_{t+l};
  R_t = A_t + V(s_t). Beyond the last valid token V = 0 for terminated rows; truncated rows
  (truncated_B True) bootstrap from bootstrap_values_B, default values_BxT at the last valid
  token (see the module docstring). Both outputs are 0 on masked tokens.
  """
  _check_bxt(rewards_BxT=rewards_BxT, values_BxT=values_BxT, mask_BxT=mask_BxT)
  _check_b("truncated_B", truncated_B, "values_BxT", values_BxT)
  _check_b("bootstrap_values_B", bootstrap_values_B, "values_BxT", values_BxT)
  m = mask_BxT.astype(values_BxT.dtype)
  v = values_BxT * m
  next_v = jnp.concatenate([v[:, 1:], jnp.zeros_like(v[:, :1])], axis=1) * m
  if truncated_B is not None:
    last = last_token_onehot(mask_BxT).astype(v.dtype)
    boot_B = (bootstrap_values_B if bootstrap_values_B is not None
              else jnp.sum(v * last, axis=1))
    next_v = next_v + last * (truncated_B.astype(v.dtype) * boot_B)[:, None]
  delta = (rewards_BxT + gae_gamma * next_v - v) * m

  def step(carry_B, delta_B):
    adv_B = delta_B + gae_gamma * gae_lambda * carry_B
    return adv_B, adv_B

  _, adv_TxB = jax.lax.scan(step, jnp.zeros_like(delta[:, 0]), delta.T, reverse=True)
  adv = adv_TxB.T * m
  return adv, (adv + v) * m


def masked_whiten(x_BxT, mask_BxT, *, eps: float = 1e-8, shift_mean: bool = True):
  """(x - mean) / sqrt(var + eps) over the masked entries (population variance, ddof 0).

  shift_mean=False adds the mean back (whiten the scale only). Masked entries return 0.
  """
  _check_bxt(x_BxT=x_BxT, mask_BxT=mask_BxT)
  m = mask_BxT.astype(x_BxT.dtype)
  n = jnp.maximum(jnp.sum(m), 1.0)
  mean = jnp.sum(x_BxT * m) / n
  var = jnp.sum(jnp.square(x_BxT - mean) * m) / n
  out = (x_BxT - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    out = out + mean
  return out * m


def _normalise(sum_, token_count, normaliser):
  return sum_ / (jnp.maximum(token_count, 1.0) if normaliser is None else normaliser)


def ppo_policy_loss(logps_BxT, old_logps_BxT, advantages_BxT, mask_BxT, *, clip_eps,
                    normaliser=None):
  """Clipped surrogate L = -mean_t min(rho A, clip(rho, 1-clip_eps, 1+clip_eps) A) (Schulman 2017).

  rho = exp(clamp(logp - logp_old, +-20)). clipfrac counts tokens where the clipped branch is
  the active one (those tokens have zero gradient). Returns (loss, metrics).
  """
  _check_bxt(logps_BxT=logps_BxT, old_logps_BxT=old_logps_BxT,
             advantages_BxT=advantages_BxT, mask_BxT=mask_BxT)
  m = mask_BxT.astype(logps_BxT.dtype)
  log_rho = jnp.clip(logps_BxT - old_logps_BxT, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
  rho = jnp.exp(log_rho)
  a = jax.lax.stop_gradient(advantages_BxT)
  unclipped = -rho * a
  clipped = -jnp.clip(rho, 1.0 - clip_eps, 1.0 + clip_eps) * a
  per_token = jnp.maximum(unclipped, clipped)
  token_count = jnp.sum(m)
  metrics = {
      "policy_loss_sum": jnp.sum(per_token * m),
      "clipfrac_sum": jnp.sum((clipped > unclipped) * m),
      "approx_kl_sum": jax.lax.stop_gradient(jnp.sum(kl.k3(old_logps_BxT, logps_BxT) * m)),
      "ratio_sum": jax.lax.stop_gradient(jnp.sum(rho * m)),
      "token_count": token_count,
  }
  return _normalise(metrics["policy_loss_sum"], token_count, normaliser), metrics


def ppo_value_loss(values_BxT, old_values_BxT, returns_BxT, mask_BxT, *, value_clip_eps,
                   normaliser=None):
  """0.5 mean_t max((V - R)^2, (clip(V, V_old - eps_v, V_old + eps_v) - R)^2) (docs/math.md, "PPO").

  Also returns the sums explained variance needs (residual = R - V). Returns (loss, metrics).
  """
  _check_bxt(values_BxT=values_BxT, old_values_BxT=old_values_BxT, returns_BxT=returns_BxT,
             mask_BxT=mask_BxT)
  m = mask_BxT.astype(values_BxT.dtype)
  r = jax.lax.stop_gradient(returns_BxT)
  v_clipped = jnp.clip(values_BxT, old_values_BxT - value_clip_eps, old_values_BxT + value_clip_eps)
  loss_unclipped = jnp.square(values_BxT - r)
  loss_clipped = jnp.square(v_clipped - r)
  per_token = 0.5 * jnp.maximum(loss_unclipped, loss_clipped)
  res = jax.lax.stop_gradient(r - values_BxT)
  token_count = jnp.sum(m)
  metrics = {
      "value_loss_sum": jnp.sum(per_token * m),
      "vf_clipfrac_sum": jnp.sum((loss_clipped > loss_unclipped) * m),
      "returns_sum": jnp.sum(r * m),
      "returns_sq_sum": jnp.sum(jnp.square(r) * m),
      "residual_sum": jnp.sum(res * m),
      "residual_sq_sum": jnp.sum(jnp.square(res) * m),
      "token_count": token_count,
  }
  return _normalise(metrics["value_loss_sum"], token_count, normaliser), metrics


def entropy_bonus(entropy_BxT, mask_BxT, *, entropy_coef, normaliser=None):
  """Entropy bonus as a loss: -entropy_coef * mean_t H_t. entropy_BxT: per-token entropy."""
  _check_bxt(entropy_BxT=entropy_BxT, mask_BxT=mask_BxT)
  m = mask_BxT.astype(entropy_BxT.dtype)
  metrics = {"entropy_sum": jnp.sum(entropy_BxT * m), "token_count": jnp.sum(m)}
  mean = _normalise(metrics["entropy_sum"], metrics["token_count"], normaliser)
  return -entropy_coef * mean, metrics


def adaptive_kl_update_horizon(kl_coef, kl_value, *, kl_target, n_steps, horizon):
  """The adaptive KL controller (Ziegler 2019; the horizon form of their lm-human-preferences
  code and of TRL): e = clip(KL/KL_target - 1, -0.2, 0.2), kl_coef <- kl_coef (1 + e n_steps /
  horizon); n_steps = samples seen since the last update. Pure: returns the new coefficient.
  The error is clipped, so one update changes kl_coef by at most a factor 1 +- 0.2 n_steps /
  horizon; at KL == kl_target it is unchanged.
  """
  e = jnp.clip(kl_value / kl_target - 1.0, -0.2, 0.2)
  return kl_coef * (1.0 + e * n_steps / horizon)
