"""Reward-model training (train/reward.py): the K-way ranking loss against a float64 NumPy
re-computation, exact gradient accumulation, learning a toy preference, compile-once,
initialisation from the policy, padding invariance, and ensemble aggregation."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import helpers

from rlhf_jax import sharding
from rlhf_jax.compile_count import CompileCounter
from rlhf_jax.models.config import preset
from rlhf_jax.models.transformer import ScalarHeadModel, Transformer
from rlhf_jax.losses import bradley_terry as bt
from rlhf_jax.train import reward, state as state_lib, step as step_lib

CFG = preset("nano", n_layers=1)
MESH = sharding.make_mesh(devices=jax.devices()[:1])


def _init(factory, seed):
  graphdef, params, _ = sharding.init_sharded(factory, jax.random.key(seed), MESH)
  return graphdef, params


@pytest.fixture(scope="module")
def rm():
  return _init(lambda r: ScalarHeadModel(CFG, rngs=r), 0)


def _ranking_batch(seed=0, b=4, k=3, t=8):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, 200, (b, k, t)).astype(np.int32)
  valid = np.ones((b, k, t), bool)
  valid[0, 1, 5:] = False           # right padding
  valid[2, 0, :3] = False           # left padding
  response_valid = np.ones((b, k), bool)
  response_valid[1, 2] = False      # prompt 1 has only 2 responses
  valid[1, 2] = False               # ... the missing one is all padding
  response_valid[3, 1:] = False     # prompt 3 has 1 response: no pair, not counted
  return {"tokens_BxKxT": tokens, "valid_BxKxT": valid, "response_valid_BxK": response_valid}


def _np_ranking(rewards_BxK, valid_BxK):
  """Float64 InstructGPT loss: per prompt, mean over its valid pairs i<j of -log s(r_i - r_j)."""
  r, v = np.asarray(rewards_BxK, np.float64), np.asarray(valid_BxK, bool)
  out = dict(loss=0.0, count=0.0, acc=0.0, margin=0.0)
  for rb, vb in zip(r, v):
    idx = np.flatnonzero(vb)
    pairs = [(i, j) for a, i in enumerate(idx) for j in idx[a + 1:]]
    if not pairs:
      continue
    out["count"] += 1
    out["loss"] += np.mean([np.logaddexp(0.0, -(rb[i] - rb[j])) for i, j in pairs])
    out["acc"] += np.mean([float(rb[i] > rb[j]) for i, j in pairs])
    out["margin"] += np.mean([rb[i] - rb[j] for i, j in pairs])
  return out


def test_ranking_loss_matches_numpy(rm):
  graphdef, params = rm
  batch = _ranking_batch()
  b, k, t = batch["tokens_BxKxT"].shape
  score = reward.score_fn(graphdef)
  # Scores computed separately, one response at a time (no flattening shared with the loss).
  rewards_BxK = np.zeros((b, k))
  for i in range(b):
    for j in range(k):
      if batch["response_valid_BxK"][i, j]:
        rewards_BxK[i, j] = score(params, batch["tokens_BxKxT"][i, j][None],
                                  batch["valid_BxKxT"][i, j][None])[0]
  ref = _np_ranking(rewards_BxK, batch["response_valid_BxK"])
  loss_sum, aux = jax.jit(reward.ranking_loss_fn(graphdef))(params, batch, jax.random.key(0))
  assert float(aux["denominator"]) == ref["count"] == 3.0
  assert float(aux["pairs"]) == 3 + 1 + 3
  np.testing.assert_allclose(float(loss_sum), ref["loss"], rtol=1e-5)
  np.testing.assert_allclose(float(aux["accuracy"]), ref["acc"], rtol=1e-5)
  np.testing.assert_allclose(float(aux["margin"]), ref["margin"], rtol=1e-4, atol=1e-6)


def _step(graphdef, opt, num_microbatches):
  return step_lib.compile_train_step(step_lib.make_train_step(
      reward.ranking_loss_fn(graphdef), opt, num_microbatches=num_microbatches))


def test_gradient_accumulation_exact(rm):
  graphdef, params = rm
  opt = optax.sgd(0.5)
  batch = _ranking_batch(seed=1)  # strided microbatches {0,2},{1,3} hold 2 and 1 prompts
  out = []
  for m in (1, 2):
    state = state_lib.init_train_state(jax.tree.map(jnp.copy, params), opt, jax.random.key(1))
    state, metrics = _step(graphdef, opt, m)(state, batch)
    out.append((jax.device_get(state.params), jax.device_get(metrics)))
  (p1, m1), (p2, m2) = out
  assert float(m1["denominator"]) == float(m2["denominator"]) == 3.0
  np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
  moved = 0.0
  for a, b, p0 in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), jax.tree.leaves(params)):
    # Microbatching changes only the float32 reduction order of the 4 x 3 x 8 scored tokens'
    # forward and backward (helpers.step_tol).
    n_terms = 2 * helpers.forward_terms(CFG, seq_len=8, log_softmax=False) + 4 * 3 * 8
    np.testing.assert_allclose(a, b, **helpers.step_tol(n_terms, p0, b))
    moved = max(moved, float(np.max(np.abs(np.asarray(a) - np.asarray(p0)))))
  assert moved > 1e-4  # the step really updated the params


def _token7_pairs(rng, n, t=8):
  """K=2 rankings: the preferred response contains token 7, the other does not."""
  tokens = rng.integers(8, 60, (n, 2, t)).astype(np.int32)
  tokens[np.arange(n), 0, rng.integers(0, t, n)] = 7
  valid = np.ones((n, 2, t), bool)
  return {"tokens_BxKxT": tokens, "valid_BxKxT": valid}


@pytest.fixture(scope="module")
def trained(rm):
  graphdef, params = rm
  opt = optax.adam(3e-3)
  state = state_lib.init_train_state(jax.tree.map(jnp.copy, params), opt, jax.random.key(2))
  step = _step(graphdef, opt, 1)
  rng = np.random.default_rng(3)
  batches = [_token7_pairs(rng, 16) for _ in range(40)]
  compiles = []
  with CompileCounter() as cc:
    for batch in batches:
      cc.reset()
      state, metrics = step(state, batch)
      jax.block_until_ready(metrics)
      compiles.append(cc.count)
  return graphdef, state.params, compiles


def test_learns_toy_preference(trained):
  graphdef, params, _ = trained
  held_out = _token7_pairs(np.random.default_rng(99), 64)
  _, aux = jax.jit(reward.ranking_loss_fn(graphdef))(params, held_out, jax.random.key(0))
  accuracy = float(aux["accuracy"]) / float(aux["denominator"])
  assert accuracy > 0.8, accuracy


def test_train_step_compiles_once(trained):
  _, _, compiles = trained
  assert compiles[0] >= 1
  assert compiles[1] == compiles[2] == 0, compiles[:3]


def test_init_from_policy_copies_backbone(rm):
  graphdef, fresh = rm
  _, policy = _init(lambda r: Transformer(CFG, rngs=r), 5)
  params = reward.init_reward_from_policy(policy, fresh)
  leaves = jax.tree_util.tree_leaves_with_path(params["backbone"])
  assert leaves
  for path, x in leaves:
    src = policy
    for p in path:
      src = src[p.key]
    assert np.array_equal(np.asarray(x), np.asarray(src)), path
    assert x.dtype == src.dtype
  assert set(params) == set(fresh)
  assert np.array_equal(params["head_w"], fresh["head_w"])
  assert not np.array_equal(params["backbone"]["embed"], fresh["backbone"]["embed"])

  bad = {**policy, "embed": policy["embed"][:-1]}
  with pytest.raises(ValueError, match="embed"):
    reward.init_reward_from_policy(bad, fresh)

  # The reward of a sequence does not depend on how much padding surrounds it.
  score = reward.score_fn(graphdef)
  seq = np.array([11, 42, 7, 99, 3], np.int32)
  tokens = np.zeros((3, 9), np.int32)
  valid = np.zeros((3, 9), bool)
  tokens[0, :5], valid[0, :5] = seq, True        # right padding
  tokens[1, 4:], valid[1, 4:] = seq, True        # left padding
  tokens[2, 2:7], valid[2, 2:7] = seq, True      # both
  r = np.asarray(score(params, tokens, valid))
  np.testing.assert_allclose(r, r[0], rtol=1e-5, atol=1e-6)


def test_ensemble_aggregation(rm):
  graphdef, p0 = rm
  members = [p0] + [_init(lambda r: ScalarHeadModel(CFG, rngs=r), s)[1] for s in (1, 2)]
  rng = np.random.default_rng(4)
  tokens = rng.integers(1, 200, (5, 6)).astype(np.int32)
  valid = np.ones((5, 6), bool)
  valid[1, 4:] = False
  score = reward.score_fn(graphdef)
  r_ExB = np.stack([np.asarray(score(p, tokens, valid), np.float64) for p in members])
  agg = lambda **kw: np.asarray(reward.ensemble_scores(graphdef, members, tokens, valid, **kw))
  np.testing.assert_allclose(agg(aggregate="mean"), r_ExB.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(agg(aggregate="wco"), r_ExB.min(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(agg(aggregate="uwo", uwo_coef=2.0),
                             r_ExB.mean(0) - 2.0 * r_ExB.var(0), rtol=1e-5, atol=1e-6)
  mean_E, std_E = r_ExB.mean(1), r_ExB.std(1)
  z_ExB = (r_ExB - mean_E[:, None]) / (std_E[:, None] + 1e-6)
  np.testing.assert_allclose(agg(aggregate="wco", norm_stats=(mean_E, std_E)), z_ExB.min(0),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(
      reward.aggregate_scores(jnp.asarray(r_ExB, jnp.float32), aggregate="uwo", uwo_coef=2.0,
                              norm_stats=(mean_E, std_E)),
      z_ExB.mean(0) - 2.0 * z_ExB.var(0), rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match=r"ensemble_size > 1"):
    reward.aggregate_scores(jnp.asarray(r_ExB[:1]), aggregate="wco")
  single = reward.ensemble_scores(graphdef, members[:1], tokens, valid, aggregate="mean")
  np.testing.assert_allclose(single, r_ExB[0], rtol=1e-5, atol=1e-6)
  for a in ("wco", "uwo"):
    with pytest.raises(ValueError, match=r"ensemble_size > 1"):
      reward.ensemble_scores(graphdef, members[:1], tokens, valid, aggregate=a)
  with pytest.raises(ValueError, match="aggregate"):
    reward.ensemble_scores(graphdef, members, tokens, valid, aggregate="max")
