"""GRPO and relatives with verifiable rewards, as three pure, jit-compiled pieces.

  rollout      = make_group_rollout_fn(...)(policy, ref, prompts, key)     G samples a prompt
  adv, stats   = make_group_advantages_fn(...)(rewards_B)                  GRPO / Dr. GRPO / RLOO
  loss_fn      = grpo_loss_fn(...)                                         step contract

No value model and no learned reward: the sequence reward r(x, y) comes from outside (here
a rule-based verifier, RLVR), and the baseline is the group's own rewards (Shao 2024;
Liu 2025; Ahmadian 2024; equations in rlhf_jax/losses/grpo.py and MATH.md).

Layout: the rollout holds B = prompts * G rows, prompt-major (row i * G + j is sample j of
prompt i), so rewards_B.reshape(prompts, G) is rewards_BxG. Every BxT array is, as in
rlhf_jax/train/ppo.py, the LEFT-padded prompt (P slots) followed by the RIGHT-padded
response (N = max_new_tokens slots); logps_BxT[:, t] scores token t; mask_BxT is 1 on
response tokens (EOS included). Each prompt's prefix is run through the model ONCE and its
KV cache replicated G times (rlhf_jax.sampling.sample_groups).

kl_coef == 0 compiles no reference forward at all: the rollout's ref_logps_BxT is None, the
loss batch has no "ref_logps", and the reference parameters are never an input.
"""
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.losses import grpo as grpo_losses
from rlhf_jax.sampling import SamplingConfig, sample_groups
from rlhf_jax.train.ppo import policy_forward

ADVANTAGES = ("grpo", "dr_grpo", "rloo")
# Flag value -> grpo_loss's aggregation: "group" is Dr. GRPO's constant normaliser (token sum
# over the group's responses / (responses * max_new_tokens)), which, unlike "token" or
# "sequence", gives every token the same weight whatever the lengths in its group.
AGGREGATIONS = {"token": "token", "sequence": "sequence", "group": "constant"}


class GroupRollout(NamedTuple):
  tokens_BxT: jax.Array  # int32 prompt (left-padded) + response (right-padded)
  valid_BxT: jax.Array  # bool, real tokens
  mask_BxT: jax.Array  # float32, response tokens
  old_logps_BxT: jax.Array  # sampling policy, training forward, 0 off the mask
  ref_logps_BxT: Optional[jax.Array]  # reference, 0 off the mask; None without a reference
  truncated_B: jax.Array  # bool, no EOS within max_new_tokens
  sampler_logps_BxN: jax.Array  # the sampler's own log-probs (response slots)


def _check_sampling(cfg: SamplingConfig):
  if cfg.greedy or cfg.top_k or cfg.top_p < 1.0:
    raise ValueError("GRPO's ratio needs the training forward to reproduce the sampling "
                     "distribution: use temperature sampling without top-k/top-p/greedy")


def make_group_rollout_fn(graphdef, sampling_cfg: SamplingConfig, group_size: int, *,
                          with_ref: bool):
  """Returns jitted rollout(policy_params, ref_params, prompt_tokens_BxP, prompt_valid_BxP,
  key) -> GroupRollout of B * group_size rows. Prompts must be left-padded. With
  with_ref=False, ref_params must be None and no reference forward is traced."""
  _check_sampling(sampling_cfg)
  if group_size < 1:
    raise ValueError(f"group_size must be >= 1, got {group_size}")
  temp = sampling_cfg.temperature

  @jax.jit
  def rollout(policy_params, ref_params, prompt_tokens_BxP, prompt_valid_BxP,
              key) -> GroupRollout:
    if (ref_params is None) == with_ref:
      raise ValueError(f"with_ref={with_ref} but ref_params is "
                       f"{'None' if ref_params is None else 'given'}")
    out = sample_groups(graphdef, policy_params, prompt_tokens_BxP, prompt_valid_BxP, key,
                        cfg=sampling_cfg, group_size=group_size)
    repeat = lambda x: jnp.repeat(x, group_size, axis=0)
    prompt_valid = repeat(prompt_valid_BxP.astype(bool))
    tokens = jnp.concatenate([repeat(prompt_tokens_BxP.astype(jnp.int32)), out.tokens_BxN], 1)
    response = out.mask_BxN.astype(bool)
    valid = jnp.concatenate([prompt_valid, response], axis=1)
    mask = jnp.concatenate([jnp.zeros_like(prompt_valid), response], 1).astype(jnp.float32)
    old_logps, _ = policy_forward(graphdef, policy_params, tokens, valid, temp)
    ref_logps = None
    if with_ref:
      ref_logps = policy_forward(graphdef, ref_params, tokens, valid, temp)[0] * mask
    return GroupRollout(tokens, valid, mask, old_logps * mask, ref_logps, ~out.finished_B,
                        out.logps_BxN)

  return rollout


def group_advantages(rewards_BxG, *, estimator: str, std_ddof: int = 0, std_eps: float = 0.0):
  """advantages_BxG by `estimator`: "grpo" (std-scaled with std_ddof, std_eps), "dr_grpo"
  (mean-centred), "rloo" (leave-one-out baseline)."""
  if estimator == "grpo":
    return grpo_losses.group_advantages(rewards_BxG, ddof=std_ddof, eps=std_eps)
  if estimator == "dr_grpo":
    return grpo_losses.dr_grpo_advantages(rewards_BxG)
  if estimator == "rloo":
    return grpo_losses.rloo_advantages(rewards_BxG)
  raise ValueError(f"estimator must be one of {ADVANTAGES}, got {estimator!r}")


def group_stats(rewards_BxG):
  """Scalars of a batch of groups: reward mean and std (population, over all samples), the
  fraction of zero-variance groups (all rewards equal: zero advantage, no gradient), and the
  fraction of groups with at least one reward above the group's minimum."""
  r = rewards_BxG.astype(jnp.float32)
  flat = jnp.max(r, axis=1) == jnp.min(r, axis=1)
  return {"reward_mean": jnp.mean(r), "reward_std": jnp.std(r),
          "zero_variance_frac": jnp.mean(flat.astype(jnp.float32))}


def make_group_advantages_fn(group_size: int, *, estimator: str, std_ddof: int = 0,
                             std_eps: float = 0.0):
  """Returns jitted advantages(rewards_B) -> (advantages_B, stats) over prompt-major groups
  of group_size (stats from group_stats, plus advantages_abs_mean)."""
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
  """bool per group: its rewards are not all equal. A zero-variance group has zero advantage
  under every estimator, so it carries no gradient."""
  r = np.asarray(rewards_BxG)
  return r.max(axis=1) != r.min(axis=1)


class Selection(NamedTuple):
  rollout: GroupRollout  # batch_groups * G rows (host arrays); fillers' mask_BxT zeroed
  rewards_B: np.ndarray
  picked: list  # (round, group) of each selected group, informative ones first
  informative: int  # how many of the selected groups are informative


def select_groups(rounds: list, batch_groups: int, group_size: int) -> Selection:
  """DAPO's dynamic sampling (Yu et al. 2025) over rollouts already made: rounds is a list
  of (GroupRollout, rewards_B), each of whole prompt-major groups. Keeps the first
  batch_groups informative groups in round order. When the rounds hold fewer, the batch is
  filled (to keep one compiled shape) with the earliest zero-variance groups, their response
  mask zeroed: fillers enter neither the loss nor its token / response denominator."""
  good, flat = [], []
  for r, (_, rewards_B) in enumerate(rounds):
    rewards_BxG = np.asarray(rewards_B).reshape(-1, group_size)
    for g, ok in enumerate(informative_groups(rewards_BxG)):
      (good if ok else flat).append((r, g))
  picked = (good + flat)[:batch_groups]
  if len(picked) < batch_groups:
    raise ValueError(f"{len(picked)} groups in the rounds, fewer than the batch's "
                     f"{batch_groups}")
  informative = min(len(good), batch_groups)
  offsets = np.cumsum([0] + [len(np.asarray(rw)) for _, rw in rounds])
  rows = np.concatenate([offsets[r] + g * group_size + np.arange(group_size)
                         for r, g in picked])

  def gather(*xs):  # on the host: the number of rounds varies, so jnp ops would recompile
    if xs[0] is None:
      return None
    return np.concatenate([np.asarray(x) for x in xs], axis=0)[rows]

  ro = jax.tree.map(gather, *[ro for ro, _ in rounds], is_leaf=lambda x: x is None)
  keep = np.repeat(np.arange(batch_groups) < informative, group_size)
  ro = ro._replace(mask_BxT=ro.mask_BxT * keep[:, None].astype(ro.mask_BxT.dtype))
  rewards = np.concatenate([np.asarray(rw) for _, rw in rounds])[rows]
  return Selection(ro, rewards, picked, informative)


def rollout_batch(rollout: GroupRollout, advantages_B) -> dict:
  """The train batch of a rollout: tokens, valid, mask, old_logps, advantages, and
  ref_logps only when the rollout has a reference."""
  batch = {"tokens": rollout.tokens_BxT, "valid": rollout.valid_BxT, "mask": rollout.mask_BxT,
           "old_logps": rollout.old_logps_BxT, "advantages": advantages_B}
  if rollout.ref_logps_BxT is not None:
    batch["ref_logps"] = rollout.ref_logps_BxT
  return batch


def grpo_loss_fn(graphdef, *, clip_eps_low: float, clip_eps_high: float, kl_coef: float,
                 aggregation: str, max_new_tokens: int, temperature: float = 1.0):
  """The group policy loss in the step contract (train/step.py): loss_fn(params, batch, rng)
  -> (loss_sum, aux), params = the policy's.

  aggregation (the flag values of AGGREGATIONS) sets what loss_sum sums and the denominator,
  so the step's division by the GLOBAL denominator is exact under accumulation:
    token     sum_{i,t} l_it                 / response tokens          (DAPO)
    sequence  sum_i (1/|o_i|) sum_t l_it     / responses                (GRPO)
    group     sum_{i,t} l_it                 / (responses * max_new_tokens)   (Dr. GRPO)
  aux SUMS: policy_loss and clipfrac (token sums), kl (k3 token sum, only with kl_coef > 0),
  token_count, count (responses). Every aux key is divided by the same denominator, so a
  per-token mean is aux[key] / aux["token_count"] after the step. kl_coef == 0: the batch
  has no "ref_logps" and no KL is computed.
  """
  if aggregation not in AGGREGATIONS:
    raise ValueError(f"aggregation must be one of {tuple(AGGREGATIONS)}, got {aggregation!r}")
  if kl_coef < 0:
    raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")

  def loss_fn(params, batch, rng):
    del rng
    tokens, valid, mask = batch["tokens"], batch["valid"], batch["mask"]
    logps, _ = policy_forward(graphdef, params, tokens, valid, temperature)
    ref = batch.get("ref_logps") if kl_coef > 0 else None
    if kl_coef > 0 and ref is None:
      raise ValueError("kl_coef > 0 needs batch['ref_logps']")
    loss_sum, m = grpo_losses.grpo_loss(
        logps, batch["old_logps"], ref, batch["advantages"], mask, clip_eps_low=clip_eps_low,
        clip_eps_high=clip_eps_high, kl_coef=kl_coef, aggregation=AGGREGATIONS[aggregation],
        normaliser=1.0)
    denominator = {"token": m["token_count"], "sequence": m["count"],
                   "group": m["count"] * max_new_tokens}[aggregation]
    aux = {"denominator": denominator, "policy_loss": m["policy_loss_sum"],
           "clipfrac": m["clipfrac_sum"], "token_count": m["token_count"], "count": m["count"]}
    if ref is not None:
      aux["kl"] = m["kl_sum"]
    return loss_sum, aux

  return loss_fn


def per_token(metrics: dict) -> dict:
  """Per-token means of a train step's normalised metrics (clipfrac, policy_loss, kl k3):
  each was divided by the step's denominator, so their ratio to token_count is exact."""
  n = max(float(metrics["token_count"]), 1e-12)
  return {k: float(metrics[k]) / n for k in ("clipfrac", "policy_loss", "kl") if k in metrics}
