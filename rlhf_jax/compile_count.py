"""Counts XLA backend compiles, to test that a step compiles once (fixed shapes: one compile
per shape).

Why not chex.assert_max_traces: it counts Python traces, and misses recompiles caused by a
changed input sharding or layout (same trace, new executable). jax.monitoring fires
'/jax/core/compile/backend_compile_duration' around every backend compile, including ones
served from the persistent compilation cache, so it counts executables actually built.
Eager jnp ops compile small programs too (e.g. `x + 1` outside jit), so build a test's
inputs before entering the counter, or look at `names`.

    with CompileCounter() as cc:
      state, m = step(state, batch)   # first call: compiles
      cc.reset()
      state, m = step(state, batch)
    assert cc.count == 0, cc.names
"""
import threading

import jax

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
  """Context manager that records the name of every function compiled while active."""

  def __init__(self):
    self.names: list[str] = []
    self._lock = threading.Lock()

  def _listener(self, event: str, duration_secs: float, **kwargs) -> None:
    del duration_secs
    if event == BACKEND_COMPILE_EVENT:
      with self._lock:
        self.names.append(str(kwargs.get("fun_name", "?")))

  @property
  def count(self) -> int:
    return len(self.names)

  def reset(self) -> None:
    with self._lock:
      self.names.clear()

  def __enter__(self) -> "CompileCounter":
    jax.monitoring.register_event_duration_secs_listener(self._listener)
    return self

  def __exit__(self, *exc) -> None:
    jax.monitoring.unregister_event_duration_listener(self._listener)
