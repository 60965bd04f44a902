"""Training only the adapters: the base is neither updated nor in the optimizer state, the
adapters' gradients match float64 finite differences of an independent NumPy forward, and
the step on an fsdp mesh matches the one-device step."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import helpers
from rlhf_jax import sharding
from rlhf_jax.compile_count import CompileCounter
from rlhf_jax.models import lora
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.transformer import Transformer
from rlhf_jax.train import lora as lora_train, optim, state as state_lib, step as step_lib
from rlhf_jax.train.lm import lm_loss_fn

CFG = helpers.nano(n_layers=1, lora_rank=4, lora_alpha=8.0)


def batch(b=8, t=16, vocab=CFG.vocab_size, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, vocab, (b, t)).astype(np.int32)
  valid = np.ones((b, t), bool)
  valid[::3, t - 5:] = False  # unequal lengths
  loss_mask = valid.astype(np.float32)
  loss_mask[:, 0] = 0
  return {"tokens": tokens, "valid": valid, "loss_mask": loss_mask}


def placed(params, cfg, mesh):
  """params put on `mesh` in the shardings of the rules: (params, shardings)."""
  shardings = sharding.param_shardings(
      nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))), mesh)
  return jax.tree.map(jax.device_put, params, shardings), shardings


def adamw():
  return optim.make_optimizer(optim.OptimConfig(learning_rate=1e-2, total_steps=10))


def test_one_step_trains_only_the_adapters():
  graphdef, params = helpers.make_model(CFG)
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  params, shardings = placed(params, CFG, mesh)
  adapters0, base0 = jax.device_get(lora.split(params))
  data = sharding.shard_batch(batch(), mesh)
  state, train_step, base = lora_train.adapter_training(
      lm_loss_fn(graphdef), adamw(), params, shardings,
      jax.tree.map(lambda _: sharding.batch_sharding(mesh), data), jax.random.key(0),
      num_microbatches=2)
  # The optimizer state mirrors the adapters only: Adam's mu and nu have their tree.
  mirrors = [x for x in jax.tree.leaves(state.opt_state) if x.ndim]
  assert len(mirrors) == 2 * len(jax.tree.leaves(adapters0))
  assert sorted(x.shape for x in mirrors) == sorted(2 * [x.shape for x in
                                                         jax.tree.leaves(adapters0)])
  state, metrics = train_step(state, data)
  assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
  for x, y in zip(jax.tree.leaves(base), jax.tree.leaves(base0)):  # bitwise unchanged
    np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))
  for x, y in zip(jax.tree.leaves(state.params), jax.tree.leaves(adapters0)):
    assert x.shape == y.shape and not np.array_equal(x, y)


def test_the_base_is_an_input_not_a_constant():
  """The same compiled step run on another base computes with it (a base closed over as a
  constant would be baked into the program), and the base is not donated."""
  graphdef, params = helpers.make_model(CFG)
  adapters, base = lora.split(params)
  opt = optax.sgd(0.1)
  step = step_lib.compile_train_step(
      step_lib.make_train_step(lm_loss_fn(graphdef), opt, num_microbatches=1, join=lora.join))
  state = state_lib.init_train_state(adapters, opt, jax.random.key(0))
  states = [jax.tree.map(jnp.copy, state) for _ in range(2)]  # each call donates its state
  other_base, data = jax.tree.map(lambda x: 1.5 * x, base), batch()
  _, metrics = step(states[0], base, data)
  with CompileCounter() as cc:
    _, other = step(states[1], other_base, data)
  assert cc.count == 0, cc.names  # one program for both bases
  assert metrics["loss"] != other["loss"]
  assert not any(x.is_deleted() for x in jax.tree.leaves(base))


# ----------------------------------------------------------------------------------------
# Gradients against float64 central differences of the NumPy Llama forward (tests/helpers.py)
# on the merged weights W + (alpha / r) A @ B: the adapters' layout, scale and backward.

TINY = ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32,
                   lora_rank=2, lora_alpha=4.0)
WEIGHT = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo",
          "gate_proj": "w_gate", "up_proj": "w_up", "down_proj": "w_down"}


def np_loss(params, data):
  """The summed masked NLL in float64 (unpadded prefix of each row)."""
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  r, s = TINY.lora_rank, TINY.lora_scale
  for block in p["blocks"].values():
    for module in ("attn", "mlp"):
      for target, ab in block[module].pop("lora").items():
        w = block[module][WEIGHT[target]]
        w += s * (ab["a"].reshape(-1, r) @ ab["b"].reshape(r, -1)).reshape(w.shape)
  total = 0.0
  for tokens, valid, mask in zip(data["tokens"], data["valid"], data["loss_mask"]):
    n = int(valid.sum())
    logps = helpers.np_log_softmax(helpers.np_forward(p, TINY, tokens[:n]))
    total -= sum(mask[t] * logps[t - 1, tokens[t]] for t in range(1, n))
  return total


def test_adapter_gradients_match_float64_finite_differences():
  graphdef, params = helpers.make_model(TINY, seed=4)  # B random: every gradient nonzero
  adapters, base = lora.split(params)
  data = batch(b=4, t=6, vocab=TINY.vocab_size, seed=1)
  opt = optax.sgd(1.0)  # the update is the mean gradient
  step = step_lib.compile_train_step(
      step_lib.make_train_step(lm_loss_fn(graphdef), opt, num_microbatches=2, join=lora.join))
  state, metrics = step(state_lib.init_train_state(adapters, opt, jax.random.key(0)), base, data)
  denom = data["loss_mask"].sum()
  flat, treedef = jax.tree.flatten(jax.tree.map(lambda x: np.asarray(x, np.float64), adapters))
  h = 1e-5
  np.testing.assert_allclose(metrics["loss"] * denom, np_loss(params, data),
                             **helpers.f32_tol(2 * helpers.forward_terms(TINY, 6) + 24))
  for i, (new, old) in enumerate(zip(jax.tree.leaves(state.params), flat)):
    grad = np.zeros_like(old)
    for j in np.ndindex(old.shape):
      def loss_at(delta):
        moved = [x.copy() for x in flat]
        moved[i][j] += delta
        return np_loss(lora.join(jax.tree.unflatten(treedef, moved), base), data)
      grad[j] = (loss_at(h) - loss_at(-h)) / (2 * h)
    assert np.abs(grad).max() > 1e-3
    # forward and backward reductions, the sum over the 4 x 6 tokens, the rank-r reductions
    n_terms = 2 * helpers.forward_terms(TINY, 6) + 24 + 4 * TINY.lora_rank
    np.testing.assert_allclose(new, old - grad / denom,
                               **helpers.step_tol(n_terms, old, old - grad / denom))


# ----------------------------------------------------------------------------------------
# On a data x fsdp mesh.

def _mesh_step(mesh):
  graphdef, params = helpers.make_model(CFG, seed=5)
  params, shardings = placed(params, CFG, mesh)
  data = sharding.shard_batch(batch(), mesh)
  # SGD with momentum: the first update is -lr * g, and the momentum mirrors the adapters
  opt = optax.sgd(0.1, momentum=0.9)
  state, train_step, _ = lora_train.adapter_training(
      lm_loss_fn(graphdef), opt, params, shardings,
      jax.tree.map(lambda _: sharding.batch_sharding(mesh), data), jax.random.key(0),
      num_microbatches=2)
  state, metrics = train_step(state, data)
  return state, jax.device_get(metrics), jax.device_get(lora.split(params)[0])


@pytest.mark.parametrize("mesh_shape", [(2, 2, 1), (1, 4, 1), (1, 2, 2)])
def test_fsdp_mesh_step_matches_one_device(mesh_shape):
  one, metrics1, adapters0 = _mesh_step(sharding.make_mesh(devices=jax.devices()[:1]))
  state, metrics, _ = _mesh_step(sharding.make_mesh(*mesh_shape, devices=jax.devices()[:4]))
  n_terms = 2 * helpers.forward_terms(CFG, 16) + 8 * 16 + 4 * CFG.lora_rank
  np.testing.assert_allclose(metrics["loss"], metrics1["loss"], **helpers.f32_tol(n_terms))
  for a, b, p0 in zip(*map(jax.tree.leaves, (jax.device_get(state.params),
                                             jax.device_get(one.params), adapters0))):
    np.testing.assert_allclose(a, b, **helpers.step_tol(n_terms, p0, b))
  q = state.params["blocks"][0]["attn"]["lora"]["q_proj"]["a"]
  assert q.sharding.spec == sharding.logical_to_spec(("embed", "lora_rank"), q.shape,
                                                     q.sharding.mesh)
  assert q.sharding.spec[0] == "fsdp"  # split, not silently replicated
  momentum = [x for x in jax.tree.leaves(state.opt_state) if x.ndim]
  assert [x.sharding for x in momentum] == [x.sharding for x in jax.tree.leaves(state.params)]
