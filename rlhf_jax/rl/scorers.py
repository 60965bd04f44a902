"""Scorers: what an online algorithm's responses are worth. A scorer maps an Experience (the
rollout's arrays and its decoded text) to one reward per row, rewards_B, a host float32 array
of EVERY row, the same on every process of a job:

  RewardModelScorer   a learned reward model or an ensemble of them (mean / WCO / UWO over
                      members, each normalised by its SFT-sample statistics first)
  VerifierScorer      a rule on the text: 1.0 if verify(response, answer) else 0.0 (RLVR)
  FunctionsScorer     K reward functions of the text (rlhf_jax/rewards/functions.py), one
                      column each: rewards_BxK, NaN where a function could not score a row
  Penalised           another scorer minus length and truncation terms

A reward model scores on the devices (each its rows); a rule on the text scores this process's
rows (Experience.local_rows) and the rewards are gathered, so a job of P processes runs each
verification once, not P times.

Pairwise judges answer a different question, P(y > y' | x), for algorithms that compare two
responses (Nash-MD): any callable (prompts, ys_a, ys_b) -> float32 [B], a learned pairwise
preference model, the simulated raters' exact probability, or a scalar reward model's
Bradley-Terry probability (RewardModelJudge). Per-token KL to the reference
is not a scorer's business: the algorithm folds it in where its objective puts it (PPO's
token rewards, GRPO's k3 term).
"""
import dataclasses
from typing import Callable, Mapping, Protocol, Sequence

import jax.numpy as jnp
import numpy as np

from rlhf_jax import sharding
from rlhf_jax.data.tokenizer import Tokenizer
from rlhf_jax.rl import comparisons
from rlhf_jax.rewards import functions
from rlhf_jax.rl.rollout import Experience
from rlhf_jax.train import reward


class Scorer(Protocol):
  def __call__(self, exp: Experience) -> np.ndarray:
    """rewards_B (host float32) of every row of the experience."""


class PairwiseJudge(Protocol):
  def __call__(self, prompts: Sequence[str], ys_a: Sequence[str],
               ys_b: Sequence[str]) -> np.ndarray:
    """P(y_a > y_b | prompt) per pair, float32 [B]."""


@dataclasses.dataclass(frozen=True)
class RewardModelScorer:
  """E reward models sharing one graphdef score each row's prompt + response at its last real
  token; scores normalised by (norm_mean_E, norm_std_E) and aggregated by `aggregate`."""
  graphdef: object
  params: Sequence[object]
  aggregate: str = "mean"
  uwo_coef: float = 0.0
  norm_mean: object = None
  norm_std: object = None

  @property
  def _norm_stats(self):
    return None if self.norm_mean is None else (self.norm_mean, self.norm_std)

  def __call__(self, exp: Experience) -> np.ndarray:
    return sharding.to_host(reward.ensemble_scores(
        self.graphdef, self.params, exp.rollout.tokens_BxT, exp.rollout.valid_BxT,
        aggregate=self.aggregate, uwo_coef=self.uwo_coef, norm_stats=self._norm_stats))

  def score_samples(self, samples: comparisons.Samples, *, seq_len: int, batch_size: int,
                    tokenizer: Tokenizer | None = None) -> np.ndarray:
    """The same aggregated reward of K sampled texts per prompt (best-of-n, online DPO's
    labeler), each re-encoded with `tokenizer` as it was sampled: float64 N x K."""
    members_ExNK = np.stack([member_scores(self.graphdef, p, samples, seq_len=seq_len,
                                           batch_size=batch_size, tokenizer=tokenizer).ravel()
                             for p in self.params])
    proxy = reward.aggregate_scores(jnp.asarray(members_ExNK), aggregate=self.aggregate,
                                    uwo_coef=self.uwo_coef, norm_stats=self._norm_stats)
    return np.asarray(proxy, np.float64).reshape(len(samples.prompts), samples.k)


def member_scores(graphdef, params, samples: comparisons.Samples, *, seq_len: int,
                  batch_size: int, tokenizer: Tokenizer | None = None) -> np.ndarray:
  """One reward model's scores N x K of every sampled response ([bos] + prompt + response,
  + [eos] only where the sampler emitted it, encoded with `tokenizer`, None: the byte
  tokenizer), in fixed-shape batches (one compile)."""
  flat_p = [p for p in samples.prompts for _ in range(samples.k)]
  flat_y = [y for ys in samples.responses for y in ys]
  tokens, valid = comparisons.encode_sequences(flat_p, flat_y, samples.finished.ravel(),
                                               seq_len, tokenizer)
  score = reward.score_fn(graphdef)
  out = []
  for i in range(0, len(tokens), batch_size):
    t, v = tokens[i:i + batch_size], valid[i:i + batch_size]
    pad = batch_size - len(t)
    t = np.concatenate([t, np.repeat(t[:1], pad, 0)]) if pad else t
    v = np.concatenate([v, np.repeat(v[:1], pad, 0)]) if pad else v
    rows = sharding.shard_global({"t": t, "v": v}, sharding.mesh_of(params))
    out.append(sharding.to_host(score(params, rows["t"], rows["v"]))[:batch_size - pad])
  return np.concatenate(out).reshape(len(samples.prompts), samples.k)


@dataclasses.dataclass(frozen=True)
class RewardModelJudge:
  """P(y_a > y_b | x) = sigmoid(r(x, y_a) - r(x, y_b)) of one scalar reward model: the
  Bradley-Terry preference it was trained to fit, as a pairwise judge (Nash-MD on real
  prompts). A judge sees texts, not whether the sampler stopped, so every response is scored
  as reward models are trained on text (reward_files.make_encoder): closed by EOS. Each
  distinct (prompt, response) is scored once (a group's pairs repeat them)."""
  graphdef: object
  params: object
  tokenizer: Tokenizer
  seq_len: int
  batch_size: int

  def __call__(self, prompts: Sequence[str], ys_a: Sequence[str],
               ys_b: Sequence[str]) -> np.ndarray:
    keys = list(dict.fromkeys([*zip(prompts, ys_a), *zip(prompts, ys_b)]))
    samples = comparisons.Samples([p for p, _ in keys], [[y] for _, y in keys],
                                  np.ones((len(keys), 1), bool))
    r = member_scores(self.graphdef, self.params, samples, seq_len=self.seq_len,
                      batch_size=self.batch_size, tokenizer=self.tokenizer).ravel()
    index = {key: i for i, key in enumerate(keys)}
    diff = np.array([r[index[(p, a)]] - r[index[(p, b)]]
                     for p, a, b in zip(prompts, ys_a, ys_b)], np.float64)
    return (1.0 / (1.0 + np.exp(-diff))).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class VerifierScorer:
  """1.0 where verify(response, answers[prompt]) holds, else 0.0 (float32)."""
  verify: Callable[[str, str], bool]
  answers: Mapping[str, str]

  def __call__(self, exp: Experience) -> np.ndarray:
    rows = exp.local_rows()
    return exp.gather(np.array([self.verify(y, self.answers[p]) for p, y in
                                zip(exp.prompts[rows], exp.responses[rows])], np.float32))


@dataclasses.dataclass(frozen=True)
class FunctionsScorer:
  """rewards_BxK (float32): column k is functions[k] = (name, fn) called on this process's
  rows with (prompts, completions, reference answers; None where a prompt has none), NaN where
  it returned None or NaN (not computed: masked out of the group statistics downstream)."""
  functions: Sequence[tuple[str, Callable]]
  answers: Mapping[str, str]

  def __call__(self, exp: Experience) -> np.ndarray:
    rows = exp.local_rows()
    prompts, completions = list(exp.prompts[rows]), list(exp.responses[rows])
    answers = [self.answers.get(p) or None for p in prompts]
    columns = [functions.call(fn, name, prompts, completions, answers)
               for name, fn in self.functions]
    return exp.gather(np.stack(columns, axis=1).astype(np.float32))


@dataclasses.dataclass(frozen=True)
class Penalised:
  """scorer(exp) - truncation_penalty * [no EOS within max_new_tokens]
  - length_coef * (response tokens): the terms that keep a policy from rambling."""
  scorer: Scorer
  truncation_penalty: float = 0.0
  length_coef: float = 0.0

  def __post_init__(self):
    if self.truncation_penalty < 0 or self.length_coef < 0:
      raise ValueError(f"truncation_penalty ({self.truncation_penalty}) and length_coef "
                       f"({self.length_coef}) must be >= 0")

  def __call__(self, exp: Experience) -> np.ndarray:
    r = np.asarray(self.scorer(exp), np.float32)
    if self.truncation_penalty:
      r = r - np.float32(self.truncation_penalty) * sharding.to_host(
          exp.rollout.truncated_B).astype(np.float32)
    if self.length_coef:
      r = r - np.float32(self.length_coef) * sharding.to_host(exp.rollout.mask_BxT).sum(
          1, dtype=np.float32)
    return r
