"""Compiled wrappers for the loss tests: every call runs as one compiled program (one per
shape), far cheaper on 2 CPU cores than op-by-op dispatch."""
import functools
import inspect

import jax


@functools.cache
def J(fn):
  """fn under jax.jit with its keyword-only hyperparameters static."""
  static = [p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY]
  return jax.jit(fn, static_argnames=static)


def G(f, **kwargs):
  return jax.jit(jax.grad(f, **kwargs))
