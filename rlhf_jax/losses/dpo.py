"""The DPO family: DPO (with conservative label smoothing), IPO, KTO, on sequence log-probs.

Inputs are SEQUENCE log-probs log pi(y|x) of shape (B,), by default SUMS over the response
tokens (docs/math.md, "DPO family"); `rlhf_jax.logprobs.sequence_logps(..., average=True)`
gives the length-averaged form that TRL uses for IPO (pass whichever you want: the losses do
not care how they were reduced).

Notation: chosen log-ratio rho_w = log pi(y_w) - log pi_ref(y_w), rejected rho_l likewise,
h = rho_w - rho_l, implicit reward r_hat = beta * rho (Rafailov 2023 eq. 5).

Metrics (sums plus counts; loss == loss_sum / max(count, 1) within one call):
  dpo_loss, ipo_loss: loss_sum, count (pairs), rewards/chosen_sum, rewards/rejected_sum,
    rewards/margins_sum, rewards/accuracies_sum (r_hat_w > r_hat_l), logps/chosen_sum,
    logps/rejected_sum (policy sequence log-probs). IPO has no beta: its "rewards" are the
    log-ratios rho (beta = 1).
  kto_loss: loss_sum, count (examples), rewards/chosen_sum + chosen_count (desirable examples),
    rewards/rejected_sum + rejected_count (undesirable), kl_sum + kl_count (the mismatched-pair
    log-ratios behind z_0; z_0 = max(0, kl_sum / kl_count)).
Step-0 invariant (policy == reference): DPO loss log 2, IPO loss (1/(2 ipo_tau))^2,
KTO loss with z_0 = 0: mean_i lambda_{y_i} / 2, and all implicit rewards 0.
"""
import jax
import jax.numpy as jnp

from rlhf_jax.losses import _shapes


def _check_python(name, value, ok, requirement):
  """Validates a static python hyperparameter (skipped for traced values)."""
  if isinstance(value, (int, float)) and not ok(value):
    raise ValueError(f"{name} must be {requirement}, got {value}")


def _log_ratios(policy_chosen_logps_B, policy_rejected_logps_B, ref_chosen_logps_B,
                ref_rejected_logps_B):
  _shapes.check_rank("policy_chosen_logps_B", policy_chosen_logps_B, 1)
  _shapes.check_same_shape(
      policy_chosen_logps_B=policy_chosen_logps_B, policy_rejected_logps_B=policy_rejected_logps_B,
      ref_chosen_logps_B=ref_chosen_logps_B, ref_rejected_logps_B=ref_rejected_logps_B)
  return (policy_chosen_logps_B - ref_chosen_logps_B,
          policy_rejected_logps_B - ref_rejected_logps_B)


def _pair_metrics(loss_B, reward_w_B, reward_l_B, policy_chosen_logps_B, policy_rejected_logps_B):
  reward_w_B, reward_l_B = jax.lax.stop_gradient((reward_w_B, reward_l_B))
  dtype = loss_B.dtype
  return {
      "loss_sum": jnp.sum(loss_B),
      "count": jnp.asarray(loss_B.shape[0], dtype),
      "rewards/chosen_sum": jnp.sum(reward_w_B),
      "rewards/rejected_sum": jnp.sum(reward_l_B),
      "rewards/margins_sum": jnp.sum(reward_w_B - reward_l_B),
      "rewards/accuracies_sum": jnp.sum((reward_w_B > reward_l_B).astype(dtype)),
      "logps/chosen_sum": jnp.sum(jax.lax.stop_gradient(policy_chosen_logps_B)),
      "logps/rejected_sum": jnp.sum(jax.lax.stop_gradient(policy_rejected_logps_B)),
  }


def dpo_loss(policy_chosen_logps_B, policy_rejected_logps_B, ref_chosen_logps_B,
             ref_rejected_logps_B, *, beta: float, label_smoothing: float = 0.0):
  """DPO sigmoid loss (Rafailov 2023 eq. 7) with conservative label smoothing.

  h = rho_w - rho_l;  L = -(1 - eps) log s(beta h) - eps log s(-beta h);  eps = 0 is plain DPO.
  Gradient: grad L = -beta E[ s(r_hat_l - r_hat_w) (grad log pi(y_w) - grad log pi(y_l)) ] (eps=0).

  Args:
    policy_chosen_logps_B, policy_rejected_logps_B: log pi_theta(y_w|x), log pi_theta(y_l|x), (B,).
    ref_chosen_logps_B, ref_rejected_logps_B: the same under pi_ref, (B,) (no gradient needed).
    beta: KL coefficient, > 0 (static python float).
    label_smoothing: eps in [0, 0.5], the assumed label-flip probability (cDPO).
  """
  _check_python("beta", beta, lambda v: v > 0, "> 0")
  _check_python("label_smoothing", label_smoothing, lambda v: 0 <= v <= 0.5, "in [0, 0.5]")
  rho_w_B, rho_l_B = _log_ratios(policy_chosen_logps_B, policy_rejected_logps_B,
                                 ref_chosen_logps_B, ref_rejected_logps_B)
  logits_B = beta * (rho_w_B - rho_l_B)
  loss_B = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(logits_B)
            - label_smoothing * jax.nn.log_sigmoid(-logits_B))
  metrics = _pair_metrics(loss_B, beta * rho_w_B, beta * rho_l_B,
                          policy_chosen_logps_B, policy_rejected_logps_B)
  return jnp.mean(loss_B), metrics


def ipo_loss(policy_chosen_logps_B, policy_rejected_logps_B, ref_chosen_logps_B,
             ref_rejected_logps_B, *, ipo_tau: float):
  """IPO (Azar et al. 2023): L = E (h - 1/(2 ipo_tau))^2, h = rho_w - rho_l.

  TRL feeds length-averaged log-probs here (logprobs.sequence_logps(..., average=True)); the
  default elsewhere is summed log-probs. The squared loss has bounded optimum h* = 1/(2 ipo_tau).

  Args: as dpo_loss; ipo_tau > 0 is IPO's regularisation strength (TRL passes beta).
  """
  _check_python("ipo_tau", ipo_tau, lambda v: v > 0, "> 0")
  rho_w_B, rho_l_B = _log_ratios(policy_chosen_logps_B, policy_rejected_logps_B,
                                 ref_chosen_logps_B, ref_rejected_logps_B)
  loss_B = jnp.square(rho_w_B - rho_l_B - 1.0 / (2.0 * ipo_tau))
  metrics = _pair_metrics(loss_B, rho_w_B, rho_l_B, policy_chosen_logps_B, policy_rejected_logps_B)
  return jnp.mean(loss_B), metrics


def kto_loss(policy_logps_B, ref_logps_B, desirable_B, kl_logratios_M, *, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
  """KTO (Ethayarajh et al. 2024) on unpaired examples.

  r = log pi(y|x) - log pi_ref(y|x);  z_0 = stop_gradient(max(0, mean(kl_logratios_M)));
  v = lambda_D s(beta (r - z_0)) if desirable else lambda_U s(beta (z_0 - r));
  L = E[ lambda_y - v ].   At step 0 (r = 0, z_0 = 0): L = mean_i lambda_{y_i} / 2.

  Args:
    policy_logps_B, ref_logps_B: sequence log-probs of the examples, (B,).
    desirable_B: bool (or 0/1), True for desirable y, (B,).
    kl_logratios_M: log pi(y'|x) - log pi_ref(y'|x) on MISMATCHED (x, y') pairs of the batch
      (e.g. y' from a shifted prompt), (M,); their mean estimates KL(pi || pi_ref).
    beta: > 0.  desirable_weight, undesirable_weight: lambda_D, lambda_U >= 0.
  """
  _check_python("beta", beta, lambda v: v > 0, "> 0")
  _check_python("desirable_weight", desirable_weight, lambda v: v >= 0, ">= 0")
  _check_python("undesirable_weight", undesirable_weight, lambda v: v >= 0, ">= 0")
  _shapes.check_rank("policy_logps_B", policy_logps_B, 1)
  _shapes.check_rank("kl_logratios_M", kl_logratios_M, 1)
  _shapes.check_same_shape(policy_logps_B=policy_logps_B, ref_logps_B=ref_logps_B,
                           desirable_B=desirable_B)
  r_B = policy_logps_B - ref_logps_B
  kl_sum = jnp.sum(kl_logratios_M)
  kl_count = jnp.asarray(kl_logratios_M.shape[0], r_B.dtype)
  z0 = jax.lax.stop_gradient(jnp.maximum(kl_sum / jnp.maximum(kl_count, 1.0), 0.0))
  good_B = desirable_B.astype(bool)
  v_B = jnp.where(good_B, desirable_weight * jax.nn.sigmoid(beta * (r_B - z0)),
                  undesirable_weight * jax.nn.sigmoid(beta * (z0 - r_B)))
  loss_B = jnp.where(good_B, desirable_weight, undesirable_weight) - v_B
  good_f = good_B.astype(r_B.dtype)
  reward_B = jax.lax.stop_gradient(beta * r_B)
  metrics = {
      "loss_sum": jnp.sum(loss_B),
      "count": jnp.asarray(r_B.shape[0], r_B.dtype),
      "rewards/chosen_sum": jnp.sum(good_f * reward_B),
      "chosen_count": jnp.sum(good_f),
      "rewards/rejected_sum": jnp.sum((1.0 - good_f) * reward_B),
      "rejected_count": jnp.sum(1.0 - good_f),
      "kl_sum": jax.lax.stop_gradient(kl_sum),
      "kl_count": kl_count,
  }
  return jnp.mean(loss_B), metrics
