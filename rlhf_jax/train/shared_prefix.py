"""Forwards over shared-prompt rows (data/shared_prefix.py): one row per prompt, K responses.

response_logps: log pi(y_k | x) of each response, with the LM head run on the states that
predict response tokens only (B x K x N of them, not every position of the row).
response_scores: a reward model's score of each response, read at its last token.
Both equal the same quantities computed on K separate rows [bos + prompt + response_k] to
float32 rounding (tests/train/test_shared_prefix.py).
"""
import jax.numpy as jnp
from flax import nnx

from rlhf_jax.logprobs import sequence_logps, token_logps


def _row_inputs(batch) -> dict:
  return dict(valid_BxT=batch["valid"], positions_BxT=batch["positions"],
              segment_ids_BxT=batch["segment_ids"], prefix_ids_BxT=batch["prefix_ids"])


def response_logps(graphdef, params, batch, *, average: bool = False):
  """B x K sequence log-probs (sums over response tokens, or means with average=True)."""
  model = nnx.merge(graphdef, params)
  hidden_BxTxD, _ = model.hidden(batch["tokens"], **_row_inputs(batch))
  b, k, n = batch["from"].shape
  from_BxM = batch["from"].reshape(b, k * n)
  predicting = jnp.take_along_axis(hidden_BxTxD, from_BxM[..., None], axis=1)  # B x KN x D
  logps = token_logps(model.logits(predicting), batch["targets"].reshape(b, k * n))
  seq = sequence_logps(logps.reshape(b * k, n), batch["target_mask"].reshape(b * k, n),
                       average=average)
  return seq.reshape(b, k)


def response_scores(graphdef, params, batch):
  """B x K float32 scores of a ScalarHeadModel, each read at its response's last token."""
  values_BxT = nnx.merge(graphdef, params)(batch["tokens"], **_row_inputs(batch))
  return jnp.take_along_axis(values_BxT.astype(jnp.float32), batch["ends"], axis=1)
