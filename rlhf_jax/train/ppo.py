"""PPO for RLHF as three pure, jit-compiled pieces (MATH.md stage 3).

  rollout    = make_rollout_fn(...)(policy, ref, value params, prompts, key)   sample + score
  batch, st  = make_advantages_fn(...)(rollout, rewards_B)                     r_t, GAE, whiten
  loss_fn    = ppo_loss_fn(...)                                                step contract

The sequence reward r_phi(x, y) comes from outside (a reward model, a gold reward, a toy
function), so the rollout never depends on the reward source. References: Ziegler et al.
2019 (KL-shaped per-token reward, adaptive KL), Stiennon et al. 2020 and Ouyang et al. 2022
(the RLHF PPO recipe), Schulman et al. 2016 (GAE) and 2017 (clipped surrogate).

Layout of every BxT array: T = P + N, the LEFT-padded prompt (P slots) followed by the
RIGHT-padded response (N = max_new_tokens slots), so response token j sits at column P + j
and the response block is contiguous. Alignment (the project's logprobs convention):
  logps_BxT[:, t]  = log pi(tokens[:, t] | tokens[:, <t])
  values_BxT[:, t] = V(s_t), s_t = tokens[:, <t], the state BEFORE token t is chosen: the
                     value head's output at column t - 1 (column 0 gets 0, never a target).
  mask_BxT         = 1 on response tokens (EOS included), 0 on prompt and padding.
So at every masked-in t, (values, logps, mask)[:, t] describe one action a_t in state s_t.
bootstrap_values_B = V(state after the last response token), the value head's output at the
last real column: GAE bootstraps truncated rows (no EOS) from it.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax.logprobs import shifted_entropy, shifted_logps
from rlhf_jax.losses import ppo as ppo_losses
from rlhf_jax.models.transformer import last_valid_index
from rlhf_jax.sampling import SamplingConfig, sample


class Rollout(NamedTuple):
  tokens_BxT: jax.Array  # int32 prompt (left-padded) + response (right-padded)
  valid_BxT: jax.Array  # bool, real tokens (prompt or response)
  mask_BxT: jax.Array  # float32, response tokens
  old_logps_BxT: jax.Array  # sampling policy, training forward, 0 off the mask
  ref_logps_BxT: jax.Array  # reference policy, 0 off the mask
  values_BxT: jax.Array  # V(s_t) (see module docstring), 0 off the mask
  bootstrap_values_B: jax.Array  # V(state after the last response token)
  truncated_B: jax.Array  # bool, no EOS within max_new_tokens
  sampler_logps_BxN: jax.Array  # the sampler's own log-probs (response slots)


def shift_values(head_BxT):
  """Value-head outputs (column t sees tokens <= t) -> V(s_t) at column t (0 at t = 0)."""
  return jnp.pad(head_BxT[:, :-1], ((0, 0), (1, 0)))


def _check_sampling(cfg: SamplingConfig):
  if cfg.greedy or cfg.top_k or cfg.top_p < 1.0:
    raise ValueError("PPO needs the training forward to reproduce the sampling distribution: "
                     "use temperature sampling without top-k/top-p/greedy")


def policy_forward(graphdef, params, tokens_BxT, valid_BxT, temperature: float):
  """(shifted logps BxT, shifted entropy BxT) under softmax(logits / temperature)."""
  logits = nnx.merge(graphdef, params)(tokens_BxT, valid_BxT=valid_BxT).logits_BxTxV
  logits = logits.astype(jnp.float32) / temperature
  return shifted_logps(logits, tokens_BxT), shifted_entropy(logits)


def make_rollout_fn(policy_graphdef, value_graphdef, sampling_cfg: SamplingConfig):
  """Returns jitted rollout(policy_params, ref_params, value_params, prompt_tokens_BxP,
  prompt_valid_BxP, key) -> Rollout. The reference shares the policy's graphdef. Prompts must
  be left-padded (each row's last slot real). Log-probs use the sampling temperature.
  """
  _check_sampling(sampling_cfg)
  temp = sampling_cfg.temperature

  @jax.jit
  def rollout(policy_params, ref_params, value_params, prompt_tokens_BxP, prompt_valid_BxP,
              key) -> Rollout:
    out = sample(policy_graphdef, policy_params, prompt_tokens_BxP, prompt_valid_BxP, key,
                 cfg=sampling_cfg)
    tokens = jnp.concatenate([prompt_tokens_BxP.astype(jnp.int32), out.tokens_BxN], axis=1)
    prompt_valid = prompt_valid_BxP.astype(bool)
    valid = jnp.concatenate([prompt_valid, out.mask_BxN.astype(bool)], axis=1)
    mask = jnp.concatenate([jnp.zeros_like(prompt_valid), out.mask_BxN.astype(bool)],
                           axis=1).astype(jnp.float32)
    old_logps, _ = policy_forward(policy_graphdef, policy_params, tokens, valid, temp)
    ref_logps, _ = policy_forward(policy_graphdef, ref_params, tokens, valid, temp)
    head = nnx.merge(value_graphdef, value_params)(tokens, valid_BxT=valid)
    boot = jnp.take_along_axis(head, last_valid_index(valid)[:, None], axis=1)[:, 0]
    return Rollout(tokens, valid, mask, old_logps * mask, ref_logps * mask,
                   shift_values(head) * mask, boot, ~out.finished_B, out.logps_BxN)

  return rollout


def make_advantages_fn(kl_coef: float, gae_gamma: float, gae_lambda: float,
                       truncation_penalty: float = 0.0):
  """Returns advantages(rollout, rewards_B, kl_coef=kl_coef) -> (batch, stats), jitted once
  (kl_coef is traced, so an adaptive controller does not recompile).

  r_t = -kl_coef (logp_old - logp_ref) + [t = last] (r_phi - truncation_penalty [truncated])
  (Ziegler 2019), GAE over the response block (Schulman 2016), advantages whitened over the
  whole rollout's response tokens. batch: the train microbatch pytree (all BxT / B arrays):
  tokens, valid, mask, old_logps, old_values, advantages, returns, token_rewards.
  stats (scalars): kl (mean over rows of sum_t (logp_old - logp_ref), what the adaptive KL
  controller reads), non_score_reward (row mean of the KL part of the return), score (mean
  r_phi), truncated_frac, advantages_mean_raw, returns_mean.
  """
  @jax.jit
  def _advantages(rollout: Rollout, rewards_B, kl_coef_):
    n = rollout.sampler_logps_BxN.shape[1]
    resp = lambda x: x[:, -n:]  # the contiguous, right-padded response block
    mask = rollout.mask_BxT
    token_rewards = ppo_losses.rlhf_token_rewards(
        resp(rollout.old_logps_BxT), resp(rollout.ref_logps_BxT), rewards_B.astype(jnp.float32),
        resp(mask), kl_coef=kl_coef_, truncated_B=rollout.truncated_B,
        truncation_penalty=truncation_penalty)
    adv, ret = ppo_losses.gae_advantages(
        token_rewards, resp(rollout.values_BxT), resp(mask), gae_gamma=gae_gamma,
        gae_lambda=gae_lambda, truncated_B=rollout.truncated_B,
        bootstrap_values_B=rollout.bootstrap_values_B)
    full = lambda x: jnp.pad(x, ((0, 0), (mask.shape[1] - n, 0)))
    token_rewards, adv, ret = full(token_rewards), full(adv), full(ret)
    kl_B = jnp.sum((rollout.old_logps_BxT - rollout.ref_logps_BxT) * mask, axis=1)
    n_tok = jnp.maximum(jnp.sum(mask), 1.0)
    stats = {"kl": jnp.mean(kl_B), "non_score_reward": -kl_coef_ * jnp.mean(kl_B),
             "score": jnp.mean(rewards_B), "kl_coef": kl_coef_,
             "truncated_frac": jnp.mean(rollout.truncated_B.astype(jnp.float32)),
             "advantages_mean_raw": jnp.sum(adv * mask) / n_tok,
             "returns_mean": jnp.sum(ret * mask) / n_tok}
    batch = {"tokens": rollout.tokens_BxT, "valid": rollout.valid_BxT, "mask": mask,
             "old_logps": rollout.old_logps_BxT, "old_values": rollout.values_BxT,
             "advantages": ppo_losses.masked_whiten(adv, mask), "returns": ret,
             "token_rewards": token_rewards}
    return batch, stats

  def advantages(rollout: Rollout, rewards_B, kl_coef=kl_coef):
    return _advantages(rollout, rewards_B, np.float32(kl_coef))

  return advantages


def ppo_loss_fn(policy_graphdef, value_graphdef, *, clip_eps: float, value_clip_eps: float,
                vf_coef: float, entropy_coef: float, temperature: float = 1.0):
  """The PPO loss in the step contract (train/step.py): loss_fn(params, batch, rng) ->
  (loss_sum, aux), params = {"policy": ..., "value": ...} (one optimizer over both).

  loss_sum = sum_t [clipped surrogate + vf_coef * clipped value loss - entropy_coef * H_t]
  over response tokens (Schulman 2017); aux["denominator"] = response token count, and SUMS
  policy_loss, value_loss, clipfrac, approx_kl (k3 of KL(pi_old || pi)), entropy, ratio.
  `batch` is the dict from make_advantages_fn (advantages already whitened over the rollout).
  temperature must match the sampler's, so the ratio starts at exactly 1.
  """
  def loss_fn(params, batch, rng):
    del rng
    tokens, valid, mask = batch["tokens"], batch["valid"], batch["mask"]
    logps, ent = policy_forward(policy_graphdef, params["policy"], tokens, valid, temperature)
    head = nnx.merge(value_graphdef, params["value"])(tokens, valid_BxT=valid)
    _, pm = ppo_losses.ppo_policy_loss(logps, batch["old_logps"], batch["advantages"], mask,
                                       clip_eps=clip_eps, normaliser=1.0)
    _, vm = ppo_losses.ppo_value_loss(shift_values(head), batch["old_values"], batch["returns"],
                                      mask, value_clip_eps=value_clip_eps, normaliser=1.0)
    _, em = ppo_losses.entropy_bonus(ent, mask, entropy_coef=entropy_coef, normaliser=1.0)
    loss_sum = (pm["policy_loss_sum"] + vf_coef * vm["value_loss_sum"]
                - entropy_coef * em["entropy_sum"])
    aux = {"denominator": pm["token_count"], "policy_loss": pm["policy_loss_sum"],
           "value_loss": vm["value_loss_sum"], "clipfrac": pm["clipfrac_sum"],
           "approx_kl": pm["approx_kl_sum"], "entropy": jax.lax.stop_gradient(em["entropy_sum"]),
           "ratio": pm["ratio_sum"]}
    return loss_sum, aux

  return loss_fn
