"""Scaled dot-product attention of grouped queries under a boolean mask, in two forms.

"einsum" writes the computation out: f32 scores, masked to a large finite negative, softmax in
f32, probabilities in the compute dtype. It is the reference, and on CPU the faster form.
"fused" calls jax.nn.dot_product_attention, which reaches cuDNN's flash-attention kernel on
GPU (it never materialises the T x S scores in memory); where cuDNN refuses the shape or dtype,
or there is no GPU, it falls back to XLA's implementation of the same function. Both give a
fully masked query row (a padding position) uniform attention, never NaN.

With cfg.remat == "attention" the attention is wrapped in jax.checkpoint: the backward pass
recomputes the scores and probabilities from q, k and v instead of keeping the T x S arrays,
which dominate activation memory at long sequence lengths.
"""
import functools
import math

import jax
import jax.numpy as jnp

from rlhf_jax.models.config import ModelConfig

# Large finite negative for masked attention scores: a fully masked row (a padding query)
# softmaxes to a uniform distribution instead of NaN.
_MASKED = -1e30
# What jax.nn.dot_product_attention raises when an implementation does not apply: no cuDNN
# ("cuDNN is not detected"), or a shape, dtype or mask it does not support.
_REFUSALS = (RuntimeError, ValueError, NotImplementedError)


def implementation(cfg: ModelConfig) -> str:
  """The form cfg.attention selects on this backend: "einsum" or "fused"."""
  if cfg.attention != "auto":
    return cfg.attention
  return "einsum" if jax.default_backend() == "cpu" else "fused"


def fused_candidates() -> tuple[str, ...]:
  """jax.nn.dot_product_attention implementations to try, best first. cuDNN's flash kernel
  only exists on GPU; XLA's always applies."""
  return ("cudnn", "xla") if jax.default_backend() == "gpu" else ("xla",)


def _einsum(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS, dtype):
  b, t, n, h = q_BxTxNxH.shape
  kv_heads = k_BxSxKxH.shape[2]
  q = q_BxTxNxH.reshape(b, t, kv_heads, n // kv_heads, h)
  scores = jnp.einsum("btkgh,bskh->bkgts", q, k_BxSxKxH.astype(q.dtype),
                      preferred_element_type=jnp.float32) / math.sqrt(h)
  scores = jnp.where(mask_BxTxS[:, None, None], scores, _MASKED)
  probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v_BxSxKxH.astype(dtype))
  return out.reshape(b, t, n, h)


def _fused(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS, dtype):
  q, k, v = (x.astype(dtype) for x in (q_BxTxNxH, k_BxSxKxH, v_BxSxKxH))
  mask = mask_BxTxS[:, None].astype(bool)  # B x 1 x T x S: the same mask for every head
  refusals = []
  for impl in fused_candidates():
    try:
      return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)
    except _REFUSALS as e:  # raised while tracing: nothing has run yet
      refusals.append(f"{impl}: {e}")
  raise RuntimeError("no jax.nn.dot_product_attention implementation applies: "
                     + "; ".join(refusals) + " (use --attention=einsum)")


def attend(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS, cfg: ModelConfig):
  """softmax(q k^T / sqrt(H) masked) v per head, K kv heads shared by N / K query heads each:
  B x T x N x H in the compute dtype."""
  fn = _einsum if implementation(cfg) == "einsum" else _fused
  fn = functools.partial(fn, dtype=cfg.compute_dtype)
  if cfg.remat == "attention":
    fn = jax.checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable)
  return fn(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS)
