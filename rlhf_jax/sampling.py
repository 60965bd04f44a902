"""Batched KV-cache sampling, compiled once per (batch, prompt length, max new tokens).

Prompts may be left- or right-padded with different lengths: `prompt_valid_BxP` marks real
tokens, positions follow the padding, and padded cache slots are masked, so a prompt's
continuation depends neither on its padding nor on its batch-mates. Decoding runs inside the
one jitted function (no Python or host work per token): a short static sequence of
lax.while_loops over length buckets (`decode_cache_lengths`), each on a KV cache just long
enough for the tokens it decodes, so a step's attention reads (about) the filled slots only;
every loop exits as soon as every row has emitted EOS. Short generations decode on one cache:
there the buckets' extra compiles cost more than the attention they save.

Randomness is per row: row r draws its token at step t with fold_in(fold_in(key, row_ids[r]), t)
(row_ids default to the batch positions 0..B-1). A caller that passes each example's own id
(its index in the dataset or in the iteration's global prompt list) gets samples that depend
on neither the batch size, the batch-mates nor the number of processes the batch is split
over: the same (key, id) draws the same continuation everywhere.

Returned log-probs are under the SAMPLING distribution (after temperature, top-k, top-p), the
quantity importance ratios need; at temperature 1 without truncation they are the model's own
log-probs, so a PPO ratio starts at exactly 1. Greedy decoding reports the model's
temperature-1 log-probs of the argmax tokens.
"""
import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax.losses.nash_md import geometric_mixture_logprobs
from rlhf_jax.models.transformer import (grow_cache, init_cache, last_valid_index,
                                         positions_from_valid)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  max_new_tokens: int
  eos_id: int
  pad_id: int
  temperature: float = 1.0
  top_k: int = 0  # 0: no top-k truncation
  top_p: float = 1.0  # 1.0: no nucleus truncation
  greedy: bool = False

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if not self.greedy and self.temperature <= 0:
      raise ValueError(f"temperature must be > 0 (use greedy=True for argmax), got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


class SampleOutput(NamedTuple):
  tokens_BxN: jax.Array  # generated tokens, pad after EOS
  logps_BxN: jax.Array  # log-probs under the sampling distribution (0 where mask is 0)
  mask_BxN: jax.Array  # 1 for generated tokens, EOS included
  finished_B: jax.Array  # emitted EOS within max_new_tokens (False: truncated)


def process_logits(logits_BxV, cfg: SamplingConfig):
  """Temperature, then top-k, then top-p, as log-probs of the distribution actually sampled."""
  logits = logits_BxV.astype(jnp.float32) / cfg.temperature
  if cfg.top_k:
    kth = jax.lax.top_k(logits, cfg.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if cfg.top_p < 1.0:
    # Keep the smallest set of most likely tokens whose mass reaches top_p: a token stays if
    # the mass strictly before it (in descending order) is below top_p.
    sorted_desc = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    n_keep = jnp.sum(mass_before < cfg.top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_desc, n_keep - 1, axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.nn.log_softmax(logits, axis=-1)


def row_keys(key, row_ids_B):
  """Each row's own key, fold_in(key, row id)."""
  return jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.asarray(row_ids_B, jnp.uint32))


def _row_ids(row_ids_B, b: int):
  return jnp.arange(b, dtype=jnp.int32) if row_ids_B is None else row_ids_B


def _choose(logits_BxV, keys_B, step, cfg: SamplingConfig):
  """Step `step`'s token of every row (row r draws with fold_in(keys_B[r], step)); step is a
  scalar, or one per row for rows decoding out of step (sampling_stream.py)."""
  if cfg.greedy:
    logp = jax.nn.log_softmax(logits_BxV.astype(jnp.float32), axis=-1)
    token = jnp.argmax(logits_BxV, axis=-1)
  else:
    logp = process_logits(logits_BxV, cfg)
    draw = lambda k, lp, t: jax.random.categorical(jax.random.fold_in(k, t), lp)
    token = jax.vmap(draw)(keys_B, logp, jnp.broadcast_to(step, keys_B.shape[:1]))
  return token.astype(jnp.int32), jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]


# Each bucket compiles one more copy of the decode step (the whole model), so compile time grows
# with their number, while the attention a finer bucket would save halves with each one.
_MAX_BUCKETS = 4
# Buckets pay where attention is a real share of a decode step. Measured (small preset, 8 rows,
# side by side): +1% at 128 new tokens, 1.30x at 512; the compile of sample grows ~25%. Below
# this many new tokens the decode loop runs on one cache of P + n slots.
MIN_BUCKETED_NEW_TOKENS = 256


def decode_cache_lengths(prompt_len: int, max_new_tokens: int) -> tuple[int, ...]:
  """The decode loop's KV cache lengths, in order: bucket_lengths from
  MIN_BUCKETED_NEW_TOKENS new tokens on, one cache of P + n slots below."""
  if max_new_tokens < MIN_BUCKETED_NEW_TOKENS:
    return (prompt_len + max_new_tokens,)
  return bucket_lengths(prompt_len, max_new_tokens)


def bucket_lengths(prompt_len: int, max_new_tokens: int) -> tuple[int, ...]:
  """The decode loop's length buckets: the KV cache lengths it runs at, in order.

  Step t writes cache slot P + t in every row (a finished row writes an invalid slot), so after
  t steps exactly P + t slots are filled, while a step's attention costs every slot of the
  cache, filled or not. The prompt is prefilled into the first bucket, P + ceil(n / 8) slots;
  when a bucket's slots are used up the cache grows (grow_cache, empty slots) to the next one:
  room for ceil(n / 4), ceil(n / 2), then all n new tokens (fewer buckets when n is small; the
  rounded rooms may coincide). Past the first bucket a step attends over fewer than twice the
  slots filled when its bucket began; the whole loop attends over P·n + (43/64)·n² slots
  instead of P·n + n² with one cache of P + n slots (the filled slots alone: P·n + n²/2). The
  lengths depend only on the static (P, n): one compiled program per (batch, P, n), whatever
  the prompts and EOS."""
  rooms = {-(-max_new_tokens // 2**k) for k in range(_MAX_BUCKETS)}
  return tuple(prompt_len + room for room in sorted(rooms))


def _checked_cache_lengths(cache_lengths, prompt_len: int, max_new_tokens: int):
  if cache_lengths is None:
    return decode_cache_lengths(prompt_len, max_new_tokens)
  lengths = tuple(cache_lengths)
  total = prompt_len + max_new_tokens
  if (not lengths or lengths[0] <= prompt_len or lengths[-1] != total
      or any(a >= b for a, b in zip(lengths, lengths[1:]))):
    raise ValueError(f"cache_lengths must increase strictly from above the prompt length "
                     f"{prompt_len} to {total} (prompt + max_new_tokens), got {lengths}")
  return lengths


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "cache_lengths"))
def sample(graphdef, params, prompt_tokens_BxP, prompt_valid_BxP, key, row_ids_B=None, *,
           cfg: SamplingConfig, cache_lengths: tuple[int, ...] | None = None) -> SampleOutput:
  """Samples up to cfg.max_new_tokens continuations of each prompt with a KV cache; row r's
  draws depend only on (key, row_ids_B[r]) and its prompt (module docstring).

  cache_lengths: the decode loop's length buckets, by default decode_cache_lengths(P, n)
  (bucket_lengths(P, n) gives buckets at any n);
  (P + n,) decodes on one cache of every slot from the first step (the same outputs, the
  reference the bucket tests compare against)."""
  b, p = prompt_tokens_BxP.shape
  lengths = _checked_cache_lengths(cache_lengths, p, cfg.max_new_tokens)
  model = nnx.merge(graphdef, params)
  cache, logits_BxV, next_pos_B = _prefill(model, prompt_tokens_BxP, prompt_valid_BxP, lengths[0])
  keys = row_keys(key, _row_ids(row_ids_B, b))
  choose = lambda logits, step: _choose(logits[0], keys, step, cfg)
  return _decode((model,), (cache,), (logits_BxV,), next_pos_B, choose, cfg, lengths)


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "group_size", "cache_lengths"))
def sample_groups(graphdef, params, prompt_tokens_BxP, prompt_valid_BxP, key, row_ids_B=None, *,
                  cfg: SamplingConfig, group_size: int,
                  cache_lengths: tuple[int, ...] | None = None) -> SampleOutput:
  """group_size samples of each prompt, prompt-major ((B * group_size) rows: row
  i * group_size + j is sample j of prompt i), with each prompt's prefix processed ONCE: its
  KV cache (of the first length bucket), last logits and next position are replicated
  group_size times after the prefill. Sample j of the prompt with id n draws as row id
  n * group_size + j: equal to `sample` on the prompts repeated group_size times with those
  row ids. cache_lengths: as in `sample`."""
  if group_size < 1:
    raise ValueError(f"group_size must be >= 1, got {group_size}")
  b, p = prompt_tokens_BxP.shape
  lengths = _checked_cache_lengths(cache_lengths, p, cfg.max_new_tokens)
  model = nnx.merge(graphdef, params)
  cache, logits_BxV, next_pos_B = _prefill(model, prompt_tokens_BxP, prompt_valid_BxP, lengths[0])
  repeat = lambda x: jnp.repeat(x, group_size, axis=0)
  ids = _row_ids(row_ids_B, b)
  keys = row_keys(key, (ids[:, None] * group_size + jnp.arange(group_size)).reshape(-1))
  choose = lambda logits, step: _choose(logits[0], keys, step, cfg)
  return _decode((model,), (_repeat_rows(cache, group_size),), (repeat(logits_BxV),),
                 repeat(next_pos_B), choose, cfg, lengths)


def _repeat_rows(cache, times: int):
  """The cache with each row repeated `times` times in place (row i -> rows i*times ...)."""
  # Every k/v array is B x S x K x H (one per layer, with --scan_layers too).
  layers = jax.tree.map(lambda x: jnp.repeat(x, times, axis=-4), cache.layers)
  return cache._replace(layers=layers, valid_BxS=jnp.repeat(cache.valid_BxS, times, axis=0))


def _prefill(model, prompt_tokens_BxP, prompt_valid_BxP, cache_len: int):
  """One forward over the prompts into a fresh cache of cache_len slots:
  (cache, last real token's logits_BxV, next position_B)."""
  b = prompt_tokens_BxP.shape[0]
  prompt_valid = prompt_valid_BxP.astype(bool)
  cache = init_cache(model.cfg, b, cache_len)
  out = model(prompt_tokens_BxP, valid_BxT=prompt_valid,
              positions_BxT=positions_from_valid(prompt_valid), cache=cache)
  last = last_valid_index(prompt_valid)
  logits_BxV = jnp.take_along_axis(out.logits_BxTxV, last[:, None, None], axis=1)[:, 0]
  return out.cache, logits_BxV, jnp.sum(prompt_valid, axis=-1).astype(jnp.int32)


class _DecodeState(NamedTuple):
  """The token loop's carry. Models decode in lockstep: one cache and one next-token logits
  per model (the mixture sampler runs two)."""
  step: jax.Array  # int32 scalar: tokens drawn so far, in every row
  caches: tuple  # KVCache per model
  logits_BxV: tuple  # per model: the logits of each row's next token
  pos_B: jax.Array  # each row's next position
  tokens_BxN: jax.Array
  logps_BxN: jax.Array
  mask_BxN: jax.Array
  done_B: jax.Array


def _decode(models, caches, logits_BxV, next_pos_B, choose, cfg: SamplingConfig,
            cache_lengths: tuple[int, ...]) -> SampleOutput:
  """The token loop from prefilled caches of cache_lengths[0] slots: one lax.while_loop per
  length bucket (decode_cache_lengths), each running until its cache's slots are used up or
  every row is done, the caches grown to the next bucket in between. choose(logits_BxV per
  model, step) -> (token_B, logp_B) draws step `step`'s tokens."""
  b, n = next_pos_B.shape[0], cfg.max_new_tokens
  prompt_len = cache_lengths[-1] - n

  def body(state: _DecodeState) -> _DecodeState:
    step = state.step
    token, logp = choose(state.logits_BxV, step)
    live = ~state.done_B
    token = jnp.where(live, token, cfg.pad_id)
    outs = [model(token[:, None], valid_BxT=live[:, None], positions_BxT=state.pos_B[:, None],
                  cache=cache) for model, cache in zip(models, state.caches)]
    return _DecodeState(
        step + 1, tuple(out.cache for out in outs),
        tuple(out.logits_BxTxV[:, 0] for out in outs), state.pos_B + live,
        state.tokens_BxN.at[:, step].set(token),
        state.logps_BxN.at[:, step].set(jnp.where(live, logp, 0.0)),
        state.mask_BxN.at[:, step].set(live), state.done_B | (token == cfg.eos_id))

  state = _DecodeState(jnp.zeros((), jnp.int32), tuple(caches), tuple(logits_BxV), next_pos_B,
                       jnp.full((b, n), cfg.pad_id, jnp.int32), jnp.zeros((b, n), jnp.float32),
                       jnp.zeros((b, n), bool), jnp.zeros((b,), bool))
  for i, cache_len in enumerate(cache_lengths):
    if i:
      state = state._replace(caches=tuple(grow_cache(c, cache_len) for c in state.caches))
    # Step t writes slot prompt_len + t: a cache of cache_len slots holds steps < its room.
    room = cache_len - prompt_len
    state = jax.lax.while_loop(lambda s, room=room: (s.step < room) & ~jnp.all(s.done_B),
                               body, state)
  return SampleOutput(state.tokens_BxN, state.logps_BxN, state.mask_BxN, state.done_B)


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg"))
def sample_naive(graphdef, params, prompt_tokens_BxP, prompt_valid_BxP, key, row_ids_B=None, *,
                 cfg: SamplingConfig) -> SampleOutput:
  """Reference sampler without a cache: every step reruns the full forward over the padded
  (prompt + max_new_tokens) sequence. Same outputs as `sample`; the benchmark's baseline."""
  model = nnx.merge(graphdef, params)
  b, p = prompt_tokens_BxP.shape
  n = cfg.max_new_tokens
  seq = jnp.concatenate([prompt_tokens_BxP, jnp.full((b, n), cfg.pad_id, jnp.int32)], axis=1)
  valid = jnp.concatenate([prompt_valid_BxP.astype(bool), jnp.zeros((b, n), bool)], axis=1)
  keys = row_keys(key, _row_ids(row_ids_B, b))

  def body(step, carry):
    seq, valid, logps, done = carry
    logits = model(seq, valid_BxT=valid).logits_BxTxV
    last = last_valid_index(valid)
    token, logp = _choose(jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0],
                          keys, step, cfg)
    live = ~done
    seq = seq.at[:, p + step].set(jnp.where(live, token, cfg.pad_id))
    valid = valid.at[:, p + step].set(live)
    logps = logps.at[:, step].set(jnp.where(live, logp, 0.0))
    return seq, valid, logps, done | (live & (token == cfg.eos_id))

  seq, valid, logps, done = jax.lax.fori_loop(
      0, n, body, (seq, valid, jnp.zeros((b, n), jnp.float32), jnp.zeros((b,), bool)))
  return SampleOutput(seq[:, p:], logps, valid[:, p:], done)


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "cache_lengths"))
def sample_mixture(graphdef, params, ref_params, prompt_tokens_BxP, prompt_valid_BxP, key,
                   mixture_coef, row_ids_B=None, *, cfg: SamplingConfig,
                   cache_lengths: tuple[int, ...] | None = None) -> SampleOutput:
  """Samples from the token-level geometric mixture of a policy and a reference sharing one
  graphdef (Nash-MD-PG's opponent pi_mix, Munos et al. 2024), with a KV cache per model (both
  grown through the same length buckets; cache_lengths as in `sample`):

    log pi_mix(. | s) = log_softmax((1 - a) log pi(. | s) + a log mu(. | s)),  a = mixture_coef

  where log pi and log mu are each log_softmax(logits / temperature); top-k / top-p then
  truncate the MIXED distribution, greedy takes its argmax. a = 0 draws what `sample` draws
  from the policy (same key: same tokens), a = 1 what it draws from the reference.
  mixture_coef is traced (a schedule does not recompile). Log-probs are under pi_mix."""
  b, p = prompt_tokens_BxP.shape
  lengths = _checked_cache_lengths(cache_lengths, p, cfg.max_new_tokens)
  policy, ref = nnx.merge(graphdef, params), nnx.merge(graphdef, ref_params)
  cache, logits, pos = _prefill(policy, prompt_tokens_BxP, prompt_valid_BxP, lengths[0])
  ref_cache, ref_logits, _ = _prefill(ref, prompt_tokens_BxP, prompt_valid_BxP, lengths[0])
  keys = row_keys(key, _row_ids(row_ids_B, b))
  mixed_cfg = dataclasses.replace(cfg, temperature=1.0)  # temperature applied before mixing
  temp = 1.0 if cfg.greedy else cfg.temperature

  def choose(logits_per_model, step):
    policy_logits, ref_logits = (x.astype(jnp.float32) / temp for x in logits_per_model)
    mixed = geometric_mixture_logprobs(policy_logits, ref_logits, mixture_coef=mixture_coef)
    return _choose(mixed, keys, step, mixed_cfg)

  return _decode((policy, ref), (cache, ref_cache), (logits, ref_logits), pos, choose, cfg,
                 lengths)
