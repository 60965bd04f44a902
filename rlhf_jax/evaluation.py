"""Generation-based evaluation: sample from a policy on prompt batches, score the answers."""
from typing import Callable, Iterable

import jax
import numpy as np

from rlhf_jax.data.tokenizer import Tokenizer
from rlhf_jax.sampling import SamplingConfig, sample


def generate(graphdef, params, prompt_batches: Iterable[dict], tokenizer: Tokenizer,
             cfg: SamplingConfig, key) -> list[tuple[str, str]]:
  """(generated text, reference answer) for every real prompt of the batches, in order.

  prompt_batches: dicts from rlhf_jax.data.pipeline.make_prompt_iterator (left-padded
  prompt_tokens/prompt_valid, answers, example_valid). Batch i samples with fold_in(key, i).
  """
  pairs = []
  for i, batch in enumerate(prompt_batches):
    out = sample(graphdef, params, batch["prompt_tokens"], batch["prompt_valid"],
                 jax.random.fold_in(key, i), cfg=cfg)
    tokens, mask = jax.device_get((out.tokens_BxN, out.mask_BxN))
    for row in np.flatnonzero(batch["example_valid"]):
      pairs.append((tokenizer.decode(tokens[row][mask[row]]), str(batch["answers"][row])))
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
