"""Reward-model training and scoring, in the train step's loss contract (step.py).

InstructGPT (Ouyang 2022 sec 3.5): a labeller ranks K responses to one prompt; the RM is
trained on all C(K,2) pairs of that prompt, each weighted 1/C(K,2), and all pairs of a prompt
stay in ONE batch (one forward per response, not per pair, and no overfitting from a prompt's
pairs being spread over an epoch). The RM starts from the SFT model with its LM head replaced
by a fresh scalar head (init_reward_from_policy).

Batch of K-way rankings (rows are prompts, responses in RANK ORDER, best first):
  tokens_BxKxT        int32, prompt + response of each of the K responses
  valid_BxKxT         bool, real (non-padding) tokens; padding may be left or right
  response_valid_BxK  optional bool, False for missing responses (a prompt with < K)

Ensembles (Coste 2024, "Reward model ensembles help mitigate overoptimization"): E reward
models score the same responses; scores are stacked members first (E x B) and aggregated by
mean, worst-case (min) or uncertainty-weighted (mean - c * var).
"""
import functools
import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax.data import shared_prefix as shared_prefix_data
from rlhf_jax.losses import bradley_terry as bt
from rlhf_jax.train import shared_prefix

AGGREGATES = ("mean", "wco", "uwo")
SINGLE_MEMBER_REFUSAL = "an ensemble aggregator needs --ensemble_size > 1"


def ranking_scores(graphdef, params, batch):
  """rewards_BxK: one ScalarHeadModel forward over the flattened (B*K, T) rows, each read
  at its row's last real token; float32. Of a packed batch (data/packing.py: pack_rankings),
  the (R * Q) x K slots, each response read at its segment's last token (0 for empty slots);
  of a shared-prompt batch (data/shared_prefix.py), each row's K responses."""
  if shared_prefix_data.is_shared(batch):  # one row per prompt: the prompt computed once
    return shared_prefix.response_scores(graphdef, params, batch)
  if "segment_ids" in batch:
    return _packed_scores(graphdef, params, batch)
  tokens_BxKxT, valid_BxKxT = batch["tokens_BxKxT"], batch["valid_BxKxT"]
  if tokens_BxKxT.ndim != 3 or valid_BxKxT.shape != tokens_BxKxT.shape:
    raise ValueError(f"tokens_BxKxT{tuple(tokens_BxKxT.shape)} and valid_BxKxT"
                     f"{tuple(valid_BxKxT.shape)} must be the same rank-3 shape")
  b, k, t = tokens_BxKxT.shape
  model = nnx.merge(graphdef, params)
  valid_NxT = valid_BxKxT.reshape(b * k, t)
  # A missing response may be all padding; give it one valid token so its (unused) score
  # is finite and its row attends to something.
  valid_NxT = valid_NxT.at[:, 0].set(valid_NxT[:, 0] | ~jnp.any(valid_NxT, axis=1))
  scores_N = model.score(tokens_BxKxT.reshape(b * k, t), valid_BxT=valid_NxT)
  return scores_N.astype(jnp.float32).reshape(b, k)


def _packed_scores(graphdef, params, batch):
  seg_BxT, resp_BxQxK = batch["segment_ids"], batch["response_segment"]
  values_BxT = nnx.merge(graphdef, params)(batch["tokens"], valid_BxT=batch["valid"],
                                           segment_ids_BxT=seg_BxT)
  t = seg_BxT.shape[1]
  # Each segment's last token: the largest position holding its id (segments are contiguous).
  ids = jnp.arange(1, 1 + resp_BxQxK.shape[1] * resp_BxQxK.shape[2])
  last_BxS = jnp.max(jnp.where(seg_BxT[:, None, :] == ids[None, :, None], jnp.arange(t), 0),
                     axis=2)
  seg_scores = jnp.take_along_axis(values_BxT.astype(jnp.float32), last_BxS, axis=1)
  seg_scores = jnp.pad(seg_scores, ((0, 0), (1, 0)))  # segment 0: the empty slot
  b, q, k = resp_BxQxK.shape
  scores = jnp.take_along_axis(seg_scores, resp_BxQxK.reshape(b, q * k), axis=1)
  return scores.reshape(b * q, k)


def response_valid(batch):
  """Which ranking slots hold a response: the batch's response_valid_BxK, all of them
  without one, or a packed batch's nonzero response segments ((R * Q) x K)."""
  if "response_segment" in batch:
    r = batch["response_segment"]
    return (r > 0).reshape(-1, r.shape[-1])
  return batch.get("response_valid_BxK")


def ranking_loss_fn(graphdef):
  """loss_fn(params, batch, rng) -> (loss_sum, aux) for K-way rankings (module docstring).

  loss_sum = sum_b (1/C(K_b,2)) sum_{i<j valid} -log s(r_bi - r_bj)  (Ouyang 2022 eq. 1);
  aux: denominator (prompts with >= 2 valid responses), accuracy (per-prompt pairwise
  accuracy, weighted as the loss), margin (per-prompt mean r_i - r_j), pairs (valid pairs; the step reports
  pairs per prompt). All sums, so microbatches and devices combine exactly.
  """
  def loss_fn(params, batch, rng):
    del rng  # deterministic forward
    rewards_BxK = ranking_scores(graphdef, params, batch)
    _, m = bt.ranking_loss(rewards_BxK, response_valid(batch))
    return m["loss_sum"], {"denominator": m["count"], "accuracy": m["accuracy_sum"],
                           "margin": m["margin_sum"], "pairs": m["pair_count"]}
  return loss_fn


def init_reward_from_policy(policy_params, reward_params):
  """RM params whose backbone is copied from a Transformer LM's params (Ouyang 2022 sec 3.5:
  the RM is initialised from the SFT model). Pure dicts as from nnx.split(...).to_pure_dict().

  policy_params: {"embed", "blocks", "final_norm", optionally "lm_head"}; the LM head is
  dropped. reward_params: a freshly initialised ScalarHeadModel's params; its head
  (head_w, head_b) is kept, every backbone tensor replaced. Raises ValueError naming the
  tensor when it is missing from the policy or its shape differs.
  """
  def copy(path, fresh):
    name = "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)
    src = policy_params
    try:
      for p in path:
        src = src[getattr(p, "key", getattr(p, "idx", None))]
    except (KeyError, IndexError, TypeError):
      raise ValueError(f"policy params have no tensor {name!r} for the reward backbone")
    if tuple(src.shape) != tuple(fresh.shape):
      raise ValueError(f"backbone tensor {name!r}: policy shape {tuple(src.shape)} != "
                       f"reward-model shape {tuple(fresh.shape)}")
    return jnp.asarray(src, fresh.dtype)

  backbone = jax.tree_util.tree_map_with_path(copy, reward_params["backbone"])
  return {**reward_params, "backbone": backbone}


@functools.cache
def score_fn(graphdef):
  """jitted (params, tokens_BxT, valid_BxT) -> rewards_B (float32, at the last real token).
  Cached per graphdef, so ensemble_scores in a loop compiles once per shape."""
  @jax.jit
  def score(params, tokens_BxT, valid_BxT):
    return nnx.merge(graphdef, params).score(tokens_BxT, valid_BxT=valid_BxT).astype(jnp.float32)
  return score


def _check_aggregate(aggregate: str, num_members: int) -> None:
  if aggregate not in AGGREGATES:
    raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
  if num_members < 1:
    raise ValueError("an ensemble needs at least one member's scores")
  if aggregate != "mean" and num_members == 1:
    raise ValueError(f"aggregate={aggregate!r} with a single reward model: {SINGLE_MEMBER_REFUSAL}")


def aggregate_scores(rewards_ExB, *, aggregate: str = "mean", uwo_coef: float = 0.0,
                     norm_stats=None):
  """rewards_B from member scores rewards_ExB (Coste 2024), optionally normalised first with
  norm_stats = (mean_E, std_E) from bradley_terry.fit_reward_normalization (members are
  otherwise on arbitrary scales), then aggregated: mean; wco = min_e; uwo = mean -
  uwo_coef * var_e. Separate from the scoring so scores computed elsewhere (best-of-n scores
  a whole sample set per member) aggregate exactly as PPO's rewards do."""
  _check_aggregate(aggregate, rewards_ExB.shape[0])
  if norm_stats is not None:
    rewards_ExB = bt.normalize_rewards(rewards_ExB, *norm_stats)
  if aggregate == "mean":
    return bt.ensemble_mean(rewards_ExB)
  if aggregate == "wco":
    return bt.ensemble_wco(rewards_ExB)
  return bt.ensemble_uwo(rewards_ExB, uwo_coef=uwo_coef)


def ensemble_scores(graphdef, params_list, tokens_BxT, valid_BxT, *, aggregate: str = "mean",
                    uwo_coef: float = 0.0, norm_stats=None):
  """rewards_B of an ensemble of E reward models sharing one graphdef: the member scores
  stacked to rewards_ExB, then aggregate_scores (checked before any member is scored)."""
  _check_aggregate(aggregate, len(params_list))
  score = score_fn(graphdef)
  rewards_ExB = jnp.stack([score(p, tokens_BxT, valid_BxT) for p in params_list])
  return aggregate_scores(rewards_ExB, aggregate=aggregate, uwo_coef=uwo_coef,
                          norm_stats=norm_stats)
