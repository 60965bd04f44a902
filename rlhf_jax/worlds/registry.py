"""The embedded worlds behind one typed interface, looked up by name (get("gold")).

Every World builds its config from plain values (the run's seed and corpus size plus the
world's own parameters, World.params), materialises its datasets, splits its prompts, and
scores responses against its ground truth. A PreferenceWorld also has simulated raters (who
rank responses, with the world's own noise model) and a pairwise truth; its summary is the
table row every preference experiment prints (mean ground truth as "gold" +- se, words, and
the world's own columns). Adding a world is a module in rlhf_jax/worlds/ and an entry here.
"""
import dataclasses
from typing import Sequence

import numpy as np

from rlhf_jax.data import pipeline
from rlhf_jax.data.tokenizer import ByteTokenizer
from rlhf_jax.worlds import arithmetic, gold, intransitive, raters, sycophancy

# Corpus sizes of a --smoke run: seconds, not minutes.
SMOKE_SIZES = dict(num_pretrain_texts=64, num_sft=32, num_test=8)


@dataclasses.dataclass(frozen=True)
class World:
  name: str
  config_cls: type
  default_max_new_tokens: int  # response tokens sampled when a run does not say
  params: tuple[str, ...] = ()  # the world's own config fields a run may set
  columns: tuple[str, ...] = ()  # its metrics worth a table column beside gold and words
  max_pretrain_bytes: int = 0  # the longest pretraining text (PPO-ptx rows must hold it)
  pairs_only: bool = False  # its raters compare pairs only (no K-way ranking model)

  def config(self, *, seed: int, num_pretrain_texts: int, smoke: bool = False, **params):
    """The world's config; params must be among self.params (another world's raise)."""
    unknown = sorted(set(params) - set(self.params))
    if unknown:
      raise ValueError(f"the {self.name} world has no parameter {', '.join(unknown)} (its "
                       f"parameters: {', '.join(self.params) or 'none'})")
    kw = dict(seed=seed, num_pretrain_texts=num_pretrain_texts, **params)
    if smoke:
      kw.update(SMOKE_SIZES)
    return self.config_cls(**kw)

  def build_datasets(self, config, data_dir: str) -> dict:
    return self._module.build_datasets(config, data_dir)

  def split_prompts(self, config) -> dict[str, list[str]]:
    """{"train": [...], "test": [...]} prompts."""
    return self._module.split_prompts(config)

  def all_prompts(self, config) -> list[str]:
    return self._module.all_prompts(config)

  def prompt_len(self, config) -> int:
    """Prompt columns that fit every prompt of the world (with bos)."""
    return prompt_len(self.all_prompts(config))

  @property
  def _module(self):
    return _MODULES[self.name]


def prompt_len(prompts: Sequence[str]) -> int:
  """Prompt columns for a set of prompts: the longest, with bos."""
  tok = ByteTokenizer()
  return max(len(tok.encode(pipeline._text(p))) for p in prompts) + 1


@dataclasses.dataclass(frozen=True)
class ArithmeticWorld(World):
  """Verifiable answers: the reward is exact match (arithmetic.verify)."""

  def split_prompts(self, config) -> dict[str, list[str]]:
    return {k: [arithmetic.prompt(*p) for p in v]
            for k, v in arithmetic.split_pairs(config).items()}

  def all_prompts(self, config) -> list[str]:
    return [p for v in self.split_prompts(config).values() for p in v]

  def answers(self, config) -> dict[str, str]:
    """The correct answer of every prompt."""
    return {arithmetic.prompt(*p): str(arithmetic.correct_answer(*p))
            for v in arithmetic.split_pairs(config).values() for p in v}

  verify = staticmethod(arithmetic.verify)


@dataclasses.dataclass(frozen=True)
class PreferenceWorld(World):
  """A world with a scalar ground truth per response and simulated raters."""

  def ground_truth(self, config, prompts, responses) -> np.ndarray:
    """float64 [N]: what RLHF is supposed to improve (reported as "gold")."""
    return self._module.ground_truth(prompts, responses)

  def metrics(self, config, prompts, responses) -> dict[str, float]:
    return self._module.metrics(prompts, responses)

  def truth_better(self, config, prompts, ys_a, ys_b) -> np.ndarray:
    """1 where a is truly better than b, 0 where worse, 0.5 on ties."""
    return self._module.truth_better(prompts, ys_a, ys_b)

  def raters(self, config, prompts, responses_NxK, *, agreement: float) -> raters.Raters:
    """The world's simulated raters for these responses (about to be rated)."""
    return raters.WorldRaters(
        lambda ps, a, b: self._module.rater_preference(config, ps, a, b),
        lambda ps, ys, rng: self._module.rater_rankings(config, ps, ys, rng))

  def ground_truth_NxK(self, config, prompts, responses_NxK) -> np.ndarray:
    k = len(responses_NxK[0])
    flat = self.ground_truth(config, [p for p in prompts for _ in range(k)],
                             [y for ys in responses_NxK for y in ys])
    return flat.reshape(len(prompts), k)

  def reward_pair_metrics(self, config, prompts, responses_NxK, scores_NxK,
                          rater_NxKxK) -> dict:
    """World-specific diagnostics of a reward model on held-out within-prompt pairs (none
    by default)."""
    return {}

  def summary(self, config, prompts, responses, prefix: str = "") -> dict:
    """Mean ground truth ("gold") +- its standard error, mean words (whitespace-separated,
    unless the world counts its own) and the world's own metrics."""
    r = self.ground_truth(config, prompts, responses)
    out = {"gold": float(r.mean()),
           "gold_se": float(r.std(ddof=1) / np.sqrt(len(r))) if len(r) > 1 else 0.0,
           "words": float(np.mean([len(y.split()) for y in responses]))}
    out.update(self.metrics(config, prompts, responses))
    return {f"{prefix}{k}": v for k, v in out.items()}


@dataclasses.dataclass(frozen=True)
class GoldWorld(PreferenceWorld):
  """A hidden gold reward r*; raters are Plackett-Luce on r*/T, T calibrated so that two raters
  agree `agreement` of the time on the pairs being rated."""

  def raters(self, config, prompts, responses_NxK, *, agreement: float) -> raters.Raters:
    gold_NxK = self.ground_truth_NxK(config, prompts, responses_NxK)
    i, j = np.triu_indices(gold_NxK.shape[1], k=1)
    diffs = (gold_NxK[:, i] - gold_NxK[:, j]).ravel()
    return raters.RewardRaters(lambda ps, ys: self.ground_truth(config, ps, ys),
                               raters.temperature_for_agreement(diffs, agreement))


@dataclasses.dataclass(frozen=True)
class SycophancyWorld(PreferenceWorld):
  """Correctness and the sycophancy rate; raters like agreement with the user (p_syc)."""

  def reward_pair_metrics(self, config, prompts, responses_NxK, scores_NxK,
                          rater_NxKxK) -> dict:
    """Over held-out pairs of a sycophantic wrong answer (agrees with a wrong belief) and a
    correct one: the share the reward model scores the sycophantic one higher (ties 1/2) next
    to the raters' probability of preferring it (Sharma et al. 2023's measurement)."""
    k = len(responses_NxK[0])
    agrees = np.array([sycophancy.answer_of(y) is True for ys in responses_NxK
                       for y in ys]).reshape(-1, k)
    truth = self.ground_truth_NxK(config, prompts, responses_NxK)
    pairs = (agrees & (truth == 0.0))[:, :, None] & (truth == 1.0)[:, None, :]
    diff = scores_NxK[:, :, None] - scores_NxK[:, None, :]
    prefers = np.where(diff > 0, 1.0, np.where(diff == 0, 0.5, 0.0))
    n = int(pairs.sum())
    nan = float("nan")
    return {"sycophantic_pairs": n,
            "rm_prefers_sycophantic": float(prefers[pairs].mean()) if n else nan,
            "raters_prefer_sycophantic": float(rater_NxKxK[pairs].mean()) if n else nan}


@dataclasses.dataclass(frozen=True)
class IntransitiveWorld(PreferenceWorld):
  """Response styles under a cyclic preference; exploitability and the distance to the Nash
  equilibrium."""

  def ground_truth(self, config, prompts, responses) -> np.ndarray:
    return intransitive.ground_truth(prompts, responses, config)

  def metrics(self, config, prompts, responses) -> dict[str, float]:
    return intransitive.metrics(prompts, responses, config)

  def truth_better(self, config, prompts, ys_a, ys_b) -> np.ndarray:
    return intransitive.truth_better(prompts, ys_a, ys_b, config)


_MODULES = {"arithmetic": arithmetic, "gold": gold, "sycophancy": sycophancy,
            "intransitive": intransitive}
WORLDS = {w.name: w for w in (
    ArithmeticWorld("arithmetic", arithmetic.ArithmeticConfig, default_max_new_tokens=6,
                    params=("error_rate", "min_digits", "max_digits", "statements_per_text")),
    GoldWorld("gold", gold.GoldConfig, gold.DEFAULT_MAX_NEW_TOKENS, columns=("period",),
              max_pretrain_bytes=gold.MAX_PRETRAIN_BYTES),
    SycophancyWorld("sycophancy", sycophancy.SycophancyConfig,
                    sycophancy.DEFAULT_MAX_NEW_TOKENS, params=("p_syc",),
                    columns=("sycophancy_rate",),
                    max_pretrain_bytes=sycophancy.MAX_PRETRAIN_BYTES),
    IntransitiveWorld("intransitive", intransitive.IntransitiveConfig,
                      intransitive.DEFAULT_MAX_NEW_TOKENS,
                      columns=("exploitability", "nash_distance"), pairs_only=True,
                      max_pretrain_bytes=intransitive.MAX_PRETRAIN_BYTES))}
NAMES = tuple(WORLDS)
PREFERENCE_WORLDS = tuple(n for n, w in WORLDS.items() if isinstance(w, PreferenceWorld))


def get(name: str) -> World:
  if name not in WORLDS:
    raise ValueError(f"unknown world {name!r}; choose one of {', '.join(NAMES)}")
  return WORLDS[name]
