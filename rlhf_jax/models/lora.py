"""LoRA on the params pure dict: adapters vs base, the base view, merging, adding adapters.

A model with cfg.lora_rank > 0 holds, next to each targeted projection W, an adapter
{"a": A, "b": B} under the module's "lora" key (models/layers.py: LoRA), e.g.
params["blocks"][3]["attn"]["lora"]["q_proj"]. Every function here works on that pure dict
(jax arrays, ShapeDtypeStructs or shardings alike), so what a train step, a checkpoint or an
exporter holds stays a plain pytree:
  split / join   the adapters vs the frozen base. The base has exactly the tree of the plain
                 (lora_rank=0) model, so nnx.merge(plain graphdef, base) is the base model.
  base_view      the same params with every B zeroed: the same graphdef computes the base
                 model (a DPO/PPO reference without a second copy of the weights).
  merge          W + (alpha / r) * A @ B into the plain model's params (merged export).
  add_adapters   a LoRA model over imported base params (hf_import.load_hf_model).
"""
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax import sharding
from rlhf_jax.models.config import LORA_TARGETS, ModelConfig
from rlhf_jax.models.transformer import ScalarHeadModel, Transformer

KEY = "lora"  # the attribute (and pure-dict key) of a module's adapters (models/layers.py)
# PEFT target -> (the module that holds it in a Block, its weight there)
WEIGHTS = {"q_proj": ("attn", "wq"), "k_proj": ("attn", "wk"), "v_proj": ("attn", "wv"),
           "o_proj": ("attn", "wo"), "gate_proj": ("mlp", "w_gate"), "up_proj": ("mlp", "w_up"),
           "down_proj": ("mlp", "w_down")}


def split(params) -> tuple[dict, dict]:
  """(adapters, base): the adapters' subtrees (same paths, nothing else) and the rest."""
  adapters, base = {}, {}
  for key, value in params.items():
    if key == KEY:
      adapters[key] = value
    elif isinstance(value, dict):
      a, b = split(value)
      if a:
        adapters[key] = a
      if b or not a:
        base[key] = b
    else:
      base[key] = value
  return adapters, base


def join(adapters, base) -> dict:
  """The inverse of split: one params dict (new dicts; the leaves are not copied)."""
  out = dict(base)
  for key, value in adapters.items():
    out[key] = join(value, base[key]) if key in base else value
  return out


def base_view(params) -> dict:
  """params with every adapter's B replaced by zeros: the adapted model then computes
  exactly the base model (x @ A @ 0 adds an exact zero), with the same graphdef and no copy
  of the base; the adapters' rank-r matmuls still run. Under differentiation nothing flows
  into the adapters from it."""
  def off(tree):
    out = {}
    for key, value in tree.items():
      if key == KEY:
        out[key] = {t: {"a": ab["a"], "b": jnp.zeros_like(ab["b"])} for t, ab in value.items()}
      else:
        out[key] = off(value) if isinstance(value, dict) else value
    return out
  return off(params)


def plain_config(cfg: ModelConfig) -> ModelConfig:
  """cfg without adapters: the config of merge's output and of split's base."""
  return dataclasses.replace(cfg, lora_rank=0)


def merge(params, cfg: ModelConfig) -> dict:
  """The params of the plain model (plain_config(cfg)) computing what the adapted one does:
  each targeted W becomes W + (alpha / r) * A @ B, in float32 at full matmul precision, stored
  in W's dtype. The result is a new copy of every adapted weight (export it, then drop it)."""
  def walk(tree):
    if KEY not in tree:
      return {k: walk(v) if isinstance(v, dict) else v for k, v in tree.items()}
    out = {k: walk(v) if isinstance(v, dict) else v for k, v in tree.items() if k != KEY}
    for target, ab in tree[KEY].items():
      name = WEIGHTS[target][1]
      out[name] = _merged(out[name], ab["a"], ab["b"], cfg.lora_scale)
    return out
  return walk(params)


@jax.jit
def _merged(w, a, b, scale):
  delta = jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=1,
                        precision=jax.lax.Precision.HIGHEST)
  return (w.astype(jnp.float32) + scale * delta).astype(w.dtype)


def config_of(graphdef, params) -> ModelConfig:
  """The ModelConfig of a Transformer / ScalarHeadModel given as graphdef and params (what
  hf_import.load_hf_model returns)."""
  model = nnx.merge(graphdef, params)
  return model.backbone.cfg if isinstance(model, ScalarHeadModel) else model.cfg


def adapted_model(cfg: ModelConfig, base, mesh, *, rank: int, alpha: float,
                  targets: tuple[str, ...] = LORA_TARGETS):
  """(config, factory(rngs), graphdef, shardings) of the LoRA model over the plain model's
  params `base` (a "backbone" means a ScalarHeadModel); shardings under LOGICAL_RULES."""
  cfg = dataclasses.replace(cfg, lora_rank=rank, lora_alpha=alpha, lora_targets=targets)
  if cfg.lora_rank < 1:
    raise ValueError(f"a LoRA model needs rank >= 1, got {rank}")
  model = ScalarHeadModel if "backbone" in base else Transformer
  factory = lambda rngs: model(cfg, rngs=rngs)  # noqa: E731
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: factory(nnx.Rngs(0))))
  shardings = sharding.param_shardings(abstract, mesh)
  if jax.tree.structure(split(shardings)[1]) != jax.tree.structure(base):
    raise ValueError("base params do not have the tree of the plain model of this config")
  return cfg, factory, graphdef, shardings


def add_adapters(cfg: ModelConfig, base, key, mesh, *, rank: int, alpha: float,
                 targets: tuple[str, ...] = LORA_TARGETS):
  """A LoRA model over the plain model's params `base` (e.g. from hf_import.load_hf_model),
  with fresh adapters (A random, B zero: at init it computes the base model) born sharded on
  `mesh` under sharding.LOGICAL_RULES. The base arrays are reused, not copied.

  cfg: the plain model's config (config_of(graphdef, base)). Returns (graphdef, params,
  shardings) of the adapted model, like hf_import.load_hf_model.
  """
  _, factory, graphdef, shardings = adapted_model(cfg, base, mesh, rank=rank, alpha=alpha,
                                                  targets=targets)

  def init(key):  # only the adapters are outputs: XLA drops the base's init
    return split(nnx.split(factory(nnx.Rngs(key)))[1].to_pure_dict())[0]

  adapters = jax.jit(init, out_shardings=split(shardings)[0])(key)
  return graphdef, join(adapters, base), shardings
