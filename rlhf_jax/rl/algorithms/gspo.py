"""GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization"): the group family's sampling
and group advantages (rl/algorithms/grpo.py: GroupSampling, grpo_batch_fn), with the
importance ratio and its clip taken per SEQUENCE instead of per token:

  s_i = exp( (1/|y_i|) sum_t (log pi(y_it) - log pi_old(y_it)) )
  loss = -(1/N) sum_i min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i)  [+ kl_coef k3]
         N = the responses with at least one token (an empty-mask filler counts nowhere)

A length-normalised sequence ratio has the variance of one token's, so GSPO clips at ranges of
~3e-4 / 4e-4 rather than 0.2. Loss: losses/gspo.py; docs/math.md, "GRPO family".
"""
from rlhf_jax.losses import gspo as gspo_losses
from rlhf_jax.rl.grouped_forward import PromptGroups
from rlhf_jax.rl.rollout import row_logps

PROGRESS_KEYS = ("reward_mean", "zero_variance_frac", "rollout_rounds", "clipfrac", "kl")


def gspo_loss_fn(graphdef, *, clip_eps_low: float, clip_eps_high: float, kl_coef: float,
                 temperature: float = 1.0, prompt_groups: PromptGroups | None = None):
  """loss_fn(params, batch, rng) -> (loss_sum, aux) in the step contract: sums over responses
  (a response with an empty mask counts nowhere), aux["denominator"] = responses; aux SUMS
  policy_loss, clipfrac and ratio per response, kl (mean k3 per response, with kl_coef > 0),
  token_count and count. The batch is the group family's (grpo.rollout_batch); with
  prompt_groups each group's prompt is computed once (rl/grouped_forward.py)."""
  if kl_coef < 0:
    raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")

  def loss_fn(params, batch, rng):
    del rng
    logps = row_logps(graphdef, params, batch["tokens"], batch["valid"], temperature,
                      prompt_groups)
    ref = batch.get("ref_logps") if kl_coef > 0 else None
    if kl_coef > 0 and ref is None:
      raise ValueError("kl_coef > 0 needs batch['ref_logps']")
    _, m = gspo_losses.gspo_loss(logps, batch["old_logps"], ref, batch["advantages"],
                                 batch["mask"], clip_eps_low=clip_eps_low,
                                 clip_eps_high=clip_eps_high, kl_coef=kl_coef, normaliser=1.0)
    aux = {"denominator": m["count"], "policy_loss": m["policy_loss_sum"],
           "clipfrac": m["clipfrac_sum"], "ratio": m["ratio_sum"],
           "token_count": m["token_count"], "count": m["count"]}
    if ref is not None:
      aux["kl"] = m["kl_sum"]
    return m["loss_sum"], aux

  return loss_fn
