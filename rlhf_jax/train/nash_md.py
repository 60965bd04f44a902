"""Nash-MD-PG (Munos et al. 2024, deep form) as pure, jit-compiled pieces (MATH.md, Nash
learning from human feedback):

  rollout  = make_rollout_fn(...)(policy, ref params, prompts, key, mixture_coef)
             y ~ pi_theta and an opponent y' ~ pi_mix, the token-level geometric mixture
             pi_mix ∝ pi_theta^(1 - a) mu^a with a = mixture_coef = eta * nash_tau
             (sampling.sample_mixture), plus log mu(y) for the KL term
  judge    (outside: a pairwise preference model, or the simulated raters) p = P(y > y' | x)
  loss_fn  = nash_md_loss_fn(...)   losses.nash_md.nash_md_pg_loss in the step contract:
             -sg(p - 1/2 - b) log pi(y) + nash_tau (sg(kl) log pi(y) + kl),
             kl = sum_t kl_fn(log pi, log mu) over y's tokens

The preference comes from outside (like PPO's reward), so the rollout never depends on the
judge. Layout of every BxT array as in train/ppo.py: the LEFT-padded prompt (P slots), then
the RIGHT-padded response (N = max_new_tokens slots); logps[:, t] scores token t.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.losses import nash_md as nash_losses
from rlhf_jax.sampling import SamplingConfig, sample, sample_mixture
from rlhf_jax.train.ppo import policy_forward


class PolicySample(NamedTuple):
  """y ~ pi with its log-probs under pi and mu (what the loss and the KL report need)."""
  tokens_BxT: jax.Array  # int32 prompt (left-padded) + response (right-padded)
  valid_BxT: jax.Array  # bool
  mask_BxT: jax.Array  # float32, response tokens (EOS included)
  logps_BxT: jax.Array  # log pi at sampling time, training forward, 0 off the mask
  ref_logps_BxT: jax.Array  # log mu, 0 off the mask
  finished_B: jax.Array  # bool, emitted EOS


class Rollout(NamedTuple):
  policy: PolicySample
  opponent_tokens_BxN: jax.Array  # y' ~ pi_mix, right-padded response slots
  opponent_mask_BxN: jax.Array
  opponent_finished_B: jax.Array


def _check_sampling(cfg: SamplingConfig):
  if cfg.greedy or cfg.top_k or cfg.top_p < 1.0:
    raise ValueError("Nash-MD-PG's policy gradient needs the training forward to reproduce the "
                     "sampling distribution: temperature sampling without top-k/top-p/greedy")


def _policy_sample(graphdef, policy_params, ref_params, prompt_tokens_BxP, prompt_valid_BxP,
                   key, cfg: SamplingConfig) -> PolicySample:
  out = sample(graphdef, policy_params, prompt_tokens_BxP, prompt_valid_BxP, key, cfg=cfg)
  tokens = jnp.concatenate([prompt_tokens_BxP.astype(jnp.int32), out.tokens_BxN], axis=1)
  prompt_valid = prompt_valid_BxP.astype(bool)
  valid = jnp.concatenate([prompt_valid, out.mask_BxN.astype(bool)], axis=1)
  mask = jnp.concatenate([jnp.zeros_like(prompt_valid), out.mask_BxN.astype(bool)],
                         axis=1).astype(jnp.float32)
  logps, _ = policy_forward(graphdef, policy_params, tokens, valid, cfg.temperature)
  ref_logps, _ = policy_forward(graphdef, ref_params, tokens, valid, cfg.temperature)
  return PolicySample(tokens, valid, mask, logps * mask, ref_logps * mask, out.finished_B)


def make_sample_fn(graphdef, sampling_cfg: SamplingConfig):
  """jitted (policy_params, ref_params, prompt_tokens_BxP, prompt_valid_BxP, key) ->
  PolicySample: the evaluation's samples (no opponent)."""
  _check_sampling(sampling_cfg)
  return jax.jit(lambda p, r, t, v, k: _policy_sample(graphdef, p, r, t, v, k, sampling_cfg))


def make_rollout_fn(graphdef, sampling_cfg: SamplingConfig):
  """jitted rollout(policy_params, ref_params, prompt_tokens_BxP, prompt_valid_BxP, key,
  mixture_coef) -> Rollout. The reference shares the policy's graphdef; mixture_coef is
  traced. y and y' use independent keys."""
  _check_sampling(sampling_cfg)

  @jax.jit
  def rollout(policy_params, ref_params, prompt_tokens_BxP, prompt_valid_BxP, key,
              mixture_coef) -> Rollout:
    key_y, key_opp = jax.random.split(key)
    ps = _policy_sample(graphdef, policy_params, ref_params, prompt_tokens_BxP,
                        prompt_valid_BxP, key_y, sampling_cfg)
    opp = sample_mixture(graphdef, policy_params, ref_params, prompt_tokens_BxP,
                         prompt_valid_BxP, key_opp, mixture_coef, cfg=sampling_cfg)
    return Rollout(ps, opp.tokens_BxN, opp.mask_BxN, opp.finished_B)

  return rollout


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
  """The Nash-MD-PG loss in the step contract: loss_fn(params, batch, rng) -> (loss_sum, aux).

  batch: tokens, valid, mask (BxT, as PolicySample), ref_logps BxT, preferences_B
  (P(y > y' | x)), baseline_B (subtracted from p - 1/2; zeros for none).
  loss_sum = sum over sequences of nash_md_pg_loss's per-sequence loss; aux: denominator
  (sequences), score (sum of p - 1/2), kl (sum of per-sequence KL estimates), tokens.
  temperature must match the sampler's (the log-probs of the sampled distribution).
  """
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
