"""Train/eval steps: exact gradient accumulation, compiled once, sharded state."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import helpers
import toy_train
from rlhf_jax.compile_count import CompileCounter
from rlhf_jax.train import optim, step
from rlhf_jax.train.state import init_train_state, state_shardings

LR = 0.5


# The toy model's float32 reductions, forward and backward (RMSNorm over DIM, logits over DIM,
# log-softmax over VOCAB), plus the gradient's sum over the 8 x SEQ tokens (helpers.f32_tol).
N_TERMS = 2 * (2 * toy_train.DIM + toy_train.VOCAB) + 8 * toy_train.SEQ


def ragged_batch():
  """8 rows whose token counts differ a lot between the 4 strided microbatches."""
  batch = toy_train.make_batch(0, 8)
  lengths = np.array([9, 2, 3, 9, 9, 2, 3, 2])  # microbatch i = rows i, i+4
  batch["mask"] = (np.arange(toy_train.SEQ) < lengths[:, None]).astype(np.int32)
  return batch


def reference_update(params, batch):
  """SGD on the token-mean loss of the whole batch, written directly."""
  loss_fn = toy_train.make_loss_fn()
  def mean_loss(p):
    loss_sum, aux = loss_fn(p, batch, None)
    return loss_sum / aux["denominator"]
  loss, grads = jax.value_and_grad(mean_loss)(params)
  return jax.tree.map(lambda p, g: p - LR * g, params, grads), loss


def run_step(num_microbatches, params, batch):
  fn = step.make_train_step(toy_train.make_loss_fn(), optax.sgd(LR),
                            num_microbatches=num_microbatches)
  state = init_train_state(params, optax.sgd(LR), jax.random.key(0))
  return jax.jit(fn)(state, batch)


def test_grad_accumulation_is_exact_with_unequal_token_counts():
  params, batch = toy_train.init_params(0), ragged_batch()
  counts = step.split_microbatches(batch, 4)["mask"][:, :, 1:].sum(axis=(1, 2))
  assert len(set(np.asarray(counts).tolist())) > 1, counts  # the premise of the test
  want_params, want_loss = reference_update(params, batch)

  for m in (1, 4):
    state, metrics = run_step(m, params, batch)
    jax.tree.map(lambda a, b, p0: np.testing.assert_allclose(a, b, **helpers.step_tol(N_TERMS, p0, b)),
                 state.params, want_params, params)
    np.testing.assert_allclose(metrics["loss"], want_loss, rtol=1e-6)
    assert float(metrics["denominator"]) == batch["mask"][:, 1:].sum()
    assert int(state.step) == 1

  # The test can fail: averaging per-microbatch means gives a different update.
  loss_fn = toy_train.make_loss_fn()
  def micro_mean(p, mb):
    loss_sum, aux = loss_fn(p, mb, None)
    return loss_sum / aux["denominator"]
  micro = step.split_microbatches(batch, 4)
  naive_grads = jax.tree.map(lambda *g: sum(g) / 4, *[
      jax.grad(micro_mean)(params, jax.tree.map(lambda x: x[i], micro)) for i in range(4)])
  naive = jax.tree.map(lambda p, g: p - LR * g, params, naive_grads)
  diff = max(float(jnp.max(jnp.abs(a - b)))
             for a, b in zip(jax.tree.leaves(naive), jax.tree.leaves(want_params)))
  assert diff > 1e-3, diff


def test_metrics_and_rng():
  cfg = optim.OptimConfig(learning_rate=0.1, total_steps=20, warmup_steps=4)
  tx = optim.make_optimizer(cfg)
  fn = jax.jit(step.make_train_step(toy_train.make_loss_fn(dropout=0.5), tx,
                                    num_microbatches=2, lr_schedule=optim.make_schedule(cfg)))
  state = init_train_state(toy_train.init_params(0), tx, jax.random.key(7))
  rng_before = np.asarray(state.rng)
  batch = toy_train.make_batch(0, 8)
  s1, m1 = fn(state, batch)
  assert set(m1) == {"loss", "correct", "denominator", "grad_norm", "learning_rate",
                     "nonfinite"}
  assert float(m1["learning_rate"]) == pytest.approx(0.0)  # update 0 of a warmup from 0
  s2, m2 = fn(s1, batch)
  assert float(m2["learning_rate"]) == pytest.approx(0.1 / 4)
  assert 0.0 <= float(m1["correct"]) <= 1.0
  np.testing.assert_array_equal(s2.rng, rng_before)  # the base key is never advanced
  # Same params and batch, but step 1's dropout key differs from step 0's.
  assert float(m2["loss"]) != float(m1["loss"])


def test_eval_step_sums_and_evaluate():
  params = toy_train.init_params(0)
  batches = [toy_train.make_batch(i, 8) for i in range(2)]
  eval_step = step.compile_eval_step(step.make_eval_step(toy_train.make_loss_fn(),
                                                         num_microbatches=2))
  loss_fn = toy_train.make_loss_fn()
  sums = [loss_fn(params, b, None) for b in batches]
  total_loss = sum(float(s[0]) for s in sums)
  total_tokens = sum(float(s[1]["denominator"]) for s in sums)
  one = eval_step(params, batches[0])
  np.testing.assert_allclose(one["loss"], sums[0][0], rtol=1e-6)
  result = step.evaluate(eval_step, params, batches)
  np.testing.assert_allclose(result["loss"], total_loss / total_tokens, rtol=1e-6)
  assert result["denominator"] == total_tokens


def _param_shardings(mesh, params):
  specs = {"embed": P(None, "data"), "norm_scale": P(),
           "out": {"kernel": P("data", None), "bias": P()}}
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))


@pytest.mark.parametrize("sharded", [False, True])
def test_compiles_once(sharded):
  cfg = optim.OptimConfig(learning_rate=0.05, total_steps=10)
  tx = optim.make_optimizer(cfg)
  params = toy_train.init_params(0)
  fn = step.make_train_step(toy_train.make_loss_fn(dropout=0.1), tx, num_microbatches=2)
  if sharded:
    mesh = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,),
                         devices=jax.devices()[:4])
    pshard = _param_shardings(mesh, params)
    state = init_train_state(params, tx, jax.random.key(0), param_shardings=pshard)
    sshard = state_shardings(tx, params, pshard)
    batch_sh = {"tokens": NamedSharding(mesh, P("data")), "mask": NamedSharding(mesh, P("data"))}
    compiled = step.compile_train_step(fn, sshard, batch_sh)
    mu = optax.tree_utils.tree_get(state.opt_state, "mu")
    assert mu["embed"].sharding == pshard["embed"]  # optimizer state born sharded
  else:
    state = init_train_state(params, tx, jax.random.key(0))
    compiled = step.compile_train_step(fn)

  with CompileCounter() as cc:
    state, _ = compiled(state, toy_train.make_batch(0, 8))
    assert cc.count >= 1, "the counter must see the first compile"
    cc.reset()
    for i in range(1, 4):
      state, metrics = compiled(state, toy_train.make_batch(i, 8))
    jax.block_until_ready(metrics)
  assert cc.count == 0, cc.names
  if sharded:
    assert state.params["embed"].sharding == pshard["embed"]


def test_data_parallel_step_matches_single_device():
  """Batch sharded over 4 devices, 2 microbatches: the same update as one device, since
  jit's global view normalises by the global token count: the loss is the global token sum
  over the global token count, not a mean of per-device means."""
  cfg = optim.OptimConfig(learning_rate=0.05, total_steps=10)
  tx = optim.make_optimizer(cfg)
  params, batch = toy_train.init_params(0), ragged_batch()
  fn = step.make_train_step(toy_train.make_loss_fn(), tx, num_microbatches=2)
  mesh = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:4])
  pshard = _param_shardings(mesh, params)
  sharded = step.compile_train_step(fn, state_shardings(tx, params, pshard),
                                    jax.tree.map(lambda _: NamedSharding(mesh, P("data")), batch))
  got, got_m = sharded(init_train_state(params, tx, jax.random.key(0), param_shardings=pshard),
                       batch)
  want, want_m = jax.jit(fn)(init_train_state(params, tx, jax.random.key(0)), batch)
  jax.tree.map(lambda a, b, p0: np.testing.assert_allclose(a, b, **helpers.step_tol(N_TERMS, p0, b)),
               got.params, want.params, params)
  np.testing.assert_allclose(got_m["loss"], want_m["loss"], rtol=1e-6)
  assert float(got_m["denominator"]) == batch["mask"][:, 1:].sum()
