"""CompileCounter sees recompiles, including the sharding-only ones chex.assert_max_traces misses."""
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from rlhf_jax.compile_count import CompileCounter


def test_counts_shape_and_sharding_recompiles():
  f = jax.jit(lambda x: x * 2 + 1)
  mesh = jax.make_mesh((2,), ("d",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:2])
  # Inputs are built first: eager ops (even x + 1) compile small programs of their own.
  x, y, short = jnp.arange(8.0), jnp.ones(8), jnp.arange(4.0)
  x_sharded = jax.device_put(x, NamedSharding(mesh, P("d")))
  with CompileCounter() as cc:
    f(x)
    assert cc.count == 1
    f(y)  # same shape and placement: cached
    assert cc.count == 1
    f(short)  # new shape
    assert cc.count == 2
    f(x_sharded)  # same shape, new sharding: a new executable, same trace
    assert cc.count == 3, cc.names
  f(jnp.zeros(16))  # after exit: not counted
  assert cc.count == 3
