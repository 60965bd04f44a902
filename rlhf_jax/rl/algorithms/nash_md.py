"""Nash-MD-PG (Munos et al. 2024, deep form) as an engine algorithm: the policy plays a
KL-regularised game against the token-level geometric mixture of itself and the reference,
judged by a pairwise preference P(y > y' | x) that no scalar reward need represent.

  y  ~ pi_theta (the rollout stage, with the reference's log-probs for the KL)
  y' ~ pi_mix ∝ pi_theta^(1-a) mu^a token by token (sampling.sample_mixture), a = mixture_coef
  p  = mean over the prompt's G opponents of judge(x, y, y'_j)
  loss = -(p - 1/2 - b) log pi(y) + nash_tau (sg(kl) log pi(y) + kl),
         kl = sum_t kl_fn(log pi, log mu), b = leave-one-out mean of p - 1/2 in the group

Loss: losses/nash_md.py; docs/math.md, "Nash-MD".
"""
import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.losses import nash_md as nash_losses
from rlhf_jax.rl.loop import Iteration, StatelessAlgorithm
from rlhf_jax.rl.rollout import RolloutStage, decode_responses, encode_prompts, policy_forward
from rlhf_jax.rl.scorers import PairwiseJudge
from rlhf_jax.sampling import sample_mixture

BATCH_KEYS = ("tokens", "valid", "mask", "ref_logps", "preferences", "baseline")


def leave_one_out_baseline(scores_B: np.ndarray, group_size: int | None = None) -> np.ndarray:
  """b_i = mean of the OTHER scores of row i's group (prompt-major groups of group_size rows;
  None: the whole batch is one group). It does not depend on row i's own sample, so the
  policy gradient stays unbiased. Needs groups of >= 2."""
  s = np.asarray(scores_B, np.float64)
  g = s.size if group_size is None else group_size
  if s.ndim != 1 or g < 2 or s.size % g:
    raise ValueError(f"need a 1-D batch of whole groups of >= 2 scores, got shape {s.shape} "
                     f"with group size {g}")
  groups = s.reshape(-1, g)
  return ((groups.sum(1, keepdims=True) - groups) / (g - 1)).reshape(-1).astype(np.float32)


def group_pairs(rows: int, group_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(i, j): every response row i against every opponent row j of its own prompt's group
  (prompt-major groups of group_size rows), i-major: rows * group_size pairs. The mean of
  P(y_i > y'_j) over j estimates P(y_i > pi_mix) with group_size opponents instead of one."""
  if group_size < 1 or rows % group_size:
    raise ValueError(f"{rows} rows do not split into groups of {group_size}")
  i = np.repeat(np.arange(rows), group_size)
  j = (i // group_size) * group_size + np.tile(np.arange(group_size), rows)
  return i, j


def nash_md_loss_fn(graphdef, *, nash_tau: float, kl_fn, temperature: float = 1.0):
  """loss_fn(params, batch, rng) -> (loss_sum, aux) in the step contract: per-sequence sums of
  nash_md_pg_loss; aux: denominator (sequences), score (sum of p - 1/2), kl (sum of
  per-sequence KL estimates), tokens. temperature must match the sampler's."""
  def loss_fn(params, batch, rng):
    del rng
    logps, _ = policy_forward(graphdef, params, batch["tokens"], batch["valid"], temperature)
    mask = batch["mask"]
    _, m = nash_losses.nash_md_pg_loss(logps * mask, batch["ref_logps"], batch["preferences"],
                                       mask, nash_tau=nash_tau, baseline_B=batch["baseline"],
                                       kl_fn=kl_fn, normaliser=1.0)
    return m["policy_loss_sum"], {"denominator": m["count"], "score": m["score_sum"],
                                  "kl": m["kl_sum"], "tokens": m["token_count"]}

  return loss_fn


@dataclasses.dataclass
class NashMD(StatelessAlgorithm):
  """Per iteration: batch_size prompts drawn with replacement by (seed, it), each repeated
  group_size times; y from the stage and y' from the mixture with the two halves of
  split(fold_in(key(seed), it)); rows shuffled by the same generator; the stage's tokenizer
  encodes the prompts and decodes both sides. The experience carries the opponents' texts and
  the judged pairs (experience.extras) for the log."""
  stage: RolloutStage  # group_size 1 over the repeated prompts, with the reference
  judge: PairwiseJudge
  prompts: Sequence[str]
  ref_params: object
  batch_size: int
  group_size: int
  seed: int
  mixture_coef: float
  baseline: bool = True
  progress_keys = ("preference", "kl")

  def __post_init__(self):
    sampling, graphdef = self.stage.sampling, self.stage.policy_graphdef
    self._opponents = jax.jit(lambda p, r, t, v, k, a: sample_mixture(graphdef, p, r, t, v, k,
                                                                      a, cfg=sampling))

  def collect(self, it: int, params) -> Iteration:
    rng = np.random.default_rng((self.seed, it))  # resume-exact prompt draws and shuffles
    g, rows = self.group_size, self.batch_size * self.group_size
    prompts = list(np.repeat(rng.choice(self.prompts, self.batch_size), g))
    key_y, key_opp = jax.random.split(jax.random.fold_in(jax.random.key(self.seed), it))
    exp = self.stage.experience(params, self.ref_params, None, prompts, key_y)
    toks, valid = encode_prompts(prompts, self.stage.prompt_len, self.stage.tokenizer)
    opp = self._opponents(params, self.ref_params, toks, valid, key_opp,
                          jnp.float32(self.mixture_coef))
    opponents = decode_responses(opp.tokens_BxN, opp.mask_BxN, self.stage.tokenizer)
    i, j = group_pairs(rows, g)
    pairs = ([prompts[k] for k in i], [exp.responses[k] for k in i], [opponents[k] for k in j])
    exp.extras.update(opponents=opponents, pairs=pairs)
    prefs = np.asarray(self.judge(*pairs), np.float32).reshape(rows, g).mean(1)
    scores = prefs - 0.5
    baseline = (leave_one_out_baseline(scores, g if g > 1 else None) if self.baseline
                else np.zeros_like(scores))
    ro = exp.rollout
    batch = {"tokens": ro.tokens_BxT, "valid": ro.valid_BxT, "mask": ro.mask_BxT,
             "ref_logps": ro.ref_logps_BxT, "preferences": jnp.asarray(prefs),
             "baseline": jnp.asarray(baseline)}
    # the judge's preference, over every judged pair
    return Iteration(batch, {"preference": float(prefs.mean())}, rng, exp)
