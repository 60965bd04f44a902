"""The embedded worlds as the experiments see them: config from flags, datasets, and the
held-out evaluation of a policy, one entry per world.

  arithmetic  exact-match accuracy of greedy and temperature-1 answers (rlhf_jax/worlds/arithmetic)
  gold        the hidden gold reward r* of greedy and temperature-1 responses, their length
              and the share that end with EOS (rlhf_jax/worlds/gold)
"""
from typing import Callable

import numpy as np

from rlhf_jax import evaluation
from rlhf_jax.data import pipeline
from rlhf_jax.data.tokenizer import ByteTokenizer
from rlhf_jax.sampling import SamplingConfig
from rlhf_jax.worlds import arithmetic, gold

NAMES = ("arithmetic", "gold")
# Response tokens sampled at evaluation when --max_new_tokens=0: an arithmetic answer is <= 4
# bytes; 120 bytes (~24 words) reach past the gold length peak (16 words) to its zero (24).
DEFAULT_MAX_NEW_TOKENS = {"arithmetic": 6, "gold": 120}


def world_config(cfg, **overrides):
  """The world's own config from an LMConfig's flags (--smoke shrinks the corpora)."""
  if cfg.world == "arithmetic":
    kw = dict(seed=cfg.world_seed, error_rate=cfg.error_rate, min_digits=cfg.min_digits,
              max_digits=cfg.max_digits, statements_per_text=cfg.statements_per_text,
              num_pretrain_texts=cfg.pretrain_texts)
    make = arithmetic.ArithmeticConfig
  else:
    kw = dict(seed=cfg.world_seed, num_pretrain_texts=cfg.pretrain_texts)
    make = gold.GoldConfig
  if cfg.smoke:
    kw.update(num_pretrain_texts=64, num_sft=32, num_test=8)
  kw.update(overrides)
  return make(**kw)


def build_datasets(cfg) -> dict:
  module = arithmetic if cfg.world == "arithmetic" else gold
  return module.build_datasets(world_config(cfg), cfg.data_dir)


def max_new_tokens(cfg) -> int:
  return cfg.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[cfg.world]


def prompt_len(prompts) -> int:
  """Prompt columns for a set of prompts: the longest, with bos."""
  tok = ByteTokenizer()
  return max(len(tok.encode(pipeline._text(p))) for p in prompts) + 1


def sample_responses(graphdef, params, prompts, *, batch_size: int, max_new: int, key,
                     greedy: bool = False, temperature: float = 1.0) -> list[str]:
  """One sampled response per prompt (texts, EOS and padding stripped), in order."""
  tok = ByteTokenizer()
  scfg = SamplingConfig(max_new_tokens=max_new, eos_id=tok.eos_id, pad_id=tok.pad_id,
                        greedy=greedy, temperature=temperature)
  source = [{"prompt": p, "response": ""} for p in prompts]
  batches = pipeline.make_prompt_iterator(source, batch_size=batch_size,
                                          prompt_len=prompt_len(prompts), tokenizer=tok)
  return [text for text, _ in evaluation.generate(graphdef, params, batches, tok, scfg, key)]


def _arithmetic_metrics(cfg, graphdef, params, source, key) -> dict:
  tok = ByteTokenizer()
  out = {}
  for name, greedy in (("greedy", True), ("temp1", False)):
    scfg = SamplingConfig(max_new_tokens=max_new_tokens(cfg), eos_id=tok.eos_id,
                          pad_id=tok.pad_id, greedy=greedy)
    batches = pipeline.make_prompt_iterator(source, batch_size=cfg.eval_batch_size,
                                            prompt_len=prompt_len([r["prompt"] for r in source]),
                                            tokenizer=tok)
    pairs = evaluation.generate(graphdef, params, batches, tok, scfg, key)
    out[f"accuracy_{name}"] = evaluation.exact_match_rate(pairs, arithmetic.verify)
  return out


def gold_summary(prompts, responses, prefix: str) -> dict:
  """Mean gold reward with its standard error, mean words, and the share ending in '.'."""
  r = gold.gold_rewards(prompts, responses)
  fs = [gold.facets(p, y) for p, y in zip(prompts, responses)]
  return {f"{prefix}gold": float(r.mean()),
          f"{prefix}gold_se": float(r.std(ddof=1) / np.sqrt(len(r))) if len(r) > 1 else 0.0,
          f"{prefix}words": float(np.mean([f["words"] for f in fs])),
          f"{prefix}period": float(np.mean([f["period"] for f in fs]))}


def win_rate(gold_a, gold_b, rng: np.random.Generator, *, n_boot: int = 2000,
             level: float = 0.95) -> dict:
  """How often policy A's response beats policy B's on the same prompt by gold reward (ties
  count 1/2), with a percentile bootstrap confidence interval over prompts-samples.

  gold_a, gold_b: paired gold rewards [N] (row i: both policies answering prompt i)."""
  a, b = np.asarray(gold_a, np.float64), np.asarray(gold_b, np.float64)
  if a.shape != b.shape or a.ndim != 1 or a.size < 2:
    raise ValueError(f"need two paired 1-D arrays of >= 2 rewards, got {a.shape} and {b.shape}")
  wins = (a > b) + 0.5 * (a == b)
  boots = wins[rng.integers(0, wins.size, (n_boot, wins.size))].mean(axis=1)
  lo, hi = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2])
  return {"win_rate": float(wins.mean()), "win_rate_lo": float(lo), "win_rate_hi": float(hi)}


# Temperature-1 samples per held-out prompt: the gold world has ~40 test prompts, and the
# mean gold reward of one sample each is too noisy to compare policies.
GOLD_EVAL_SAMPLES = 4


def _gold_metrics(cfg, graphdef, params, source, key) -> dict:
  prompts = [pipeline._text(r["prompt"]) for r in source]
  out = {}
  for name, greedy, reps in (("greedy_", True, 1), ("temp1_", False, GOLD_EVAL_SAMPLES)):
    ps = prompts * reps
    ys = sample_responses(graphdef, params, ps, batch_size=cfg.eval_batch_size,
                          max_new=max_new_tokens(cfg), key=key, greedy=greedy)
    out.update(gold_summary(ps, ys, name))
  return out


_METRICS: dict[str, Callable] = {"arithmetic": _arithmetic_metrics, "gold": _gold_metrics}


def heldout_metrics(cfg, graphdef, params, heldout_source, *, key) -> dict:
  """The world's held-out evaluation of a policy on up to --eval_prompts test prompts."""
  source = [heldout_source[i] for i in range(min(cfg.eval_prompts, len(heldout_source)))]
  return _METRICS[cfg.world](cfg, graphdef, params, source, key)


def headline(world: str) -> tuple[str, ...]:
  """The metrics an experiment prints for a policy of this world."""
  return (("accuracy_greedy", "accuracy_temp1") if world == "arithmetic"
          else ("greedy_gold", "temp1_gold", "temp1_words", "temp1_period"))

