"""The train state: a pure pytree of arrays, so it can be jitted, donated and checkpointed.

Why not nnx.Optimizer: it is mutable, and a train step here is a pure function compiled
once with donation (one compile per shape, updated in place). Params are any pytree of arrays (e.g. the state
from nnx.split); the module that owns the model merges them back where it needs a module.

The rng is stored as raw uint32 key data (jax.random.key_data), not a typed key: typed
keys do not round-trip through orbax's StandardRestore. Use `state.key` to get the typed key.
"""
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from rlhf_jax import sharding

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """params: model parameters; opt_state: optax state; step: int32 scalar, the number of
  updates applied so far; rng: uint32 key data of the run's base key (never advanced --
  step t derives its randomness as fold_in(key, t), see step.py)."""
  params: PyTree
  opt_state: optax.OptState
  step: jax.Array
  rng: jax.Array

  @property
  def key(self) -> jax.Array:
    """The base PRNG key as a typed key."""
    return jax.random.wrap_key_data(self.rng)


def _key_data(rng: jax.Array) -> jax.Array:
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(rng)
  return jnp.asarray(rng, jnp.uint32)


def _replicated_like(param_shardings: PyTree) -> NamedSharding:
  return sharding.replicated(jax.tree.leaves(param_shardings)[0].mesh)


def state_shardings(optimizer: optax.GradientTransformation, params: PyTree,
                    param_shardings: PyTree) -> TrainState:
  """Shardings of the whole TrainState, derived from the params' shardings.

  Optimizer-state leaves that mirror a parameter (Adam's mu and nu) take that parameter's
  sharding; everything else (counts, scalars) and step/rng are replicated on the same mesh.
  `params` may be arrays or jax.ShapeDtypeStruct (nothing is allocated).
  """
  replicated = _replicated_like(param_shardings)
  abstract_opt = jax.eval_shape(optimizer.init, params)
  opt_shardings = optax.tree_map_params(
      optimizer, lambda _, s: s, abstract_opt, param_shardings,
      transform_non_params=lambda _: replicated)
  return TrainState(params=param_shardings, opt_state=opt_shardings,
                    step=replicated, rng=replicated)


def abstract_state(optimizer: optax.GradientTransformation, params: PyTree,
                   param_shardings: PyTree) -> TrainState:
  """A TrainState of jax.ShapeDtypeStruct carrying shardings: the target of a restore."""
  def build(params):
    return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32),
                      jax.random.key_data(jax.random.key(0)))
  shapes = jax.eval_shape(build, params)
  shardings = state_shardings(optimizer, params, param_shardings)
  return jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def init_train_state(params: PyTree, optimizer: optax.GradientTransformation,
                     rng: jax.Array, *, param_shardings: PyTree | None = None) -> TrainState:
  """A step-0 TrainState. The optimizer state is created under jit with out_shardings so
  it is born sharded like the params (never materialised whole on one device).

  rng: a typed key (jax.random.key) or raw key data.
  """
  def build(params, rng_data):
    return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32), rng_data)

  rng_data = _key_data(rng)
  if param_shardings is None:
    return jax.jit(build)(params, rng_data)
  shardings = state_shardings(optimizer, params, param_shardings)
  return jax.jit(build, in_shardings=(param_shardings, shardings.rng),
                 out_shardings=shardings)(params, rng_data)
