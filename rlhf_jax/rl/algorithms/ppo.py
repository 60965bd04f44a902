"""PPO for RLHF (InstructGPT stage 3) as an engine algorithm: KL-shaped per-token rewards, GAE
with a value head trained jointly with the policy, whitened advantages, clipped policy and
value losses, an optional adaptive KL coefficient and PPO-ptx.

  r_t = -kl_coef (log pi_old - log pi_ref) + [t = last] r(x, y)       (Ziegler et al. 2019)
  A, R = GAE(r, V) over the response (Schulman et al. 2016), A whitened over the rollout
  loss = clipped surrogate + vf_coef * clipped value loss - entropy_coef * entropy
         (+ ptx_coef * pretraining NLL: Ouyang et al. 2022 eq. 2)

Equations: docs/math.md, "PPO". params = {"policy": ..., "value": ...}, one optimizer over both.
"""
import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax.logprobs import shifted_logps
from rlhf_jax.losses import ppo as ppo_losses
from rlhf_jax.losses.sft import ptx_loss
from rlhf_jax.rl.loop import Iteration
from rlhf_jax.rl.rollout import Rollout, RolloutStage, policy_forward, shift_values
from rlhf_jax.rl.scorers import Scorer

BATCH_KEYS = ("tokens", "valid", "mask", "old_logps", "old_values", "advantages", "returns")
PTX_KEYS = ("ptx_tokens", "ptx_valid", "ptx_loss_mask")


def make_advantages_fn(gae_gamma: float, gae_lambda: float):
  """Returns jitted advantages(rollout, rewards_B, kl_coef) -> (batch, stats); kl_coef is
  traced, so an adaptive controller does not recompile.

  batch: BATCH_KEYS (all BxT) plus token_rewards; advantages whitened over the whole
  rollout's response tokens. stats: kl (row mean of sum_t (logp_old - logp_ref), what the
  adaptive controller reads), non_score_reward, score (mean r), kl_coef, truncated_frac,
  advantages_mean_raw, returns_mean."""
  @jax.jit
  def advantages(rollout: Rollout, rewards_B, kl_coef):
    n = rollout.sampler_logps_BxN.shape[1]
    resp = lambda x: x[:, -n:]  # the contiguous, right-padded response block
    mask = rollout.mask_BxT
    token_rewards = ppo_losses.rlhf_token_rewards(
        resp(rollout.old_logps_BxT), resp(rollout.ref_logps_BxT), rewards_B.astype(jnp.float32),
        resp(mask), kl_coef=kl_coef, truncated_B=rollout.truncated_B, truncation_penalty=0.0)
    adv, ret = ppo_losses.gae_advantages(
        token_rewards, resp(rollout.values_BxT), resp(mask), gae_gamma=gae_gamma,
        gae_lambda=gae_lambda, truncated_B=rollout.truncated_B,
        bootstrap_values_B=rollout.bootstrap_values_B)
    full = lambda x: jnp.pad(x, ((0, 0), (mask.shape[1] - n, 0)))
    token_rewards, adv, ret = full(token_rewards), full(adv), full(ret)
    kl_B = jnp.sum((rollout.old_logps_BxT - rollout.ref_logps_BxT) * mask, axis=1)
    n_tok = jnp.maximum(jnp.sum(mask), 1.0)
    stats = {"kl": jnp.mean(kl_B), "non_score_reward": -kl_coef * jnp.mean(kl_B),
             "score": jnp.mean(rewards_B), "kl_coef": kl_coef,
             "truncated_frac": jnp.mean(rollout.truncated_B.astype(jnp.float32)),
             "advantages_mean_raw": jnp.sum(adv * mask) / n_tok,
             "returns_mean": jnp.sum(ret * mask) / n_tok}
    batch = {"tokens": rollout.tokens_BxT, "valid": rollout.valid_BxT, "mask": mask,
             "old_logps": rollout.old_logps_BxT, "old_values": rollout.values_BxT,
             "advantages": ppo_losses.masked_whiten(adv, mask), "returns": ret,
             "token_rewards": token_rewards}
    return batch, stats

  return advantages


def ppo_loss_fn(policy_graphdef, value_graphdef, *, clip_eps: float, value_clip_eps: float,
                vf_coef: float, entropy_coef: float, temperature: float = 1.0):
  """loss_fn(params, batch, rng) -> (loss_sum, aux) in the step contract (train/step.py).

  loss_sum = sum_t [clipped surrogate + vf_coef * clipped value loss - entropy_coef * H_t]
  over response tokens; aux["denominator"] = response token count, and SUMS policy_loss,
  value_loss, clipfrac, approx_kl (k3 of KL(pi_old || pi)), entropy, ratio. temperature must
  match the sampler's, so the ratio starts at exactly 1."""
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


def with_ptx(loss_fn, graphdef, ptx_coef: float):
  """PPO-ptx: loss_sum + ptx_coef * mean pretraining NLL * (this microbatch's PPO token
  count), so after the step divides by the PPO token count the objective is
  PPO mean + ptx_coef * NLL mean (exact with one microbatch; with several, each microbatch's
  NLL mean is weighted by its share of response tokens)."""
  if ptx_coef == 0:
    return loss_fn

  def loss(params, batch, rng):
    loss_sum, aux = loss_fn(params, batch, rng)
    logits = nnx.merge(graphdef, params["policy"])(batch["ptx_tokens"],
                                                   valid_BxT=batch["ptx_valid"]).logits_BxTxV
    term, _ = ptx_loss(shifted_logps(logits.astype(jnp.float32), batch["ptx_tokens"]),
                       batch["ptx_loss_mask"], ptx_coef=ptx_coef)  # ptx_coef * mean NLL
    return loss_sum + term * aux["denominator"], {**aux, "ptx": term * aux["denominator"]}
  return loss


@dataclasses.dataclass(frozen=True)
class AdaptiveKL:
  """Ziegler et al. 2019's proportional controller towards `target` nats per sequence."""
  target: float
  horizon: int


@dataclasses.dataclass
class PPO:
  """Each iteration: batch_size prompts drawn with replacement by (seed, it), one response
  each from the policy, scored, turned into whitened GAE advantages; its rows are then
  shuffled by the same generator. ptx_iter: a resumable iterator of pretraining batches
  (tokens, valid, loss_mask), one per update, when ptx_coef > 0."""
  stage: RolloutStage  # group_size 1, with the reference and the value head
  scorer: Scorer
  prompts: Sequence[str]
  ref_params: object
  batch_size: int
  seed: int
  kl_coef: float
  gae_gamma: float = 1.0
  gae_lambda: float = 0.95
  adaptive_kl: AdaptiveKL | None = None
  ptx_iter: object = None
  progress_keys = ("score", "rollout_gold", "kl", "kl_coef")

  def __post_init__(self):
    self._advantages = make_advantages_fn(self.gae_gamma, self.gae_lambda)

  def collect(self, it: int, params) -> Iteration:
    rng = np.random.default_rng((self.seed, it))  # resume-exact prompt draws and shuffles
    prompts = list(rng.choice(self.prompts, self.batch_size))
    exp = self.stage.experience(params["policy"], self.ref_params, params["value"], prompts,
                                jax.random.fold_in(jax.random.key(self.seed), it))
    exp.rewards_B = self.scorer(exp)
    batch, stats = self._advantages(exp.rollout, exp.rewards_B, np.float32(self.kl_coef))
    return Iteration({k: batch[k] for k in BATCH_KEYS}, stats, rng, exp)

  def extend_minibatch(self, minibatch: dict) -> dict:
    if self.ptx_iter is None:
      return minibatch
    lm_batch = next(self.ptx_iter)
    return {**minibatch, "ptx_tokens": lm_batch["tokens"], "ptx_valid": lm_batch["valid"],
            "ptx_loss_mask": lm_batch["loss_mask"]}

  def finish_iteration(self, values: dict) -> dict:
    if self.adaptive_kl is not None:
      self.kl_coef = float(ppo_losses.adaptive_kl_update_horizon(
          self.kl_coef, values["kl"], kl_target=self.adaptive_kl.target,
          n_steps=self.batch_size, horizon=self.adaptive_kl.horizon))
    return values

  def state_dict(self) -> dict:
    out = {"kl_coef": self.kl_coef}
    if self.ptx_iter is not None:
      out["ptx"] = self.ptx_iter.get_state()
    return out

  def load_state_dict(self, data: dict) -> None:
    self.kl_coef = data["kl_coef"]
    if self.ptx_iter is not None:
      self.ptx_iter.set_state(data["ptx"])

  def batch_keys(self) -> tuple[str, ...]:
    return BATCH_KEYS + (PTX_KEYS if self.ptx_iter is not None else ())
