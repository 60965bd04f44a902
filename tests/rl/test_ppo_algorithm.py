"""PPO (rlhf_jax.rl.algorithms.ppo and the rollout stage with a value head): rollout alignment, KL-shaped rewards + GAE against a
NumPy float64 reference, ratio exactly 1 at step 0, compile-once iterations, and a toy reward
that PPO raises."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import helpers
from rlhf_jax.compile_count import CompileCounter
from rlhf_jax.models.transformer import ScalarHeadModel
from rlhf_jax.sampling import SamplingConfig
from rlhf_jax.rl import rollout as rollout_lib, scorers
from rlhf_jax.rl.algorithms import ppo
from rlhf_jax.train import step
from rlhf_jax.train.state import init_train_state

CFG = helpers.nano(n_layers=1)
V = CFG.vocab_size
PAD, EOS = 0, 7
B, P, N = 4, 5, 6
SCFG = SamplingConfig(max_new_tokens=N, eos_id=EOS, pad_id=PAD)
# Training-forward log-probs vs the sampler's (another float32 forward): helpers.f32_tol.
LOGP_TOL = helpers.f32_tol(helpers.forward_terms(CFG, seq_len=P + N))
LOSS_KW = dict(clip_eps=0.2, value_clip_eps=0.2, vf_coef=0.5, entropy_coef=0.01)


def models(seed=0, std=0.2):
  pg, policy = helpers.make_model(CFG, seed=seed, std=std)
  _, ref = helpers.make_model(CFG, seed=seed + 100, std=std)
  vg, value = helpers.init_module(lambda rngs: ScalarHeadModel(CFG, rngs=rngs), seed + 200, 0.2)
  return pg, policy, ref, vg, value


def prompts(seed, b=B, p=P):
  """Left-padded prompts of lengths 1..p."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, p + 1, b)
  lengths[0] = 1  # a one-token prompt: V(s_P) is read at its only token
  valid = np.arange(p)[None, :] >= (p - lengths)[:, None]
  tokens = np.where(valid, rng.integers(1, V, (b, p)), PAD).astype(np.int32)
  return tokens, valid


@pytest.fixture(scope="module")
def rollout_data():
  pg, policy, ref, vg, value = models()
  rollout_fn = rollout_lib.make_rollout_fn(pg, SCFG, value_graphdef=vg)
  tokens, valid = prompts(0)
  ro = rollout_fn(policy, ref, value, tokens, valid, jax.random.key(3))
  return pg, policy, ref, vg, value, ro


def test_rollout_layout_and_old_logps_equal_sampler(rollout_data):
  *_, ro = rollout_data
  mask = np.asarray(ro.mask_BxT)
  assert mask.shape == (B, P + N) and not mask[:, :P].any() and mask[:, P].all()
  # Training-forward logps of the sampled tokens == the sampler's (temperature 1).
  np.testing.assert_allclose(ro.old_logps_BxT[:, P:], ro.sampler_logps_BxN, **LOGP_TOL)
  assert np.abs(np.asarray(ro.old_logps_BxT)[mask > 0]).min() > 0  # real scores, not zeros
  assert np.abs(np.asarray(ro.old_logps_BxT - ro.ref_logps_BxT)).max() > 1e-3  # ref differs
  np.testing.assert_array_equal(ro.truncated_B, ~(np.asarray(ro.tokens_BxT) == EOS).any(1))


def test_value_alignment(rollout_data):
  # Hand example: head output at column t sees tokens <= t, so V(s_t) = head[t - 1].
  np.testing.assert_array_equal(rollout_lib.shift_values(jnp.array([[1., 2., 3., 4.]])), [[0, 1, 2, 3]])
  # On the rollout: V(s_{P+j}) is the value model run on the prefix tokens[:, :P+j] alone,
  # read at its last column; the bootstrap value reads the whole row's last real token.
  _, _, _, vg, value, ro = rollout_data
  apply = jax.jit(lambda p, t, v: nnx.merge(vg, p)(t, valid_BxT=v))
  tokens, valid = np.asarray(ro.tokens_BxT), np.asarray(ro.valid_BxT)
  full = np.asarray(apply(value, tokens, valid))
  tol = helpers.logits_tol(CFG, P + N, full)  # value forwards of other lengths: rounding only
  for j in (0, 2):
    prefix = apply(value, tokens[:, :P + j], valid[:, :P + j])
    live = np.asarray(ro.mask_BxT)[:, P + j] > 0
    np.testing.assert_allclose(np.asarray(ro.values_BxT)[live, P + j],
                               np.asarray(prefix)[live, -1], **tol)
  last = valid.shape[1] - 1 - np.argmax(valid[:, ::-1], axis=1)
  np.testing.assert_allclose(ro.bootstrap_values_B, full[np.arange(B), last], **tol)


def numpy_advantages(ro, rewards_B, *, kl_coef, gamma, lam, penalty):
  """Token rewards, GAE and whitening written directly in float64 (Ziegler 2019, Schulman 2016)."""
  f = lambda x: np.asarray(x, np.float64)
  mask, old, ref, val = f(ro.mask_BxT), f(ro.old_logps_BxT), f(ro.ref_logps_BxT), f(ro.values_BxT)
  trunc, boot = np.asarray(ro.truncated_B), f(ro.bootstrap_values_B)
  r = np.zeros_like(mask); adv = np.zeros_like(mask); ret = np.zeros_like(mask)
  for b in range(mask.shape[0]):
    cols = np.nonzero(mask[b])[0]
    for t in cols:
      r[b, t] = -kl_coef * (old[b, t] - ref[b, t])
    r[b, cols[-1]] += rewards_B[b] - penalty * trunc[b]
    next_v, a = (boot[b] if trunc[b] else 0.0), 0.0
    for t in cols[::-1]:
      delta = r[b, t] + gamma * next_v - val[b, t]
      a = delta + gamma * lam * a
      adv[b, t], ret[b, t], next_v = a, a + val[b, t], val[b, t]
  sel = mask > 0
  white = np.where(sel, (adv - adv[sel].mean()) / np.sqrt(adv[sel].var() + 1e-8), 0.0)
  return r, white, ret


def hand_rollout():
  """B=3, P=2, N=5 with lengths 5 (truncated), 3 and 1 (EOS), random logps and values."""
  rng = np.random.default_rng(1)
  b, p, n = 3, 2, 5
  lengths = np.array([5, 3, 1])
  mask = np.concatenate([np.zeros((b, p)), np.arange(n)[None] < lengths[:, None]], 1)
  z = lambda: (rng.normal(size=(b, p + n)) * mask).astype(np.float32)
  return rollout_lib.Rollout(
      tokens_BxT=np.ones((b, p + n), np.int32), valid_BxT=mask > 0, mask_BxT=mask.astype(np.float32),
      old_logps_BxT=z() - 2, ref_logps_BxT=z() - 2, values_BxT=z(),
      bootstrap_values_B=rng.normal(size=b).astype(np.float32),
      truncated_B=np.array([True, False, False]), sampler_logps_BxN=np.zeros((b, n), np.float32))


@pytest.mark.parametrize("source", ["hand", "sampled"])
def test_advantages_match_numpy(source, rollout_data):
  ro = hand_rollout() if source == "hand" else rollout_data[-1]
  rewards = np.linspace(-1.0, 2.0, ro.mask_BxT.shape[0]).astype(np.float32)
  kw = dict(kl_coef=0.3, gamma=0.9, lam=0.8, penalty=0.5)
  fn = ppo.make_advantages_fn(0.9, 0.8)
  # The truncation penalty is the scorer's (scorers.Penalised), applied before the advantages.
  exp = rollout_lib.Experience(ro, [], [], 1)
  penalised = scorers.Penalised(lambda e: rewards, truncation_penalty=0.5)(exp)
  batch, stats = fn(ro, penalised, np.float32(0.3))
  r, adv, ret = numpy_advantages(ro, rewards, **kw)
  # Token rewards: r - kl_coef·(old - ref) (+ penalty), 4 roundings at the logps' size. GAE
  # and returns: 3 roundings per step of the backward recursion over the T columns, at the
  # size of the rewards and values (helpers.f32_tol).
  t = ro.mask_BxT.shape[1]
  size = max(np.abs(np.asarray(ro.old_logps_BxT)).max(), np.abs(np.asarray(ro.values_BxT)).max(),
             np.abs(rewards).max())
  np.testing.assert_allclose(batch["token_rewards"], r, **helpers.f32_tol(4, scale=size))
  gae_tol = helpers.f32_tol(4 + 3 * t, scale=size)
  np.testing.assert_allclose(batch["returns"], ret, **gae_tol)
  np.testing.assert_allclose(batch["advantages"], adv, **gae_tol)
  mask = np.asarray(ro.mask_BxT)
  kl_B = ((np.asarray(ro.old_logps_BxT, np.float64) - ro.ref_logps_BxT) * mask).sum(1)
  np.testing.assert_allclose(stats["kl"], kl_B.mean(), rtol=1e-5, atol=1e-6)
  # kl_coef is traced: a new coefficient changes the rewards (and does not recompile).
  batch2, _ = fn(ro, penalised, np.float32(0.0))
  r0, _, _ = numpy_advantages(ro, rewards, **{**kw, "kl_coef": 0.0})
  np.testing.assert_allclose(batch2["token_rewards"], r0, **helpers.f32_tol(4, scale=size))


def test_step0_ratio_is_one(rollout_data):
  pg, policy, ref, vg, value, ro = rollout_data
  batch, _ = ppo.make_advantages_fn(1.0, 0.95)(ro, jnp.arange(B, dtype=jnp.float32),
                                                   np.float32(0.1))
  loss_fn = jax.jit(ppo.ppo_loss_fn(pg, vg, **LOSS_KW))
  loss_sum, aux = loss_fn({"policy": policy, "value": value}, batch, None)
  n = float(aux["denominator"])
  assert n == float(np.asarray(ro.mask_BxT).sum()) > 0
  assert float(aux["clipfrac"]) == 0.0
  # old and new log-probs differ only by float32 rounding, |d| <= dmax (LOGP_TOL); then
  # k3 = (e^d - 1) - d ~ d^2 / 2 plus 3 roundings at size 1, and the ratio e^d ~ 1 + d.
  old = np.asarray(ro.old_logps_BxT)
  dmax = LOGP_TOL["atol"] + LOGP_TOL["rtol"] * np.abs(old).max()
  assert abs(float(aux["approx_kl"]) / n) <= 3 * helpers.F32_EPS + dmax ** 2 / 2
  np.testing.assert_allclose(float(aux["ratio"]) / n, 1.0, rtol=0, atol=dmax + helpers.F32_EPS)
  # Can fail: against the reference policy the ratio is not 1.
  _, aux_ref = loss_fn({"policy": ref, "value": value}, batch, None)
  assert float(aux_ref["approx_kl"]) / n > 1e-3


TOY_B, TOY_P, TOY_N = 16, 3, 8


@pytest.fixture(scope="module")
def toy():
  """(fresh_state(), iteration(state, key, tokens, valid) -> (state, rewards_B, metrics)):
  one PPO iteration = rollout -> toy reward -> advantages -> 2 compiled train steps."""
  pg, policy, ref, vg, value = models(1, std=0.1)
  scfg = SamplingConfig(max_new_tokens=TOY_N, eos_id=V, pad_id=PAD)  # EOS never sampled
  rollout_fn = rollout_lib.make_rollout_fn(pg, scfg, value_graphdef=vg)
  adv_fn = ppo.make_advantages_fn(1.0, 0.95)
  opt = optax.adam(3e-2)
  train_step = step.compile_train_step(step.make_train_step(
      ppo.ppo_loss_fn(pg, vg, **LOSS_KW), opt, num_microbatches=2))
  # Toy reward: +1 per response token in the lower quarter of the vocabulary.
  reward_fn = jax.jit(
      lambda ro: jnp.sum((ro.tokens_BxT[:, TOY_P:] < V // 4) * ro.mask_BxT[:, TOY_P:], 1))

  def fresh_state():
    params = jax.tree.map(np.array, {"policy": policy, "value": value})  # own buffers: donated
    return init_train_state(params, opt, jax.random.key(0))

  def iteration(state, key, tokens, valid):
    ro = rollout_fn(state.params["policy"], ref, state.params["value"], tokens, valid, key)
    rewards = reward_fn(ro)
    batch, _ = adv_fn(ro, rewards, np.float32(0.01))
    for _ in range(2):
      state, metrics = train_step(state, batch)
    return state, rewards, metrics

  return fresh_state, iteration


def test_second_iteration_compiles_nothing(toy):
  fresh_state, iteration = toy
  state = fresh_state()
  keys = [jax.random.key(i) for i in range(2)]
  (t0, v0), (t1, v1) = prompts(10, TOY_B, TOY_P), prompts(11, TOY_B, TOY_P)
  state, _, m = iteration(state, keys[0], t0, v0)
  jax.block_until_ready(m)
  with CompileCounter() as cc:
    state, _, m = iteration(state, keys[1], t1, v1)  # new prompts, same shapes
    jax.block_until_ready(m)
  assert cc.count == 0, cc.names
  assert int(state.step) == 4 and np.isfinite(float(m["loss"]))


def test_ppo_raises_toy_reward(toy):
  fresh_state, iteration = toy
  state = fresh_state()
  tokens, valid = prompts(20, TOY_B, TOY_P)
  means = []
  for i in range(6):
    state, rewards, _ = iteration(state, jax.random.key(100 + i), tokens, valid)
    means.append(float(np.mean(rewards)))
  # A uniform-ish policy scores ~N/4 = 2; seeded PPO reaches > 5 by iteration 5.
  assert np.mean(means[-2:]) > means[0] + 1.5, means
