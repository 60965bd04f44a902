"""Online (iterative) DPO as an engine algorithm (Xu et al. 2023; Guo et al. 2024): every
iteration (a "round") samples two responses per prompt from the CURRENT policy, a labeler
picks the better one, and the DPO family's loss (train/preference.py) takes steps_per_round
steps of batch_size pairs on them against the frozen reference, whose log-probs are computed
once per round (each pair is visited several times; the step holds one model).

Rounds are 1-based in their draws: round r = iteration + 1 draws its prompts, labels and step
order from default_rng((seed, r)) and samples with fold_in(key(seed), r).
"""
import dataclasses
from typing import Callable, Sequence

import jax
import numpy as np

from rlhf_jax import sharding
from rlhf_jax.data.tokenizer import Tokenizer
from rlhf_jax.rl import comparisons
from rlhf_jax.rl.loop import Iteration, StatelessAlgorithm

PAIR_KEYS = ("chosen_tokens", "chosen_valid", "chosen_mask", "rejected_tokens",
             "rejected_valid", "rejected_mask", "example_valid")
BATCH_KEYS = PAIR_KEYS + ("ref_chosen_logps", "ref_rejected_logps")


def pair_batch(samples: comparisons.Samples, chosen_N: np.ndarray, seq_len: int,
               tokenizer: Tokenizer | None = None) -> dict:
  """The pairs of 2 samples per prompt, chosen_N (0 or 1) marking the preferred one, encoded
  with `tokenizer` (None: the byte tokenizer)."""
  rows = np.arange(len(chosen_N))
  pick = lambda side: [samples.responses[n][side[n]] for n in rows]
  return comparisons.sampled_pairs(samples.prompts, pick(chosen_N), pick(1 - chosen_N),
                                   samples.finished[rows, chosen_N],
                                   samples.finished[rows, 1 - chosen_N], seq_len, tokenizer)


def reference_logps(ref_fn, ref_params, batch: dict, batch_size: int, mesh) -> dict:
  """The frozen reference's log-probs of every pair, in batch_size chunks (the last one
  filled with copies of the first rows, whose outputs are dropped)."""
  n = len(batch["example_valid"])
  padded = {k: np.concatenate([v, np.repeat(v[:1], -n % batch_size, 0)])
            for k, v in batch.items()}
  outs = [jax.device_get(ref_fn(ref_params, sharding.shard_batch(
      {k: v[i:i + batch_size] for k, v in padded.items()}, mesh)))
      for i in range(0, n + (-n % batch_size), batch_size)]
  return {k: np.concatenate([o[k] for o in outs])[:n] for k in outs[0]}


def step_order(rows: int, steps: int, batch_size: int, rng: np.random.Generator) -> list:
  """`steps` batches of `batch_size` rows: fresh shuffles back to back (every pair is seen
  equally often, up to one pass), so each step has the same shape."""
  order = np.concatenate([rng.permutation(rows) for _ in range(-(-steps * batch_size // rows))])
  return [order[j * batch_size:(j + 1) * batch_size] for j in range(steps)]


@dataclasses.dataclass
class OnlineDPO(StatelessAlgorithm):
  """sample(params, prompts, key) -> Samples with 2 responses per prompt; label(samples, rng)
  -> (chosen_N, stats): the labeler (a reward model, simulated raters, ...) and what to log
  about its pairs; ref_fn: the jitted reference log-prob pass (preference.reference_logps_fn);
  tokenizer: the one the samples were decoded with (None: the byte tokenizer)."""
  sample: Callable
  label: Callable
  ref_fn: Callable
  ref_params: object
  prompts: Sequence[str]
  prompts_per_round: int
  steps_per_round: int
  batch_size: int
  seq_len: int
  seed: int
  mesh: object
  tokenizer: Tokenizer | None = None
  progress_keys = ("label_agreement", "sample_gold")

  def collect(self, it: int, params) -> Iteration:
    r = it + 1
    rng = np.random.default_rng((self.seed, r))  # resume-exact prompts, labels and order
    prompts = list(rng.choice(self.prompts, self.prompts_per_round))
    samples = self.sample(params, prompts, jax.random.fold_in(jax.random.key(self.seed), r))
    chosen, stats = self.label(samples, rng)
    batch = pair_batch(samples, chosen, self.seq_len, self.tokenizer)
    batch.update(reference_logps(self.ref_fn, self.ref_params, batch, self.batch_size,
                                 self.mesh))
    order = step_order(len(chosen), self.steps_per_round, self.batch_size, rng)
    return Iteration(batch, stats, rng, samples, order=order, metrics="mean")
