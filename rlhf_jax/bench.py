"""Benchmark: train-step throughput and MFU, sampler throughput, KV cache vs naive decoding.

    python -m rlhf_jax.bench [--presets=peers_tiny,small] [--dtype=float32]

Prints one JSON object. MFU is model FLOPs per second over the PEAK MATMUL FLOP/s measured
in the same run on the same device (a square matmul of the compute dtype), so the ratio is
meaningful on any machine. Model FLOPs per trained token: 6 * (matmul params) + 12 * layers *
d_model * seq_len (attention scores and values, forward + backward; PaLM appendix B).
Never part of the test suite.
"""
import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax import runtime, sharding
from rlhf_jax.models.config import ModelConfig, preset
from rlhf_jax.models.transformer import Transformer
from rlhf_jax.sampling import SamplingConfig, sample, sample_naive
from rlhf_jax.train import optim, state as state_lib, step as step_lib
from rlhf_jax.train.lm import lm_loss_fn

# The "tiny" shape of the peer comparison (TRL, a plain PyTorch training loop and tunix on
# Llama-shaped models with random weights, 0.52M params); the project's own `tiny` preset is
# the arithmetic world's model.
_PEERS_TINY = dict(vocab_size=512, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=384)


def model_preset(name: str, dtype: str) -> ModelConfig:
  if name == "peers_tiny":
    return preset("nano", dtype=dtype, **_PEERS_TINY)
  return preset(name, dtype=dtype)


def _time(fn, *, repeats: int) -> float:
  """Median wall time of fn() (which must block), after one warm-up call."""
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def peak_matmul_flops(dtype: str, sizes=(512, 1024, 2048)) -> float:
  best = 0.0
  for n in sizes:
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    seconds = _time(lambda: f(a).block_until_ready(), repeats=5)
    best = max(best, 2 * n ** 3 / seconds)
  return best


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  # The embedding lookup is a gather, not a matmul; a tied table still does the LM-head matmul.
  matmul_params = cfg.num_params() - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model)
  return 6 * matmul_params + 12 * cfg.n_layers * cfg.d_model * seq_len


def lm_train_step(cfg: ModelConfig):
  """(state, step) of the causal-LM train step on one device: what the benchmarks time."""
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  graphdef, params, shardings = sharding.init_sharded(lambda r: Transformer(cfg, rngs=r),
                                                      jax.random.key(0), mesh)
  opt = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-3, total_steps=1000))
  state = state_lib.init_train_state(params, opt, jax.random.key(0), param_shardings=shardings)
  return state, step_lib.compile_train_step(step_lib.make_train_step(lm_loss_fn(graphdef), opt,
                                                                     num_microbatches=1))


def bench_train_step(cfg: ModelConfig, *, batch: int, seq_len: int, repeats: int) -> dict:
  state, step = lm_train_step(cfg)
  rng = np.random.default_rng(0)
  data = {"tokens": jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, seq_len)), jnp.int32),
          "valid": jnp.ones((batch, seq_len), bool),
          "loss_mask": jnp.ones((batch, seq_len), jnp.float32).at[:, 0].set(0.0)}
  holder = [state]

  def run():
    holder[0], metrics = step(holder[0], data)
    jax.block_until_ready(metrics)

  seconds = _time(run, repeats=repeats)
  tokens = batch * seq_len
  return {"seconds_per_step": seconds, "tokens_per_s": tokens / seconds,
          "model_flops_per_s": tokens * train_flops_per_token(cfg, seq_len) / seconds}


def bench_sampler(cfg: ModelConfig, *, batch: int, prompt_len: int, new_tokens: int,
                  repeats: int, naive: bool) -> dict:
  graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
  params = state.to_pure_dict()
  prompts = jnp.asarray(np.random.default_rng(0).integers(0, min(cfg.vocab_size, 256),
                                                         (batch, prompt_len)), jnp.int32)
  valid = jnp.ones((batch, prompt_len), bool)
  # eos_id=-1 never matches a token: every row decodes exactly new_tokens tokens, so both
  # samplers do the same work.
  scfg = SamplingConfig(max_new_tokens=new_tokens, eos_id=-1, pad_id=0)
  out = {}
  for name, fn in (("kv_cache", sample), ("naive", sample_naive)):
    if name == "naive" and not naive:
      continue
    seconds = _time(lambda: jax.block_until_ready(
        fn(graphdef, params, prompts, valid, jax.random.key(0), cfg=scfg)), repeats=repeats)
    out[f"{name}_new_tokens_per_s"] = batch * new_tokens / seconds
  if naive:
    out["speedup_over_naive"] = out["kv_cache_new_tokens_per_s"] / out["naive_new_tokens_per_s"]
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--presets", default="peers_tiny,small")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--train_batch", type=int, default=8)
  parser.add_argument("--seq_len", type=int, default=128)
  parser.add_argument("--sample_batch", type=int, default=8)
  parser.add_argument("--prompt_len", type=int, default=64)
  parser.add_argument("--new_tokens", type=int, default=128)
  parser.add_argument("--naive_new_tokens", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  runtime.enable_compilation_cache()
  peak = peak_matmul_flops(args.dtype)
  report = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
            "dtype": args.dtype, "peak_matmul_flops_per_s": peak, "presets": {}}
  for name in args.presets.split(","):
    cfg = model_preset(name, args.dtype)
    train = bench_train_step(cfg, batch=args.train_batch, seq_len=args.seq_len,
                             repeats=args.repeats)
    train["mfu"] = train["model_flops_per_s"] / peak
    sampler = bench_sampler(cfg, batch=args.sample_batch, prompt_len=args.prompt_len,
                            new_tokens=args.new_tokens, repeats=args.repeats, naive=False)
    naive = bench_sampler(cfg, batch=args.sample_batch, prompt_len=args.prompt_len,
                          new_tokens=args.naive_new_tokens, repeats=max(1, args.repeats // 2),
                          naive=True)
    report["presets"][name] = {
        "params": cfg.num_params(), "train_step": train, "sampler": sampler,
        f"sampler_vs_naive_at_{args.naive_new_tokens}_new_tokens": naive}
  print(json.dumps(report, indent=1))


if __name__ == "__main__":
  main()
