"""Generation-based evaluation: sample from a policy on prompt batches, score the answers."""
from typing import Callable, Iterable, Iterator

import numpy as np

from rlhf_jax import sharding
from rlhf_jax.data.tokenizer import Tokenizer
from rlhf_jax.sampling import SamplingConfig, sample


def sample_stream(graphdef, params, prompt_batches: Iterable[dict], cfg: SamplingConfig,
                  key, first_id: int = 0) -> Iterator[tuple[dict, dict]]:
  """(batch, host outputs {tokens, mask, finished}) for each prompt batch, every row of it.

  The prompt at position n of the stream samples as row id first_id + n (sampling.py), so its
  answer depends neither on the batch size nor on the number of processes. Rows are sharded over the
  params' mesh (each device samples its share) and the outputs gathered to every process."""
  offset = first_id
  mesh = sharding.mesh_of(params)
  for batch in prompt_batches:
    rows = len(batch["prompt_tokens"])
    inputs = sharding.shard_global(
        {"tokens": batch["prompt_tokens"], "valid": batch["prompt_valid"],
         "ids": np.arange(offset, offset + rows, dtype=np.int32)}, mesh)
    out = sample(graphdef, params, inputs["tokens"], inputs["valid"], key, inputs["ids"],
                 cfg=cfg)
    offset += rows
    yield batch, {"tokens": sharding.to_host(out.tokens_BxN),
                  "mask": sharding.to_host(out.mask_BxN).astype(bool),
                  "finished": sharding.to_host(out.finished_B)}


def generate(graphdef, params, prompt_batches: Iterable[dict], tokenizer: Tokenizer,
             cfg: SamplingConfig, key) -> list[tuple[str, str]]:
  """(generated text, reference answer) for every real prompt of the batches, in order.

  prompt_batches: dicts from rlhf_jax.data.pipeline.make_prompt_iterator (left-padded
  prompt_tokens/prompt_valid, answers, example_valid); sampled by sample_stream.
  """
  pairs = []
  for batch, out in sample_stream(graphdef, params, prompt_batches, cfg, key):
    for row in np.flatnonzero(batch["example_valid"]):
      pairs.append((tokenizer.decode(out["tokens"][row][out["mask"][row]]),
                    str(batch["answers"][row])))
  return pairs


def first_field(text: str) -> str:
  """The answer a completion commits to: its first whitespace-separated field. A base model
  continues "37+48=" with "85 12+7=19 ..." (it never saw EOS after an answer); an SFT model
  emits "85" then EOS. Both are scored on "85"."""
  fields = text.split()
  return fields[0] if fields else ""


def exact_match_rate(pairs: list[tuple[str, str]],
                     verify: Callable[[str, str], bool]) -> float:
  if not pairs:
    raise ValueError("no prompts to evaluate")
  return float(np.mean([verify(first_field(text), answer) for text, answer in pairs]))


def pass_at_k(num_samples, num_correct, k: int) -> np.ndarray:
  """The unbiased pass@k estimator per problem (Chen et al. 2021, eq. 1):

    pass@k = 1 - C(n - c, k) / C(n, k),  n samples of which c are correct, k <= n,

  computed stably as 1 - prod_{i = n - c + 1}^{n} (1 - k / i) (their numpy form, no huge
  binomials); exactly 1 when n - c < k. num_samples, num_correct: ints or int arrays of the
  same shape (one entry per problem). Returns float64 of that shape; average over problems.
  """
  n = np.asarray(num_samples, np.int64)
  c = np.asarray(num_correct, np.int64)
  n, c = np.broadcast_arrays(n, c)
  if k < 1 or np.any(n < k):
    raise ValueError(f"pass@k needs 1 <= k <= n samples per problem, got k={k}, "
                     f"n={np.unique(n).tolist()}")
  if np.any((c < 0) | (c > n)):
    raise ValueError("num_correct must lie in [0, num_samples]")
  out = np.ones(n.shape, np.float64)
  for idx in np.ndindex(n.shape):
    ni, ci = int(n[idx]), int(c[idx])
    if ni - ci >= k:
      out[idx] = 1.0 - np.prod(1.0 - k / np.arange(ni - ci + 1, ni + 1, dtype=np.float64))
  return out


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
