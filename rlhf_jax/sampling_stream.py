"""Sampling more prompts than decode rows: a row that finishes takes the next prompt.

`sample` decodes a batch in lockstep, so a row that emits EOS early keeps costing full steps
until the longest row ends. `sample_stream` keeps `rows` rows busy over N prompts
(continuous batching): when a row finishes (EOS or max_new_tokens), the next waiting prompt is
prefilled on its own and written into that row's cache slots, and the row decodes it while the
others go on. Rows therefore decode out of step: the KV cache keeps one write slot per row
(models/transformer.py: KVCache.index as a B-vector) and every row counts its own steps.

Prompt q's continuation equals `sample`'s of that prompt alone with row id q (or
prompt_ids_N[q]): the same key fold_in(fold_in(key, id), step), the same cache layout
(prompt in slots 0..P-1, step t at slot P + t) and the same attention. So the outputs do not
depend on `rows`, on the order prompts finish in, or on batch-mates. One prompt is inserted
per loop iteration (a prefill of one prompt); rows that finish together wait an iteration
each. Everything runs in one jitted while_loop: no host work per token.
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax.sampling import (SampleOutput, SamplingConfig, _choose, _prefill, _row_ids,
                               row_keys)


class _Stream(NamedTuple):
  cache: object
  logits_RxV: jax.Array
  pos_R: jax.Array  # next position of each row
  prompt_R: jax.Array  # the prompt each row decodes
  step_R: jax.Array  # that prompt's next step
  idle_R: jax.Array  # the row has no prompt (finished, waiting or none left)
  waiting: jax.Array  # the next prompt to insert
  out: SampleOutput  # per prompt


def _insert(model, prompts, valid, s: int, st: _Stream) -> _Stream:
  """The next waiting prompt prefilled alone into the first idle row."""
  r, q = jnp.argmax(st.idle_R), st.waiting
  one = lambda x: jax.lax.dynamic_slice_in_dim(x, q, 1)  # noqa: E731
  cache, logits, pos = _prefill(model, one(prompts), one(valid), s)
  put = lambda big, new: big.at[r].set(new[0])  # noqa: E731  row r of every k/v array
  layers = jax.tree.map(put, st.cache.layers, cache.layers)
  new_cache = st.cache._replace(layers=layers, valid_BxS=put(st.cache.valid_BxS, cache.valid_BxS),
                                index=st.cache.index.at[r].set(prompts.shape[1]))
  return st._replace(cache=new_cache, logits_RxV=put(st.logits_RxV, logits),
                     pos_R=put(st.pos_R, pos), prompt_R=st.prompt_R.at[r].set(q),
                     step_R=st.step_R.at[r].set(0), idle_R=st.idle_R.at[r].set(False),
                     waiting=q + 1)


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "rows"))
def sample_stream(graphdef, params, prompt_tokens_NxP, prompt_valid_NxP, key, prompt_ids_N=None,
                  *, cfg: SamplingConfig, rows: int) -> SampleOutput:
  """Up to cfg.max_new_tokens tokens after each of the N prompts, decoded `rows` at a time
  (module docstring); outputs in prompt order, as `sample` returns them."""
  n_prompts, p = prompt_tokens_NxP.shape
  rows, n, s = min(rows, n_prompts), cfg.max_new_tokens, p + cfg.max_new_tokens
  if rows < 1:
    raise ValueError(f"rows must be >= 1, got {rows}")
  model = nnx.merge(graphdef, params)
  valid = prompt_valid_NxP.astype(bool)
  keys_N = row_keys(key, _row_ids(prompt_ids_N, n_prompts))
  cache, logits, pos = _prefill(model, prompt_tokens_NxP[:rows], valid[:rows], s)
  zeros = lambda dtype: jnp.zeros((n_prompts, n), dtype)  # noqa: E731
  st = _Stream(cache._replace(index=jnp.full((rows,), p, jnp.int32)), logits, pos,
               jnp.arange(rows, dtype=jnp.int32), jnp.zeros((rows,), jnp.int32),
               jnp.zeros((rows,), bool), jnp.asarray(rows, jnp.int32),
               SampleOutput(jnp.full((n_prompts, n), cfg.pad_id, jnp.int32),
                            zeros(jnp.float32), zeros(bool), jnp.zeros((n_prompts,), bool)))

  def cond(st):
    return jnp.any(~st.idle_R) | (st.waiting < n_prompts)

  def body(st):
    refill = jnp.any(st.idle_R) & (st.waiting < n_prompts)
    st = jax.lax.cond(refill, functools.partial(_insert, model, prompt_tokens_NxP, valid, s),
                      lambda st: st, st)
    live = ~st.idle_R
    token, logp = _choose(st.logits_RxV, keys_N[st.prompt_R], st.step_R, cfg)
    token = jnp.where(live, token, cfg.pad_id)
    # Idle rows write nothing: their (prompt, step) slot is left as it is.
    at = (st.prompt_R, jnp.minimum(st.step_R, n - 1))
    o = st.out
    keep = lambda a, new: a.at[at].set(jnp.where(live, new, a[at]))  # noqa: E731
    eos = live & (token == cfg.eos_id)
    out = SampleOutput(keep(o.tokens_BxN, token), keep(o.logps_BxN, logp),
                       keep(o.mask_BxN, live),
                       o.finished_B.at[st.prompt_R].set(o.finished_B[st.prompt_R] | eos))
    fwd = model(token[:, None], valid_BxT=live[:, None], positions_BxT=st.pos_R[:, None],
                cache=st.cache)
    # An idle row's write slot stays put: its garbage token is written there as invalid.
    new_cache = fwd.cache._replace(index=jnp.where(live, fwd.cache.index, st.cache.index))
    step = st.step_R + live
    return st._replace(cache=new_cache, logits_RxV=fwd.logits_BxTxV[:, 0],
                       pos_R=st.pos_R + live, step_R=step,
                       idle_R=st.idle_R | eos | (step >= n), out=out)

  return jax.lax.while_loop(cond, body, st).out
