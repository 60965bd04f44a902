"""A sharded train step of the real model gives the same loss and update as an unsharded
one (1-device sub-mesh), on fsdp, tensor and mixed meshes of the 8 fake devices."""
import jax
import numpy as np
import optax
import pytest

import helpers
from rlhf_jax import sharding
from rlhf_jax.models.config import preset
from rlhf_jax.models.transformer import Transformer
from rlhf_jax.train import state as state_lib, step as step_lib
from rlhf_jax.train.lm import lm_loss_fn

CFG = preset("nano", n_layers=1)
# Plain SGD: the update is the gradient, so the comparison measures the sharded computation.
# (Adam's first step, g / sqrt(g^2 + eps), turns float noise in near-zero grads into O(lr).)
OPT = optax.sgd(0.1)


def _batch():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 256, (8, 16)).astype(np.int32)
  valid = np.ones((8, 16), bool)
  valid[::3, 11:] = False  # unequal lengths: a per-device mean would be wrong
  loss_mask = valid.astype(np.float32)
  loss_mask[:, 0] = 0
  return {"tokens": tokens, "valid": valid, "loss_mask": loss_mask}


def _one_step(mesh):
  graphdef, params, shardings = sharding.init_sharded(lambda r: Transformer(CFG, rngs=r),
                                                      jax.random.key(0), mesh)
  state = state_lib.init_train_state(params, OPT, jax.random.key(1), param_shardings=shardings)
  batch = sharding.shard_batch(_batch(), mesh)
  step = step_lib.compile_train_step(
      step_lib.make_train_step(lm_loss_fn(graphdef), OPT, num_microbatches=2),
      state_lib.state_shardings(OPT, params, shardings),
      jax.tree.map(lambda _: sharding.batch_sharding(mesh), batch))
  state, metrics = step(state, batch)
  return jax.device_get(state.params), jax.device_get(metrics), state


@pytest.fixture(scope="module")
def baseline():
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  params0 = sharding.init_sharded(lambda r: Transformer(CFG, rngs=r), jax.random.key(0), mesh)[1]
  return (*_one_step(mesh)[:2], jax.device_get(params0))


@pytest.mark.parametrize("mesh_shape", [(1, 8, 1), (4, 1, 2), (2, 2, 2)])
def test_sharded_step_matches_unsharded(baseline, mesh_shape):
  params1, metrics1, params0 = baseline
  params, metrics, state = _one_step(sharding.make_mesh(*mesh_shape))
  # Sharding changes only the float32 reduction order: the forward's reductions and the
  # backward's (transposed, same lengths), plus the sums over the 8 x 16 tokens.
  n_terms = 2 * helpers.forward_terms(CFG, seq_len=16) + 8 * 16
  np.testing.assert_allclose(metrics["loss"], metrics1["loss"], **helpers.f32_tol(n_terms))
  assert metrics["denominator"] == metrics1["denominator"] == _batch()["loss_mask"].sum()
  for a, b, p0 in zip(*map(jax.tree.leaves, (params, params1, params0))):
    np.testing.assert_allclose(a, b, **helpers.step_tol(n_terms, p0, b))
  # The parameters really are distributed as the rules say (not silently replicated).
  wq = state.params["blocks"][0]["attn"]["wq"]
  assert wq.sharding.spec == sharding.logical_to_spec(
      ("embed", "q_heads", "head_dim"), wq.shape, wq.sharding.mesh)
  if mesh_shape[1] > 1:
    assert wq.sharding.spec[0] == "fsdp"
