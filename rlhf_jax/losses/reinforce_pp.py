"""REINFORCE++ (Hu 2025, "REINFORCE++: a simple and efficient approach for aligning large
language models"): PPO's token-level KL-shaped reward and clipped surrogate, no critic.

Shapes as losses/ppo.py: B responses of T token slots, mask_BxT right-padded and contiguous.

Equations (docs/math.md, "GRPO family"):
  token reward (k1 KL penalty folded into the reward, sequence reward on the last token):
    r_t = -kl_coef (log pi_old(y_t) - log pi_ref(y_t)) + [t = last] r(x, y)
  return:  G_t = sum_{s >= t} gamma^{s-t} r_s   (gamma = 1 in the paper)
  batch-normalised advantage, mean and std over ALL masked tokens of the batch:
    A_t = (G_t - mean(G)) / sqrt(var(G) + eps)   (population variance)
  loss: PPO's clipped surrogate on A_t, token mean (ppo.ppo_policy_loss).
REINFORCE++-baseline (same paper, for groups of G samples per prompt in prompt-major order):
  the group mean of the sequence rewards is subtracted first, r(x, y_i) <- r_i - mean_j r_j,
  then the same KL shaping, returns and batch normalisation.

The batch statistics are those of the arrays given: call reinforce_pp_advantages on the whole
rollout batch (under jit the global arrays, so every host sees the global mean and std) and
only then split it into microbatches.
"""
from typing import Optional

import jax.numpy as jnp

from rlhf_jax.losses import grpo, ppo


def reinforce_pp_advantages(old_logps_BxT, ref_logps_BxT, rewards_B, mask_BxT, *,
                            kl_coef: float, gamma: float = 1.0,
                            group_size: Optional[int] = None, eps: float = 1e-8,
                            truncated_B=None, truncation_penalty: float = 0.0):
  """REINFORCE++ advantages: KL-shaped token rewards, discounted returns, batch whitening.

  Args:
    old_logps_BxT: log pi_old of the sampled tokens (the policy that sampled them), (B, T).
    ref_logps_BxT: log pi_ref of the same tokens, (B, T).
    rewards_B: sequence rewards r(x, y), (B,).
    mask_BxT: response tokens, (B, T).
    kl_coef: beta of the k1 penalty r_t -= beta (log pi_old - log pi_ref).
    gamma: discount of the return (the paper uses 1).
    group_size: None for REINFORCE++; G for REINFORCE++-baseline (B = prompts * G,
      prompt-major): subtract each group's mean reward before shaping.
    eps: added to the batch variance before the square root.
    truncated_B, truncation_penalty: as ppo.rlhf_token_rewards (penalty subtracted from the
      sequence reward of rows cut at the length limit).
  Returns (advantages_BxT, returns_BxT), both 0 on masked tokens; the advantages have mean 0
  and std sqrt(var / (var + eps)) over the masked tokens.
  """
  if group_size is not None:
    if rewards_B.ndim != 1 or rewards_B.shape[0] % group_size:
      raise ValueError(f"rewards_B{tuple(rewards_B.shape)} must be (prompts * group_size,) "
                       f"with group_size={group_size}")
    rewards_B = grpo.dr_grpo_advantages(rewards_B.reshape(-1, group_size)).reshape(-1)
  token_rewards_BxT = ppo.rlhf_token_rewards(
      old_logps_BxT, ref_logps_BxT, rewards_B, mask_BxT, kl_coef=kl_coef,
      truncated_B=truncated_B, truncation_penalty=truncation_penalty)
  # With V = 0 and lambda = 1, GAE's advantage is the discounted return G_t (no bootstrap:
  # REINFORCE++ has no critic; a truncated row's penalty is already in its reward).
  returns_BxT, _ = ppo.gae_advantages(token_rewards_BxT, jnp.zeros_like(token_rewards_BxT),
                                      mask_BxT, gae_gamma=gamma, gae_lambda=1.0)
  return ppo.masked_whiten(returns_BxT, mask_BxT, eps=eps), returns_BxT


def reinforce_pp_loss(logps_BxT, old_logps_BxT, advantages_BxT, mask_BxT, *, clip_eps: float,
                      normaliser=None):
  """REINFORCE++'s policy loss: the PPO clipped surrogate (Schulman 2017) on the token
  advantages of reinforce_pp_advantages, token mean,
    L = -(1/N) sum_{i,t} min(rho A, clip(rho, 1 - clip_eps, 1 + clip_eps) A),
  N = the token count of the call, or `normaliser` (the GLOBAL token count of the step).
  This is ppo.ppo_policy_loss; returns its (loss, metrics): policy_loss_sum, clipfrac_sum,
  approx_kl_sum, ratio_sum, token_count.
  """
  return ppo.ppo_policy_loss(logps_BxT, old_logps_BxT, advantages_BxT, mask_BxT,
                             clip_eps=clip_eps, normaliser=normaliser)
