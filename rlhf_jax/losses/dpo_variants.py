"""Offline variants compared against DPO: the SLiC-HF hinge, robust DPO, SimPO.

Same conventions as losses/dpo.py (whose private helpers they share): SEQUENCE log-probs of
shape (B,), hyperparameters keyword-only and validated when they are python numbers, and
`(loss, metrics)` with dpo_loss's metric sums, so the DPO experiment logs every member alike:
loss_sum, count (pairs), rewards/chosen_sum, rewards/rejected_sum, rewards/margins_sum,
rewards/accuracies_sum (r_hat_w > r_hat_l), logps/chosen_sum, logps/rejected_sum.

Notation as dpo.py: rho_w = log pi(y_w) - log pi_ref(y_w), rho_l likewise, h = rho_w - rho_l,
implicit reward r_hat = beta * rho. SimPO has no reference: its reward is beta times the
length-averaged policy log-prob. docs/math.md, "DPO family", states each as implemented.
"""
import jax
import jax.numpy as jnp

from rlhf_jax.losses import _shapes, dpo


def hinge_loss(policy_chosen_logps_B, policy_rejected_logps_B, ref_chosen_logps_B,
               ref_rejected_logps_B, *, beta: float):
  """SLiC-HF's calibration loss on the reference-normalised margin (TRL's loss_type="hinge").

  L = mean_b relu(1 - beta h_b),   h = rho_w - rho_l.
  Zero once beta h >= 1, slope -beta below; step 0 (policy == reference): L = 1.

  Zhao, Joshi, Liu, Khalman, Saleh, Liu (2023), "SLiC-HF: Sequence Likelihood Calibration with
  Human Feedback", calibrate with max(0, delta - log pi(y_w|x) + log pi(y_l|x)) on the policy's
  own log-probs (plus a cross-entropy regulariser on SFT targets, not part of this loss). Here
  each log-prob is replaced by its log-ratio to the reference and delta = 1/beta:
  relu(1 - beta h) = beta * max(0, 1/beta - rho_w + rho_l), the paper's term times beta. With
  reference log-probs of 0 it is exactly beta times the paper's calibration loss.

  Args:
    policy_chosen_logps_B, policy_rejected_logps_B: log pi_theta(y_w|x), log pi_theta(y_l|x), (B,).
    ref_chosen_logps_B, ref_rejected_logps_B: the same under pi_ref, (B,) (no gradient needed).
    beta: > 0, the inverse of the margin delta (static python float).
  """
  dpo._check_python("beta", beta, lambda v: v > 0, "> 0")
  rho_w_B, rho_l_B = dpo._log_ratios(policy_chosen_logps_B, policy_rejected_logps_B,
                                     ref_chosen_logps_B, ref_rejected_logps_B)
  loss_B = jax.nn.relu(1.0 - beta * (rho_w_B - rho_l_B))
  metrics = dpo._pair_metrics(loss_B, beta * rho_w_B, beta * rho_l_B,
                              policy_chosen_logps_B, policy_rejected_logps_B)
  return jnp.mean(loss_B), metrics


def robust_dpo_loss(policy_chosen_logps_B, policy_rejected_logps_B, ref_chosen_logps_B,
                    ref_rejected_logps_B, *, beta: float, label_smoothing: float):
  """Robust DPO: the DPO loss de-biased for labels flipped with probability eps.

  l(z) = -log s(z),  z = beta h;
  L = mean_b [(1 - eps) l(z_b) - eps l(-z_b)] / (1 - 2 eps),   eps = label_smoothing in [0, 0.5).
  Unbiased: (1 - eps) L(y_w, y_l) + eps L(y_l, y_w) = DPO's l(z), so on eps-flipped labels its
  expectation is the clean-label DPO loss. Since l(-z) - l(z) = z, it also equals
  l(z) - eps / (1 - 2 eps) * z: DPO minus a linear reward on the margin, so it is unbounded
  below and its gradient never vanishes (dL/dz -> -eps / (1 - 2 eps) as z -> inf). eps = 0 is
  DPO; step 0 (policy == reference): L = log 2 for every eps. cDPO (dpo_loss with
  label_smoothing) instead mixes the two labels' losses with weights summing to 1: biased.

  Chowdhury, Kini, Natarajan (2024), "Provably Robust DPO: Aligning Language Models with Noisy
  Feedback".

  Args: as dpo_loss; beta > 0; label_smoothing: eps in [0, 0.5), the assumed flip rate.
  """
  dpo._check_python("beta", beta, lambda v: v > 0, "> 0")
  dpo._check_python("label_smoothing", label_smoothing, lambda v: 0 <= v < 0.5, "in [0, 0.5)")
  rho_w_B, rho_l_B = dpo._log_ratios(policy_chosen_logps_B, policy_rejected_logps_B,
                                     ref_chosen_logps_B, ref_rejected_logps_B)
  logits_B = beta * (rho_w_B - rho_l_B)
  loss_B = ((1.0 - label_smoothing) * -jax.nn.log_sigmoid(logits_B)
            - label_smoothing * -jax.nn.log_sigmoid(-logits_B)) / (1.0 - 2.0 * label_smoothing)
  metrics = dpo._pair_metrics(loss_B, beta * rho_w_B, beta * rho_l_B,
                              policy_chosen_logps_B, policy_rejected_logps_B)
  return jnp.mean(loss_B), metrics


def simpo_loss(policy_chosen_avg_logps_B, policy_rejected_avg_logps_B, *, beta: float,
               gamma: float):
  """SimPO: a reference-free Bradley-Terry loss with a target reward margin.

  r_hat(y) = beta * avg log pi(y|x) = (beta / |y|) sum_t log pi(y_t | x, y_<t);
  L = mean_b -log s(r_hat_w - r_hat_l - gamma).
  At zero margin (equal averaged log-probs): L = log(1 + e^gamma); gamma = 0 is dpo_loss with
  the reference log-probs set to 0. Only the difference of the two averages enters, so adding
  one constant to both leaves L unchanged.

  The caller must pass LENGTH-AVERAGED log-probs (logprobs.sequence_logps(..., average=True)):
  the loss cannot tell, and on sums it becomes the paper's "w/o length normalisation" ablation,
  which favours long responses. No reference model: there are no reference arguments.

  Meng, Xia, Chen (2024), "SimPO: Simple Preference Optimization with a Reference-Free Reward"
  (the paper's settings: beta 2 to 2.5, gamma 0.3 to 1.6; the authors later advise beta 10).

  Args:
    policy_chosen_avg_logps_B, policy_rejected_avg_logps_B: per-token mean log pi_theta of y_w
      and y_l over their response tokens, (B,).
    beta: > 0, the reward scale (static python float).
    gamma: >= 0, the target margin between the two rewards.
  Metrics: as dpo_loss, rewards r_hat = beta * avg logp (the accuracy ignores gamma), logps/*
    the averaged log-probs given.
  """
  dpo._check_python("beta", beta, lambda v: v > 0, "> 0")
  dpo._check_python("gamma", gamma, lambda v: v >= 0, ">= 0")
  _shapes.check_rank("policy_chosen_avg_logps_B", policy_chosen_avg_logps_B, 1)
  _shapes.check_same_shape(policy_chosen_avg_logps_B=policy_chosen_avg_logps_B,
                           policy_rejected_avg_logps_B=policy_rejected_avg_logps_B)
  reward_w_B = beta * policy_chosen_avg_logps_B
  reward_l_B = beta * policy_rejected_avg_logps_B
  loss_B = -jax.nn.log_sigmoid(reward_w_B - reward_l_B - gamma)
  metrics = dpo._pair_metrics(loss_B, reward_w_B, reward_l_B, policy_chosen_avg_logps_B,
                              policy_rejected_avg_logps_B)
  return jnp.mean(loss_B), metrics
