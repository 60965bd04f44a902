"""Reward-model losses: Bradley-Terry pairs, K-way rankings, Plackett-Luce, ensembles,
normalisation, and the antisymmetric pairwise preference model of Nash-MD (docs/math.md,
"Bradley-Terry and ensembles").

Bradley-Terry (Christiano 2017; Ouyang 2022 eq. 1):  P(y_w > y_l) = s(r_w - r_l),
L_BT = -E log s(r_w - r_l). Hand check: r_w = 2.0, r_l = 0.5 gives P = s(1.5) = 0.8176.

Metrics of every loss here are sums plus counts (microbatches and hosts combine exactly, and
loss == loss_sum / max(count, 1) within one call):
  bt_loss:               loss_sum, count (pairs), accuracy_sum (r_w > r_l), margin_sum (r_w - r_l),
                         rewards/chosen_sum, rewards/rejected_sum
  ranking_loss:          loss_sum, count (prompts with >= 2 valid responses), accuracy_sum
                         (per-prompt mean pairwise accuracy), margin_sum (per-prompt mean margin),
                         pair_count (valid pairs)
  plackett_luce_loss:    loss_sum, count (prompts with >= 2 valid responses)
  preference_model_loss: loss_sum, count (ordered comparisons: 2 per valid pair),
                         accuracy_sum (2 per correct pair), pair_count (valid pairs)
Ensembles take rewards_ExB: MEMBERS FIRST (E reward models, B responses) and return rewards_B.
"""
import jax
import jax.numpy as jnp

from rlhf_jax.losses import _shapes


def bt_probability(chosen_rewards_B, rejected_rewards_B):
  """P(y_w > y_l) = s(r_w - r_l) under Bradley-Terry; (B,) -> (B,)."""
  _shapes.check_same_shape(chosen_rewards_B=chosen_rewards_B, rejected_rewards_B=rejected_rewards_B)
  return jax.nn.sigmoid(chosen_rewards_B - rejected_rewards_B)


def bt_loss(chosen_rewards_B, rejected_rewards_B):
  """Pairwise Bradley-Terry loss -log s(r_w - r_l), mean over pairs (Ouyang 2022 eq. 1).

  Args:
    chosen_rewards_B: r(x, y_w) of the preferred responses, (B,).
    rejected_rewards_B: r(x, y_l) of the dispreferred responses, (B,).
  """
  _shapes.check_rank("chosen_rewards_B", chosen_rewards_B, 1)
  _shapes.check_same_shape(chosen_rewards_B=chosen_rewards_B, rejected_rewards_B=rejected_rewards_B)
  margin_B = chosen_rewards_B - rejected_rewards_B
  loss_B = -jax.nn.log_sigmoid(margin_B)
  metrics = {
      "loss_sum": jnp.sum(loss_B),
      "count": jnp.asarray(margin_B.shape[0], margin_B.dtype),
      "accuracy_sum": jnp.sum((margin_B > 0).astype(margin_B.dtype)),
      "margin_sum": jnp.sum(margin_B),
      "rewards/chosen_sum": jnp.sum(chosen_rewards_B),
      "rewards/rejected_sum": jnp.sum(rejected_rewards_B),
  }
  return jnp.mean(loss_B), metrics


def _valid(rewards_BxK, valid_BxK):
  _shapes.check_rank("rewards_BxK", rewards_BxK, 2)
  if valid_BxK is None:
    return jnp.ones(rewards_BxK.shape, bool)
  _shapes.check_same_shape(rewards_BxK=rewards_BxK, valid_BxK=valid_BxK)
  return valid_BxK.astype(bool)


def ranking_loss(rewards_BxK, valid_BxK=None):
  """InstructGPT K-way ranking loss: all C(K,2) pairs of a prompt, each weighted 1/C(K,2).

  loss = (1/B') sum_b (1/C(K_b,2)) sum_{i<j valid} -log s(r_bi - r_bj)   (Ouyang 2022 sec 3.5)
  with K_b the number of valid responses of prompt b and B' the prompts with K_b >= 2.

  Args:
    rewards_BxK: rewards in RANK ORDER, best first: response i is preferred to j when i < j.
    valid_BxK: optional bool mask for prompts with fewer than K responses (any pattern; the
      order among valid entries is the index order).
  """
  valid_BxK = _valid(rewards_BxK, valid_BxK)
  k = rewards_BxK.shape[1]
  upper_KxK = jnp.triu(jnp.ones((k, k), bool), 1)
  pair_BxKxK = upper_KxK[None] & valid_BxK[:, :, None] & valid_BxK[:, None, :]
  pair_BxKxK = pair_BxKxK.astype(rewards_BxK.dtype)
  margin_BxKxK = rewards_BxK[:, :, None] - rewards_BxK[:, None, :]
  n_pairs_B = jnp.sum(pair_BxKxK, axis=(1, 2))
  weight_B = 1.0 / jnp.maximum(n_pairs_B, 1.0)

  def per_prompt(x_BxKxK):
    return weight_B * jnp.sum(pair_BxKxK * x_BxKxK, axis=(1, 2))

  loss_B = per_prompt(-jax.nn.log_sigmoid(margin_BxKxK))
  count = jnp.sum((n_pairs_B > 0).astype(rewards_BxK.dtype))
  loss_sum = jnp.sum(loss_B)
  metrics = {
      "loss_sum": loss_sum,
      "count": count,
      "accuracy_sum": jnp.sum(per_prompt((margin_BxKxK > 0).astype(rewards_BxK.dtype))),
      "margin_sum": jnp.sum(per_prompt(margin_BxKxK)),
      "pair_count": jnp.sum(n_pairs_B),
  }
  return loss_sum / jnp.maximum(count, 1.0), metrics


def plackett_luce_loss(rewards_BxK, valid_BxK=None):
  """Negative log-likelihood of a full ranking under Plackett-Luce (Rafailov 2023 app. A.3).

  -log P(tau) = -sum_k [ r_tau(k) - logsumexp_{j >= k} r_tau(j) ]  over valid positions,
  mean over prompts with >= 2 valid responses. With K = 2 it equals bt_loss.

  Args:
    rewards_BxK: rewards in RANK ORDER, best first.
    valid_BxK: optional bool mask; invalid responses are left out of the ranking.
  """
  valid_BxK = _valid(rewards_BxK, valid_BxK)
  k = rewards_BxK.shape[1]
  later_KxK = jnp.triu(jnp.ones((k, k), bool), 0)  # [k, j]: j >= k
  # Always keep the diagonal so every row has a finite entry (no NaN gradients).
  keep_BxKxK = later_KxK[None] & (valid_BxK[:, None, :] | jnp.eye(k, dtype=bool)[None])
  lse_BxK = jax.nn.logsumexp(
      jnp.broadcast_to(rewards_BxK[:, None, :], keep_BxKxK.shape), axis=-1, where=keep_BxKxK)
  valid_f = valid_BxK.astype(rewards_BxK.dtype)
  loss_B = -jnp.sum(valid_f * (rewards_BxK - lse_BxK), axis=1)
  count = jnp.sum((jnp.sum(valid_f, axis=1) >= 2).astype(rewards_BxK.dtype))
  loss_sum = jnp.sum(loss_B)
  return loss_sum / jnp.maximum(count, 1.0), {"loss_sum": loss_sum, "count": count}


def ensemble_mean(rewards_ExB):
  """R_mean = (1/E) sum_e R_e over E reward models (Coste et al. 2024); (E, B) -> (B,)."""
  _shapes.check_rank("rewards_ExB", rewards_ExB, 2)
  return jnp.mean(rewards_ExB, axis=0)


def ensemble_wco(rewards_ExB):
  """Worst-case optimisation R_wco = min_e R_e (Coste et al. 2024); (E, B) -> (B,)."""
  _shapes.check_rank("rewards_ExB", rewards_ExB, 2)
  return jnp.min(rewards_ExB, axis=0)


def ensemble_uwo(rewards_ExB, *, uwo_coef: float):
  """Uncertainty-weighted R_uwo = mean_e R_e - uwo_coef * Var_e R_e (Coste et al. 2024).

  The variance is the population variance over members (ddof 0): (1/E) sum_e (R_e - R_mean)^2.
  """
  _shapes.check_rank("rewards_ExB", rewards_ExB, 2)
  return jnp.mean(rewards_ExB, axis=0) - uwo_coef * jnp.var(rewards_ExB, axis=0)


def fit_reward_normalization(reference_rewards_ExN):
  """Mean and std (ddof 0) of rewards on a reference sample, over the LAST axis.

  (E, N) -> (mean_E, std_E) for an ensemble, or (N,) -> scalars for one reward model.
  """
  return jnp.mean(reference_rewards_ExN, axis=-1), jnp.std(reference_rewards_ExN, axis=-1)


def normalize_rewards(rewards_ExB, mean_E, std_E, *, eps: float = 1e-6):
  """(R - mean) / (std + eps): mean 0 and std ~1 on the reference sample.

  rewards_ExB is (E, B) with mean_E, std_E of shape (E,), or (B,) with scalar statistics,
  as returned by fit_reward_normalization.
  """
  mean_E, std_E = jnp.asarray(mean_E), jnp.asarray(std_E)
  if mean_E.shape != rewards_ExB.shape[:-1] or std_E.shape != mean_E.shape:
    raise ValueError(
        f"rewards_ExB{tuple(rewards_ExB.shape)} needs mean_E and std_E of shape "
        f"{tuple(rewards_ExB.shape[:-1])}, got {tuple(mean_E.shape)} and {tuple(std_E.shape)}")
  return (rewards_ExB - mean_E[..., None]) / (std_E[..., None] + eps)


def preference_probability(f_ab_B, f_ba_B):
  """P(a > b | x) = ( s(f(x, a, b)) + 1 - s(f(x, b, a)) ) / 2 of a pairwise preference model
  (Munos et al. 2024) scored in both orders; P(a > b) + P(b > a) = 1 exactly. (B,) -> (B,).
  """
  _shapes.check_rank("f_ab_B", f_ab_B, 1)
  _shapes.check_same_shape(f_ab_B=f_ab_B, f_ba_B=f_ba_B)
  return 0.5 * (jax.nn.sigmoid(f_ab_B) + 1.0 - jax.nn.sigmoid(f_ba_B))


def preference_model_loss(f_ab_B, f_ba_B, labels_B, valid_B=None):
  """Both-orders binary cross-entropy of a pairwise preference model (Munos et al. 2024).

  The model scores one sequence holding both responses, f(x, a, b), and sees every labelled
  pair in both orders, so it is trained antisymmetric:
    l = BCE(s(f(x, a, b)), y) + BCE(s(f(x, b, a)), 1 - y),  BCE(p, y) = -y log p - (1-y) log(1-p)
  loss = sum over valid pairs of l / (2 x valid pairs) (units: ordered comparisons). At
  inference P(a > b) is preference_probability, antisymmetric by construction.

  Args:
    f_ab_B: score of (a, b), (B,).
    f_ba_B: score of the swapped sequence (b, a), (B,).
    labels_B: 1 when a was preferred, 0 when b was; soft labels in [0, 1] allowed, (B,).
    valid_B: optional bool (B,); False rows (padding) count nowhere.
  Returns (loss, metrics): loss_sum, count (ordered comparisons, 2 per valid pair),
  accuracy_sum (preference_probability on the label's side of 1/2, ties 1/2; both orders
  share the prediction, so each pair counts twice and accuracy_sum / count is the per-pair
  accuracy), pair_count (valid pairs).
  """
  _shapes.check_rank("f_ab_B", f_ab_B, 1)
  arrays = dict(f_ab_B=f_ab_B, f_ba_B=f_ba_B, labels_B=labels_B)
  if valid_B is not None:
    arrays["valid_B"] = valid_B
  _shapes.check_same_shape(**arrays)
  dtype = jnp.result_type(f_ab_B.dtype, jnp.float32)
  w_B = jnp.ones(f_ab_B.shape, dtype) if valid_B is None else valid_B.astype(dtype)
  y_B = labels_B.astype(dtype)
  # BCE(s(f), y) = y softplus(-f) + (1 - y) softplus(f): finite for any f.
  bce = lambda f, t: t * jax.nn.softplus(-f) + (1.0 - t) * jax.nn.softplus(f)
  loss_B = bce(f_ab_B, y_B) + bce(f_ba_B, 1.0 - y_B)
  p_B = preference_probability(f_ab_B, f_ba_B)
  hit_B = jnp.where(p_B == 0.5, 0.5, ((p_B > 0.5) == (y_B > 0.5)).astype(dtype))
  metrics = {"loss_sum": jnp.sum(loss_B * w_B), "count": 2.0 * jnp.sum(w_B),
             "accuracy_sum": jax.lax.stop_gradient(2.0 * jnp.sum(hit_B * w_B)),
             "pair_count": jnp.sum(w_B)}
  return metrics["loss_sum"] / jnp.maximum(metrics["count"], 1.0), metrics
