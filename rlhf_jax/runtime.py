"""Process-level JAX settings shared by experiments, benchmarks and tests."""
import os

import jax

DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "rlhf_jax", "jax_cache")


def enable_compilation_cache(cache_dir: str | None = None) -> str:
  """Turns on JAX's persistent compilation cache (big win for cold CPU runs and tests).

  Every executable is cached, however fast it compiled, because on 2 CPU cores the many
  small programs of a run dominate its cold start.
  """
  cache_dir = cache_dir or os.environ.get("RLHF_JAX_CACHE_DIR", DEFAULT_CACHE_DIR)
  os.makedirs(cache_dir, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return cache_dir
