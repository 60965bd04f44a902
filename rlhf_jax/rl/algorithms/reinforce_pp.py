"""REINFORCE++ (Hu 2025): no critic and no per-group normaliser; the k1 KL to the reference is
folded into each token's reward, returns are summed to the end of the response, and the
advantages are normalised over the WHOLE BATCH of tokens before PPO's clipped surrogate:

  r_t = -kl_coef (log pi_old - log pi_ref) + [t = last] r(x, y)
  A_t = whiten_batch( sum_{s >= t} gamma^(s-t) r_s )
  loss = token mean of -min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t)

group_baseline=True is the paper's REINFORCE++-baseline: each group's mean reward is
subtracted first. Sampling is the group family's (GroupSampling; G = 1 is plain REINFORCE++).
Loss: losses/reinforce_pp.py; docs/math.md, "GRPO family".
"""
import jax
import jax.numpy as jnp

from rlhf_jax.losses import reinforce_pp as rpp_losses
from rlhf_jax.rl.grouped_forward import PromptGroups
from rlhf_jax.rl.rollout import Rollout, row_logps

PROGRESS_KEYS = ("reward_mean", "kl_seq", "clipfrac_per_token")


def reinforce_pp_batch_fn(*, kl_coef: float, gamma: float = 1.0, group_size: int | None = None):
  """make_batch(rollout, rewards_B) -> (batch, stats): the token advantages over the rollout's
  response block (whitened over the whole rollout), and the batch tokens, valid, mask,
  old_logps, advantages. Needs the reference in the rollout when kl_coef > 0."""
  @jax.jit
  def make_batch(rollout: Rollout, rewards_B):
    n = rollout.sampler_logps_BxN.shape[1]
    resp = lambda x: x[:, -n:]  # the contiguous, right-padded response block
    ref = rollout.ref_logps_BxT if kl_coef > 0 else rollout.old_logps_BxT
    adv, _ = rpp_losses.reinforce_pp_advantages(
        resp(rollout.old_logps_BxT), resp(ref), rewards_B.astype(jnp.float32),
        resp(rollout.mask_BxT), kl_coef=kl_coef, gamma=gamma, group_size=group_size)
    adv = jnp.pad(adv, ((0, 0), (rollout.mask_BxT.shape[1] - n, 0)))
    batch = {"tokens": rollout.tokens_BxT, "valid": rollout.valid_BxT,
             "mask": rollout.mask_BxT, "old_logps": rollout.old_logps_BxT, "advantages": adv}
    return batch, {"advantages_abs_mean": jnp.sum(jnp.abs(adv)) / jnp.maximum(
        jnp.sum(rollout.mask_BxT), 1.0)}
  return make_batch


def reinforce_pp_loss_fn(graphdef, *, clip_eps: float, temperature: float = 1.0,
                         prompt_groups: PromptGroups | None = None):
  """loss_fn(params, batch, rng) -> (loss_sum, aux) in the step contract: token sums,
  aux["denominator"] = response tokens; aux SUMS policy_loss, clipfrac, approx_kl, ratio,
  token_count. With prompt_groups each group's prompt is computed once
  (rl/grouped_forward.py)."""
  def loss_fn(params, batch, rng):
    del rng
    logps = row_logps(graphdef, params, batch["tokens"], batch["valid"], temperature,
                      prompt_groups)
    _, m = rpp_losses.reinforce_pp_loss(logps, batch["old_logps"], batch["advantages"],
                                        batch["mask"], clip_eps=clip_eps, normaliser=1.0)
    aux = {"denominator": m["token_count"], "policy_loss": m["policy_loss_sum"],
           "clipfrac": m["clipfrac_sum"], "approx_kl": m["approx_kl_sum"],
           "ratio": m["ratio_sum"], "token_count": m["token_count"]}
    return m["policy_loss_sum"], aux

  return loss_fn
