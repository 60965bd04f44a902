"""Benchmark: SFT throughput with and without sequence packing on a padding-heavy set.

    python -m rlhf_jax.bench_packing [--preset=peers_tiny] [--seq_len=512] [--batch=8]

Examples have chat-like lengths (log-normal, median --median_len tokens, clipped to
[8, seq_len]): padded, each fills one row of --seq_len; packed (data/packing.py), several
share a row with attention kept inside each. Both train the same step (one compile each, the
same row shape); what differs is how many real tokens a step trains on. Prints one JSON
object: seconds per step and REAL (non-padding) tokens per second of each, measured side by
side in one run, and their ratio. Never part of the test suite.
"""
import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import runtime
from rlhf_jax.bench.common import median_time, model_preset
from rlhf_jax.bench.train_workloads import lm_train_step
from rlhf_jax.data import packing


def examples(n: int, *, seq_len: int, median_len: int, vocab: int, seed: int = 0) -> list[dict]:
  """Right-padded SFT examples: a quarter prompt (no loss), the rest response."""
  rng = np.random.default_rng(seed)
  lengths = np.clip(rng.lognormal(np.log(median_len), 0.6, n).astype(int), 8, seq_len)
  out = []
  for length in lengths:
    tokens = np.zeros(seq_len, np.int32)
    tokens[:length] = rng.integers(1, vocab, length)
    mask = np.zeros(seq_len, np.float32)
    mask[length // 4:length] = 1.0
    out.append({"tokens": tokens, "loss_mask": mask, "valid": np.arange(seq_len) < length,
                "example_valid": np.True_})
  return out


def bench(cfg, rows: list[dict], keys, *, batch: int, repeats: int) -> dict:
  state, step = lm_train_step(cfg)
  data = {k: jnp.asarray(np.stack([r[k] for r in rows[:batch]])) for k in keys}
  holder = [state]

  def run():
    holder[0], metrics = step(holder[0], data)
    jax.block_until_ready(metrics)

  seconds = median_time(run, repeats=repeats)
  real = int(np.asarray(data["valid"]).sum())
  return {"seconds_per_step": seconds, "real_tokens_per_step": real,
          "real_tokens_per_s": real / seconds}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="peers_tiny")
  parser.add_argument("--seq_len", type=int, default=512)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--examples", type=int, default=512)
  parser.add_argument("--median_len", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  runtime.enable_compilation_cache()
  cfg = model_preset(args.preset, "float32")
  padded = examples(args.examples, seq_len=args.seq_len, median_len=args.median_len,
                    vocab=cfg.vocab_size)
  packed = packing.pack_examples(padded, args.seq_len, pad_id=0)
  base = ("tokens", "loss_mask", "valid")
  report = {"device": str(jax.devices()[0].device_kind), "preset": args.preset,
            "seq_len": args.seq_len, "batch": args.batch, "examples": args.examples,
            "padded_fill": float(np.mean([e["valid"].mean() for e in padded])),
            "packed_fill": packed.fill, "packed_rows": len(packed.rows),
            "padded": bench(cfg, padded, base, batch=args.batch, repeats=args.repeats),
            "packed": bench(cfg, packed.rows, base + ("segment_ids",), batch=args.batch,
                            repeats=args.repeats)}
  report["real_tokens_per_s_ratio"] = (report["packed"]["real_tokens_per_s"]
                                       / report["padded"]["real_tokens_per_s"])
  print(json.dumps(report, indent=1))


if __name__ == "__main__":
  main()
