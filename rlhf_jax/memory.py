"""Analytic per-device memory of a training run: will it fit, before anything compiles?

Terms (bytes per device; `shards(x)` = how many devices split tensor x under
sharding.LOGICAL_RULES for the given mesh shape, computed from the model's real logical axes):
  params       sum_x numel(x) / shards(x) * param_bytes
  optimizer    Adam mu and nu in float32: 2 * 4 * sum_x numel(x) / shards(x)
  gradients    float32 accumulators (step.py sums microbatch grads in f32):
               4 * sum_x numel(x) / shards(x)
  reference    a frozen copy of the policy (param_bytes), when its log-probs are NOT
               precomputed; 0 otherwise
  other_models reward / value models: their parameter count (an argument; 0 for DPO) in
               param_bytes, sharded over fsdp*tensor
  activations  what backprop keeps for one microbatch of b = batch / microbatches / (data*fsdp)
               sequences of length T on this device (no rematerialisation):
                 per layer  c * b*T*D * compute_bytes        (c = ACTIVATION_FACTOR: norm inputs,
                                                            q/k/v, attention output, the SwiGLU
                                                            gate/up/product, residuals)
                          + b*(N/tensor)*T*T * 4              (f32 attention probabilities)
                 plus logits b*T*(V/tensor) * 4 * 2           (f32 logits and their log-softmax)
  kv_cache     sampling cache: 2 (k, v) * layers * B_s/(data*fsdp) * S * (kv_heads/tensor)
               * head_dim * compute_bytes; 0 when no sampling batch is given
The estimate leaves out XLA's temporaries and fragmentation: plan for ~20% headroom.
"""
import math
from typing import Mapping

import jax.numpy as jnp
from flax import nnx

from rlhf_jax import sharding
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.transformer import Transformer

ACTIVATION_FACTOR = 16
TERMS = ("params", "optimizer", "gradients", "reference", "other_models", "activations",
         "kv_cache")


class _MeshShape:
  """Just enough of a Mesh for sharding.logical_to_spec: axis sizes, no devices."""

  def __init__(self, shape: Mapping[str, int]):
    self.shape = {a: int(shape.get(a, 1)) for a in sharding.MESH_AXES}


def sharded_numel(cfg: ModelConfig, mesh_shape: Mapping[str, int]) -> int:
  """Parameters one device holds under LOGICAL_RULES (from the model's abstract state)."""
  _, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  mesh = _MeshShape(mesh_shape)
  axes = sharding.logical_axes(state)
  shapes = state.to_pure_dict()
  total = 0
  flat_axes = {tuple(p): a for p, a in _flatten(axes)}
  for path, x in _flatten(shapes):
    spec = sharding.logical_to_spec(flat_axes[tuple(path)], x.shape, mesh)
    shards = math.prod(_size(mesh, s) for s in spec)
    total += math.prod(x.shape) // shards
  return total


def _flatten(tree, prefix=()):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _flatten(v, prefix + (k,))
  else:
    yield prefix, tree


def _size(mesh: _MeshShape, entry) -> int:
  if entry is None:
    return 1
  names = (entry,) if isinstance(entry, str) else entry
  return math.prod(mesh.shape[a] for a in names)


def estimate(cfg: ModelConfig, mesh_shape: Mapping[str, int], *, batch_size: int, seq_len: int,
             num_microbatches: int = 1, reference_params: bool = False,
             other_model_params: int = 0, sample_batch: int = 0, sample_len: int = 0,
             activation_factor: int = ACTIVATION_FACTOR) -> dict[str, int]:
  """Bytes per device for each of TERMS plus "total" (see the module docstring).

  batch_size: sequences per step through the trained model (DPO: 2 per pair).
  """
  mesh = _MeshShape(mesh_shape)
  dp, tp = mesh.shape["data"] * mesh.shape["fsdp"], mesh.shape["tensor"]
  p_bytes = jnp.dtype(cfg.param_dtype).itemsize
  c_bytes = jnp.dtype(cfg.dtype).itemsize
  numel = sharded_numel(cfg, mesh.shape)
  b = math.ceil(batch_size / num_microbatches / dp)
  heads = cfg.n_heads // tp if cfg.n_heads % tp == 0 else cfg.n_heads
  vocab = cfg.vocab_size // tp if cfg.vocab_size % tp == 0 else cfg.vocab_size
  per_layer = (activation_factor * b * seq_len * cfg.d_model * c_bytes
               + b * heads * seq_len * seq_len * 4)
  kv_heads = cfg.n_kv_heads // tp if cfg.n_kv_heads % tp == 0 else cfg.n_kv_heads
  out = {
      "params": numel * p_bytes,
      "optimizer": 2 * 4 * numel,
      "gradients": 4 * numel,
      "reference": numel * p_bytes if reference_params else 0,
      "other_models": math.ceil(other_model_params / (mesh.shape["fsdp"] * tp)) * p_bytes,
      "activations": cfg.n_layers * per_layer + b * seq_len * vocab * 4 * 2,
      "kv_cache": (2 * cfg.n_layers * math.ceil(sample_batch / dp) * sample_len * kv_heads
                   * cfg.dim_per_head * c_bytes),
  }
  out["total"] = sum(out.values())
  return out


def format_table(est: Mapping[str, int]) -> str:
  """A human-readable table of an `estimate` (GiB per device)."""
  lines = [f"{'term':<14}{'GiB/device':>12}"]
  for name in (*TERMS, "total"):
    lines.append(f"{name:<14}{est[name] / 2**30:>12.3f}")
  return "\n".join(lines)
