"""The decoder's n_layers blocks: built, stored and run as a Python loop or as one lax.scan.

Two layouts of the same parameters:
- listed (cfg.scan_layers False): params["blocks"][i] holds layer i. A training step traces
  every layer, so compile time grows with depth (about linearly).
- stacked (cfg.scan_layers True): params["layers"] holds every layer's arrays stacked on a
  leading "layers" axis (replicated: FSDP and tensor parallelism split the other axes as in
  the listed layout), and training forwards run one lax.scan over it: one traced layer
  whatever the depth. Decoding with a KV cache loops over static slices of the stack instead
  (a scan would stack a new copy of the whole cache at every token); a slice on the leading
  axis is contiguous, so it reads the weights without copying them.
Both layouts are initialised from the same random draws (the stacked one stacks the listed
one's blocks), so a seed gives the same model either way; stacked_params / listed_params
convert a params dict between them (Hugging Face import and export use the listed one).

Rematerialisation (cfg.remat, models/config.py REMAT_POLICIES) is applied here for "block":
each block becomes a jax.checkpoint whose backward recomputes the block from its input, so
a step keeps one residual per layer instead of every intermediate. ("attention" is applied
inside the attention itself: models/attention.py.) Forwards with a cache never differentiate
and are never rematerialised.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.layers import Block

LISTED, STACKED = "blocks", "layers"


def build(cfg: ModelConfig, rngs: nnx.Rngs):
  """The blocks in cfg's layout: an nnx.List of Blocks, or one Block of stacked arrays."""
  blocks = [Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)]
  if not cfg.scan_layers:
    return nnx.List(blocks)
  graphdef = nnx.split(blocks[0])[0]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.split(b)[1] for b in blocks])
  for _, var in stacked.flat_state():
    var.set_metadata(logical_axes=(STACKED, *var.get_metadata()["logical_axes"]))
  return nnx.merge(graphdef, stacked)


def _remat(fn, cfg: ModelConfig):
  if cfg.remat != "block":
    return fn
  # Keep nothing inside the block: its backward recomputes it from the block's input.
  # prevent_cse=False is safe under scan (jax.checkpoint's docs) and lets XLA fuse freely.
  return jax.checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable,
                        prevent_cse=not cfg.scan_layers)


def run(blocks, cfg: ModelConfig, x_BxTxD, positions_BxT, mask_BxTxS, cache_layers, index):
  """x through every block in order: (x, the new per-layer caches or None)."""
  def one(block_graphdef, block_state, x, layer_cache):
    return nnx.merge(block_graphdef, block_state)(x, positions_BxT, mask_BxTxS, layer_cache,
                                                  index)

  if not cfg.scan_layers:
    new_layers = []
    for i, block in enumerate(blocks):
      graphdef, state = nnx.split(block)
      if cache_layers is None:
        fn = _remat(lambda s, x: one(graphdef, s, x, None)[0], cfg)
        x_BxTxD, layer_cache = fn(state, x_BxTxD), None
      else:
        x_BxTxD, layer_cache = one(graphdef, state, x_BxTxD, cache_layers[i])
      new_layers.append(layer_cache)
    return x_BxTxD, (None if cache_layers is None else tuple(new_layers))

  graphdef, stacked = nnx.split(blocks)
  if cache_layers is None:
    body = _remat(lambda x, layer_state: (one(graphdef, layer_state, x, None)[0], None), cfg)
    return jax.lax.scan(body, x_BxTxD, stacked)[0], None
  new_layers = []
  for i in range(cfg.n_layers):
    layer_state = jax.tree.map(lambda a, i=i: a[i], stacked)
    x_BxTxD, layer_cache = one(graphdef, layer_state, x_BxTxD, cache_layers[i])
    new_layers.append(layer_cache)
  return x_BxTxD, tuple(new_layers)


def _holder(params: dict, key: str):
  """The dict that holds the blocks (a ScalarHeadModel keeps them under "backbone")."""
  return params["backbone"] if key not in params and "backbone" in params else params


def stacked_params(params: dict) -> dict:
  """A listed-layout params dict (pure dict, blocks under "blocks") in the stacked layout."""
  holder = _holder(params, LISTED)
  if LISTED not in holder:
    return params
  blocks = holder[LISTED]
  layers = jax.tree.map(lambda *xs: jnp.stack(xs), *[blocks[i] for i in range(len(blocks))])
  new = {k: v for k, v in holder.items() if k != LISTED} | {STACKED: layers}
  return new if holder is params else params | {"backbone": new}


def listed_params(params: dict) -> dict:
  """A stacked-layout params dict in the listed layout (one dict per layer under "blocks")."""
  holder = _holder(params, STACKED)
  if STACKED not in holder:
    return params
  layers = holder[STACKED]
  n = jax.tree.leaves(layers)[0].shape[0]
  blocks = {i: jax.tree.map(lambda a, i=i: a[i], layers) for i in range(n)}
  new = {k: v for k, v in holder.items() if k != STACKED} | {LISTED: blocks}
  return new if holder is params else params | {"backbone": new}
