"""Meshes, the logical-axis rules, sharded init, and sharded forward/gradient equality."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

import helpers
from rlhf_jax import sharding
from rlhf_jax.logprobs import shifted_logps
from rlhf_jax.models.transformer import ScalarHeadModel, Transformer

CFG = helpers.nano(n_layers=1)  # one block shows every rule; compiles fast


def factory(rngs):
  return Transformer(CFG, rngs=rngs)


def norm_spec(spec, ndim):
  """A PartitionSpec as a tuple of length ndim (trailing Nones made explicit)."""
  spec = tuple(spec)
  return spec + (None,) * (ndim - len(spec))


def one_device_mesh():
  return sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])


# ---------------------------------------------------------------------------------- meshes

def test_make_mesh_fills_minus_one():
  assert len(jax.devices()) == 8
  assert dict(sharding.make_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1}
  assert dict(sharding.make_mesh(-1, 2, 2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert dict(sharding.make_mesh(2, -1, 1).shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  assert dict(sharding.make_mesh(1, 1, -1).shape) == {"data": 1, "fsdp": 1, "tensor": 8}
  mesh = sharding.make_mesh(2, 2, 2)
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert tuple(mesh.axis_types) == (AxisType.Auto,) * 3
  sub = one_device_mesh()
  assert sub.devices.size == 1 and sub.devices.flat[0] == jax.devices()[0]
  assert dict(sharding.make_mesh(-1, 1, 2, devices=jax.devices()[:4]).shape)["data"] == 2


@pytest.mark.parametrize("sizes,match", [
    ((3, 1, 1), r"uses 3 devices, but 8 are available"),
    ((2, 2, 4), r"uses 16 devices, but 8 are available"),
    ((-1, -1, 2), "at most one of"),
    ((0, 1, 8), "positive or -1"),
    ((-2, 1, 4), "positive or -1"),
    ((-1, 3, 1), "8 devices cannot be split"),
])
def test_make_mesh_rejects_bad_sizes(sizes, match):
  with pytest.raises(ValueError, match=match):
    sharding.make_mesh(*sizes)


# --------------------------------------------------------------------------------- rules

# What LOGICAL_RULES means on a (data=2, fsdp=2, tensor=2) mesh, written out per parameter.
EXPECTED_222 = {
    "embed": ("tensor", "fsdp"),
    "lm_head": ("fsdp", "tensor"),
    "wq": ("fsdp", "tensor", None),
    "wk": ("fsdp", "tensor", None),
    "wv": ("fsdp", "tensor", None),
    "wo": ("tensor", None, "fsdp"),
    "w_gate": ("fsdp", "tensor"),
    "w_up": ("fsdp", "tensor"),
    "w_down": ("tensor", "fsdp"),
    "scale": (None,),
}


@pytest.fixture(scope="module")
def sharded_init():
  """init_sharded on a 2x2x2 mesh and on a 1-device sub-mesh, same key."""
  key = jax.random.key(0)
  mesh = sharding.make_mesh(2, 2, 2)
  graphdef, params, shardings = sharding.init_sharded(factory, key, mesh)
  _, params1, _ = sharding.init_sharded(factory, key, one_device_mesh())
  return mesh, graphdef, params, shardings, params1


def test_param_specs_follow_rules_on_2x2x2(sharded_init):
  mesh, _, params, shardings, _ = sharded_init
  leaves = jax.tree.leaves_with_path(params)
  assert len(leaves) == 2 + 1 + CFG.n_layers * 9
  for path, x in leaves:
    name = str(path[-1].key)
    want = EXPECTED_222[name]
    got_sharding = x.sharding
    assert got_sharding.mesh.shape == mesh.shape
    assert norm_spec(got_sharding.spec, x.ndim) == want, (path, got_sharding.spec)
    # Shards really are split: each device holds 1/(product of used axis sizes) of the leaf.
    used = [a for a in want if a is not None]
    shard = x.addressable_shards[0].data
    assert shard.size * 2 ** len(used) == x.size, path
  sh = jax.tree.map(lambda s: s.spec, shardings)
  assert norm_spec(sh["blocks"][0]["attn"]["wq"], 3) == ("fsdp", "tensor", None)
  assert norm_spec(sh["embed"], 2) == ("tensor", "fsdp")
  assert norm_spec(sh["blocks"][0]["mlp"]["w_down"], 2) == ("tensor", "fsdp")
  assert norm_spec(sh["final_norm"]["scale"], 1) == (None,)


def test_indivisible_dimension_stays_replicated():
  mesh = sharding.make_mesh(1, 2, 4)  # nano has 2 kv heads: not divisible by tensor=4
  abstract = nnx.split(nnx.eval_shape(lambda: factory(nnx.Rngs(0))))[1]
  sh = sharding.param_shardings(abstract, mesh)
  attn = sh["blocks"][0]["attn"]
  assert norm_spec(attn["wk"].spec, 3) == ("fsdp", None, None)
  assert norm_spec(attn["wq"].spec, 3) == ("fsdp", "tensor", None)  # 4 query heads do divide
  assert norm_spec(sharding.logical_to_spec(("vocab", "embed"), (263, 64), mesh), 2) == (
      None, "fsdp")
  assert norm_spec(sharding.logical_to_spec(("vocab", "embed"), (264, 63), mesh), 2) == (
      "tensor", None)


def test_logical_to_spec_unknown_axis_and_scalar_head():
  mesh = sharding.make_mesh(2, 2, 2)
  with pytest.raises(ValueError, match="logical axis 'heads' has no rule"):
    sharding.logical_to_spec(("heads",), (4,), mesh)
  with pytest.raises(ValueError, match="does not match logical axes"):
    from rlhf_jax.models.layers import param
    param(nnx.Rngs(0), (2, 3), ("embed",), CFG)
  abstract = nnx.split(nnx.eval_shape(lambda: ScalarHeadModel(CFG, rngs=nnx.Rngs(0))))[1]
  sh = sharding.param_shardings(abstract, mesh)
  assert norm_spec(sh["head_w"].spec, 1) == ("fsdp",)
  assert norm_spec(sh["head_b"].spec, 0) == ()
  assert norm_spec(sh["backbone"]["embed"].spec, 2) == ("tensor", "fsdp")


def test_init_sharded_equals_one_device_init(sharded_init):
  _, _, params, _, params1 = sharded_init
  for x in jax.tree.leaves(params1):
    assert len(x.sharding.device_set) == 1
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               params, params1)
  # Real random init (not zeros/ones) for the weights; norm scales are ones.
  assert np.asarray(params["embed"]).std() > 0.01
  np.testing.assert_array_equal(np.asarray(params["final_norm"]["scale"]), 1.0)
  # A different key gives different weights.
  _, other, _ = sharding.init_sharded(factory, jax.random.key(1), one_device_mesh())
  assert not np.array_equal(np.asarray(other["embed"]), np.asarray(params1["embed"]))


# ------------------------------------------------------------------- sharded forward/grad

def make_batch():
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, CFG.vocab_size, (8, 12)).astype(np.int32)
  lengths = np.array([12, 5, 9, 12, 3, 12, 7, 10])
  valid = np.arange(12)[None] < lengths[:, None]  # right-padded rows
  return {"tokens": tokens, "valid": valid}


def make_loss(graphdef):
  def loss(params, batch):
    """Mean next-token cross-entropy over real target tokens."""
    logits = nnx.merge(graphdef, params)(batch["tokens"], valid_BxT=batch["valid"]).logits_BxTxV
    logps = shifted_logps(logits, batch["tokens"])
    mask = batch["valid"].at[:, 0].set(False).astype(jnp.float32)
    return -jnp.sum(logps * mask) / jnp.sum(mask)
  return jax.jit(jax.value_and_grad(loss))


@pytest.fixture(scope="module")
def loss_setup():
  graphdef, params = helpers.make_model(CFG, seed=4, std=0.2)
  value_and_grad = make_loss(graphdef)
  mesh1 = one_device_mesh()
  abstract = nnx.split(nnx.eval_shape(lambda: factory(nnx.Rngs(0))))[1]
  p1 = jax.device_put(params, sharding.param_shardings(abstract, mesh1))
  loss1, grads1 = value_and_grad(p1, sharding.shard_batch(make_batch(), mesh1))
  return abstract, params, value_and_grad, float(loss1), jax.tree.map(np.asarray, grads1)


@pytest.mark.parametrize("sizes", [(1, 8, 1), (4, 1, 2), (2, 2, 2)],
                         ids=["fsdp8", "data4_tensor2", "data2_fsdp2_tensor2"])
def test_sharded_loss_and_grad_equal_unsharded(loss_setup, sizes):
  abstract, params, value_and_grad, want_loss, want_grads = loss_setup
  mesh = sharding.make_mesh(*sizes)
  shardings = sharding.param_shardings(abstract, mesh)
  sharded = jax.device_put(params, shardings)
  batch = sharding.shard_batch(make_batch(), mesh)
  assert norm_spec(batch["tokens"].sharding.spec, 2) == (("data", "fsdp"), None)
  rows = 8 // (sizes[0] * sizes[1])
  assert batch["tokens"].addressable_shards[0].data.shape == (rows, 12)
  if sizes[1] > 1:  # the parameters really are split
    assert sharded["embed"].addressable_shards[0].data.size < sharded["embed"].size
  loss, grads = value_and_grad(sharded, batch)
  assert np.isfinite(want_loss) and want_loss > 1.0
  # Sharding changes only the float32 reduction order (partial sums per device, then an
  # all-reduce): the forward's reductions plus the mean over the 8 x 12 tokens; the backward
  # runs the same reductions transposed, and each weight gradient also sums over the tokens.
  # atol at each gradient leaf's size covers entries that cancel to near 0 (helpers.f32_tol).
  n_fwd = helpers.forward_terms(CFG, seq_len=12) + 8 * 12
  np.testing.assert_allclose(float(loss), want_loss, **helpers.f32_tol(n_fwd))
  jax.tree.map(lambda g, w: np.testing.assert_allclose(
      np.asarray(g), w, **helpers.f32_tol(2 * n_fwd, scale=np.abs(w).max())), grads, want_grads)
  assert max(np.abs(g).max() for g in jax.tree.leaves(want_grads)) > 1e-3


def test_shard_batch_places_rows_on_data_axes():
  mesh = sharding.make_mesh(2, 2, 2)
  batch = make_batch()
  placed = sharding.shard_batch(batch, mesh)
  np.testing.assert_array_equal(np.asarray(placed["tokens"]), batch["tokens"])
  assert placed["valid"].dtype == bool
  assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"))
  # Devices along 'tensor' hold the same rows; along data/fsdp different ones.
  starts = {s.device: s.index[0].start for s in placed["tokens"].addressable_shards}
  devs = mesh.devices
  assert starts[devs[0, 0, 0]] == starts[devs[0, 0, 1]]
  assert len({starts[d] for d in devs[:, :, 0].flat}) == 4


# ------------------------------------------------------------ rows of a batch per process

def test_one_process_holds_every_row_and_places_host_batches():
  mesh = sharding.make_mesh(2, 2, 2)
  assert sharding.process_rows(mesh, 12) == slice(0, 12)
  assert sharding.process_rows(mesh, 3) == slice(0, 3)  # indivisible: replicated, all held
  x = np.arange(12 * 3, dtype=np.float32).reshape(12, 3)
  placed = sharding.shard_batch({"x": x}, mesh)["x"]
  assert placed.sharding.spec == P(("data", "fsdp")) and placed.shape == (12, 3)
  np.testing.assert_array_equal(sharding.to_host(placed), x)
  # A batch every process holds whole: rows over the data axes when they divide, else
  # replicated (3 prompts on a 4-way data axis).
  whole = sharding.shard_global({"a": x, "b": x[:3]}, mesh)
  assert whole["a"].sharding.spec == P(("data", "fsdp"))
  assert whole["b"].sharding.is_fully_replicated
  np.testing.assert_array_equal(sharding.to_host(whole["b"]), x[:3])
  np.testing.assert_array_equal(sharding.gather_rows(x[:5], mesh, 5), x[:5])
  assert sharding.mesh_of({"w": placed}) is mesh
