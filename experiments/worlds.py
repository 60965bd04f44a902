"""The embedded worlds as the experiments see them: config from flags, datasets, simulated
raters, and the held-out evaluation of a policy, one entry per world.

  arithmetic    exact-match accuracy of greedy and temperature-1 answers (worlds/arithmetic)
  gold          the hidden gold reward r*; raters are Plackett-Luce on r* at a temperature
                calibrated to --rater_agreement on the pairs they rate (worlds/gold, raters)
  sycophancy    correctness and the sycophancy rate; raters prefer agreement (worlds/sycophancy)
  intransitive  response styles under a cyclic preference; exploitability and the distance
                to the Nash equilibrium (worlds/intransitive)

The preference worlds (all but arithmetic) are modules of one protocol: <Name>Config (with
seed, num_pretrain_texts, num_sft, num_test), build_datasets, split_prompts, all_prompts,
DEFAULT_MAX_NEW_TOKENS, MAX_PRETRAIN_BYTES (PPO-ptx rows), ground_truth (the scalar reported
as "gold"), metrics (the world's own aggregates), truth_better, and, except for gold,
rater_preference and rater_rankings.
"""
import dataclasses
import importlib
import math
import numpy as np

from rlhf_jax import evaluation
from rlhf_jax.data import pipeline
from rlhf_jax.data.tokenizer import ByteTokenizer
from rlhf_jax.sampling import SamplingConfig
from rlhf_jax.worlds import arithmetic, raters

PREFERENCE_WORLDS = ("gold", "sycophancy", "intransitive")
NAMES = ("arithmetic",) + PREFERENCE_WORLDS
# Response tokens sampled at evaluation when --max_new_tokens=0 (an arithmetic answer is <= 4
# bytes; the preference worlds state their own).
ARITHMETIC_MAX_NEW_TOKENS = 6


def module(world: str):
  """The world's module in rlhf_jax/worlds/."""
  if world not in NAMES:
    raise ValueError(f"unknown world {world!r}; choose one of {NAMES}")
  return importlib.import_module(f"rlhf_jax.worlds.{world}")


def world_config(cfg, **overrides):
  """The world's own config from an LMConfig's flags (--smoke shrinks the corpora)."""
  kw = dict(seed=cfg.world_seed, num_pretrain_texts=cfg.pretrain_texts)
  if cfg.world == "arithmetic":
    kw.update(error_rate=cfg.error_rate, min_digits=cfg.min_digits, max_digits=cfg.max_digits,
              statements_per_text=cfg.statements_per_text)
    make = arithmetic.ArithmeticConfig
  else:
    make = getattr(module(cfg.world), f"{cfg.world.capitalize()}Config")
    if cfg.world == "sycophancy":
      kw.update(p_syc=cfg.p_syc)
  if cfg.smoke:
    kw.update(num_pretrain_texts=64, num_sft=32, num_test=8)
  kw.update(overrides)
  return make(**kw)


def build_datasets(cfg) -> dict:
  return module(cfg.world).build_datasets(world_config(cfg), cfg.data_dir)


def max_new_tokens(cfg) -> int:
  if cfg.max_new_tokens:
    return cfg.max_new_tokens
  if cfg.world == "arithmetic":
    return ARITHMETIC_MAX_NEW_TOKENS
  return module(cfg.world).DEFAULT_MAX_NEW_TOKENS


def split_prompts(cfg) -> dict[str, list[str]]:
  """{"train": [...], "test": [...]} prompts of a preference world."""
  return module(cfg.world).split_prompts(world_config(cfg))


def test_prompts(cfg) -> list[str]:
  """The held-out prompts an experiment evaluates on: up to --eval_prompts of the test split."""
  world = world_config(cfg)
  return split_prompts(cfg)["test"][:min(cfg.eval_prompts, world.num_test)]


def world_prompt_len(cfg) -> int:
  """Prompt columns that fit every prompt of the world."""
  return prompt_len(module(cfg.world).all_prompts(world_config(cfg)))


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


def summary(world: str, prompts, responses, prefix: str = "") -> dict:
  """A preference world's evaluation of responses: mean ground truth ("gold") with its
  standard error, mean words (whitespace-separated, unless the world counts its own), and
  the world's own metrics (gold: words, period; sycophancy: sycophancy rate, ...)."""
  mod = module(world)
  r = mod.ground_truth(prompts, responses)
  out = {"gold": float(r.mean()),
         "gold_se": float(r.std(ddof=1) / np.sqrt(len(r))) if len(r) > 1 else 0.0,
         "words": float(np.mean([len(y.split()) for y in responses]))}
  out.update(mod.metrics(prompts, responses))
  return {f"{prefix}{k}": v for k, v in out.items()}


@dataclasses.dataclass(frozen=True)
class Raters:
  """A preference world's simulated raters, as the comparison experiments use them.

  gold: Plackett-Luce on r*/T with T calibrated so two raters agree --rater_agreement of the
  time on the pairs being rated (make_raters); the other worlds bring their own noise model.
  """
  world: str
  world_cfg: object
  temperature: float = math.nan  # gold only

  def preference(self, prompts, ys_a, ys_b) -> np.ndarray:
    """P(a rater prefers a over b), per pair."""
    if self.world == "gold":
      mod = module("gold")
      diff = mod.ground_truth(prompts, ys_a) - mod.ground_truth(prompts, ys_b)
      return raters.preference_probability(diff, self.temperature)
    return module(self.world).rater_preference(self.world_cfg, prompts, ys_a, ys_b)

  def rank(self, prompts, responses_NxK, rng: np.random.Generator) -> np.ndarray:
    """One rater's ranking of each prompt's K responses, indices best first [N, K]."""
    if self.world == "gold":
      return raters.sample_rankings(ground_truth_NxK("gold", prompts, responses_NxK),
                                    self.temperature, rng)
    return module(self.world).rater_rankings(self.world_cfg, prompts, responses_NxK, rng)


def ground_truth_NxK(world: str, prompts, responses_NxK) -> np.ndarray:
  """The world's ground truth of N prompts' K responses each, float64 [N, K]."""
  k = len(responses_NxK[0])
  flat = module(world).ground_truth([p for p in prompts for _ in range(k)],
                                    [y for ys in responses_NxK for y in ys])
  return flat.reshape(len(prompts), k)


def make_raters(cfg, prompts, responses_NxK) -> Raters:
  """The raters of cfg.world; gold's temperature is calibrated to cfg.rater_agreement on all
  within-prompt pairs of these responses (the pairs about to be rated)."""
  world_cfg = world_config(cfg)
  if cfg.world != "gold":
    return Raters(cfg.world, world_cfg)
  gold_NxK = ground_truth_NxK("gold", prompts, responses_NxK)
  i, j = np.triu_indices(gold_NxK.shape[1], k=1)
  diffs = (gold_NxK[:, i] - gold_NxK[:, j]).ravel()
  return Raters("gold", world_cfg, raters.temperature_for_agreement(diffs, cfg.rater_agreement))


def pair_labels(world: str, raters_: Raters, prompts, responses_NxK) -> dict[str, np.ndarray]:
  """Per within-prompt pair (i, j) [N, K, K]: the raters' P(i > j) and the truth (1/0/0.5)."""
  n, k = len(prompts), len(responses_NxK[0])
  i, j = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
  ps = [p for p in prompts for _ in range(k * k)]
  ya = [ys[a] for ys in responses_NxK for a in i.ravel()]
  yb = [ys[b] for ys in responses_NxK for b in j.ravel()]
  return {"rater": raters_.preference(ps, ya, yb).reshape(n, k, k),
          "truth": module(world).truth_better(ps, ya, yb).reshape(n, k, k)}


def reward_pair_metrics(world: str, prompts, responses_NxK, scores_NxK, labels) -> dict:
  """World-specific diagnostics of a reward model on held-out within-prompt pairs.

  sycophancy: over pairs of a sycophantic wrong answer (agrees with a wrong belief) and a
  correct one, the share the reward model scores the sycophantic one higher (ties 1/2)
  next to the raters' probability of preferring it (Sharma 2023's measurement)."""
  if world != "sycophancy":
    return {}
  mod = module(world)
  k = len(responses_NxK[0])
  flat_y = [y for ys in responses_NxK for y in ys]
  truth = ground_truth_NxK(world, prompts, responses_NxK)
  # "yes" agrees with the user; a wrong "yes" agrees with a wrong belief.
  agrees = np.array([mod.answer_of(y) is True for y in flat_y]).reshape(-1, k)
  syco, correct = agrees & (truth == 0.0), truth == 1.0
  pairs = syco[:, :, None] & correct[:, None, :]
  diff = scores_NxK[:, :, None] - scores_NxK[:, None, :]
  prefers = np.where(diff > 0, 1.0, np.where(diff == 0, 0.5, 0.0))
  n = int(pairs.sum())
  nan = float("nan")
  return {"sycophantic_pairs": n,
          "rm_prefers_sycophantic": float(prefers[pairs].mean()) if n else nan,
          "raters_prefer_sycophantic": float(labels["rater"][pairs].mean()) if n else nan}


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


def _preference_metrics(cfg, graphdef, params, source, key) -> dict:
  prompts = [pipeline._text(r["prompt"]) for r in source]
  out = {}
  for name, greedy, reps in (("greedy_", True, 1), ("temp1_", False, GOLD_EVAL_SAMPLES)):
    ps = prompts * reps
    ys = sample_responses(graphdef, params, ps, batch_size=cfg.eval_batch_size,
                          max_new=max_new_tokens(cfg), key=key, greedy=greedy)
    out.update(summary(cfg.world, ps, ys, name))
  return out


def heldout_metrics(cfg, graphdef, params, heldout_source, *, key) -> dict:
  """The world's held-out evaluation of a policy on up to --eval_prompts test prompts."""
  source = [heldout_source[i] for i in range(min(cfg.eval_prompts, len(heldout_source)))]
  evaluate = _arithmetic_metrics if cfg.world == "arithmetic" else _preference_metrics
  return evaluate(cfg, graphdef, params, source, key)


# The world's own metrics worth a column next to gold and words (keys of module.metrics).
WORLD_COLUMNS = {"gold": ("period",), "sycophancy": ("sycophancy_rate",),
                 "intransitive": ("exploitability", "nash_distance")}


def headline(world: str) -> tuple[str, ...]:
  """The metrics an experiment prints for a policy of this world."""
  if world == "arithmetic":
    return ("accuracy_greedy", "accuracy_temp1")
  return ("greedy_gold", "temp1_gold", "temp1_words") + tuple(
      f"temp1_{k}" for k in WORLD_COLUMNS[world])
