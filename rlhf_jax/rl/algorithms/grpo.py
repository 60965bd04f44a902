"""The group family with verifiable rewards: G samples per prompt, the group's own rewards as
the baseline, no value model. GRPO (Shao et al. 2024), Dr. GRPO (Liu et al. 2025), RLOO
(Ahmadian et al. 2024), DAPO's clip-higher, token-level loss and dynamic sampling (Yu et al.
2025). Equations: docs/math.md, "GRPO family".

GroupSampling does what every group algorithm shares: prompts drawn by (seed, it, round),
G samples each from one prefill, scored; with dynamic_sampling_rounds R, zero-variance groups
(no gradient under any group baseline) leave the batch and are replaced by the informative
groups of up to R further rollouts of fresh prompts; leftover fillers keep the shape with an
empty mask. `make_batch(rollout, rewards_B) -> (batch, stats)` and the loss_fn are what an
algorithm adds (GRPO here; GSPO and REINFORCE++ beside it).
"""
import dataclasses
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import sharding
from rlhf_jax.losses import grpo as grpo_losses
from rlhf_jax.rl.loop import Iteration, StatelessAlgorithm
from rlhf_jax.rl.grouped_forward import PromptGroups
from rlhf_jax.rl.rollout import Rollout, RolloutStage, row_logps
from rlhf_jax.rl.scorers import Scorer

ADVANTAGES = ("grpo", "dr_grpo", "rloo")
# Flag value -> grpo_loss's aggregation: "group" is Dr. GRPO's constant normaliser (token sum
# over the group's responses / (responses * max_new_tokens)), which, unlike "token" or
# "sequence", gives every token the same weight whatever the lengths in its group.
AGGREGATIONS = {"token": "token", "sequence": "sequence", "group": "constant"}


def group_advantages(rewards_BxG, *, estimator: str, std_ddof: int = 0, std_eps: float = 0.0):
  """advantages_BxG by `estimator`: "grpo" (std-scaled), "dr_grpo" (mean-centred), "rloo"."""
  if estimator == "grpo":
    return grpo_losses.group_advantages(rewards_BxG, ddof=std_ddof, eps=std_eps)
  if estimator == "dr_grpo":
    return grpo_losses.dr_grpo_advantages(rewards_BxG)
  if estimator == "rloo":
    return grpo_losses.rloo_advantages(rewards_BxG)
  raise ValueError(f"estimator must be one of {ADVANTAGES}, got {estimator!r}")


def group_stats(rewards_BxG):
  """Reward mean and std (population, over all samples) and the fraction of zero-variance
  groups (all rewards equal: zero advantage, no gradient)."""
  r = rewards_BxG.astype(jnp.float32)
  flat = jnp.max(r, axis=1) == jnp.min(r, axis=1)
  return {"reward_mean": jnp.mean(r), "reward_std": jnp.std(r),
          "zero_variance_frac": jnp.mean(flat.astype(jnp.float32))}


def make_group_advantages_fn(group_size: int, *, estimator: str, std_ddof: int = 0,
                             std_eps: float = 0.0):
  """Returns jitted advantages(rewards_B) -> (advantages_B, stats) over prompt-major groups."""
  if estimator not in ADVANTAGES:
    raise ValueError(f"estimator must be one of {ADVANTAGES}, got {estimator!r}")

  @jax.jit
  def advantages(rewards_B):
    if rewards_B.shape[0] % group_size:
      raise ValueError(f"{rewards_B.shape[0]} rewards do not split into groups of {group_size}")
    rewards_BxG = rewards_B.astype(jnp.float32).reshape(-1, group_size)
    adv = group_advantages(rewards_BxG, estimator=estimator, std_ddof=std_ddof,
                           std_eps=std_eps).reshape(-1)
    return adv, {**group_stats(rewards_BxG), "advantages_abs_mean": jnp.mean(jnp.abs(adv))}

  return advantages


def informative_groups(rewards_BxG) -> np.ndarray:
  """bool per group: its rewards are not all equal. rewards_BxGxK (several reward functions,
  NaN where one could not score a row): some function's scored values differ in the group."""
  r = np.asarray(rewards_BxG, np.float64)
  r = r.reshape(*r.shape[:2], -1)
  scored = ~np.isnan(r)
  hi = np.where(scored, r, -np.inf).max(axis=1)
  lo = np.where(scored, r, np.inf).min(axis=1)
  return (hi > lo).any(axis=-1)


def groups_of(rewards, group_size: int) -> np.ndarray:
  """rewards_B -> BxG, rewards_BxK -> BxGxK (prompt-major rows)."""
  r = np.asarray(rewards)
  return r.reshape(-1, group_size, *r.shape[1:])


class Selection(NamedTuple):
  rollout: Rollout  # batch_groups * G rows; fillers' mask_BxT zeroed
  rewards_B: np.ndarray
  picked: list  # (round, group) of each selected group, informative ones first
  informative: int  # how many of the selected groups are informative


def select_groups(rounds: list, batch_groups: int, group_size: int) -> Selection:
  """DAPO's dynamic sampling over rollouts already made: rounds is a list of (Rollout,
  rewards_B) of whole prompt-major groups. Keeps the first batch_groups informative groups
  in round order; when there are fewer, fills the batch (one compiled shape) with the earliest
  zero-variance groups, their response mask zeroed: absent from the loss and its normaliser."""
  good, flat = [], []
  for r, (_, rewards_B) in enumerate(rounds):
    for g, ok in enumerate(informative_groups(groups_of(rewards_B, group_size))):
      (good if ok else flat).append((r, g))
  picked = (good + flat)[:batch_groups]
  if len(picked) < batch_groups:
    raise ValueError(f"{len(picked)} groups in the rounds, fewer than the batch's "
                     f"{batch_groups}")
  informative = min(len(good), batch_groups)
  offsets = np.cumsum([0] + [len(rw) for _, rw in rounds])
  rows = np.concatenate([offsets[r] + g * group_size + np.arange(group_size)
                         for r, g in picked])

  def gather(*xs):  # on the host: the number of rounds varies, so jnp ops would recompile
    if xs[0] is None:
      return None
    return np.concatenate([sharding.to_host(x) for x in xs], axis=0)[rows]

  ro = jax.tree.map(gather, *[ro for ro, _ in rounds], is_leaf=lambda x: x is None)
  keep = np.repeat(np.arange(batch_groups) < informative, group_size)
  ro = ro._replace(mask_BxT=ro.mask_BxT * keep[:, None].astype(ro.mask_BxT.dtype))
  rewards = np.concatenate([np.asarray(rw) for _, rw in rounds])[rows]
  return Selection(ro, rewards, picked, informative)


def rollout_batch(rollout: Rollout, advantages_B) -> dict:
  """tokens, valid, mask, old_logps, advantages, and ref_logps when the rollout has them."""
  batch = {"tokens": rollout.tokens_BxT, "valid": rollout.valid_BxT, "mask": rollout.mask_BxT,
           "old_logps": rollout.old_logps_BxT, "advantages": advantages_B}
  if rollout.ref_logps_BxT is not None:
    batch["ref_logps"] = rollout.ref_logps_BxT
  return batch


def rollout_summary(ro: Rollout) -> dict:
  """Length (response tokens, EOS included), truncation rate and, with a reference, the
  per-sequence KL estimate sum_t (log pi_old - log pi_ref) of a rollout."""
  mask = sharding.to_host(ro.mask_BxT)
  out = {"length": float(mask.sum(1).mean()),
         "truncated_frac": float(sharding.to_host(ro.truncated_B).mean())}
  if ro.ref_logps_BxT is not None:
    kl = sharding.to_host(ro.old_logps_BxT - ro.ref_logps_BxT)
    out["kl_seq"] = float(np.sum(kl * mask, 1).mean())
  return out


def per_token(metrics: dict) -> dict:
  """Per-token means of a step's normalised sums (clipfrac, policy_loss, kl): each was divided
  by the step's denominator, so their ratio to token_count is exact."""
  n = max(float(metrics["token_count"]), 1e-12)
  return {f"{k}_per_token": float(metrics[k]) / n for k in ("clipfrac", "policy_loss", "kl")
          if k in metrics}


def grpo_loss_fn(graphdef, *, clip_eps_low: float, clip_eps_high: float, kl_coef: float,
                 aggregation: str, max_new_tokens: int, temperature: float = 1.0,
                 prompt_groups: PromptGroups | None = None):
  """The group policy loss in the step contract; params = the policy's. aggregation sets
  what loss_sum sums and the denominator (exact under accumulation):
    token     sum_{i,t} l_it                 / response tokens                (DAPO)
    sequence  sum_i (1/|o_i|) sum_t l_it     / responses                      (GRPO)
    group     sum_{i,t} l_it                 / (responses * max_new_tokens)   (Dr. GRPO)
  aux SUMS: policy_loss, clipfrac, kl (k3, only with kl_coef > 0), token_count, count.
  With prompt_groups each group's prompt is computed once (rl/grouped_forward.py)."""
  if aggregation not in AGGREGATIONS:
    raise ValueError(f"aggregation must be one of {tuple(AGGREGATIONS)}, got {aggregation!r}")
  if kl_coef < 0:
    raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")

  def loss_fn(params, batch, rng):
    del rng
    logps = row_logps(graphdef, params, batch["tokens"], batch["valid"], temperature,
                      prompt_groups)
    ref = batch.get("ref_logps") if kl_coef > 0 else None
    if kl_coef > 0 and ref is None:
      raise ValueError("kl_coef > 0 needs batch['ref_logps']")
    loss_sum, m = grpo_losses.grpo_loss(
        logps, batch["old_logps"], ref, batch["advantages"], batch["mask"],
        clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high, kl_coef=kl_coef,
        aggregation=AGGREGATIONS[aggregation], normaliser=1.0)
    denominator = {"token": m["token_count"], "sequence": m["count"],
                   "group": m["count"] * max_new_tokens}[aggregation]
    aux = {"denominator": denominator, "policy_loss": m["policy_loss_sum"],
           "clipfrac": m["clipfrac_sum"], "token_count": m["token_count"], "count": m["count"]}
    if ref is not None:
      aux["kl"] = m["kl_sum"]
    return loss_sum, aux

  return loss_fn


def grpo_batch_fn(group_size: int, *, estimator: str, std_ddof: int = 0, std_eps: float = 0.0):
  """make_batch(rollout, rewards_B) -> (batch, stats) with group advantages per response."""
  advantages = make_group_advantages_fn(group_size, estimator=estimator, std_ddof=std_ddof,
                                        std_eps=std_eps)

  def make_batch(rollout: Rollout, rewards_B):
    adv, stats = advantages(rewards_B)
    return rollout_batch(rollout, adv), stats
  return make_batch


@dataclasses.dataclass
class GroupSampling(StatelessAlgorithm):
  """An online algorithm over groups of G samples per prompt (the loop's Algorithm).

  Per iteration: batch_size distinct prompts drawn by (seed, it) (round r > 0 of dynamic
  sampling: (seed, it, r)), sampled with fold_in(key(seed), it) (round r: fold_in of that
  by r), scored (rewards_B, or rewards_BxK from several reward functions, whose make_batch
  reports the reward statistics); make_batch turns the selected groups into train rows,
  shuffled by
  default_rng((seed, it, 1)). The log's reward and zero-variance fraction are the FIRST
  rollout's (the on-policy sample of fresh prompts, comparable with and without dynamic
  sampling), with rollout_rounds and informative_groups. prompts_seen keeps the prompts whose
  groups entered the loss ("trained") and every prompt rolled out ("rolled_out"), per
  iteration (the matched-compute baselines train on them)."""
  stage: RolloutStage  # group_size G; with_ref iff the loss needs the reference
  scorer: Scorer
  prompts: Sequence[str]
  ref_params: object
  batch_size: int
  seed: int
  make_batch: Callable
  dynamic_sampling_rounds: int = 0
  # The loss's metrics are token sums (GRPO, REINFORCE++): log their per-token means too.
  token_metrics: bool = True
  progress_keys: tuple = ("reward_mean", "zero_variance_frac", "rollout_rounds",
                          "clipfrac_per_token", "kl_seq")

  def __post_init__(self):
    self.prompts_seen = {"trained": [], "rolled_out": []}

  def draw(self, it: int, round_: int = 0) -> list[str]:
    rng = np.random.default_rng((self.seed, it) + ((round_,) if round_ else ()))
    return [self.prompts[i] for i in rng.choice(len(self.prompts), self.batch_size,
                                                replace=False)]

  def collect(self, it: int, params) -> Iteration:
    g = self.stage.group_size
    key = jax.random.fold_in(jax.random.key(self.seed), it)
    rounds, informative = [], 0
    for r in range(self.dynamic_sampling_rounds + 1):
      exp = self.stage.experience(params, self.ref_params, None, self.draw(it, r),
                                  jax.random.fold_in(key, r) if r else key)
      exp.rewards_B = np.asarray(self.scorer(exp), np.float32)
      rounds.append(exp)
      informative += int(informative_groups(groups_of(exp.rewards_B, g)).sum())
      if informative >= self.batch_size:
        break
    if not self.dynamic_sampling_rounds:  # every group enters the loss, informative or not
      sel = Selection(exp.rollout, exp.rewards_B, [(0, i) for i in range(self.batch_size)],
                      informative)
    else:
      sel = select_groups([(e.rollout, e.rewards_B) for e in rounds], self.batch_size, g)
    firsts = lambda e: e.prompts[::g]
    self.prompts_seen["trained"].append([firsts(rounds[r])[i] for r, i in
                                         sel.picked[:sel.informative]]
                                        if self.dynamic_sampling_rounds else firsts(rounds[0]))
    self.prompts_seen["rolled_out"].append([p for e in rounds for p in firsts(e)])
    batch, stats = self.make_batch(sel.rollout, sel.rewards_B)
    if rounds[0].rewards_B.ndim == 1:  # several rewards: make_batch's stats have them
      stats = {**stats, **group_stats(rounds[0].rewards_B.reshape(-1, g))}
    stats = {**stats,
             **rollout_summary(rounds[0].rollout),
             "informative_groups": sel.informative / self.batch_size,
             "rollout_rounds": float(len(rounds))}
    # A group whose prompt the loss computes once stays whole in its minibatch.
    block = g if self.stage.share_prompt else 1
    return Iteration(batch, stats, np.random.default_rng((self.seed, it, 1)), rounds[0],
                     row_block=block)

  def finish_iteration(self, values: dict) -> dict:
    return {**values, **per_token(values)} if self.token_metrics else values

  def state_dict(self) -> dict:
    return {"prompts": self.prompts_seen}

  def load_state_dict(self, data: dict) -> None:
    self.prompts_seen = data["prompts"]
