"""Log-probs of prompt-major groups, each prompt computed once.

A group-sampling rollout holds G rows per prompt, [left-padded prompt (P) | response (N)]
(rollout.py), and every forward over them (the rollout's old-policy and reference log-probs,
the policy's in the train step) would compute each prompt G times. Here the prompt runs once
per group into a KV cache (models/transformer.py), the cache is repeated G times and the
responses run as its continuation: each response token attends to the same keys, at the same
positions, as in its full row, so its log-prob is the full row's to float32 rounding. The LM
head runs on the states that predict response tokens only (the prompt's last state and the
response's own), and gradients reach the prompt's keys and values through the cache, summed
over the group. Rows must come in whole groups, prompt-major (row i * G + j: sample j of
prompt i), as sample_groups makes them and epoch_order(block=G) keeps them.
"""
import dataclasses

import jax.numpy as jnp
from flax import nnx

from rlhf_jax.logprobs import token_logps
from rlhf_jax.models.transformer import init_cache, positions_from_valid
from rlhf_jax.sampling import _repeat_rows


@dataclasses.dataclass(frozen=True)
class PromptGroups:
  """How a batch's rows share prompts: group_size rows per prompt of prompt_len tokens."""
  group_size: int
  prompt_len: int


def group_logps(graphdef, params, tokens_BxT, valid_BxT, groups: PromptGroups,
                temperature: float = 1.0):
  """Shifted log-probs BxT under softmax(logits / temperature), 0 on the prompt positions."""
  g, p = groups.group_size, groups.prompt_len
  b, t = tokens_BxT.shape
  if b % g:
    raise ValueError(f"{b} rows do not split into groups of {g} (rows come in whole groups)")
  model = nnx.merge(graphdef, params)
  prompt, prompt_valid = tokens_BxT[::g, :p], valid_BxT[::g, :p].astype(bool)
  cache = init_cache(model.cfg, b // g, t)
  prompt_hidden, cache = model.hidden(prompt, valid_BxT=prompt_valid,
                                      positions_BxT=positions_from_valid(prompt_valid),
                                      cache=cache)
  repeat = lambda x: jnp.repeat(x, g, axis=0)  # noqa: E731
  cache = _repeat_rows(cache, g)
  response_valid = valid_BxT[:, p:].astype(bool)
  # A response token's position in its full row: the prompt's real tokens, then its own.
  prompt_tokens = repeat(jnp.sum(prompt_valid, axis=1, dtype=jnp.int32))
  positions = prompt_tokens[:, None] + jnp.cumsum(response_valid, axis=1, dtype=jnp.int32) - 1
  response_hidden, _ = model.hidden(tokens_BxT[:, p:], valid_BxT=response_valid,
                                    positions_BxT=jnp.maximum(positions, 0), cache=cache)
  # Left padding puts every prompt's last token at p - 1: it predicts the first response token.
  predicting = jnp.concatenate([repeat(prompt_hidden[:, -1:]), response_hidden[:, :-1]], axis=1)
  logits = model.logits(predicting).astype(jnp.float32) / temperature
  return jnp.pad(token_logps(logits, tokens_BxT[:, p:]), ((0, 0), (p, 0)))

