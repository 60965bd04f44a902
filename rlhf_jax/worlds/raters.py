"""Simulated raters: noisy rankings of K completions drawn from a hidden reward.

Why: proxy reward models must learn from labels as noisy as human ones, not from r* itself.
A rater ranks K completions by Plackett-Luce on r*/T (docs/math.md; Rafailov 2023 A.3):
  P(tau) = prod_k exp(r_tau(k)/T) / sum_{j>=k} exp(r_tau(j)/T),
i.e. repeatedly pick the next best with a softmax over the remaining r/T. K = 2 is
Bradley-Terry: P(a > b) = s((r_a - r_b)/T). Sampling uses the Gumbel-max form of the same
process (sort r/T + Gumbel noise, descending; Yellott 1977): the first place is the softmax
pick, and by memorylessness of the Gumbel maximum the rest is again PL on the remainder, so it
is exact, and it vectorises over any batch of prompts (tests check it against the product).

The temperature sets the label noise. InstructGPT labelers agreed with each other 72.6% of the
time (Ouyang 2022), so `temperature_for_agreement` picks T such that two independent raters
agree that often: agreement(T) = E_pairs[p^2 + (1-p)^2], p = s(delta/T). It depends on the
pair distribution (pairs with large reward gaps are easy), so calibrate T on reward
differences of the very pairs that will be rated (e.g. pairs of SFT-policy samples) and
re-calibrate if that distribution changes.

Use with the gold world: rewards = gold.gold_rewards(prompts, responses) reshaped to [N, K]
(RewardRaters does it). Worlds with their own noise model give WorldRaters their functions.
"""
import dataclasses
from typing import Callable, Protocol

import numpy as np

INSTRUCTGPT_AGREEMENT = 0.726


def _check_temperature(temperature: float) -> None:
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")


def sample_rankings(rewards, temperature: float, rng: np.random.Generator) -> np.ndarray:
  """Plackett-Luce rankings of the last axis: rewards [..., K] -> indices [..., K], best first."""
  _check_temperature(temperature)
  rewards = np.asarray(rewards, dtype=np.float64)
  if rewards.ndim == 0 or rewards.shape[-1] < 2:
    raise ValueError(f"need K >= 2 completions on the last axis, got shape {rewards.shape}")
  noisy = rewards / temperature + rng.gumbel(size=rewards.shape)
  return np.argsort(-noisy, axis=-1, kind="stable")


def ranking_probability(rewards, ranking, temperature: float) -> float:
  """The closed-form Plackett-Luce probability of one ranking (indices, best first)."""
  _check_temperature(temperature)
  scaled = np.asarray(rewards, dtype=np.float64)[np.asarray(ranking)] / temperature
  log_p = sum(scaled[k] - np.logaddexp.reduce(scaled[k:]) for k in range(len(scaled)))
  return float(np.exp(log_p))


def pairwise_labels(rewards_a, rewards_b, temperature: float,
                    rng: np.random.Generator) -> np.ndarray:
  """Bradley-Terry labels (the K = 2 case): True where the rater prefers a over b."""
  pairs = np.stack(np.broadcast_arrays(np.asarray(rewards_a, np.float64),
                                       np.asarray(rewards_b, np.float64)), axis=-1)
  return sample_rankings(pairs, temperature, rng)[..., 0] == 0


def preference_probability(reward_diffs, temperature: float) -> np.ndarray:
  """P(a > b) = s((r_a - r_b) / T)."""
  _check_temperature(temperature)
  return 0.5 * (1.0 + np.tanh(np.asarray(reward_diffs, np.float64) / (2.0 * temperature)))


def agreement(reward_diffs, temperature: float) -> float:
  """Probability that two independent raters label a random pair the same way."""
  p = preference_probability(reward_diffs, temperature)
  return float(np.mean(p**2 + (1.0 - p) ** 2))


def temperature_for_agreement(reward_diffs, target: float = INSTRUCTGPT_AGREEMENT,
                              tol: float = 1e-10) -> float:
  """The T at which `agreement(reward_diffs, T) == target`, by bisection on log T.

  Agreement falls monotonically from (share of non-tied pairs + half the tied ones) at T -> 0
  to 1/2 at T -> inf, so the root is unique when the target lies strictly between.
  """
  if not 0.5 < target < 1.0:
    raise ValueError(f"target agreement must be in (0.5, 1), got {target}")
  diffs = np.abs(np.asarray(reward_diffs, np.float64)).ravel()
  if diffs.size == 0:
    raise ValueError("need at least one reward difference")
  ceiling = np.mean(diffs > 0) + 0.5 * np.mean(diffs == 0)
  if target >= ceiling:
    raise ValueError(f"target {target} unreachable: even T -> 0 gives agreement {ceiling:.4f} "
                     f"(tied pairs are coin flips)")
  scale = diffs.max()
  lo, hi = np.log(scale * 1e-6), np.log(scale)
  while agreement(diffs, np.exp(lo)) < target:
    lo -= np.log(10.0)
  while agreement(diffs, np.exp(hi)) > target:
    hi += np.log(10.0)
  while hi - lo > tol:
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if agreement(diffs, np.exp(mid)) > target else (lo, mid)
  return float(np.exp(0.5 * (lo + hi)))


class Raters(Protocol):
  """A world's simulated raters, as comparison data and online labelers use them."""

  def preference(self, prompts, ys_a, ys_b) -> np.ndarray:
    """P(a rater prefers a over b), per pair, float64."""

  def rank(self, prompts, responses_NxK, rng: np.random.Generator) -> np.ndarray:
    """One rater's ranking of each prompt's K responses, indices best first [N, K]."""


@dataclasses.dataclass(frozen=True)
class RewardRaters:
  """Plackett-Luce raters on a hidden reward r*(prompt, response) at a temperature."""
  reward: Callable  # (prompts, responses) -> float64 [N]
  temperature: float

  def preference(self, prompts, ys_a, ys_b) -> np.ndarray:
    return preference_probability(self.reward(prompts, ys_a) - self.reward(prompts, ys_b),
                                  self.temperature)

  def rank(self, prompts, responses_NxK, rng: np.random.Generator) -> np.ndarray:
    k = len(responses_NxK[0])
    flat = self.reward([p for p in prompts for _ in range(k)],
                       [y for ys in responses_NxK for y in ys])
    return sample_rankings(np.asarray(flat).reshape(len(prompts), k), self.temperature, rng)


@dataclasses.dataclass(frozen=True)
class WorldRaters:
  """Raters with a world's own noise model, given as its two functions."""
  preference_fn: Callable  # (prompts, ys_a, ys_b) -> P(a > b)
  rank_fn: Callable  # (prompts, responses_NxK, rng) -> rankings [N, K]

  def preference(self, prompts, ys_a, ys_b) -> np.ndarray:
    return self.preference_fn(prompts, ys_a, ys_b)

  def rank(self, prompts, responses_NxK, rng: np.random.Generator) -> np.ndarray:
    return self.rank_fn(prompts, responses_NxK, rng)
