"""Batched KV-cache sampling, compiled once per (batch, prompt length, max new tokens).

Prompts may be left- or right-padded with different lengths: `prompt_valid_BxP` marks real
tokens, positions follow the padding, and padded cache slots are masked, so a prompt's
continuation depends neither on its padding nor on its batch-mates. Decoding is a
lax.while_loop (no Python per token) that stops when every row has emitted EOS.

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
from rlhf_jax.models.transformer import init_cache, last_valid_index, positions_from_valid


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
  """Step `step`'s token of every row (row r draws with fold_in(keys_B[r], step))."""
  if cfg.greedy:
    logp = jax.nn.log_softmax(logits_BxV.astype(jnp.float32), axis=-1)
    token = jnp.argmax(logits_BxV, axis=-1)
  else:
    logp = process_logits(logits_BxV, cfg)
    draw = lambda k, lp: jax.random.categorical(jax.random.fold_in(k, step), lp)
    token = jax.vmap(draw)(keys_B, logp)
  return token.astype(jnp.int32), jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg"))
def sample(graphdef, params, prompt_tokens_BxP, prompt_valid_BxP, key, row_ids_B=None, *,
           cfg: SamplingConfig) -> SampleOutput:
  """Samples up to cfg.max_new_tokens continuations of each prompt with a KV cache; row r's
  draws depend only on (key, row_ids_B[r]) and its prompt (module docstring)."""
  model = nnx.merge(graphdef, params)
  cache, logits_BxV, next_pos_B = _prefill(model, prompt_tokens_BxP, prompt_valid_BxP,
                                           cfg.max_new_tokens)
  keys = row_keys(key, _row_ids(row_ids_B, prompt_tokens_BxP.shape[0]))
  return _decode(model, cache, logits_BxV, next_pos_B, keys, cfg)


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "group_size"))
def sample_groups(graphdef, params, prompt_tokens_BxP, prompt_valid_BxP, key, row_ids_B=None, *,
                  cfg: SamplingConfig, group_size: int) -> SampleOutput:
  """group_size samples of each prompt, prompt-major ((B * group_size) rows: row
  i * group_size + j is sample j of prompt i), with each prompt's prefix processed ONCE: its
  KV cache, last logits and next position are replicated group_size times after the prefill.
  Sample j of the prompt with id n draws as row id n * group_size + j: equal to `sample` on
  the prompts repeated group_size times with those row ids."""
  if group_size < 1:
    raise ValueError(f"group_size must be >= 1, got {group_size}")
  model = nnx.merge(graphdef, params)
  cache, logits_BxV, next_pos_B = _prefill(model, prompt_tokens_BxP, prompt_valid_BxP,
                                           cfg.max_new_tokens)
  repeat = lambda x: jnp.repeat(x, group_size, axis=0) if x.ndim else x  # not cache.index
  ids = _row_ids(row_ids_B, prompt_tokens_BxP.shape[0])
  sample_ids = (ids[:, None] * group_size + jnp.arange(group_size)).reshape(-1)
  return _decode(model, jax.tree.map(repeat, cache), repeat(logits_BxV), repeat(next_pos_B),
                 row_keys(key, sample_ids), cfg)


def _prefill(model, prompt_tokens_BxP, prompt_valid_BxP, max_new_tokens: int):
  """One forward over the prompts into a fresh cache of P + max_new_tokens slots:
  (cache, last real token's logits_BxV, next position_B)."""
  b, p = prompt_tokens_BxP.shape
  prompt_valid = prompt_valid_BxP.astype(bool)
  cache = init_cache(model.cfg, b, p + max_new_tokens)
  out = model(prompt_tokens_BxP, valid_BxT=prompt_valid,
              positions_BxT=positions_from_valid(prompt_valid), cache=cache)
  last = last_valid_index(prompt_valid)
  logits_BxV = jnp.take_along_axis(out.logits_BxTxV, last[:, None, None], axis=1)[:, 0]
  return out.cache, logits_BxV, jnp.sum(prompt_valid, axis=-1).astype(jnp.int32)


def _decode(model, cache, logits_BxV, next_pos_B, keys_B, cfg: SamplingConfig) -> SampleOutput:
  """The token loop (lax.while_loop) from a prefilled cache; row r draws step t with
  fold_in(keys_B[r], t)."""
  b = logits_BxV.shape[0]
  n = cfg.max_new_tokens

  def cond(carry):
    step, _, _, _, _, _, done, _ = carry
    return (step < n) & ~jnp.all(done)

  def body(carry):
    step, cache, logits, pos, tokens, logps, done, mask = carry
    token, logp = _choose(logits, keys_B, step, cfg)
    live = ~done
    token = jnp.where(live, token, cfg.pad_id)
    tokens = tokens.at[:, step].set(token)
    logps = logps.at[:, step].set(jnp.where(live, logp, 0.0))
    mask = mask.at[:, step].set(live)
    done = done | (token == cfg.eos_id)
    out = model(token[:, None], valid_BxT=live[:, None], positions_BxT=pos[:, None], cache=cache)
    return (step + 1, out.cache, out.logits_BxTxV[:, 0], pos + live, tokens, logps, done, mask)

  carry = (jnp.zeros((), jnp.int32), cache, logits_BxV, next_pos_B,
           jnp.full((b, n), cfg.pad_id, jnp.int32), jnp.zeros((b, n), jnp.float32),
           jnp.zeros((b,), bool), jnp.zeros((b, n), bool))
  _, _, _, _, tokens, logps, done, mask = jax.lax.while_loop(cond, body, carry)
  return SampleOutput(tokens, logps, mask, done)


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


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg"))
def sample_mixture(graphdef, params, ref_params, prompt_tokens_BxP, prompt_valid_BxP, key,
                   mixture_coef, row_ids_B=None, *, cfg: SamplingConfig) -> SampleOutput:
  """Samples from the token-level geometric mixture of a policy and a reference sharing one
  graphdef (Nash-MD-PG's opponent pi_mix, Munos et al. 2024), with a KV cache per model:

    log pi_mix(. | s) = log_softmax((1 - a) log pi(. | s) + a log mu(. | s)),  a = mixture_coef

  where log pi and log mu are each log_softmax(logits / temperature); top-k / top-p then
  truncate the MIXED distribution, greedy takes its argmax. a = 0 draws what `sample` draws
  from the policy (same key: same tokens), a = 1 what it draws from the reference.
  mixture_coef is traced (a schedule does not recompile). Log-probs are under pi_mix."""
  policy, ref = nnx.merge(graphdef, params), nnx.merge(graphdef, ref_params)
  b = prompt_tokens_BxP.shape[0]
  n = cfg.max_new_tokens
  cache, logits, pos = _prefill(policy, prompt_tokens_BxP, prompt_valid_BxP, n)
  ref_cache, ref_logits, _ = _prefill(ref, prompt_tokens_BxP, prompt_valid_BxP, n)
  keys = row_keys(key, _row_ids(row_ids_B, b))
  mixed_cfg = dataclasses.replace(cfg, temperature=1.0)  # temperature applied before mixing
  temp = 1.0 if cfg.greedy else cfg.temperature

  def mixed(logits_BxV, ref_logits_BxV):
    return geometric_mixture_logprobs(logits_BxV.astype(jnp.float32) / temp,
                                      ref_logits_BxV.astype(jnp.float32) / temp,
                                      mixture_coef=mixture_coef)

  def cond(carry):
    return (carry[0] < n) & ~jnp.all(carry[7])

  def body(carry):
    step, cache, ref_cache, logits, ref_logits, pos, tokens, done, logps, mask = carry
    token, logp = _choose(mixed(logits, ref_logits), keys, step, mixed_cfg)
    live = ~done
    token = jnp.where(live, token, cfg.pad_id)
    tokens = tokens.at[:, step].set(token)
    logps = logps.at[:, step].set(jnp.where(live, logp, 0.0))
    mask = mask.at[:, step].set(live)
    done = done | (token == cfg.eos_id)
    feed = dict(valid_BxT=live[:, None], positions_BxT=pos[:, None])
    out = policy(token[:, None], cache=cache, **feed)
    ref_out = ref(token[:, None], cache=ref_cache, **feed)
    return (step + 1, out.cache, ref_out.cache, out.logits_BxTxV[:, 0],
            ref_out.logits_BxTxV[:, 0], pos + live, tokens, done, logps, mask)

  # done sits at index 7 of the carry (cond reads it).
  carry = (jnp.zeros((), jnp.int32), cache, ref_cache, logits, ref_logits, pos,
           jnp.full((b, n), cfg.pad_id, jnp.int32), jnp.zeros((b,), bool),
           jnp.zeros((b, n), jnp.float32), jnp.zeros((b, n), bool))
  _, _, _, _, _, _, tokens, done, logps, mask = jax.lax.while_loop(cond, body, carry)
  return SampleOutput(tokens, logps, mask, done)
