"""Diagnostics: CHES scores for likelihood displacement, and best-of-n KL (bound and exact).

These return arrays, not (loss, metrics): they are measurements, not objectives.

CHES (Razin et al. 2024, "Unintentional Unalignment"), with h_{x,y<k} the last-layer hidden
state that PREDICTS token k of y (so the caller passes the hidden states at the positions whose
next token is a response token, and the mask selects those positions):
  CHES_x(y+, y-) = < sum_k h_{x,y+<k}, sum_k' h_{x,y-<k'} > - || sum_k h_{x,y+<k} ||^2
Length-normalised CHES replaces each sum by the mean over its tokens. High-CHES pairs are the
ones whose DPO training lowers log pi(y+).

Best-of-n (Beirami et al. 2024; Gao et al. 2023): KL(pi_bon || pi_ref) <= log n - (n-1)/n, and on
a finite response set the exact best-of-n distribution is pi_bon(y) = F(y)^n - F(y-)^n.
"""
import jax.numpy as jnp

from rlhf_jax.losses import _shapes


def _hidden_sums(hidden_chosen_BxTxD, chosen_mask_BxT, hidden_rejected_BxSxD, rejected_mask_BxS):
  _shapes.check_rank("hidden_chosen_BxTxD", hidden_chosen_BxTxD, 3)
  _shapes.check_rank("hidden_rejected_BxSxD", hidden_rejected_BxSxD, 3)
  _shapes.check_same_shape(hidden_chosen_BxT=hidden_chosen_BxTxD[..., 0], chosen_mask_BxT=chosen_mask_BxT)
  _shapes.check_same_shape(hidden_rejected_BxS=hidden_rejected_BxSxD[..., 0],
                           rejected_mask_BxS=rejected_mask_BxS)
  if (hidden_chosen_BxTxD.shape[0] != hidden_rejected_BxSxD.shape[0]
      or hidden_chosen_BxTxD.shape[2] != hidden_rejected_BxSxD.shape[2]):
    raise ValueError(
        f"hidden_chosen_BxTxD{tuple(hidden_chosen_BxTxD.shape)} and hidden_rejected_BxSxD"
        f"{tuple(hidden_rejected_BxSxD.shape)} must agree in B and D")
  m_pos = chosen_mask_BxT.astype(hidden_chosen_BxTxD.dtype)
  m_neg = rejected_mask_BxS.astype(hidden_rejected_BxSxD.dtype)
  sum_pos_BxD = jnp.einsum("btd,bt->bd", hidden_chosen_BxTxD, m_pos)
  sum_neg_BxD = jnp.einsum("bsd,bs->bd", hidden_rejected_BxSxD, m_neg)
  return sum_pos_BxD, jnp.sum(m_pos, 1), sum_neg_BxD, jnp.sum(m_neg, 1)


def _ches(pos_BxD, neg_BxD):
  return jnp.sum(pos_BxD * neg_BxD, axis=-1) - jnp.sum(pos_BxD * pos_BxD, axis=-1)


def ches_score(hidden_chosen_BxTxD, chosen_mask_BxT, hidden_rejected_BxSxD, rejected_mask_BxS):
  """CHES_x(y+, y-) = <sum h+, sum h-> - ||sum h+||^2 per pair (Razin et al. 2024); -> (B,).

  Args:
    hidden_chosen_BxTxD: hidden states predicting the chosen response's tokens, (B, T, D).
    chosen_mask_BxT: 1 on those positions, 0 on prompt/padding, (B, T).
    hidden_rejected_BxSxD, rejected_mask_BxS: the same for the rejected response (S may differ).
  """
  pos, _, neg, _ = _hidden_sums(hidden_chosen_BxTxD, chosen_mask_BxT, hidden_rejected_BxSxD,
                                rejected_mask_BxS)
  return _ches(pos, neg)


def normalized_ches_score(hidden_chosen_BxTxD, chosen_mask_BxT, hidden_rejected_BxSxD,
                          rejected_mask_BxS):
  """Length-normalised CHES: the sums of ches_score replaced by token means; -> (B,).

  An all-masked response counts as a zero mean (no NaN).
  """
  pos, n_pos, neg, n_neg = _hidden_sums(hidden_chosen_BxTxD, chosen_mask_BxT,
                                        hidden_rejected_BxSxD, rejected_mask_BxS)
  return _ches(pos / jnp.maximum(n_pos, 1.0)[:, None], neg / jnp.maximum(n_neg, 1.0)[:, None])


def best_of_n_kl_bound(n):
  """Upper bound log n - (n - 1)/n on KL(pi_bon || pi_ref) (Beirami et al. 2024); n >= 1."""
  n = jnp.asarray(n, jnp.float32)
  return jnp.log(n) - (n - 1.0) / n


def best_of_n_exact(p_ref_N, rewards_N, *, n: int):
  """Exact best-of-n distribution and KL(pi_bon || pi_ref) on a finite response set.

  Sort responses by (reward, index): TIE RULE, among equal rewards the response with the
  LARGER index ranks higher (the sampler keeps the tied sample with the larger index). With F
  the CDF of pi_ref in that order and y- the response just below y:
    pi_bon(y) = F(y)^n - F(y-)^n,   KL = sum_y pi_bon(y) log(pi_bon(y) / pi_ref(y)).
  Computed as -F(y)^n expm1(n log1p(-p(y)/F(y))) to avoid cancellation when p(y) << F(y).

  Args:
    p_ref_N: reference probabilities of the N responses (renormalised to sum 1), (N,).
    rewards_N: proxy rewards, (N,).
    n: number of samples, a python int >= 1.

  Returns:
    (kl, pi_bon_N).
  """
  if isinstance(n, int) and n < 1:
    raise ValueError(f"n must be >= 1, got {n}")
  _shapes.check_rank("p_ref_N", p_ref_N, 1)
  _shapes.check_same_shape(p_ref_N=p_ref_N, rewards_N=rewards_N)
  p_N = p_ref_N / jnp.sum(p_ref_N)
  order_N = jnp.argsort(rewards_N, stable=True)  # ascending; ties keep index order
  p_sorted = p_N[order_N]
  cdf = jnp.cumsum(p_sorted)
  safe_cdf = jnp.where(cdf > 0, cdf, 1.0)
  frac = jnp.clip(p_sorted / safe_cdf, 0.0, 1.0)
  bon_sorted = jnp.where(cdf > 0, -(safe_cdf ** n) * jnp.expm1(n * jnp.log1p(-frac)), 0.0)
  pi_bon_N = jnp.zeros_like(p_N).at[order_N].set(bon_sorted)
  positive = (pi_bon_N > 0) & (p_N > 0)
  log_ratio = jnp.log(jnp.where(positive, pi_bon_N, 1.0)) - jnp.log(jnp.where(positive, p_N, 1.0))
  kl = jnp.sum(jnp.where(positive, pi_bon_N * log_ratio, 0.0))
  return kl, pi_bon_N
