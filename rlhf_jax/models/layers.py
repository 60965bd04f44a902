"""Building blocks of the Llama-family decoder: RMSNorm, rotary embeddings, GQA attention, SwiGLU.

Every parameter carries `logical_axes` metadata; rlhf_jax.sharding maps those names to mesh
axes through one rules table. Parameters are stored in param_dtype and cast to the compute
dtype at use, so bf16 compute with f32 master weights is a config switch.

With cfg.lora_rank > 0 the targeted projections also carry a LoRA module (low-rank adapter) in
an nnx.Dict named `lora`, keyed by the PEFT module name (attn.lora["q_proj"], ...); with rank
0 nothing is added and every computation is the one of the plain model.
"""
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax.models import attention
from rlhf_jax.models.config import ModelConfig


def dense(x_BxTxD, w_DxF, **kwargs):
  """x @ w over a flattened (B*T, D) view. XLA:CPU runs the weight-gradient matmul of a 3-D
  input (contracting over both B and T) about 2x slower than the same 2-D matmul."""
  b, t, d = x_BxTxD.shape
  return jnp.dot(x_BxTxD.reshape(b * t, d), w_DxF, **kwargs).reshape(b, t, w_DxF.shape[-1])


def param(rngs: nnx.Rngs, shape, axes, cfg: ModelConfig, std: float | None = None) -> nnx.Param:
  if len(shape) != len(axes):
    raise ValueError(f"parameter shape {shape} does not match logical axes {axes}")
  if std is None:
    value = jnp.ones(shape, cfg.storage_dtype)
  elif std == 0.0:
    value = jnp.zeros(shape, cfg.storage_dtype)
  else:
    value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(cfg.storage_dtype)
  return nnx.Param(value, logical_axes=tuple(axes))


class LoRAParam(nnx.Param):
  """A low-rank adapter's parameter: its own Variable type, so nnx filters separate adapters
  from the base weights (nnx.state(model, LoRAParam))."""


class LoRA(nnx.Module):
  """The low-rank update of one projection W (in_shape + out_shape): x -> scale * (x @ A) @ B.

  A (in_shape + (r,)) and B ((r,) + out_shape) reuse W's logical axes on W's dimensions, so
  FSDP and tensor parallelism split them like W; the rank axis ("lora_rank") is replicated.
  Init as PEFT's default: A ~ U(-1/sqrt(in), 1/sqrt(in)) (torch's kaiming_uniform(a=sqrt(5))
  of the (r, in) weight), B = 0, so the adapted model equals the base at init. Stored in
  float32 whatever the base's dtype (PEFT's autocast_adapter_dtype): bf16 adapters would round
  away the small updates they are trained with. No dropout (these models have none)."""

  def __init__(self, cfg: ModelConfig, in_shape, in_axes, out_shape, out_axes, *,
               rngs: nnx.Rngs):
    r, bound = cfg.lora_rank, 1.0 / math.sqrt(math.prod(in_shape))
    self.a = LoRAParam(jax.random.uniform(rngs.params(), (*in_shape, r), jnp.float32,
                                          -bound, bound), logical_axes=(*in_axes, "lora_rank"))
    self.b = LoRAParam(jnp.zeros((r, *out_shape), jnp.float32),
                       logical_axes=("lora_rank", *out_axes))
    self.scale, self.dtype = cfg.lora_scale, cfg.compute_dtype

  def __call__(self, x_NxI):
    """The update for inputs whose last dimension is prod(in_shape): ... x prod(out_shape)."""
    r, dt = self.b.shape[0], self.dtype
    x = x_NxI.reshape(-1, x_NxI.shape[-1])
    y = (x @ self.a[...].reshape(-1, r).astype(dt)) * jnp.asarray(self.scale, dt)
    y = y @ self.b[...].reshape(r, -1).astype(dt)
    return y.reshape(*x_NxI.shape[:-1], y.shape[-1])


def adapters(cfg: ModelConfig, rngs: nnx.Rngs, shapes: dict) -> nnx.Dict | None:
  """LoRA modules of the targeted projections among `shapes` (PEFT name -> (in_shape, in_axes,
  out_shape, out_axes)); None when none is targeted (the module then has no `lora`)."""
  lora = {t: LoRA(cfg, *shape, rngs=rngs) for t, shape in shapes.items() if cfg.lora_targeted(t)}
  return nnx.Dict(lora) if lora else None


def adapted(module: nnx.Module, target: str, x_NxI, y_NxO):
  """y (x @ W) plus the LoRA update of `target` on x, if the module adapts it."""
  lora = getattr(module, "lora", None)
  if lora is None or target not in lora:
    return y_NxO
  return y_NxO + lora[target](x_NxI).reshape(y_NxO.shape)


class RMSNorm(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.eps = cfg.norm_eps
    self.dtype = cfg.compute_dtype
    self.scale = param(rngs, (cfg.d_model,), ("norm",), cfg)

  def __call__(self, x_BxTxD):
    x = x_BxTxD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (x * self.scale[...].astype(jnp.float32)).astype(self.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
  """Inverse rotary frequencies, with Llama 3.1's band-wise scaling when configured."""
  h = cfg.dim_per_head
  inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, h, 2, dtype=np.float32) / h))
  s = cfg.rope_scaling
  if s is None:
    return inv_freq.astype(np.float32)
  # Wavelengths longer than the original context / low_freq_factor are slowed down by
  # `factor`; shorter than context / high_freq_factor are kept; in between interpolated.
  wavelen = 2 * math.pi / inv_freq
  low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
  high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
  scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
  smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
            / (s.high_freq_factor - s.low_freq_factor))
  smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x_BxTxNxH, positions_BxT, inv_freq_H2):
  """Rotary embedding in the Hugging Face "rotate half" layout (first half, second half)."""
  angles = positions_BxT.astype(jnp.float32)[..., None] * inv_freq_H2  # BxTxH/2
  cos = jnp.cos(jnp.concatenate([angles, angles], -1))[:, :, None, :]
  sin = jnp.sin(jnp.concatenate([angles, angles], -1))[:, :, None, :]
  x = x_BxTxNxH.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x * cos + rotated * sin).astype(x_BxTxNxH.dtype)


class LayerCache(NamedTuple):
  k_BxSxKxH: jax.Array
  v_BxSxKxH: jax.Array


def write_slots(cache_BxSxKxH, new_BxTxKxH, index):
  """The cache with new's T positions written at slots index, index + 1, ...: a scalar index
  writes every row there; a B-vector writes one token per row at its own slot (rows that
  decode out of step: sampling_stream.py)."""
  new = new_BxTxKxH.astype(cache_BxSxKxH.dtype)
  if jnp.ndim(index) == 0:
    return jax.lax.dynamic_update_slice_in_dim(cache_BxSxKxH, new, index, axis=1)
  if new.shape[1] != 1:
    raise ValueError("a per-row cache index writes one token per row (decoding), got "
                     f"{new.shape[1]}")
  return cache_BxSxKxH.at[jnp.arange(new.shape[0]), index].set(new[:, 0])


class Attention(nnx.Module):
  """Grouped-query attention; with a cache, writes this call's keys/values at `index`."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.dim_per_head
    std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layers)
    self.cfg = cfg
    self.wq = param(rngs, (d, n, h), ("embed", "q_heads", "head_dim"), cfg, std)
    self.wk = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), cfg, std)
    self.wv = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), cfg, std)
    self.wo = param(rngs, (n, h, d), ("q_heads", "head_dim", "embed"), cfg, out_std)
    if cfg.qkv_bias:
      self.bq = param(rngs, (n, h), ("q_heads", "head_dim"), cfg, 0.0)
      self.bk = param(rngs, (k, h), ("kv_heads", "head_dim"), cfg, 0.0)
      self.bv = param(rngs, (k, h), ("kv_heads", "head_dim"), cfg, 0.0)
    lora = adapters(cfg, rngs, {
        "q_proj": ((d,), ("embed",), (n, h), ("q_heads", "head_dim")),
        "k_proj": ((d,), ("embed",), (k, h), ("kv_heads", "head_dim")),
        "v_proj": ((d,), ("embed",), (k, h), ("kv_heads", "head_dim")),
        "o_proj": ((n, h), ("q_heads", "head_dim"), (d,), ("embed",))})
    if lora is not None:
      self.lora = lora

  def _project(self, x_BxTxD, w, bias_name, target):
    dt = self.cfg.compute_dtype
    d, n, h = w.shape
    y = dense(x_BxTxD, w[...].reshape(d, n * h).astype(dt))
    y = adapted(self, target, x_BxTxD, y).reshape(*x_BxTxD.shape[:2], n, h)
    if self.cfg.qkv_bias:
      y = y + getattr(self, bias_name)[...].astype(dt)
    return y

  def __call__(self, x_BxTxD, positions_BxT, mask_BxTxS, cache: LayerCache | None, index):
    cfg = self.cfg
    inv_freq = rope_inv_freq(cfg)  # a trace-time constant
    q = apply_rope(self._project(x_BxTxD, self.wq, "bq", "q_proj"), positions_BxT, inv_freq)
    k = apply_rope(self._project(x_BxTxD, self.wk, "bk", "k_proj"), positions_BxT, inv_freq)
    v = self._project(x_BxTxD, self.wv, "bv", "v_proj")
    if cache is not None:
      k, v = write_slots(cache.k_BxSxKxH, k, index), write_slots(cache.v_BxSxKxH, v, index)
      cache = LayerCache(k, v)
    b, t, n, h = q.shape
    out = attention.attend(q, k, v, mask_BxTxS, cfg).reshape(b, t, n * h)
    y = dense(out, self.wo[...].reshape(n * h, -1).astype(cfg.compute_dtype))
    return adapted(self, "o_proj", out, y), cache


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, f = cfg.d_model, cfg.d_ff
    self.dtype = cfg.compute_dtype
    self.w_gate = param(rngs, (d, f), ("embed", "mlp"), cfg, cfg.init_std)
    self.w_up = param(rngs, (d, f), ("embed", "mlp"), cfg, cfg.init_std)
    self.w_down = param(rngs, (f, d), ("mlp", "embed"), cfg,
                        cfg.init_std / math.sqrt(2 * cfg.n_layers))
    lora = adapters(cfg, rngs, {"gate_proj": ((d,), ("embed",), (f,), ("mlp",)),
                                "up_proj": ((d,), ("embed",), (f,), ("mlp",)),
                                "down_proj": ((f,), ("mlp",), (d,), ("embed",))})
    if lora is not None:
      self.lora = lora

  def _project(self, x_NxI, w, target):
    return adapted(self, target, x_NxI, x_NxI @ w[...].astype(self.dtype))

  def __call__(self, x_BxTxD):
    b, t, d = x_BxTxD.shape
    x = x_BxTxD.reshape(b * t, d)
    gate = jax.nn.silu(self._project(x, self.w_gate, "gate_proj"))
    hidden = gate * self._project(x, self.w_up, "up_proj")
    return self._project(hidden, self.w_down, "down_proj").reshape(b, t, d)


class Block(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg, rngs=rngs)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x_BxTxD, positions_BxT, mask_BxTxS, cache, index):
    y, cache = self.attn(self.attn_norm(x_BxTxD), positions_BxT, mask_BxTxS, cache, index)
    x_BxTxD = x_BxTxD + y
    return x_BxTxD + self.mlp(self.mlp_norm(x_BxTxD)), cache
