"""Shared test helpers: small models, params surgery, and an independent NumPy Llama forward.

The NumPy forward is written from the Llama equations (float64) and shares no code with
rlhf_jax.models: RMSNorm, rotate-half RoPE, softmax attention with each kv head repeated for
its n_heads / n_kv_heads query heads, SwiGLU, final norm, LM head.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax.models.config import preset
from rlhf_jax.models.transformer import Transformer


def nano(**overrides):
  return preset("nano", **overrides)


def init_module(factory, seed: int = 0, std: float = 0.2):
  """(graphdef, params pure dict) of `factory(rngs)` with random NumPy parameters (see
  `randomize`). Shapes come from nnx.eval_shape: no init is compiled, which keeps a cold test
  run fast (the library's own init is tested through sharding.init_sharded)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: factory(nnx.Rngs(0))))
  return graphdef, randomize(state.to_pure_dict(), seed, std)


def make_model(cfg=None, seed: int = 0, std: float = 0.2, **kwargs):
  """(graphdef, random params pure dict) of a Transformer."""
  return init_module(lambda rngs: Transformer(cfg or nano(), rngs=rngs, **kwargs), seed, std)


@functools.partial(jax.jit, static_argnames="graphdef")
def apply(graphdef, params, tokens_BxT, valid_BxT=None):
  """(logits_BxTxV, hidden_BxTxD) of a Transformer, jitted per graphdef and shape."""
  out = nnx.merge(graphdef, params)(tokens_BxT, valid_BxT=valid_BxT, return_hidden=True)
  return out.logits_BxTxV, out.hidden_BxTxD


def randomize(params, seed: int, std: float = 0.3):
  """Replaces every parameter with N(0, std) (norm scales with 1 + N(0, 0.1)), so logits are
  peaked and biases nonzero: a stronger test than the near-uniform default init."""
  leaves, treedef = jax.tree.flatten_with_path(params)
  rng = np.random.default_rng(seed)
  out = []
  for path, x in leaves:
    name = str(path[-1].key)
    noise = rng.standard_normal(x.shape)
    value = 1.0 + 0.1 * noise if name == "scale" else std * noise
    out.append(jnp.asarray(value, x.dtype))
  return jax.tree.unflatten(treedef, out)


# ----------------------------------------------------------------------------------------
# Float32 comparison tolerances.

F32_EPS = float(np.finfo(np.float32).eps)  # 2**-23 ~= 1.19e-7; round-to-nearest unit u = eps/2


def f32_tol(n_terms: int, scale: float = 1.0) -> dict:
  """`assert_allclose` tolerances for two float32 evaluations of one quantity that may differ
  only in rounding: another reduction order (XLA's CPU kernels differ between AVX2 and AVX-512
  machines, sharded vs unsharded, cached vs full forward) or a float64 reference.

  Derivation: a float32 sum of n terms, in any order, is within (n - 1)·u·sum|x_i| of the exact
  sum (Higham, Accuracy and Stability of Numerical Algorithms, §4.2), so two evaluations differ
  by less than n·eps·sum|x_i|. Roundings along a chain of reductions add to first order, so
  n_terms is the sum of the chain's reduction lengths (`forward_terms` for a model forward).
  - rtol = n·eps: for results about as large as their terms (no cancellation), e.g. log-probs,
    losses, norms.
  - atol = n·eps·scale: for results that may cancel to near 0, with `scale` the size of the
    terms (1 for unit-scale values: log-probs, advantages, normalised rewards).
  The bound is worst case (random rounding errors grow like sqrt(n)), and for n below ~10^4 it
  stays far below the >= 1e-2 relative change of a wrong formula, so these tests still fail
  on real bugs.
  """
  tol = n_terms * F32_EPS
  return dict(rtol=tol, atol=tol * scale)


def forward_terms(cfg, seq_len: int, log_softmax: bool = True) -> int:
  """Sum of the float32 reduction lengths along one Transformer forward to log-probs (see
  `f32_tol`): per layer the two RMSNorm mean-squares (2·d_model), the q/k/v projections
  (d_model), the scores q·k (dim_per_head), the softmax normaliser and the weighted sum of
  values (2·seq_len), the output projection (n_heads·dim_per_head), gate/up (d_model) and down
  (d_ff); then the final norm and LM head (2·d_model) and, for log-probs, the log-softmax
  (vocab_size). nano, 2 layers, 16 positions: 1512 terms, so rtol ~= 1.8e-4."""
  d, h = cfg.d_model, cfg.dim_per_head
  per_layer = 2 * d + d + h + 2 * seq_len + cfg.n_heads * h + d + cfg.d_ff
  return cfg.n_layers * per_layer + 2 * d + (cfg.vocab_size if log_softmax else 0)


def logits_tol(cfg, seq_len: int, logits) -> dict:
  """f32_tol of a forward to logits (no log-softmax), atol at the size of the logits: a logit
  near 0 is a cancelling sum of terms of about that size."""
  return f32_tol(forward_terms(cfg, seq_len, log_softmax=False), scale=np.abs(logits).max())


def matmul_tol(x, w) -> dict:
  """f32_tol of x @ w against a float64 product: the bound n·eps·sum_k |x_k w_k| with the
  sum taken exactly, its largest entry as scale."""
  x, w = np.abs(np.asarray(x, np.float64)), np.abs(np.asarray(w, np.float64))
  return f32_tol(x.shape[-1], scale=(x @ w).max())


def step_tol(n_terms: int, params_before, params_after) -> dict:
  """Tolerance for parameters after one update, p - u, vs another float32 evaluation of it:
  one rounding of p - u (rtol = eps) plus the update's own rounding, n_terms reductions at the
  size of the largest update (atol, see f32_tol). Pass one leaf at a time."""
  u = np.abs(np.asarray(params_after, np.float64) - np.asarray(params_before, np.float64)).max()
  return dict(rtol=F32_EPS, atol=n_terms * F32_EPS * u)


def make_forward(graphdef):
  """Jitted full forward: (params, tokens_BxT, valid_BxT) -> logits_BxTxV (f32)."""
  return lambda params, tokens_BxT, valid_BxT: apply(graphdef, params, tokens_BxT, valid_BxT)[0]


# ----------------------------------------------------------------------------------------
# Independent NumPy float64 reference.

def np_rms_norm(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def np_rotate_half(x):
  h = x.shape[-1] // 2
  return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def np_rope(x_TxNxH, pos_T, theta):
  h = x_TxNxH.shape[-1]
  freqs = np.array([theta ** (-2.0 * i / h) for i in range(h // 2)])
  ang = pos_T[:, None] * freqs[None, :]  # T x H/2
  ang = np.concatenate([ang, ang], axis=-1)[:, None, :]
  return x_TxNxH * np.cos(ang) + np_rotate_half(x_TxNxH) * np.sin(ang)


def np_silu(x):
  return x / (1.0 + np.exp(-x))


def np_forward(params, cfg, tokens_T):
  """Logits TxV of one unpadded sequence, in float64, from the Llama equations."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  t = len(tokens_T)
  pos = np.arange(t, dtype=np.float64)
  n, k, h = cfg.n_heads, cfg.n_kv_heads, cfg.dim_per_head
  x = p["embed"][np.asarray(tokens_T)]  # TxD
  for i in range(cfg.n_layers):
    blk = p["blocks"][i]
    a = blk["attn"]
    y = np_rms_norm(x, blk["attn_norm"]["scale"], cfg.norm_eps)
    q = np.einsum("td,dnh->tnh", y, a["wq"])
    kk = np.einsum("td,dkh->tkh", y, a["wk"])
    v = np.einsum("td,dkh->tkh", y, a["wv"])
    if cfg.qkv_bias:
      q, kk, v = q + a["bq"], kk + a["bk"], v + a["bv"]
    q, kk = np_rope(q, pos, cfg.rope_theta), np_rope(kk, pos, cfg.rope_theta)
    heads = []
    for j in range(n):
      kv = j // (n // k)  # repeat_kv: query head j reads kv head j // groups
      s = q[:, j] @ kk[:, kv].T / math.sqrt(h)
      s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
      s = np.exp(s - s.max(-1, keepdims=True))
      heads.append((s / s.sum(-1, keepdims=True)) @ v[:, kv])
    o = np.stack(heads, axis=1)  # TxNxH
    x = x + np.einsum("tnh,nhd->td", o, a["wo"])
    m = blk["mlp"]
    y = np_rms_norm(x, blk["mlp_norm"]["scale"], cfg.norm_eps)
    x = x + (np_silu(y @ m["w_gate"]) * (y @ m["w_up"])) @ m["w_down"]
  x = np_rms_norm(x, p["final_norm"]["scale"], cfg.norm_eps)
  w = p["embed"].T if cfg.tie_embeddings else p["lm_head"]
  return x @ w


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
