"""Analytic per-device memory of a training run: will it fit, before anything compiles?

Terms (bytes per device; `shards(x)` = how many devices split tensor x under
sharding.LOGICAL_RULES for the given mesh shape, computed from the model's real logical axes;
c = compute_bytes; a head count, d_ff or the vocabulary is divided by `tensor` when it divides):
  params       sum_x numel(x) / shards(x) * param_bytes
  optimizer    Adam mu and nu in float32: 2 * 4 * sum_x numel(x) / shards(x)   (train only)
  gradients    float32 gradients, 4 * sum_x numel(x) / shards(x), twice with microbatches:
               step.py's scan carries the f32 sum while each microbatch's backward makes its
               own; with one microbatch XLA folds the sum away                (train only)
  reference    a frozen copy of the policy (param_bytes), when its log-probs are NOT
               precomputed; 0 otherwise
  other_models reward / value models: their parameter count (an argument; 0 for DPO) in
               param_bytes, sharded over fsdp*tensor
  activations  for b = batch / microbatches / (data*fsdp) sequences of length T on this
               device (no rematerialisation), per layer what backprop must keep, from
               models/layers.py: every matmul's input and every nonlinearity's input:
                 b*T*c * (4*D                the block input, the residual after attention
                                             and the two RMSNorm outputs
                          + 2*N*H + 2*K*H    q and the attention output; k and v (GQA)
                          + 4*F)             SwiGLU gate pre-activation, silu(gate), up and
                                             their product
                 + b*N*T*T * (2*4 + 1 + c)   attention, scores in f32: of the three f32
                                             arrays JAX saves (masked scores, their exp, the
                                             probabilities) XLA keeps two, measured at T <=
                                             512 (three at 1024), plus the boolean mask, plus
                                             the probabilities' compute-dtype copy (c = 0
                                             when c = 4)
               A train step holds L + 1 layers of it (all L layers' kept activations plus the
               gradients of the layer being differentiated) and an LM's logits b*T*V * 4 * 2
               (f32 logits and their log-softmax / gradient). With cfg.remat "attention"
               the L layers drop the T x T term (recomputed for the layer being
               differentiated); with "block" they keep their input alone, b*T*D*c, and the
               layer being differentiated is recomputed and differentiated: 2 layers' worth
               (_kept_per_token). XLA:CPU honours remat only under scan_layers (its
               scheduler recomputes an unrolled stack's blocks early: docs/performance.md). A forward (frozen model,
               sampler prefill) frees each layer's intermediates before the next: its peak is
               the widest of the attention (b*T*c * (D + N*H + 2*K*H), the residual, q, k, v,
               plus the attention term above), the MLP (b*T*c * (D + 2*F), the residual,
               SwiGLU's gate and up) and the logits.
  gathered     under fsdp > 1, the all-gathered weights (tensor-sharded only) in the compute
               dtype: XLA keeps each layer's gathered weights from the forward to the
               backward (no re-gather), and a sampler's decode loop hoists them out of the
               loop, so a device holds one unsharded copy; 0 without fsdp
  kv_cache     sampling cache: 2 (k, v) * layers * B_s/(data*fsdp) * S * (kv_heads/tensor)
               * head_dim * c; 0 when no sampling batch is given
LoRA (cfg.lora_rank = r > 0, only the adapters trained; rlhf_jax/train/lora.py): params are
the base in param_bytes plus the adapters in float32; optimizer and gradients cover the
adapters alone; reference is 0 (the reference is the base view of the same params, no copy);
each targeted projection keeps its b*T*r adapter activation (x @ A, B's input), r * c bytes
per token per target.
Why these activation counts and not one flat factor: SwiGLU's d_ff is 3x (nano, tiny) to 4x
(Llama 3.2 1B) d_model, GQA makes k and v smaller than q, and bf16 compute still keeps f32
attention scores; a single factor per d_model is off by the ratio of those shapes.
What the estimate leaves out (XLA's fusion temporaries, its choice of what to keep or
recompute, fragmentation) is measured by compiling the real programs: `python -m
rlhf_jax.plan` prints both; docs/plan.md has the measured agreement.
"""
import math
from typing import Mapping

import jax.numpy as jnp
from flax import nnx

from rlhf_jax import sharding
from rlhf_jax.models import lora
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.transformer import ScalarHeadModel, Transformer

TERMS = ("params", "optimizer", "gradients", "reference", "other_models", "activations",
         "gathered", "kv_cache")


class _MeshShape:
  """Just enough of a Mesh for sharding.logical_to_spec: axis sizes, no devices."""

  def __init__(self, shape: Mapping[str, int]):
    self.shape = {a: int(shape.get(a, 1)) for a in sharding.MESH_AXES}


def sharded_numel(cfg: ModelConfig, mesh_shape: Mapping[str, int], *,
                  scalar_head: bool = False, part: str = "all") -> int:
  """Parameters one device holds under LOGICAL_RULES (from the model's abstract state).
  part: "all", or the LoRA "adapters" or "base" alone (models/lora.py: split)."""
  model = ScalarHeadModel if scalar_head else Transformer
  _, state = nnx.split(nnx.eval_shape(lambda: model(cfg, rngs=nnx.Rngs(0))))
  mesh = _MeshShape(mesh_shape)
  axes = sharding.logical_axes(state)
  shapes = state.to_pure_dict()
  if part != "all":
    shapes = dict(zip(("adapters", "base"), lora.split(shapes)))[part]
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
             scalar_head: bool = False, train: bool = True) -> dict[str, int]:
  """Bytes per device for each of TERMS plus "total" (see the module docstring).

  batch_size: sequences per step through the model (DPO: 2 per pair).
  scalar_head: a reward / value model (ScalarHeadModel: no LM head, no logits).
  train: a train step (optimizer, gradients, every layer's activations kept); False: a
    forward of a frozen model or a sampler's prefill.
  """
  mesh = _MeshShape(mesh_shape)
  dp, tp = mesh.shape["data"] * mesh.shape["fsdp"], mesh.shape["tensor"]
  p_bytes = jnp.dtype(cfg.param_dtype).itemsize
  c_bytes = jnp.dtype(cfg.dtype).itemsize
  numel = sharded_numel(cfg, mesh.shape, scalar_head=scalar_head)
  trained, params_bytes = numel, numel * p_bytes
  if cfg.lora_rank:
    trained = sharded_numel(cfg, mesh.shape, scalar_head=scalar_head, part="adapters")
    params_bytes = (numel - trained) * p_bytes + trained * 4
  b = math.ceil(batch_size / num_microbatches / dp)
  split = lambda n: n // tp if n % tp == 0 else n
  heads, kv_heads, h = split(cfg.n_heads), split(cfg.n_kv_heads), cfg.dim_per_head
  d, f = cfg.d_model, split(cfg.d_ff)
  adapted = len(cfg.lora_targets) if cfg.lora_rank else 0
  token = c_bytes * (4 * d + 2 * heads * h + 2 * kv_heads * h + 4 * f + adapted * cfg.lora_rank)
  probs = heads * seq_len * (2 * 4 + 1 + (c_bytes if c_bytes != 4 else 0))
  logits = 0 if scalar_head else b * seq_len * split(cfg.vocab_size) * 4 * 2
  if train:
    activations = b * seq_len * _kept_per_token(cfg, token, probs, c_bytes) + logits
  else:
    mlp = c_bytes * (d + 2 * f)
    attention = c_bytes * (d + heads * h + 2 * kv_heads * h) + probs
    activations = max(b * seq_len * max(mlp, attention), logits)
  gathered = 0
  if mesh.shape["fsdp"] > 1:
    gathered = sharded_numel(cfg, {"tensor": tp}, scalar_head=scalar_head) * c_bytes
  out = {
      "params": params_bytes,
      "optimizer": 2 * 4 * trained if train else 0,
      "gradients": 4 * trained * (2 if num_microbatches > 1 else 1) if train else 0,
      "reference": numel * p_bytes if reference_params and not cfg.lora_rank else 0,
      "other_models": math.ceil(other_model_params / (mesh.shape["fsdp"] * tp)) * p_bytes,
      "activations": activations,
      "gathered": gathered,
      "kv_cache": (2 * cfg.n_layers * math.ceil(sample_batch / dp) * sample_len
                   * split(cfg.n_kv_heads) * h * c_bytes),
  }
  out["total"] = sum(out.values())
  return out


def _kept_per_token(cfg: ModelConfig, token: int, probs: int, c_bytes: int) -> int:
  """Activation bytes per token a train step holds, by cfg.remat: every layer keeps what its
  backward needs (token + probs) and the layer being differentiated adds its gradients
  (none); under "attention" the layers keep all but the T x T arrays, which the layer being
  differentiated recomputes; under "block" they keep their input (d_model) alone and the
  layer being differentiated recomputes everything, then differentiates it."""
  layers = cfg.n_layers
  if cfg.remat == "attention":
    return layers * token + token + 2 * probs
  if cfg.remat == "block":
    return layers * cfg.d_model * c_bytes + 2 * (token + probs)
  return (layers + 1) * (token + probs)


def add(*estimates: Mapping[str, int]) -> dict[str, int]:
  """Term-wise sum of estimates (models that live side by side, e.g. PPO's policy + value)."""
  return {k: sum(e[k] for e in estimates) for k in (*TERMS, "total")}


def format_table(est: Mapping[str, int]) -> str:
  """A human-readable table of an `estimate` (GiB per device)."""
  lines = [f"{'term':<14}{'GiB/device':>12}"]
  for name in (*TERMS, "total"):
    lines.append(f"{name:<14}{est[name] / 2**30:>12.3f}")
  return "\n".join(lines)
