"""The rollout's log-prob forwards in row chunks (rollout.in_row_chunks) against one pass:
the same per-row log-probs, on one device and with rows sharded over 8 devices, and the shape
errors that name the fix."""
import jax
import numpy as np
import pytest

import helpers
from rlhf_jax import sharding
from rlhf_jax.rl import rollout


def _batch(cfg, rows=16, t=12, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, cfg.vocab_size, (rows, t)).astype(np.int32)
  valid = np.ones((rows, t), bool)
  valid[::3, :4] = False  # some left padding
  return tokens, valid


@pytest.mark.parametrize("devices, chunk", [(1, 4), (8, 8), (8, 16)])
def test_chunked_log_probs_equal_one_pass(devices, chunk):
  cfg = helpers.nano()
  graphdef, params = helpers.make_model(cfg)
  mesh = sharding.make_mesh(devices=jax.devices()[:devices])
  params = jax.device_put(params, sharding.replicated(mesh))
  tokens, valid = _batch(cfg)
  rows = sharding.shard_global({"t": tokens, "v": valid}, mesh)
  fn = lambda t, v: rollout.policy_forward(graphdef, params, t, v, 1.0)[0]  # noqa: E731
  whole = np.asarray(jax.jit(fn)(rows["t"], rows["v"]))
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  chunked = np.asarray(jax.jit(rollout.in_row_chunks(fn, chunk, dp))(rows["t"], rows["v"]))
  # Each row's log-probs come from the same forward; only the matmuls' row counts differ.
  np.testing.assert_allclose(chunked, whole, **helpers.f32_tol(
      helpers.forward_terms(cfg, tokens.shape[1]), scale=np.abs(whole).max()))


def test_rows_that_do_not_split_are_refused():
  fn = lambda t, v: t  # noqa: E731
  tokens = np.zeros((12, 4), np.int32)
  with pytest.raises(ValueError, match="do not split into chunks of 8 rows"):
    rollout.in_row_chunks(fn, 8)(tokens, tokens)
  with pytest.raises(ValueError, match="multiple of the data-parallel size 8"):
    rollout.in_row_chunks(fn, 4, 8)(tokens, tokens)
