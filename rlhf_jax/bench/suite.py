"""The benchmark's workloads by name, at the shapes of docs/benchmarks.md, into one report."""
import dataclasses
import sys

import jax

from rlhf_jax.bench.common import model_preset, peak_matmul_flops
from rlhf_jax.bench.rl_workloads import bench_grpo, bench_sampler
from rlhf_jax.bench.train_workloads import bench_dpo, bench_sft

WORKLOADS = ("dpo", "dpo_shared", "dpo_ref_in_step", "sft", "sampler", "sampler_naive", "grpo",
             "grpo_shared", "grpo_fast")
TRAIN_WORKLOADS = ("dpo", "dpo_shared", "dpo_ref_in_step", "sft")  # these report MFU


@dataclasses.dataclass(frozen=True)
class Shapes:
  """Every workload's shape; the defaults are the peer comparison's."""
  batch: int = 8  # DPO pairs, SFT rows, sampler prompts
  prompt_len: int = 64
  response_len: int = 64  # DPO / SFT response tokens (eos included)
  new_tokens: int = 128  # sampler
  naive_new_tokens: int = 256  # sampler_naive: long enough for the cache to matter
  grpo_prompts: int = 8
  group_size: int = 4
  grpo_new_tokens: int = 64


def run_workload(name: str, cfg, shapes: Shapes, repeats: int) -> dict:
  s = shapes
  if name in ("dpo", "dpo_shared", "dpo_ref_in_step"):
    return bench_dpo(cfg, pairs=s.batch, prompt_len=s.prompt_len, response_len=s.response_len,
                     repeats=repeats, reference_in_step=name == "dpo_ref_in_step",
                     shared_prompt=name == "dpo_shared")
  if name == "sft":
    return bench_sft(cfg, batch=s.batch, prompt_len=s.prompt_len,
                     response_len=s.response_len, repeats=repeats)
  if name == "sampler":
    return bench_sampler(cfg, batch=s.batch, prompt_len=s.prompt_len, new_tokens=s.new_tokens,
                         repeats=repeats)
  if name == "sampler_naive":  # naive decoding, and the KV-cache sampler's speed-up over it
    args = dict(batch=s.batch, prompt_len=s.prompt_len, new_tokens=s.naive_new_tokens)
    naive = bench_sampler(cfg, **args, repeats=max(1, repeats // 2), naive=True)
    cached = bench_sampler(cfg, **args, repeats=repeats)
    return {**naive, "kv_cache_new_tokens_per_s": cached["new_tokens_per_s"],
            "speedup_over_naive": cached["new_tokens_per_s"] / naive["new_tokens_per_s"]}
  if name in ("grpo", "grpo_shared", "grpo_fast"):
    return bench_grpo(cfg, prompts=s.grpo_prompts, group_size=s.group_size,
                      prompt_len=s.prompt_len, new_tokens=s.grpo_new_tokens, repeats=repeats,
                      share_prompt=name != "grpo", sampler_old_logps=name == "grpo_fast")
  raise ValueError(f"unknown workload {name!r}; choose from {WORKLOADS}")


def run(presets, workloads, *, dtype: str = "float32", shapes: Shapes = Shapes(),
        repeats: int = 5, log=sys.stderr) -> dict:
  """{"device", "backend", "dtype", "shapes", "repeats", "peak_matmul_flops_per_s",
  "presets": {preset: {"params": n, workload: {...}}}}; one progress line per workload on
  `log`. The peak matmul rate is measured only when a train workload runs (MFU needs it)."""
  for name in workloads:
    if name not in WORKLOADS:
      raise ValueError(f"unknown workload {name!r}; choose from {WORKLOADS}")
  report = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
            "dtype": dtype, "shapes": dataclasses.asdict(shapes), "repeats": repeats,
            "presets": {}}
  peak = None
  if any(w in TRAIN_WORKLOADS for w in workloads):
    peak = report["peak_matmul_flops_per_s"] = peak_matmul_flops(dtype)
  for preset_name in presets:
    cfg = model_preset(preset_name, dtype)
    out = report["presets"][preset_name] = {"params": cfg.num_params()}
    for name in workloads:
      result = run_workload(name, cfg, shapes, repeats)
      if name in TRAIN_WORKLOADS:
        result["mfu"] = result["model_flops_per_s"] / peak
      out[name] = result
      print(f"[bench] {preset_name} {name} done", file=log, flush=True)
  return report


def _mib(n) -> str:
  return f"{n / 2 ** 20:.1f}"


def table(report: dict) -> str:
  """A short human-readable table of a report: per preset and workload, the time, throughput,
  MFU, compile seconds and peak MiB (the train step's, for GRPO)."""
  lines = [f"{'preset':<11} {'workload':<16} {'seconds':>8} {'throughput':>18} {'MFU':>5} "
           f"{'compile s':>9} {'peak MiB':>8}"]
  for preset_name, results in report["presets"].items():
    for name, r in results.items():
      if name == "params":
        continue
      if "tokens_per_s" in r:
        seconds, rate = r["seconds_per_step"], f"{r['tokens_per_s']:.0f} tok/s"
      elif "new_tokens_per_s" in r:
        seconds, rate = r["seconds"], f"{r['new_tokens_per_s']:.0f} new tok/s"
      else:
        seconds, rate = r["seconds"], f"{100 * r['generation_share']:.0f}% generation"
      memory = r["memory"].get("train_step", r["memory"])
      mfu = f"{100 * r['mfu']:.0f}%" if "mfu" in r else "-"
      lines.append(f"{preset_name:<11} {name:<16} {seconds:>8.3f} {rate:>18} {mfu:>5} "
                   f"{r['compile_s']:>9.2f} {_mib(memory.get('peak_bytes', 0)):>8}")
  return "\n".join(lines)
