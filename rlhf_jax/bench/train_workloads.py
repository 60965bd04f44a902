"""The offline train steps researchers run, on random tokens: SFT (the causal-LM step, loss on
the response half) and DPO (pairs, the reference's log-probs precomputed or evaluated in the
step). Each is the library's own step (train/step.py) around its own loss_fn, on one device."""
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import sharding
from rlhf_jax.bench.common import (compile_with_stats, forward_flops_per_token, median_time,
                                   train_flops_per_token)
from rlhf_jax.data import shared_prefix
from rlhf_jax.data.pairs import SIDES
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.transformer import Transformer
from rlhf_jax.train import optim, preference, state as state_lib, step as step_lib
from rlhf_jax.train.lm import lm_loss_fn


def init_params(cfg: ModelConfig, seed: int = 0):
  """(graphdef, params, shardings) of a randomly initialised Transformer on one device."""
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  return sharding.init_sharded(lambda r: Transformer(cfg, rngs=r), jax.random.key(seed), mesh)


def train_step_for(params, loss_fn):
  """(state, step): the train step of `loss_fn` compiled as every trainer compiles it
  (step.compile_train_step: the state donated), AdamW with a cosine schedule."""
  opt = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-3, total_steps=1000))
  state = state_lib.init_train_state(params, opt, jax.random.key(0))
  return state, step_lib.compile_train_step(step_lib.make_train_step(loss_fn, opt,
                                                                     num_microbatches=1))


def lm_train_step(cfg: ModelConfig):
  """(state, step) of the causal-LM train step on one device (also bench_packing's)."""
  graphdef, params, _ = init_params(cfg)
  return train_step_for(params, lm_loss_fn(graphdef))


def _random_tokens(rng, cfg: ModelConfig, shape) -> np.ndarray:
  # Ids 3.. : 0-2 stay free for pad, bos and eos as a tokenizer would place them.
  return rng.integers(3, cfg.vocab_size, shape).astype(np.int32)


def sft_batch(cfg: ModelConfig, *, batch: int, prompt_len: int, response_len: int) -> dict:
  """The LM step's batch: full rows of prompt + response, loss_mask on the response tokens."""
  t = prompt_len + response_len
  mask = np.zeros((batch, t), np.float32)
  mask[:, prompt_len:] = 1.0
  return {"tokens": jnp.asarray(_random_tokens(np.random.default_rng(0), cfg, (batch, t))),
          "valid": jnp.ones((batch, t), bool), "loss_mask": jnp.asarray(mask)}


def dpo_batch(cfg: ModelConfig, *, pairs: int, prompt_len: int, response_len: int) -> dict:
  """A batch of data/pairs.py's layout: each pair's two rows share [bos] + prompt (prompt_len
  tokens), then a response ending in eos (response_len tokens) that differs between chosen and
  rejected; the mask covers the response tokens and eos, as pair_example builds it."""
  rng = np.random.default_rng(0)
  t = prompt_len + response_len
  prompt = _random_tokens(rng, cfg, (pairs, prompt_len))
  prompt[:, 0] = 1  # bos
  mask = np.zeros((pairs, t), np.float32)
  mask[:, prompt_len:] = 1.0
  out = {"example_valid": jnp.ones((pairs,), bool)}
  for side in SIDES:
    response = _random_tokens(rng, cfg, (pairs, response_len))
    response[:, -1] = 2  # eos
    out[f"{side}_tokens"] = jnp.asarray(np.concatenate([prompt, response], axis=1))
    out[f"{side}_valid"] = jnp.ones((pairs, t), bool)
    out[f"{side}_mask"] = jnp.asarray(mask)
  return out


def shared_dpo_batch(two_row: dict, *, prompt_len: int, response_len: int) -> dict:
  """The same pairs in data/shared_prefix.py's layout (what --response_len makes): one row
  [bos + prompt | chosen | rejected] per pair, response_len slots per response."""
  rows = []
  for i in range(two_row["chosen_tokens"].shape[0]):
    head = [int(x) for x in two_row["chosen_tokens"][i, :prompt_len]]
    responses = [[int(x) for x in two_row[f"{side}_tokens"][i, prompt_len:]] for side in SIDES]
    rows.append(shared_prefix.shared_row(head, responses, row_len=prompt_len + 2 * response_len,
                                         response_len=response_len, pad_id=0))
  return {"example_valid": two_row["example_valid"],
          **{k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}}


def _time_step(state, step, batch, *, repeats: int) -> tuple[float, dict]:
  """(median seconds per step, compile stats) of a donated train step."""
  _, stats = compile_with_stats(step, state, batch)
  holder = [state]

  def run():
    holder[0], metrics = step(holder[0], batch)
    jax.block_until_ready(metrics)

  return median_time(run, repeats=repeats), stats


def _train_report(seconds: float, stats: dict, tokens: int, flops: float) -> dict:
  return {"seconds_per_step": seconds, "tokens_per_s": tokens / seconds,
          "model_flops_per_s": flops / seconds, **stats}


def bench_sft(cfg: ModelConfig, *, batch: int, prompt_len: int, response_len: int,
              repeats: int) -> dict:
  """The LM train step (rlhf_jax/train/lm.py's loss) on batch x (prompt + response) tokens.
  Model FLOPs count every token of the rows (the forward and backward run over all of them)."""
  state, step = lm_train_step(cfg)
  data = sft_batch(cfg, batch=batch, prompt_len=prompt_len, response_len=response_len)
  seconds, stats = _time_step(state, step, data, repeats=repeats)
  t = prompt_len + response_len
  tokens = batch * t
  return _train_report(seconds, stats, tokens, tokens * train_flops_per_token(cfg, t))


def bench_dpo(cfg: ModelConfig, *, pairs: int, prompt_len: int, response_len: int,
              repeats: int, reference_in_step: bool, shared_prompt: bool = False) -> dict:
  """One DPO optimizer step (train/preference.py's loss, beta 0.1) on `pairs` pairs.

  reference_in_step False (what DPO training does by default): the batch carries the
  reference's log-probs, computed once beforehand by reference_logps_fn (not timed); True:
  the step runs the frozen reference's forward itself (ref_params closed over: constants of
  the program). Model FLOPs: the policy's forward + backward over both rows of every pair,
  plus the reference's forward when it runs in the step.

  shared_prompt (--response_len): each pair is one row [prompt | chosen | rejected]
  (data/shared_prefix.py), the LM head on response tokens only. tokens_per_s still counts
  the two sequences' tokens (the work a pair stands for), so it compares with the two-row
  layout; model FLOPs count what the shared rows compute: the blocks over prompt_len + 2 *
  response_len tokens, the LM head over the 2 * response_len response tokens."""
  graphdef, params, _ = init_params(cfg)
  data = dpo_batch(cfg, pairs=pairs, prompt_len=prompt_len, response_len=response_len)
  t = prompt_len + response_len
  tokens = 2 * pairs * t
  flops = tokens * train_flops_per_token(cfg, t)
  if shared_prompt:
    data = shared_dpo_batch(data, prompt_len=prompt_len, response_len=response_len)
    row = prompt_len + 2 * response_len
    head = 6 * cfg.d_model * cfg.vocab_size
    flops = (pairs * row * (train_flops_per_token(cfg, row) - head)
             + 2 * pairs * response_len * head)
  if reference_in_step:
    loss_fn = preference.preference_loss_fn(graphdef, loss="dpo", beta=0.1,
                                            ref_params=jax.tree.map(jnp.copy, params))
    flops += tokens * forward_flops_per_token(cfg, t)
  else:
    reference = jax.jit(preference.reference_logps_fn(graphdef))
    data = {**data, **reference(params, data)}
    loss_fn = preference.preference_loss_fn(graphdef, loss="dpo", beta=0.1)
  state, step = train_step_for(params, loss_fn)
  seconds, stats = _time_step(state, step, data, repeats=repeats)
  return _train_report(seconds, stats, tokens, flops)
