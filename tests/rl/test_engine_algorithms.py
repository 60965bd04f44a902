"""GSPO and REINFORCE++ as engine algorithms (rlhf_jax.rl.algorithms.gspo / reinforce_pp):
the step-contract losses against the pure losses on the policy's own log-probs, with the
response (GSPO) / token (REINFORCE++) count as denominator; REINFORCE++'s batch (KL-shaped
returns, batch whitening, optional group baseline) against a NumPy float64 reference; and
GroupSampling's prompt draws."""
import jax
import numpy as np
import pytest

import helpers
from rlhf_jax.losses import gspo as gspo_losses, reinforce_pp as rpp_losses
from rlhf_jax.rl import rollout as rollout_lib
from rlhf_jax.rl.algorithms import grpo, gspo, reinforce_pp
from rlhf_jax.sampling import SamplingConfig

CFG = helpers.nano(n_layers=1)
V = CFG.vocab_size
PAD, EOS = 0, 7
B, G, P, N = 2, 4, 5, 6
TEMP = 0.8  # the loss's forward must use it (a loss at temperature 1 would differ)


@pytest.fixture(scope="module")
def data():
  g, policy = helpers.make_model(CFG, seed=0, std=0.2)
  _, ref = helpers.make_model(CFG, seed=100, std=0.2)
  rng = np.random.default_rng(0)
  lengths = np.array([2, 5])
  valid = np.arange(P)[None] >= (P - lengths)[:, None]
  tokens = np.where(valid, rng.integers(8, V, (B, P)), PAD).astype(np.int32)
  scfg = SamplingConfig(max_new_tokens=N, eos_id=EOS, pad_id=PAD, temperature=TEMP)
  ro = rollout_lib.make_rollout_fn(g, scfg, group_size=G)(policy, ref, None, tokens, valid,
                                                          jax.random.key(1))
  batch = {k: np.array(v) for k, v in grpo.rollout_batch(
      ro, rng.standard_normal(B * G).astype(np.float32)).items()}
  # Old log-probs perturbed so ratios differ from 1; one response emptied (counts nowhere).
  batch["mask"][3] = 0.0
  batch["old_logps"] = (batch["old_logps"] + 0.05 * rng.standard_normal(
      batch["mask"].shape).astype(np.float32)) * batch["mask"]
  logps = np.asarray(jax.jit(lambda p: rollout_lib.policy_forward(
      g, p, batch["tokens"], batch["valid"], TEMP)[0])(policy))
  return g, policy, batch, logps


# Loss vs the pure loss: two float32 forwards of the log-probs (helpers.forward_terms) and
# the sums over the B·G x (P + N) tokens.
LOSS_TOL = helpers.f32_tol(helpers.forward_terms(CFG, P + N) + B * G * (P + N))


@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
def test_gspo_loss_fn_equals_pure_loss(data, kl_coef):
  g, policy, batch, logps = data
  batch = dict(batch)
  if kl_coef == 0:
    del batch["ref_logps"]
  clip = dict(clip_eps_low=0.01, clip_eps_high=0.015)
  loss_sum, aux = jax.jit(gspo.gspo_loss_fn(g, kl_coef=kl_coef, temperature=TEMP, **clip))(
      policy, batch, jax.random.key(0))
  want, m = gspo_losses.gspo_loss(logps, batch["old_logps"], batch.get("ref_logps"),
                                  batch["advantages"], batch["mask"], kl_coef=kl_coef, **clip)
  assert float(aux["denominator"]) == float(aux["count"]) == B * G - 1  # responses, not tokens
  assert float(aux["token_count"]) == batch["mask"].sum()
  np.testing.assert_allclose(float(loss_sum) / float(aux["denominator"]), float(want),
                             **LOSS_TOL)
  for k in ("policy_loss", "clipfrac", "ratio") + (("kl",) if kl_coef else ()):
    np.testing.assert_allclose(float(aux[k]), float(m[f"{k}_sum"]), **LOSS_TOL, err_msg=k)
  assert ("kl" in aux) == (kl_coef > 0)
  assert 0 < float(aux["clipfrac"]) < B * G - 1  # some responses clip, not all
  if kl_coef == 0:
    with pytest.raises(ValueError, match="ref_logps"):
      gspo.gspo_loss_fn(g, kl_coef=0.1, **clip)(policy, batch, None)


def test_reinforce_pp_loss_fn_equals_pure_loss(data):
  g, policy, batch, logps = data
  rng = np.random.default_rng(2)
  batch = dict(batch, advantages=(rng.standard_normal(batch["mask"].shape)
                                  * batch["mask"]).astype(np.float32))
  del batch["ref_logps"]
  loss_sum, aux = jax.jit(reinforce_pp.reinforce_pp_loss_fn(g, clip_eps=0.04,
                                                            temperature=TEMP))(
      policy, batch, jax.random.key(0))
  want, m = rpp_losses.reinforce_pp_loss(logps, batch["old_logps"], batch["advantages"],
                                         batch["mask"], clip_eps=0.04)
  assert float(aux["denominator"]) == float(aux["token_count"]) == batch["mask"].sum()
  np.testing.assert_allclose(float(loss_sum) / float(aux["denominator"]), float(want),
                             **LOSS_TOL)
  for k in ("policy_loss", "clipfrac", "approx_kl", "ratio"):
    np.testing.assert_allclose(float(aux[k]), float(m[f"{k}_sum"]), **LOSS_TOL, err_msg=k)
  assert 0 < float(aux["clipfrac"]) < float(aux["token_count"])


def rpp_rollout(with_ref=True):
  """B=4 rows (2 groups of 2), P=3 left-padded prompt slots, N=5 right-padded response
  slots with lengths 5, 2, 1, 4; random log-probs (0 off the mask)."""
  rng = np.random.default_rng(3)
  b, p, n = 4, 3, 5
  prompt = np.arange(p)[None] >= (p - np.array([3, 1, 2, 2]))[:, None]
  resp = np.arange(n)[None] < np.array([5, 2, 1, 4])[:, None]
  mask = np.concatenate([np.zeros_like(prompt), resp], 1).astype(np.float32)
  z = lambda: (rng.normal(size=mask.shape) * mask - 2 * mask).astype(np.float32)
  return rollout_lib.Rollout(
      tokens_BxT=np.where(np.concatenate([prompt, resp], 1), 9, PAD).astype(np.int32),
      valid_BxT=np.concatenate([prompt, resp], 1), mask_BxT=mask, old_logps_BxT=z(),
      ref_logps_BxT=z() if with_ref else None, values_BxT=None, bootstrap_values_B=None,
      truncated_B=np.array([True, False, False, False]),
      sampler_logps_BxN=np.zeros((b, n), np.float32))


def np_reinforce_pp(ro, rewards, *, kl_coef, gamma, group_size):
  """REINFORCE++ from its equations, float64: token rewards, returns, batch whitening."""
  f = lambda x: np.asarray(x, np.float64)
  mask, old = f(ro.mask_BxT), f(ro.old_logps_BxT)
  ref = old if ro.ref_logps_BxT is None else f(ro.ref_logps_BxT)
  r_B = f(rewards)
  if group_size:
    r_B = r_B - np.repeat(r_B.reshape(-1, group_size).mean(1), group_size)
  ret = np.zeros_like(mask)
  for b in range(mask.shape[0]):
    cols = np.nonzero(mask[b])[0]
    r = {t: -kl_coef * (old[b, t] - ref[b, t]) for t in cols}
    r[cols[-1]] += r_B[b]
    for t in cols:
      ret[b, t] = sum(gamma ** (s - t) * r[s] for s in cols if s >= t)
  sel = mask > 0
  return np.where(sel, (ret - ret[sel].mean()) / np.sqrt(ret[sel].var() + 1e-8), 0.0)


@pytest.mark.parametrize("kl_coef, gamma, group_size, with_ref", [
    (0.3, 1.0, None, True), (0.3, 1.0, 2, True), (0.3, 0.9, None, True),
    (0.0, 1.0, None, False), (0.0, 1.0, 2, False)])
def test_reinforce_pp_batch_matches_numpy(kl_coef, gamma, group_size, with_ref):
  ro = rpp_rollout(with_ref)
  rewards = np.array([1.0, -0.5, 2.0, 0.25], np.float32)
  make_batch = reinforce_pp.reinforce_pp_batch_fn(kl_coef=kl_coef, gamma=gamma,
                                                  group_size=group_size)
  batch, stats = make_batch(ro, rewards)
  want = np_reinforce_pp(ro, rewards, kl_coef=kl_coef, gamma=gamma, group_size=group_size)
  adv = np.asarray(batch["advantages"])
  # Token rewards (4 roundings), an N-term return, the batch mean / variance over the
  # B·T tokens and 3 roundings of the whitening; advantages are unit-scale.
  t = ro.mask_BxT.shape[1]
  np.testing.assert_allclose(adv, want, **helpers.f32_tol(4 + N + 2 * 4 * t + 3))
  assert not adv[:, :3].any()  # prompt columns carry no advantage
  assert not adv[np.asarray(ro.mask_BxT) == 0].any()  # nor padding
  for k, f in (("tokens", "tokens_BxT"), ("valid", "valid_BxT"), ("mask", "mask_BxT"),
               ("old_logps", "old_logps_BxT")):
    np.testing.assert_array_equal(batch[k], getattr(ro, f), err_msg=k)
  assert set(batch) == {"tokens", "valid", "mask", "old_logps", "advantages"}
  mask = np.asarray(ro.mask_BxT)
  np.testing.assert_allclose(stats["advantages_abs_mean"], np.abs(want).sum() / mask.sum(),
                             **helpers.f32_tol(4 * t + 2 * 4 * t + 3))


def test_reinforce_pp_group_baseline_changes_advantages():
  """Can fail: the baseline variant is not the plain one (group means 0.25 and 1.125)."""
  ro, rewards = rpp_rollout(), np.array([1.0, -0.5, 2.0, 0.25], np.float32)
  plain, _ = reinforce_pp.reinforce_pp_batch_fn(kl_coef=0.3)(ro, rewards)
  base, _ = reinforce_pp.reinforce_pp_batch_fn(kl_coef=0.3, group_size=2)(ro, rewards)
  assert np.abs(np.asarray(plain["advantages"]) - np.asarray(base["advantages"])).max() > 0.1
  with pytest.raises(ValueError, match="group_size=3"):
    reinforce_pp.reinforce_pp_batch_fn(kl_coef=0.3, group_size=3)(ro, rewards)


def sampler(seed=3, batch_size=6, n_prompts=20):
  return grpo.GroupSampling(stage=None, scorer=None, prompts=[f"p{i}" for i in range(n_prompts)],
                            ref_params=None, batch_size=batch_size, seed=seed, make_batch=None)


def test_group_sampling_draws():
  a, b = sampler(), sampler()
  later = a.draw(4, 2)  # draw order does not matter: each draw has its own generator
  assert [a.draw(4, 0), a.draw(4, 1)] == [b.draw(4, 0), b.draw(4, 1)] and later == b.draw(4, 2)
  draws = [a.draw(it, r) for it in range(3) for r in range(3)]
  for d in draws:
    assert len(d) == 6 and len(set(d)) == 6 and set(d) <= set(a.prompts)  # distinct prompts
  assert len({tuple(d) for d in draws}) == len(draws)  # rounds and iterations differ
  assert sampler(seed=4).draw(0) != a.draw(0)  # the seed matters
  assert sampler(batch_size=20).draw(0) != a.prompts  # a full draw is still shuffled
  with pytest.raises(ValueError):
    sampler(batch_size=21).draw(0)  # more prompts than exist: no repeats possible
