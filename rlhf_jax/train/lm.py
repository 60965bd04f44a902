"""Causal-LM loss for pretraining and SFT, in the train step's loss contract (step.py).

Batch (rlhf_jax.data.pipeline): tokens BxT, valid BxT, loss_mask BxT (1 on target tokens),
and segment_ids BxT for packed rows (rlhf_jax.data.packing).
"""
import jax.numpy as jnp
from flax import nnx

from rlhf_jax.logprobs import next_token_logits, token_logps
from rlhf_jax.losses.sft import sft_loss


def lm_loss_fn(graphdef):
  """loss_fn(params, batch, rng) -> (summed token NLL, {"denominator": tokens, ...})."""

  def loss_fn(params, batch, rng):
    del rng  # deterministic forward: no dropout in these models
    model = nnx.merge(graphdef, params)
    hidden, _ = model.hidden(batch["tokens"], valid_BxT=batch["valid"],
                             segment_ids_BxT=batch.get("segment_ids"))
    logits = next_token_logits(model.logits, hidden)  # predicting tokens 1..T-1
    logps_BxT = jnp.pad(token_logps(logits, batch["tokens"][:, 1:]), ((0, 0), (1, 0)))
    mask_BxT = batch["loss_mask"]
    _, metrics = sft_loss(logps_BxT, mask_BxT)
    predicted = jnp.pad(jnp.argmax(logits, axis=-1), ((0, 0), (1, 0)))
    correct = jnp.sum((predicted == batch["tokens"]) * mask_BxT)
    return metrics["loss_sum"], {"denominator": metrics["count"], "token_accuracy": correct}

  return loss_fn
