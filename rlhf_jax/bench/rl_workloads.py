"""Generation and the online loop: the KV-cache sampler (and naive decoding beside it) and one
GRPO iteration through the engine's own pieces (rl/rollout.py, rl/algorithms/grpo.py,
rl/loop.py), on a randomly initialised model and random-token prompts."""
import time

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import sharding
from rlhf_jax.bench.common import compile_with_stats, median_time, memory_stats
from rlhf_jax.bench.train_workloads import init_params
from rlhf_jax.compile_count import CompileCounter
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.rewards import functions
from rlhf_jax.rl import loop as rl_loop
from rlhf_jax.rl.algorithms import grpo
from rlhf_jax.rl.grouped_forward import PromptGroups
from rlhf_jax.rl.rollout import RolloutStage, encode_prompts, make_rollout_fn
from rlhf_jax.sampling import SamplingConfig, sample, sample_naive
from rlhf_jax.train import optim

# eos_id -1 never matches a token: every row decodes exactly max_new_tokens tokens, so every
# sampler (and every peer) does the same work whatever the random weights emit.
NO_EOS = -1


def random_prompts(cfg: ModelConfig, batch: int, prompt_len: int) -> np.ndarray:
  return np.random.default_rng(0).integers(3, cfg.vocab_size, (batch, prompt_len)).astype(
      np.int32)


def bench_sampler(cfg: ModelConfig, *, batch: int, prompt_len: int, new_tokens: int,
                  repeats: int, naive: bool = False) -> dict:
  """sampling.sample (or sample_naive, which reruns the whole forward every token) of
  new_tokens tokens after each of `batch` prompts, temperature 1, no EOS. Timed: the compiled
  program (prefill + decode loop) until its tokens are ready."""
  graphdef, params, _ = init_params(cfg)
  prompts = jnp.asarray(random_prompts(cfg, batch, prompt_len))
  valid = jnp.ones((batch, prompt_len), bool)
  scfg = SamplingConfig(max_new_tokens=new_tokens, eos_id=NO_EOS, pad_id=0)
  fn = sample_naive if naive else sample
  args = (graphdef, params, prompts, valid, jax.random.key(0))
  _, stats = compile_with_stats(fn, *args, cfg=scfg)
  seconds = median_time(lambda: jax.block_until_ready(fn(*args, cfg=scfg)), repeats=repeats)
  return {"seconds": seconds, "new_tokens_per_s": batch * new_tokens / seconds, **stats}


class IdTokenizer:
  """Token ids as words ("t17 t3"): what the rollout decodes responses into and the reward
  function reads, without a tokenizer file. pad 0, bos 1, eos 2."""
  pad_id, bos_id, eos_id = 0, 1, 2

  def __init__(self, vocab_size: int):
    self.vocab_size = vocab_size

  def encode(self, text: str) -> list[int]:
    return [int(w[1:]) for w in text.split()]

  def decode(self, ids) -> str:
    return " ".join(f"t{int(i)}" for i in ids if int(i) > self.eos_id)


def even_token_reward(prompts, completions, answers):
  """The fraction of a completion's tokens with an even id: a verifiable reward of the tokens
  (rewards/functions.py's signature) that costs next to nothing beside the model."""
  del prompts, answers
  out = []
  for text in completions:
    ids = [int(w[1:]) for w in text.split()]
    out.append(sum(i % 2 == 0 for i in ids) / max(len(ids), 1))
  return out


class _TimedStage(RolloutStage):
  """The engine's rollout stage, recording how long each experience(...) took: the compiled
  rollout (sampling + the old-policy log-prob forward) and decoding the responses to text."""

  def experience(self, *args, **kwargs):
    start = time.perf_counter()
    exp = super().experience(*args, **kwargs)
    jax.block_until_ready(exp.rollout)
    self.seconds.append(time.perf_counter() - start)
    return exp


def bench_grpo(cfg: ModelConfig, *, prompts: int, group_size: int, prompt_len: int,
               new_tokens: int, repeats: int, share_prompt: bool = False,
               sampler_old_logps: bool = False) -> dict:
  """GRPO iterations as rl/loop.py runs them, minus logging, evaluation and checkpoints:
  GroupSampling.collect (the rollout of `prompts` x group_size samples from one prefill per
  prompt, the reward, group advantages) and ONE optimizer step on every row (train_on_rollout
  with the trainer of rl_loop.make_trainer). No KL (no reference), token aggregation, no EOS.

  seconds: the median steady iteration; generation_share: its rollout's part (_TimedStage);
  compile_s: the first iteration minus a steady one (every program it compiles: rollout,
  advantages, row gather, train step); compiles_steady: backend compiles in a steady
  iteration (0). memory: of the train step, and of the rollout program compiled from
  make_rollout_fn at the same shapes (its compile_s is that explicit compile's).
  share_prompt (--share_prompt): each group's prompt computed once in the rollout's log-prob
  forward and in the train step (rl/grouped_forward.py); sampler_old_logps
  (--sampler_old_logps): no log-prob forward in the rollout (rollout.make_rollout_fn)."""
  graphdef, params, shardings = init_params(cfg)
  mesh = sharding.mesh_of(params)
  tok = IdTokenizer(cfg.vocab_size)
  scfg = SamplingConfig(max_new_tokens=new_tokens, eos_id=NO_EOS, pad_id=tok.pad_id)
  texts = [tok.decode(row) for row in random_prompts(cfg, prompts, prompt_len - 1)]
  stage = _TimedStage(graphdef, scfg, prompt_len, group_size=group_size, with_ref=False,
                      tokenizer=tok, share_prompt=share_prompt,
                      sampler_old_logps=sampler_old_logps)
  stage.seconds = []
  scorer = lambda exp: functions.call(  # noqa: E731
      even_token_reward, "even_tokens", exp.prompts, exp.responses, [None] * exp.rows
  ).astype(np.float32)
  algorithm = grpo.GroupSampling(
      stage, scorer, texts, None, prompts, 0,
      grpo.grpo_batch_fn(group_size, estimator="grpo", std_eps=1e-4))
  loss_fn = grpo.grpo_loss_fn(graphdef, clip_eps_low=0.2, clip_eps_high=0.2, kl_coef=0.0,
                              aggregation="token", max_new_tokens=new_tokens,
                              prompt_groups=PromptGroups(group_size, prompt_len)
                              if share_prompt else None)
  keys = ("tokens", "valid", "mask", "old_logps", "advantages")
  state, train_step = rl_loop.make_trainer(
      loss_fn, params, shardings, keys, mesh, num_microbatches=1, seed=0,
      optim_cfg=optim.OptimConfig(learning_rate=1e-6, total_steps=1000))
  holder = [state]

  def iteration(it: int):
    step = algorithm.collect(it, holder[0].params)
    order = rl_loop.epoch_order(len(step.batch["tokens"]), step.shuffle_rng, epochs=1,
                                num_minibatches=1, block=step.row_block)
    holder[0], metrics = rl_loop.train_on_rollout(train_step, holder[0], step.batch, order,
                                                  mesh)
    jax.block_until_ready(metrics)
    return step.batch

  with CompileCounter() as counter:
    start = time.perf_counter()
    batch = iteration(0)
    first = time.perf_counter() - start
    counter.reset()
    times = []
    for it in range(1, repeats + 1):
      start = time.perf_counter()
      iteration(it)
      times.append(time.perf_counter() - start)
    steady_compiles = counter.count
  i = int(np.argsort(times)[len(times) // 2])  # the median iteration, with its own rollout
  seconds, generation = times[i], stage.seconds[1 + i]
  train = memory_stats(train_step.lower(holder[0], batch).compile())
  rollout_fn = make_rollout_fn(graphdef, scfg, group_size=group_size, with_ref=False,
                               mesh=mesh, share_prompt=share_prompt,
                               sampler_old_logps=sampler_old_logps)
  ptoks, pvalid = encode_prompts(texts, prompt_len, tok)
  _, rollout = compile_with_stats(rollout_fn, holder[0].params, None, None, ptoks, pvalid,
                                  jax.random.key(0), np.arange(prompts, dtype=np.int32))
  return {"seconds": seconds, "generation_s": generation,
          "generation_share": generation / seconds, "compile_s": max(first - seconds, 0.0),
          "compiles_steady": steady_compiles,
          "rollout_tokens_per_s": prompts * group_size * new_tokens / seconds,
          "memory": {"train_step": train, "rollout": rollout["memory"]},
          "rollout_compile_s": rollout["compile_s"]}
