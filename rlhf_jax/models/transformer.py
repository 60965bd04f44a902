"""The Llama/Qwen2-compatible decoder and its scalar-head variant (reward and value models).

Padding convention: `valid_BxT` marks real tokens; positions follow the padding (the first
real token of every row has position 0), so a prompt's outputs do not depend on how much
padding it carries or on which side. With a KV cache, slots are written in time order, so
"causal" is "slot <= current slot", and padded slots are masked through `cache.valid_BxS`.

Packing: `segment_ids_BxT` (int, 0 on padding, 1, 2, ... for the documents packed into a row)
keeps attention inside each document and restarts positions at each document's first token,
so every document's outputs are those it has alone in a row (data/packing.py).

Shared prefixes: with `prefix_ids_BxT` as well, a token also attends to the segment whose id
is its prefix id, so responses to one prompt ride in one row after it, each seeing the prompt
and itself but not the other responses (data/shared_prefix.py). Such rows carry explicit
positions: each response continues its prompt's positions.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax import sharding
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models import layer_stack
from rlhf_jax.models.layers import LayerCache, RMSNorm, dense, param


class KVCache(NamedTuple):
  layers: tuple[LayerCache, ...]
  valid_BxS: jax.Array  # which slots hold real tokens
  # int32: the next slot to write; a scalar (every row), or one per row (B,) for rows that
  # decode one token each out of step (sampling_stream.py)
  index: jax.Array


class ModelOutput(NamedTuple):
  logits_BxTxV: jax.Array | None
  hidden_BxTxD: jax.Array | None  # final-normed last-layer states (what predicts each token)
  cache: KVCache | None


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
  shape = (batch, max_len, cfg.n_kv_heads, cfg.dim_per_head)
  dtype = dtype or cfg.compute_dtype
  layers = tuple(LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
                 for _ in range(cfg.n_layers))
  return KVCache(layers, jnp.zeros((batch, max_len), bool), jnp.zeros((), jnp.int32))


def grow_cache(cache: KVCache, max_len: int) -> KVCache:
  """The same cache with max_len slots: the new slots are empty (invalid, zeros). Attention
  costs what the cache holds, so a decode loop can run on a short cache and grow it as rows
  fill it (length buckets) instead of attending over every slot from the first step."""
  extra = max_len - cache.valid_BxS.shape[1]
  if extra < 0:
    raise ValueError(f"cannot shrink a cache of {cache.valid_BxS.shape[1]} slots to {max_len}")
  # Every k/v array is B x S x K x H (one per layer, with --scan_layers too).
  pad = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 3) + [(0, extra), (0, 0), (0, 0)])
  return KVCache(jax.tree.map(pad, cache.layers),
                 jnp.pad(cache.valid_BxS, ((0, 0), (0, extra))), cache.index)


def positions_from_valid(valid_BxT) -> jax.Array:
  """Position ids that skip padding: 0 at each row's first real token."""
  return jnp.maximum(jnp.cumsum(valid_BxT.astype(jnp.int32), axis=-1) - 1, 0)


def positions_in_segments(segment_ids_BxT) -> jax.Array:
  """Position ids that restart at 0 where the segment id changes (each packed document)."""
  t = segment_ids_BxT.shape[-1]
  idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids_BxT.shape)
  change = jnp.concatenate([jnp.ones_like(segment_ids_BxT[:, :1], bool),
                            segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1]], axis=1)
  start = jax.lax.cummax(jnp.where(change, idx, 0), axis=1)
  return idx - start


def last_valid_index(valid_BxT) -> jax.Array:
  """Index of each row's last real token (works for left- and right-padding)."""
  t = valid_BxT.shape[-1]
  return t - 1 - jnp.argmax(valid_BxT[:, ::-1].astype(jnp.int32), axis=-1)


def _attention_mask(valid_BxT, cache: KVCache | None, segment_ids_BxT=None,
                    prefix_ids_BxT=None):
  b, t = valid_BxT.shape
  if cache is None:
    causal_TxT = jnp.tril(jnp.ones((t, t), bool))
    mask = causal_TxT[None] & valid_BxT[:, None, :].astype(bool)
    if segment_ids_BxT is not None:
      seen = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
      if prefix_ids_BxT is not None:
        seen = seen | (prefix_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :])
      mask = mask & seen
    return mask, None
  key_slot_S = jnp.arange(cache.valid_BxS.shape[1])
  if cache.index.ndim:  # a slot per row (one token each): rows decoding out of step
    slot_valid = cache.valid_BxS.at[jnp.arange(b), cache.index].set(valid_BxT[:, 0].astype(bool))
    causal_BxTxS = key_slot_S[None, None, :] <= cache.index[:, None, None]
    return causal_BxTxS & slot_valid[:, None, :], slot_valid
  slot_valid = jax.lax.dynamic_update_slice_in_dim(
      cache.valid_BxS, valid_BxT.astype(bool), cache.index, axis=1)
  query_slot_T = cache.index + jnp.arange(t)
  causal_TxS = key_slot_S[None, :] <= query_slot_T[:, None]
  return causal_TxS[None] & slot_valid[:, None, :], slot_valid


class Transformer(nnx.Module):
  """Token embedding -> n_layers x (RMSNorm, GQA, RMSNorm, SwiGLU) -> RMSNorm -> LM head."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, lm_head: bool = True):
    self.cfg = cfg
    self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg, cfg.init_std)
    # "blocks" (a list) or "layers" (one stacked Block): models/layer_stack.py
    setattr(self, layer_stack.STACKED if cfg.scan_layers else layer_stack.LISTED,
            layer_stack.build(cfg, rngs))
    self.final_norm = RMSNorm(cfg, rngs=rngs)
    self.has_lm_head = lm_head
    if lm_head and not cfg.tie_embeddings:
      self.lm_head = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg,
                           cfg.init_std)

  def hidden(self, tokens_BxT, *, valid_BxT=None, positions_BxT=None, cache: KVCache | None = None,
             segment_ids_BxT=None, prefix_ids_BxT=None):
    """Final-normed hidden states BxTxD and the updated cache."""
    if valid_BxT is None:
      valid_BxT = jnp.ones(tokens_BxT.shape, bool)
    if segment_ids_BxT is not None and cache is not None:
      raise ValueError("packed rows (segment_ids_BxT) are for training forwards, not decoding")
    if prefix_ids_BxT is not None and (segment_ids_BxT is None or positions_BxT is None):
      raise ValueError("shared-prefix rows (prefix_ids_BxT) need their segment_ids_BxT and "
                       "explicit positions_BxT (data/shared_prefix.py builds all three)")
    if positions_BxT is None:
      if cache is not None:
        raise ValueError("decoding with a cache needs explicit positions_BxT")
      positions_BxT = (positions_from_valid(valid_BxT) if segment_ids_BxT is None
                       else positions_in_segments(segment_ids_BxT))
    mask_BxTxS, slot_valid = _attention_mask(valid_BxT, cache, segment_ids_BxT, prefix_ids_BxT)
    index = None if cache is None else cache.index
    x = sharding.constrain_rows(
        jnp.take(self.embed[...], tokens_BxT, axis=0).astype(self.cfg.compute_dtype))
    blocks = getattr(self, layer_stack.STACKED if self.cfg.scan_layers else layer_stack.LISTED)
    x, new_layers = layer_stack.run(blocks, self.cfg, x, positions_BxT, mask_BxTxS,
                                    None if cache is None else cache.layers, index)
    if cache is not None:
      cache = KVCache(new_layers, slot_valid, cache.index + tokens_BxT.shape[1])
    return self.final_norm(x), cache

  def logits(self, hidden_BxTxD):
    w = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
    return dense(hidden_BxTxD, w.astype(hidden_BxTxD.dtype), preferred_element_type=jnp.float32)

  def __call__(self, tokens_BxT, *, valid_BxT=None, positions_BxT=None,
               cache: KVCache | None = None, return_hidden: bool = False,
               segment_ids_BxT=None, prefix_ids_BxT=None) -> ModelOutput:
    if not self.has_lm_head:
      raise ValueError("this Transformer was built without an LM head (lm_head=False)")
    hidden, cache = self.hidden(tokens_BxT, valid_BxT=valid_BxT, positions_BxT=positions_BxT,
                                cache=cache, segment_ids_BxT=segment_ids_BxT,
                                prefix_ids_BxT=prefix_ids_BxT)
    return ModelOutput(self.logits(hidden), hidden if return_hidden else None, cache)


class ScalarHeadModel(nnx.Module):
  """Backbone + linear scalar head: a reward model (read at the last real token) or a
  value model (read at every token)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.backbone = Transformer(cfg, rngs=rngs, lm_head=False)
    self.head_w = param(rngs, (cfg.d_model,), ("embed",), cfg, cfg.init_std)
    self.head_b = param(rngs, (), (), cfg, 0.0)

  def __call__(self, tokens_BxT, *, valid_BxT=None, positions_BxT=None, segment_ids_BxT=None,
               prefix_ids_BxT=None):
    """Per-token scalars BxT in float32."""
    hidden, _ = self.backbone.hidden(tokens_BxT, valid_BxT=valid_BxT, positions_BxT=positions_BxT,
                                     segment_ids_BxT=segment_ids_BxT,
                                     prefix_ids_BxT=prefix_ids_BxT)
    values = dense(hidden.astype(jnp.float32), self.head_w[...].astype(jnp.float32)[:, None])[..., 0]
    return values + self.head_b[...].astype(jnp.float32)

  def score(self, tokens_BxT, *, valid_BxT):
    """One scalar per sequence, read at its last real token (reward-model convention)."""
    values_BxT = self(tokens_BxT, valid_BxT=valid_BxT)
    return jnp.take_along_axis(values_BxT, last_valid_index(valid_BxT)[:, None], axis=1)[:, 0]
