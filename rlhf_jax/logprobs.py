"""Logits -> per-token log-probs, masked sequence reductions, entropy.

Alignment convention used across the project: `logps_BxT[:, t]` is log p(tokens[:, t] |
tokens[:, <t]), so it lines up with a target mask over the same token positions; position 0
(never a target: it is BOS or padding) gets 0.
"""
import jax
import jax.numpy as jnp

from rlhf_jax.losses import _shapes


def token_logps(logits_BxTxV, targets_BxT, *, temperature: float = 1.0):
  """log softmax(logits / temperature)[target], without materialising the log-softmax:
  one logsumexp and one gather over the vocabulary."""
  logits = logits_BxTxV.astype(jnp.float32)
  if temperature != 1.0:
    logits = logits / temperature
  lse_BxT = jax.nn.logsumexp(logits, axis=-1)
  target_BxT = jnp.take_along_axis(logits, targets_BxT[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return target_BxT - lse_BxT


def shifted_logps(logits_BxTxV, tokens_BxT, *, temperature: float = 1.0):
  """Causal-LM log-probs aligned to the tokens they score (see the module docstring)."""
  logps = token_logps(logits_BxTxV[:, :-1], tokens_BxT[:, 1:], temperature=temperature)
  return jnp.pad(logps, ((0, 0), (1, 0)))


def next_token_logits(logits_fn, hidden_BxTxD):
  """The logits that predict tokens 1..T-1 (B x T-1 x V): the LM head (logits_fn) on every
  position but the last, whose prediction no target scores. Slicing the D-wide hidden states
  rather than the V-wide logits keeps a sliced copy of the logits, and its zero-padded
  gradient, out of a train step (measured: a small-preset DPO step 10% faster, 6% less
  memory)."""
  return logits_fn(hidden_BxTxD[:, :-1])


def shifted_logps_of(logits_fn, hidden_BxTxD, tokens_BxT, *, temperature: float = 1.0):
  """shifted_logps of the logits logits_fn(hidden) would give, via next_token_logits."""
  logps = token_logps(next_token_logits(logits_fn, hidden_BxTxD), tokens_BxT[:, 1:],
                      temperature=temperature)
  return jnp.pad(logps, ((0, 0), (1, 0)))


def entropy(logits_BxTxV):
  """Entropy of softmax(logits) per position: lse - sum p * logits."""
  logits = logits_BxTxV.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
  p = jnp.exp(logits - lse)
  # -inf logits (truncated tokens, e.g. after top-k) contribute 0, not 0 * -inf = NaN.
  return lse[..., 0] - jnp.sum(jnp.where(p > 0, p * logits, 0.0), axis=-1)


def masked_sum(x_BxT, mask_BxT):
  """Per-row masked sum: B. `where`, not a bare product: a masked -inf must not become NaN."""
  _shapes.check_rank("x_BxT", x_BxT, 2)
  _shapes.check_same_shape(x_BxT=x_BxT, mask_BxT=mask_BxT)
  mask_BxT = mask_BxT.astype(x_BxT.dtype)
  return jnp.sum(jnp.where(mask_BxT > 0, x_BxT * mask_BxT, 0.0), axis=-1)


def masked_mean(x_BxT, mask_BxT):
  """Per-row masked mean: B. An all-masked row gives 0, not NaN."""
  count = jnp.sum(mask_BxT.astype(x_BxT.dtype), axis=-1)
  return masked_sum(x_BxT, mask_BxT) / jnp.maximum(count, 1.0)


def sequence_logps(logps_BxT, mask_BxT, *, average: bool = False):
  """log pi(y|x) as the SUM of response-token log-probs (the project's convention,
  docs/math.md#conventions), or their mean when average=True (length-normalised, as TRL
  runs IPO)."""
  _shapes.check_rank("logps_BxT", logps_BxT, 2)
  _shapes.check_same_shape(logps_BxT=logps_BxT, mask_BxT=mask_BxT)
  return masked_mean(logps_BxT, mask_BxT) if average else masked_sum(logps_BxT, mask_BxT)
