"""The group family (rlhf_jax.rl.algorithms.grpo, the rollout stage with groups) and the pass@k estimator (rlhf_jax.evaluation):
group rollout layout and prefix sharing, no reference forward at kl_coef 0, advantages and
group statistics, the step-contract loss for every aggregation against a NumPy float64
reference, exact gradient accumulation, and pass@k against brute-force enumeration."""
import itertools
import math

import jax
import numpy as np
import optax
import pytest

import helpers
from rlhf_jax.compile_count import CompileCounter
from rlhf_jax.evaluation import pass_at_k
from rlhf_jax.sampling import SamplingConfig
from rlhf_jax.rl import rollout as rollout_lib
from rlhf_jax.rl.algorithms import grpo
from rlhf_jax.train import step
from rlhf_jax.train.state import init_train_state

CFG = helpers.nano(n_layers=1)
V = CFG.vocab_size
PAD, EOS = 0, 7
B, G, P, N = 2, 4, 5, 6  # prompts, group size, prompt slots, new tokens
SCFG = SamplingConfig(max_new_tokens=N, eos_id=EOS, pad_id=PAD)


def group_rollout_fn(g, *, with_ref):
  """rollout(policy, ref, tokens, valid, key) of G samples per prompt, no value head."""
  fn = rollout_lib.make_rollout_fn(g, SCFG, group_size=G, with_ref=with_ref)
  return lambda policy, ref, tokens, valid, key: fn(policy, ref, None, tokens, valid, key)


def prompts(seed, b=B, p=P):
  """Left-padded prompts of lengths 2..p."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(2, p + 1, b)
  valid = np.arange(p)[None, :] >= (p - lengths)[:, None]
  return np.where(valid, rng.integers(8, V, (b, p)), PAD).astype(np.int32), valid


@pytest.fixture(scope="module")
def models():
  g, policy = helpers.make_model(CFG, seed=0, std=0.2)
  _, ref = helpers.make_model(CFG, seed=100, std=0.2)
  return g, policy, ref


@pytest.fixture(scope="module")
def rollout(models):
  g, policy, ref = models
  tokens, valid = prompts(0)
  fn = group_rollout_fn(g, with_ref=True)
  return tokens, valid, fn(policy, ref, tokens, valid, jax.random.key(3))


def test_rollout_layout(rollout):
  tokens, valid, ro = rollout
  t = np.asarray(ro.tokens_BxT)
  mask = np.asarray(ro.mask_BxT)
  assert t.shape == (B * G, P + N) and not mask[:, :P].any() and mask[:, P].all()
  # Prompt-major groups: rows i*G..i*G+G-1 all continue prompt i.
  np.testing.assert_array_equal(t[:, :P], np.repeat(tokens, G, 0))
  np.testing.assert_array_equal(np.asarray(ro.valid_BxT)[:, :P], np.repeat(valid, G, 0))
  assert len({tuple(r) for r in t[:G, P:]}) > 1  # the group's samples differ
  # Training-forward logps of the sampled tokens == the sampler's (temperature 1).
  # Training forward vs the sampler's: two float32 forwards (helpers.f32_tol).
  np.testing.assert_allclose(ro.old_logps_BxT[:, P:], ro.sampler_logps_BxN,
                             **helpers.f32_tol(helpers.forward_terms(CFG, seq_len=P + N)))
  assert np.abs(np.asarray(ro.old_logps_BxT - ro.ref_logps_BxT)).max() > 1e-3
  np.testing.assert_array_equal(ro.truncated_B, ~(t[:, P:] == EOS).any(1))


def _dot_shapes(jaxpr) -> list:
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      out += [tuple(v.aval.shape) for v in eqn.outvars]
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
          out += _dot_shapes(sub.jaxpr)
        elif hasattr(sub, "eqns"):
          out += _dot_shapes(sub)
  return out


def test_no_reference_forward_without_kl(models):
  """with_ref=False: the traced rollout holds one full-sequence forward (the policy's), not
  two; the rollout has no ref_logps and the batch no "ref_logps"."""
  g, policy, ref = models
  tokens, valid = prompts(1)
  key = jax.random.key(0)
  counts = {}
  for with_ref, r in ((True, ref), (False, None)):
    fn = group_rollout_fn(g, with_ref=with_ref)
    jaxpr = jax.make_jaxpr(lambda p, rp: fn(p, rp, tokens, valid, key))(policy, r)
    # The LM head of a full forward over B*G rows x (P + N) columns, run on the P + N - 1
    # positions that predict a token (logprobs.next_token_logits).
    counts[with_ref] = _dot_shapes(jaxpr.jaxpr).count((B * G * (P + N - 1), V))
  assert counts == {True: 2, False: 1}
  ro = group_rollout_fn(g, with_ref=False)(policy, None, tokens, valid, key)
  assert ro.ref_logps_BxT is None
  assert "ref_logps" not in grpo.rollout_batch(ro, np.zeros(B * G, np.float32))
  with pytest.raises(ValueError, match="ref_params"):
    group_rollout_fn(g, with_ref=False)(policy, ref, tokens, valid, key)


def np_advantages(r, estimator, ddof=0, eps=0.0):
  r = np.asarray(r, np.float64)
  out = np.zeros_like(r)
  for i, row in enumerate(r):
    if estimator == "grpo":
      std = np.std(row, ddof=ddof)
      out[i] = 0.0 if np.all(row == row[0]) else (row - row.mean()) / (std + eps)
    elif estimator == "dr_grpo":
      out[i] = row - row.mean()
    else:
      out[i] = [row[j] - np.mean(np.delete(row, j)) for j in range(len(row))]
  return out


@pytest.mark.parametrize("estimator, ddof, eps", [("grpo", 0, 0.0), ("grpo", 1, 1e-4),
                                                  ("dr_grpo", 0, 0.0), ("rloo", 0, 0.0)])
def test_group_advantages_and_stats(estimator, ddof, eps):
  rewards = np.array([1, 0, 1, 0, 1, 1, 1, 1, 0, 0, 0, 1], np.float32)  # 3 groups of 4
  fn = grpo.make_group_advantages_fn(4, estimator=estimator, std_ddof=ddof, std_eps=eps)
  adv, stats = fn(rewards)
  want = np_advantages(rewards.reshape(3, 4), estimator, ddof, eps).reshape(-1)
  np.testing.assert_allclose(adv, want, rtol=1e-5, atol=1e-6)
  if (estimator, ddof) == ("grpo", 0):  # worked example: rewards 1,0,1,0 -> mean 1/2, std 1/2
    # (r - mean) / std: the 4-term mean and std, then 2 roundings, at unit size.
    np.testing.assert_allclose(adv[:4], [1, -1, 1, -1], **helpers.f32_tol(2 * 4 + 2))
  assert float(stats["zero_variance_frac"]) == pytest.approx(1 / 3)
  assert float(stats["reward_mean"]) == pytest.approx(7 / 12)
  assert float(stats["reward_std"]) == pytest.approx(np.std(rewards), rel=1e-6)
  with pytest.raises(ValueError, match="groups of 5"):
    grpo.make_group_advantages_fn(5, estimator=estimator)(rewards)


def test_dynamic_sampling_selects_informative_groups_in_round_order(models, rollout):
  g, policy, ref = models
  tokens, valid, first = rollout
  second = group_rollout_fn(g, with_ref=True)(
      policy, ref, *prompts(1), jax.random.key(4))
  # Round 0: group 0 flat, group 1 informative; round 1: group 0 informative, group 1 flat.
  r0, r1 = np.array([1, 1, 1, 1, 0, 1, 0, 0.]), np.array([0, 1, 1, 1, 0, 0, 0, 0.])
  sel = grpo.select_groups([(first, r0), (second, r1)], B, G)
  assert sel.picked == [(0, 1), (1, 0)] and sel.informative == 2
  for field in ("tokens_BxT", "valid_BxT", "mask_BxT", "old_logps_BxT", "ref_logps_BxT",
                "truncated_B", "sampler_logps_BxN"):
    want = np.concatenate([np.asarray(getattr(first, field))[G:],
                           np.asarray(getattr(second, field))[:G]])
    np.testing.assert_array_equal(np.asarray(getattr(sel.rollout, field)), want, err_msg=field)
  np.testing.assert_array_equal(sel.rewards_B, [0, 1, 0, 0, 0, 1, 1, 1])
  # One informative group for a batch of two: the filler is the earliest flat group, its
  # mask zeroed (absent from the loss) and everything else kept.
  short = grpo.select_groups([(first, r0)], B, G)
  assert short.picked == [(0, 1), (0, 0)] and short.informative == 1
  mask = np.asarray(short.rollout.mask_BxT)
  np.testing.assert_array_equal(mask[:G], np.asarray(first.mask_BxT)[G:])
  assert not mask[G:].any() and np.asarray(first.mask_BxT)[:G].any()
  np.testing.assert_array_equal(np.asarray(short.rollout.tokens_BxT)[G:],
                                np.asarray(first.tokens_BxT)[:G])
  with pytest.raises(ValueError, match="fewer than the batch"):
    grpo.select_groups([(first, r0)], B + 1, G)


def _np_loss(logps, old, ref, adv, mask, *, lo, hi, beta, aggregation):
  """GRPO / DAPO / Dr. GRPO objective (docs/math.md, GRPO family), float64."""
  logps, old, mask = (np.asarray(x, np.float64) for x in (logps, old, mask))
  rho = np.exp(logps - old)
  a = np.asarray(adv, np.float64)[:, None]
  l = -np.minimum(rho * a, np.clip(rho, 1 - lo, 1 + hi) * a)
  if beta:
    d = np.asarray(ref, np.float64) - logps
    l = l + beta * (np.exp(d) - d - 1)
  if aggregation == "token":
    return (l * mask).sum() / mask.sum()
  if aggregation == "sequence":
    return np.mean((l * mask).sum(1) / mask.sum(1))
  return (l * mask).sum() / (mask.shape[0] * N)


def _batch(models, rollout, seed=0):
  """A rollout batch with old log-probs perturbed (so ratios are != 1 and some clip)."""
  g, policy, ref = models
  *_, ro = rollout
  rng = np.random.default_rng(seed)
  adv = rng.standard_normal(B * G).astype(np.float32)
  batch = grpo.rollout_batch(ro, adv)
  batch["old_logps"] = batch["old_logps"] + 0.3 * rng.standard_normal(
      batch["mask"].shape).astype(np.float32) * batch["mask"]
  return {k: np.asarray(v) for k, v in batch.items()}


@pytest.mark.parametrize("aggregation", ["token", "sequence", "group"])
@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_loss_matches_numpy_reference(models, rollout, aggregation, beta):
  g, policy, ref = models
  batch = _batch(models, rollout)
  if beta == 0:
    del batch["ref_logps"]  # kl_coef 0 needs no reference log-probs
  kw = dict(clip_eps_low=0.2, clip_eps_high=0.28, kl_coef=beta, aggregation=aggregation,
            max_new_tokens=N)
  loss_fn = jax.jit(grpo.grpo_loss_fn(g, **kw))
  loss_sum, aux = loss_fn(policy, batch, jax.random.key(0))
  logps = np.asarray(jax.jit(lambda p: rollout_lib.policy_forward(
      g, p, batch["tokens"], batch["valid"], 1.0)[0])(policy))
  want = _np_loss(logps, batch["old_logps"], batch.get("ref_logps"), batch["advantages"],
                  batch["mask"], lo=0.2, hi=0.28, beta=beta, aggregation=aggregation)
  assert float(loss_sum / aux["denominator"]) == pytest.approx(want, rel=1e-5, abs=1e-7)
  assert float(aux["count"]) == B * G
  assert ("kl" in aux) == (beta > 0)
  assert 0 < float(aux["clipfrac"]) < float(aux["token_count"])  # some tokens clip, not all
  if beta == 0:
    with pytest.raises(ValueError, match="ref_logps"):
      grpo.grpo_loss_fn(g, **{**kw, "kl_coef": 0.1})(policy, batch, jax.random.key(0))


@pytest.mark.parametrize("aggregation", ["token", "sequence", "group"])
def test_accumulation_is_exact_and_compiles_once(models, rollout, aggregation):
  """One step over the batch == the same step in 2 microbatches (the GLOBAL denominator),
  and later steps compile nothing."""
  g, policy, _ = models
  batch = _batch(models, rollout, seed=1)
  del batch["ref_logps"]
  loss_fn = grpo.grpo_loss_fn(g, clip_eps_low=0.2, clip_eps_high=0.2, kl_coef=0.0,
                              aggregation=aggregation, max_new_tokens=N)
  opt = optax.sgd(0.1)
  outs = []
  for m in (1, 2):
    fn = step.compile_train_step(step.make_train_step(loss_fn, opt, num_microbatches=m))
    state = init_train_state(jax.tree.map(np.array, policy), opt, jax.random.key(0))
    state, metrics = fn(state, batch)
    with CompileCounter() as cc:
      state, _ = fn(state, batch)
    assert cc.count == 0, cc.names
    outs.append((metrics, state.params))
  (m1, p1), (m2, p2) = outs
  assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), rel=1e-5)
  # Two updates; microbatching changes only the float32 reduction order of the forward and
  # backward over the B·G x (P + N) tokens (helpers.step_tol).
  n_terms = 2 * (2 * helpers.forward_terms(CFG, seq_len=P + N) + B * G * (P + N))
  jax.tree.map(lambda a, b, p0: np.testing.assert_allclose(
      a, b, **helpers.step_tol(n_terms, p0, b)), p1, p2, policy)
  # The update moved the policy (a gradient flowed).
  assert max(float(np.abs(a - b).max()) for a, b in zip(
      jax.tree.leaves(p1), jax.tree.leaves(policy))) > 1e-4
  pt = grpo.per_token(m1)
  assert 0 <= pt["clipfrac_per_token"] <= 1


# ---------------------------------------------------------------------------------------
# pass@k

def brute_pass_at_k(n, c, k):
  """Fraction of the k-subsets of n samples (c correct) holding a correct one, float64."""
  samples = [1] * c + [0] * (n - c)
  subsets = list(itertools.combinations(range(n), k))
  return np.mean([any(samples[i] for i in s) for s in subsets], dtype=np.float64)


def test_pass_at_k_matches_enumeration():
  for n in range(1, 11):
    for c in range(n + 1):
      for k in range(1, n + 1):
        assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_vectorised_hand_values_and_stability():
  # k = 1 is the fraction correct; n=4, c=1, k=2: 1 - C(3,2)/C(4,2) = 1/2.
  np.testing.assert_allclose(pass_at_k([4, 4, 4], [0, 1, 4], 2), [0.0, 0.5, 1.0])
  np.testing.assert_allclose(pass_at_k(np.full((2, 3), 16), np.arange(6).reshape(2, 3), 1),
                             np.arange(6).reshape(2, 3) / 16)
  # Huge binomials: exact rational arithmetic with Python ints as the reference.
  for n, c, k in ((1000, 1, 500), (1000, 3, 10), (500, 250, 100)):
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-10)
  with pytest.raises(ValueError, match="k <= n"):
    pass_at_k(4, 1, 5)
  with pytest.raises(ValueError, match="num_correct"):
    pass_at_k(4, 5, 2)
