"""Checkpoints: bitwise round trip into NamedShardings, keep-K, data-iterator state."""
import os

import jax
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import toy_train
from rlhf_jax.train import checkpoint, optim, step
from rlhf_jax.train.state import abstract_state, init_train_state


def _trained_state(tx, param_shardings=None):
  """A state two steps in, so opt_state moments and step are not their init values."""
  params = toy_train.init_params(0)
  state = init_train_state(params, tx, jax.random.key(123), param_shardings=param_shardings)
  fn = jax.jit(step.make_train_step(toy_train.make_loss_fn(dropout=0.1), tx, num_microbatches=2))
  for i in range(2):
    state, _ = fn(state, toy_train.make_batch(i, 8))
  return state


def _assert_bitwise_equal(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_bitwise_and_sharded(tmp_path):
  mesh = jax.make_mesh((2,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:2])
  rep = NamedSharding(mesh, P())
  params = toy_train.init_params(0)
  pshard = jax.tree.map(lambda _: rep, params)
  pshard["embed"] = NamedSharding(mesh, P(None, "data"))
  tx = optim.make_optimizer(optim.OptimConfig(learning_rate=0.1, total_steps=10))
  state = _trained_state(tx, pshard)
  assert int(state.step) == 2

  manager = checkpoint.make_manager(str(tmp_path), save_every=1, async_save=True)
  assert checkpoint.restore_latest(manager, abstract_state(tx, params, pshard)) is None
  assert checkpoint.save(manager, 2, state, {"index": 2, "epoch": 0}, meta={"note": "x"})
  manager.wait_until_finished()

  fresh = checkpoint.make_manager(str(tmp_path), save_every=1)  # as a new process would
  restored, data_state = checkpoint.restore_latest(fresh, abstract_state(tx, params, pshard))
  _assert_bitwise_equal(restored, state)
  assert restored.rng.dtype == np.uint32
  np.testing.assert_array_equal(jax.random.key_data(restored.key), np.asarray(state.rng))
  assert restored.params["embed"].sharding == pshard["embed"]
  assert optax.tree_utils.tree_get(restored.opt_state, "mu")["embed"].sharding == pshard["embed"]
  assert data_state == {"index": 2, "epoch": 0}


def test_restore_detects_a_different_state(tmp_path):
  """Guards the round-trip test: a state one step further must not compare equal."""
  tx = optim.make_optimizer(optim.OptimConfig(learning_rate=0.1, total_steps=10))
  state = _trained_state(tx)
  manager = checkpoint.make_manager(str(tmp_path), save_every=1)
  checkpoint.save(manager, 2, state, {"index": 2})
  manager.wait_until_finished()
  other = init_train_state(toy_train.init_params(1), tx, jax.random.key(5))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          other)
  restored, _ = checkpoint.restore_latest(manager, abstract)
  _assert_bitwise_equal(restored, state)
  try:
    _assert_bitwise_equal(restored, other)
  except AssertionError:
    return
  raise AssertionError("distinct states compared equal")


def test_save_policy_and_keep_k(tmp_path):
  tx = optim.make_optimizer(optim.OptimConfig(learning_rate=0.1, total_steps=10))
  state = init_train_state(toy_train.init_params(0), tx, jax.random.key(0))
  manager = checkpoint.make_manager(str(tmp_path), save_every=2, max_to_keep=2)
  saved = [s for s in range(1, 8) if checkpoint.save(manager, s, state, {"index": s})]
  assert saved == [2, 4, 6]  # only multiples of save_every, no initial save at step 1
  assert checkpoint.save(manager, 7, state, {"index": 7}, force=True)
  manager.wait_until_finished()
  assert manager.all_steps() == [6, 7]
  steps_on_disk = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  assert steps_on_disk == [6, 7]
  _, data_state = checkpoint.restore_latest(manager, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state))
  assert data_state == {"index": 7}
