"""Held-out sampling for the engine's evaluations: every policy answers the same prompts with
the same keys (paired comparisons), in batches of one compiled shape (the last batch is filled
with the first prompts and its extra rows dropped), so evaluating again compiles nothing.

The prompt at offset n of the list samples as row id n (sampling.py), so its answers depend
neither on the batch size nor on how many processes share the batch. What a world makes of the
answers (accuracy, pass@k, gold reward, exploitability) is the caller's: these return text and the
per-row quantities every online evaluation reports (reward, KL to the reference, length).
"""
import dataclasses
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from rlhf_jax import evaluation, sharding
from rlhf_jax.data.tokenizer import Tokenizer
from rlhf_jax.rl.rollout import Experience, Rollout, RolloutStage, decode_responses, encode_prompts
from rlhf_jax.sampling import SamplingConfig


def _chunks(prompts: Sequence[str], batch_size: int):
  ps = list(prompts)
  ps += [ps[i % len(ps)] for i in range((-len(ps)) % batch_size)]  # cyclic: any count fills
  for i in range(0, len(ps), batch_size):
    yield i, ps[i:i + batch_size]


@dataclasses.dataclass
class Heldout:
  """Rows of a held-out sampling (prompt-major, group_size samples per prompt), host arrays."""
  experience: Experience  # rollout fields as numpy, trimmed to the real rows
  kl_B: np.ndarray | None  # sum_t (log pi - log pi_ref) per row; None without a reference


def sample_heldout(stage: RolloutStage, policy_params, ref_params, value_params,
                   prompts: Sequence[str], *, batch_size: int, key, scorer=None) -> Heldout:
  """stage.group_size samples of each prompt; rewards_B from `scorer` when given."""
  exps, kls, rewards = [], [], []
  for i, chunk in _chunks(prompts, batch_size):
    exp = stage.experience(policy_params, ref_params, value_params, chunk, key, first_id=i)
    ro = exp.rollout
    if ro.ref_logps_BxT is not None:
      kls.append(sharding.to_host(jnp.sum((ro.old_logps_BxT - ro.ref_logps_BxT) * ro.mask_BxT,
                                          1)))
    if scorer is not None:
      rewards.append(sharding.to_host(scorer(exp)))
    exps.append(exp)
  rows = len(prompts) * stage.group_size
  cat = lambda xs: np.concatenate([sharding.to_host(x) for x in xs])[:rows]
  rollout = Rollout(*[None if getattr(exps[0].rollout, f) is None
                      else cat([getattr(e.rollout, f) for e in exps])
                      for f in Rollout._fields])
  exp = Experience(rollout, [p for e in exps for p in e.prompts][:rows],
                   [y for e in exps for y in e.responses][:rows], stage.group_size,
                   cat(rewards) if rewards else None)
  return Heldout(exp, cat(kls) if kls else None)


def greedy_responses(graphdef, params, prompts: Sequence[str], *, prompt_len: int,
                     batch_size: int, sampling: SamplingConfig, key,
                     tokenizer: Tokenizer | None = None) -> list[str]:
  """One greedy answer per prompt, batched and keyed as sample_heldout (greedy ignores the
  key; it keeps the batches aligned). tokenizer: the byte tokenizer when None."""
  cfg = dataclasses.replace(sampling, greedy=True)
  out = []
  for i, chunk in _chunks(prompts, batch_size):
    toks, valid = encode_prompts(chunk, prompt_len, tokenizer)
    batch = {"prompt_tokens": toks, "prompt_valid": valid}
    for _, s in evaluation.sample_stream(graphdef, params, [batch], cfg, key, first_id=i):
      out += decode_responses(s["tokens"], s["mask"], tokenizer)
  return out[:len(prompts)]


def mean_se(x) -> tuple[float, float]:
  """Mean and its standard error (ddof 1; 0 for a single value), in x's own dtype."""
  x = np.asarray(x)
  return float(x.mean()), float(x.std(ddof=1) / np.sqrt(x.size)) if x.size > 1 else 0.0


def verifiable_metrics(heldout: Heldout, greedy: Sequence[str], answers: Sequence[str],
                       verify, ks: Sequence[int]) -> dict:
  """A verifiable-reward world's held-out table row from n = group_size temperature samples
  per prompt (heldout, scored by the verifier) and one greedy answer per prompt:
  accuracy_greedy and accuracy_temp1 (+- se over prompts) score each answer's first field;
  the unbiased pass@k for each k < n; the reward's mean and std and the fraction of
  zero-variance groups; KL to the reference, length (tokens, EOS included), truncation."""
  exp, m, n = heldout.experience, len(answers), heldout.experience.group_size
  answers_rows = np.repeat(answers, n)
  correct = np.array([verify(evaluation.first_field(t), a)
                      for t, a in zip(exp.responses, answers_rows)]).reshape(m, n)
  rewards = exp.rewards_B.reshape(m, n).astype(np.float64)
  temp1, temp1_se = mean_se(correct.mean(1))
  out = {"accuracy_greedy": evaluation.exact_match_rate(list(zip(greedy, answers)), verify),
         "accuracy_temp1": temp1, "accuracy_temp1_se": temp1_se}
  for k in ks:
    out[f"pass_at_{k}"] = float(evaluation.pass_at_k(n, correct.sum(1), k).mean())
  mask = np.asarray(exp.rollout.mask_BxT)
  out.update(reward_mean=float(rewards.mean()), reward_std=float(rewards.std()),
             zero_variance_frac=float(np.mean(rewards.max(1) == rewards.min(1))))
  if heldout.kl_B is not None:
    out["kl"], out["kl_se"] = mean_se(heldout.kl_B)
  out.update(length=float(mask.sum(1).mean()),
             truncated_frac=float(np.asarray(exp.rollout.truncated_B).mean()))
  return out
