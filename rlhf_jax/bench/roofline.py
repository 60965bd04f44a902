"""The decode loop against its memory roofline, on this machine.

    python -m rlhf_jax.bench.roofline [--presets=peers_tiny,small] [--dtype=float32]

A decode step of B rows multiplies B x D activations by every weight matrix: at small B it
reads every weight once and does 2 B flops per weight read, so it is bound by memory
bandwidth, not by matmul throughput. Measured in one run:
  bandwidth_bytes_per_s   reading one large array (a sum over 512 MiB, jitted): what the
                          machine streams from memory
  step_bytes              what one decode step must read: the parameters (the embedding
                          table's row gather aside) plus the KV cache at its mean fill
  roofline_step_s         step_bytes / bandwidth: no decode step can be faster
  matmul_chain_s          the step's weight matmuls alone (every layer's q, k, v, o, gate,
                          up, down and the LM head, B rows each), jitted: the same reads
                          without attention, sampling or the loop
  decode_step_s           the sampler's steady per-token time: (new tokens at 2n - at n) / n
  roofline_share          roofline_step_s / decode_step_s
Peers decode through the same XLA (tunix) or through PyTorch's CPU kernels (HF generate); none
can beat the roofline, so a target ratio above decode_step_s / roofline_step_s is out of reach.
"""
import argparse
import json

import jax
import jax.numpy as jnp

from rlhf_jax.bench.common import median_time, model_preset
from rlhf_jax.bench.rl_workloads import bench_sampler


def stream_bandwidth(nbytes: int = 512 * 2**20) -> float:
  x = jnp.ones((nbytes // 4,), jnp.float32)
  total = jax.jit(jnp.sum)
  return nbytes / median_time(lambda: total(x).block_until_ready(), repeats=5)


def matmul_chain_seconds(cfg, rows: int) -> float:
  """One decode step's weight matmuls, B rows, jitted as one program."""
  d, h = cfg.d_model, cfg.dim_per_head
  shapes = [(d, cfg.n_heads * h), (d, cfg.n_kv_heads * h), (d, cfg.n_kv_heads * h),
            (cfg.n_heads * h, d), (d, cfg.d_ff), (d, cfg.d_ff), (cfg.d_ff, d)] * cfg.n_layers
  shapes.append((d, cfg.vocab_size))
  weights = [jnp.ones(s, cfg.compute_dtype) * 0.01 for s in shapes]

  @jax.jit
  def chain(ws, x):  # every product is used, so XLA computes (and reads) every weight
    return sum(jnp.sum(x[:, :w.shape[0]] @ w) for w in ws)
  x = jnp.ones((rows, max(s[0] for s in shapes)), cfg.compute_dtype)
  return median_time(lambda: chain(weights, x).block_until_ready(), repeats=5)


def roofline(preset: str, dtype: str, *, rows: int = 8, prompt_len: int = 64,
             new_tokens: int = 128, repeats: int = 5) -> dict:
  cfg = model_preset(preset, dtype)
  bandwidth = stream_bandwidth()
  itemsize = jnp.dtype(cfg.dtype).itemsize
  param_bytes = (cfg.num_params() - cfg.vocab_size * cfg.d_model * (not cfg.tie_embeddings)
                 ) * jnp.dtype(cfg.param_dtype).itemsize
  mean_fill = prompt_len + 1.5 * new_tokens  # the steps timed: tokens n+1 .. 2n
  cache_bytes = 2 * cfg.n_layers * rows * mean_fill * cfg.n_kv_heads * cfg.dim_per_head * itemsize
  step_bytes = param_bytes + cache_bytes
  short, long = (bench_sampler(cfg, batch=rows, prompt_len=prompt_len, new_tokens=n,
                               repeats=repeats)["seconds"] for n in (new_tokens, 2 * new_tokens))
  decode_step = (long - short) / new_tokens
  return {"preset": preset, "dtype": dtype, "rows": rows,
          "bandwidth_bytes_per_s": bandwidth, "step_bytes": step_bytes,
          "roofline_step_s": step_bytes / bandwidth,
          "matmul_chain_s": matmul_chain_seconds(cfg, rows),
          "decode_step_s": decode_step, "roofline_share": step_bytes / bandwidth / decode_step}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--presets", default="peers_tiny,small")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  out = [roofline(p, args.dtype, repeats=args.repeats) for p in args.presets.split(",")]
  print(json.dumps({"device": str(jax.devices()[0].device_kind), "results": out}, indent=1))


if __name__ == "__main__":
  main()
