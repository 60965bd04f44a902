"""Trace-time shape checks shared by the loss modules.

Shapes are static under jax.jit, so these raise at trace time, before anything compiles.
Hand-written rather than chex.assert_rank / assert_equal_shape: chex raises AssertionError
with "input 0 has rank 3", while these raise ValueError naming every array and its shape.
"""
from typing import Sequence


def check_rank(name: str, x, rank: int) -> None:
  if x.ndim != rank:
    raise ValueError(f"{name} must have rank {rank}, got shape {tuple(x.shape)}")


def check_same_shape(**arrays) -> None:
  """Raises ValueError naming every array when the shapes differ: check_same_shape(a_BxT=a, b_BxT=b)."""
  shapes = {name: tuple(a.shape) for name, a in arrays.items()}
  if len(set(shapes.values())) > 1:
    listed = ", ".join(f"{n}{s}" for n, s in shapes.items())
    raise ValueError(f"shape mismatch: {listed}; these arrays must have the same shape")


def check_leading(names_arrays: Sequence[tuple[str, object]], ndim: int) -> None:
  """Checks that several arrays share their first `ndim` dimensions."""
  lead = {n: tuple(a.shape[:ndim]) for n, a in names_arrays}
  if len(set(lead.values())) > 1:
    listed = ", ".join(f"{n}{tuple(a.shape)}" for n, a in names_arrays)
    raise ValueError(f"leading dimensions differ: {listed}")
