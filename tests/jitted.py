"""Compiled wrappers for the loss tests: every call runs as one compiled program (one per
shape), far cheaper on 2 CPU cores than op-by-op dispatch."""
import functools
import inspect

import jax
import numpy as np


@functools.cache
def J(fn):
  """fn under jax.jit with its keyword-only hyperparameters static."""
  static = [p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY]
  return jax.jit(fn, static_argnames=static)


def G(f, **kwargs):
  return jax.jit(jax.grad(f, **kwargs))


def fd_grad(f, x, h=1e-6):
  """Central finite-difference gradient of a scalar float64 function of one array."""
  x = np.asarray(x, np.float64)
  g = np.zeros_like(x)
  for i in np.ndindex(x.shape):
    e = np.zeros_like(x)
    e[i] = h
    g[i] = (f(x + e) - f(x - e)) / (2 * h)
  return g
