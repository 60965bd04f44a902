"""Supervised fine-tuning and the PPO-ptx pretraining term.

L_SFT = -E_{(x,y)} sum_t log pi(y_t | x, y_<t)   over response tokens only (docs/math.md,
"SFT and PPO-ptx"), here normalised per token: loss = -sum(logps * mask) / sum(mask).

Metrics (sums plus counts, so microbatches and hosts combine exactly):
  loss_sum   sum over unmasked tokens of the per-token loss (loss == loss_sum / count)
  nll_sum    sum over unmasked tokens of -log pi(y_t | ...) (unweighted by ptx_coef)
  count      number of unmasked tokens
Under gradient accumulation or data parallelism divide the summed `loss_sum` by the GLOBAL
`count` of the step; the per-call mean `loss` is exact only for one microbatch.
"""
import jax.numpy as jnp

from rlhf_jax.losses import _shapes


def _masked_token_nll(logps_BxT, mask_BxT):
  _shapes.check_rank("logps_BxT", logps_BxT, 2)
  _shapes.check_same_shape(logps_BxT=logps_BxT, mask_BxT=mask_BxT)
  mask_BxT = mask_BxT.astype(logps_BxT.dtype)
  # where, not multiply: a masked -inf log-prob must not turn into NaN.
  nll_sum = -jnp.sum(jnp.where(mask_BxT > 0, logps_BxT * mask_BxT, 0.0))
  return nll_sum, jnp.sum(mask_BxT)


def sft_loss(logps_BxT, mask_BxT):
  """Masked token cross-entropy from per-token target log-probs.

  Args:
    logps_BxT: log pi(y_t | x, y_<t) of the target tokens, (B, T).
    mask_BxT: 1 (or True) on response tokens, 0 on prompt and padding, (B, T).

  Returns:
    (loss, metrics): loss = -sum(logps * mask) / max(sum(mask), 1); an all-masked batch gives 0.
  """
  nll_sum, count = _masked_token_nll(logps_BxT, mask_BxT)
  loss = nll_sum / jnp.maximum(count, 1.0)
  return loss, {"loss_sum": nll_sum, "nll_sum": nll_sum, "count": count}


def ptx_loss(logps_BxT, mask_BxT, *, ptx_coef: float):
  """PPO-ptx pretraining term (Ouyang et al. 2022, eq. 2), as a loss to ADD to the RL loss.

  The objective adds ptx_coef * E_{x~D_pretrain}[log pi(x)]; as a loss that is
  ptx_coef * (token-mean NLL of pretraining text) = ptx_coef * sft_loss(logps_BxT, mask_BxT).
  (Ouyang et al. write the coefficient gamma; here it is ptx_coef.)

  Args:
    logps_BxT: per-token log-probs of pretraining text under the policy, (B, T).
    mask_BxT: 1 on scored tokens, (B, T).
    ptx_coef: the pretraining coefficient, >= 0 (InstructGPT used 27.8).
  """
  if isinstance(ptx_coef, (int, float)) and ptx_coef < 0:
    raise ValueError(f"ptx_coef must be >= 0, got {ptx_coef}")
  nll_sum, count = _masked_token_nll(logps_BxT, mask_BxT)
  loss_sum = ptx_coef * nll_sum
  loss = loss_sum / jnp.maximum(count, 1.0)
  return loss, {"loss_sum": loss_sum, "nll_sum": nll_sum, "count": count}
