"""Each group's prompt computed once (rl/grouped_forward.py), against the full-row forward.

The reference is rollout.policy_forward over the full rows [prompt | response], which the
project checks against the float64 Llama (tests/models). The grouped forward computes the
same attention over the same keys at the same positions through a KV cache, so response
log-probs agree to float32 rounding (helpers.f32_tol of the forward); prompt positions are 0
in both wherever the loss mask reads them.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from rlhf_jax.rl import grouped_forward
from rlhf_jax.rl.algorithms import grpo
from rlhf_jax.rl.loop import epoch_order
from rlhf_jax.rl.rollout import encode_prompts, make_rollout_fn, policy_forward
from rlhf_jax.runs.grpo import GRPOConfig
from rlhf_jax.sampling import SamplingConfig

CFG = helpers.nano()
G, P, N = 3, 20, 10
PROMPTS = ["1+2=", "a longer prompt:", "x"]  # left padding of different lengths
SAMPLING = SamplingConfig(max_new_tokens=N, eos_id=2, pad_id=0, temperature=1.0)


@pytest.fixture(scope="module")
def rollout():
  graphdef, params = helpers.make_model(CFG, seed=7)
  _, ref = helpers.make_model(CFG, seed=8)
  toks, valid = encode_prompts(PROMPTS, P)
  run = lambda share: make_rollout_fn(graphdef, SAMPLING, group_size=G,  # noqa: E731
                                      share_prompt=share)(params, ref, None, toks, valid,
                                                          jax.random.key(0))
  return graphdef, params, run(False), run(True)


def _tol(scale=1.0):
  return helpers.f32_tol(helpers.forward_terms(CFG, P + N), scale=scale)


def test_group_logps_equal_the_full_rows(rollout):
  graphdef, params, full, _ = rollout
  assert 0 < float(full.mask_BxT.sum()) < full.mask_BxT.size  # EOS and padding occur
  want = policy_forward(graphdef, params, full.tokens_BxT, full.valid_BxT, 1.0)[0]
  got = grouped_forward.group_logps(graphdef, params, full.tokens_BxT, full.valid_BxT,
                                    grouped_forward.PromptGroups(G, P))
  mask = np.asarray(full.mask_BxT)
  np.testing.assert_allclose(np.asarray(got) * mask, np.asarray(want) * mask, **_tol())
  assert not np.asarray(got)[:, :P].any()


def test_the_rollout_with_shared_prompts_is_the_same_rollout(rollout):
  _, _, full, shared = rollout
  np.testing.assert_array_equal(shared.tokens_BxT, full.tokens_BxT)
  np.testing.assert_array_equal(shared.mask_BxT, full.mask_BxT)
  for got, want in ((shared.old_logps_BxT, full.old_logps_BxT),
                    (shared.ref_logps_BxT, full.ref_logps_BxT)):
    np.testing.assert_allclose(got, want, **_tol())


def test_old_logps_from_the_sampler_are_the_forwards(rollout):
  graphdef, params, full, _ = rollout
  _, ref = helpers.make_model(CFG, seed=8)
  toks, valid = encode_prompts(PROMPTS, P)
  reused = make_rollout_fn(graphdef, SAMPLING, group_size=G, sampler_old_logps=True)(
      params, ref, None, toks, valid, jax.random.key(0))
  np.testing.assert_array_equal(reused.tokens_BxT, full.tokens_BxT)
  assert np.asarray(full.old_logps_BxT).min() < -1.0  # log-probs, not zeros
  np.testing.assert_allclose(reused.old_logps_BxT, full.old_logps_BxT, **_tol())


def test_grpo_loss_and_gradients_equal_the_full_rows(rollout):
  graphdef, params, full, _ = rollout
  adv = jnp.asarray(np.random.default_rng(0).standard_normal(G * len(PROMPTS)), jnp.float32)
  batch = grpo.rollout_batch(full, adv)
  kwargs = dict(clip_eps_low=0.2, clip_eps_high=0.28, kl_coef=0.05, aggregation="token",
                max_new_tokens=N)
  results = []
  for groups in (None, grouped_forward.PromptGroups(G, P)):
    fn = grpo.grpo_loss_fn(graphdef, prompt_groups=groups, **kwargs)
    results.append(jax.jit(jax.value_and_grad(lambda p: fn(p, batch, None)[0]))(params))
  (loss, grads), (loss_g, grads_g) = results
  tol = helpers.f32_tol(3 * helpers.forward_terms(CFG, P + N))
  np.testing.assert_allclose(loss_g, loss, **tol)
  for g, w in zip(jax.tree.leaves(grads_g), jax.tree.leaves(grads)):
    np.testing.assert_allclose(g, w, rtol=tol["rtol"], atol=tol["rtol"] * float(np.abs(w).max()))


def test_rows_not_in_whole_groups_are_refused(rollout):
  graphdef, params, full, _ = rollout
  with pytest.raises(ValueError, match="whole groups"):
    grouped_forward.group_logps(graphdef, params, full.tokens_BxT[:4], full.valid_BxT[:4],
                                grouped_forward.PromptGroups(G, P))


def test_epoch_order_keeps_blocks_whole():
  order = epoch_order(12, np.random.default_rng(0), epochs=2, num_minibatches=2, block=3)
  assert len(order) == 4
  for epoch in (order[:2], order[2:]):
    assert sorted(np.concatenate(epoch).tolist()) == list(range(12))
  for minibatch in order:
    blocks = np.asarray(minibatch).reshape(-1, 3)
    assert (blocks % 3 == [0, 1, 2]).all() and (np.diff(blocks, axis=1) == 1).all()
  # block=1 is the row shuffle it always was: rng.permutation(rows), cut in minibatches.
  plain = epoch_order(8, np.random.default_rng(1), epochs=1, num_minibatches=2)
  perm = np.random.default_rng(1).permutation(8)
  np.testing.assert_array_equal(np.concatenate(plain), perm)
  with pytest.raises(ValueError, match="whole blocks"):
    epoch_order(12, np.random.default_rng(0), epochs=1, num_minibatches=4, block=2)


def test_share_prompt_flags_that_would_split_groups_are_refused():
  with pytest.raises(ValueError, match="--share_prompt keeps each group whole"):
    GRPOConfig(share_prompt=True, batch_size=6, group_size=4, num_minibatches=4)
  with pytest.raises(ValueError, match="strided"):
    GRPOConfig(share_prompt=True, batch_size=8, group_size=4, num_microbatches=2)
  with pytest.raises(ValueError, match="--rollout_chunk_rows"):
    GRPOConfig(share_prompt=True, rollout_chunk_rows=8)
