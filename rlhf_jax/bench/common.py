"""What every benchmark workload shares: the model presets, timing, compile time and the
compiled program's memory, the peak matmul rate and model FLOPs (docs/benchmarks.md)."""
import time

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models.config import ModelConfig, preset

# The "tiny" shape of the peer comparison (TRL, a plain PyTorch training loop and tunix on
# Llama-shaped models with random weights, 0.52M params); the project's own `tiny` preset is
# the arithmetic world's model.
_PEERS_TINY = dict(vocab_size=512, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=384)


def model_preset(name: str, dtype: str) -> ModelConfig:
  if name == "peers_tiny":
    return preset("nano", dtype=dtype, **_PEERS_TINY)
  return preset(name, dtype=dtype)


def median_time(fn, *, repeats: int, warmup: int = 1) -> float:
  """Median wall time of fn() (which must block) over `repeats` calls after `warmup` calls."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def compile_with_stats(jitted, *args, **kwargs):
  """(compiled, stats) of a jax.jit function at these arguments, lowered and compiled
  explicitly: stats = compile_s (lowering + XLA compile, wall seconds) and memory
  (memory_stats). jax shares the executable with later calls of `jitted` at the same
  shapes, so they compile nothing."""
  start = time.perf_counter()
  compiled = jitted.lower(*args, **kwargs).compile()
  return compiled, {"compile_s": time.perf_counter() - start,
                    "memory": memory_stats(compiled)}


def memory_stats(compiled) -> dict:
  """XLA's buffer assignment of one executable (compiled.memory_analysis()), in bytes:
  arguments, outputs, temporaries, and `peak_bytes` = arguments + outputs - aliased
  (outputs written into donated arguments) + temporaries: what the program holds live at
  most, as planned at compile time. Constants baked into the program (e.g. a closed-over
  reference model) and the runtime allocator's own overhead are not counted."""
  m = compiled.memory_analysis()
  if m is None:  # a backend without the analysis
    return {}
  out = {"argument_bytes": int(m.argument_size_in_bytes),
         "output_bytes": int(m.output_size_in_bytes),
         "alias_bytes": int(m.alias_size_in_bytes),
         "temp_bytes": int(m.temp_size_in_bytes)}
  out["peak_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                       + out["temp_bytes"])
  return out


def peak_matmul_flops(dtype: str, sizes=(512, 1024, 2048)) -> float:
  """The best FLOP/s of a square matmul of the compute dtype: the denominator of MFU, measured
  in the same run on the same device, so MFU means the same on any machine."""
  best = 0.0
  for n in sizes:
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    seconds = median_time(lambda: f(a).block_until_ready(), repeats=5)
    best = max(best, 2 * n ** 3 / seconds)
  return best


def _matmul_params(cfg: ModelConfig) -> int:
  # The embedding lookup is a gather, not a matmul; a tied table still does the LM-head matmul.
  return cfg.num_params() - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model)


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Forward + backward model FLOPs per token: 6 * (matmul params) + 12 * layers * d_model *
  seq_len (attention scores and values; PaLM appendix B)."""
  return 6 * _matmul_params(cfg) + 12 * cfg.n_layers * cfg.d_model * seq_len


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """A third of train_flops_per_token: the forward alone (e.g. an in-step reference model)."""
  return train_flops_per_token(cfg, seq_len) / 3
