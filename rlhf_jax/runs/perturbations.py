"""An experiment's results under the perturbations that change its float reductions, next to
its seed spread: the evidence that a result is a property of the method, not of one CPU.

    python -m experiments.perturbations --flagfile=experiments/configs/perturb_sft_grpo_tiny.flags

Float rounding differs between machines (AVX2 vs AVX-512 kernels, thread counts, how a
computation is sharded), and a small model near a learning transition can amplify one ulp into
a different result. No single machine can run on another CPU, so this runs the experiment's
whole stage chain (every flagfile it names through a --*_flagfile flag, each stage rebuilt in
its own stage root) once per variant:

  seed S        --seed=S on every stage (init, data order, sampling)
  data_order    --data_seed=1000 on every stage: seed 0's init, another training data order
  sharded8      8 fake CPU devices (XLA --xla_force_host_platform_device_count=8): the same
                run data-parallel, its reductions split 8 ways
  threads1      XLA's CPU thread pool off (one thread: different reduction blocking)
  fast_math     XLA's CPU fast math on (reassociated, approximate float arithmetic)

and reports, per metric, every value, the seed mean and standard deviation, the largest
distance of a perturbation from seed 0 (the run it perturbs), and the interval holding every
run. The perturbed flagfiles are written next to the runs (<workdir>/<variant>/flags/), so
each run can be repeated by hand. A variant runs in <workdir>/<variant>/<hash of its
flagfiles>/: one that finished with the same flagfiles is read back, not rerun. A variant
that fails (a stage missing its criterion) is reported as failed, with its error, and the
spread is taken over the others (distances from the first seed that finished).
"""
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np

from rlhf_jax import provenance
from rlhf_jax.pipeline import config
from rlhf_jax.runs import plots, sweeps
from rlhf_jax.train.logging import read_metrics

# name -> (extra flags for every stage, XLA flags)
PERTURBATIONS = {
    "data_order": (("--data_seed=1000",), ""),
    "sharded8": ((), "--xla_force_host_platform_device_count=8"),
    "threads1": ((), "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"),
    "fast_math": ((), "--xla_cpu_enable_fast_math=true"),
}
_FLAGFILE_LINE = re.compile(r"^--(\w+_flagfile)=(.+)$")


@dataclasses.dataclass(frozen=True)
class PerturbationConfig:
  experiment: str = config.flag("experiments.sft", "The experiment module to run.")
  experiment_flagfile: str = config.flag("experiments/configs/sft_grpo_tiny.flags",
                                         "Its flagfile (the top of the stage chain).")
  metrics: str = config.flag("base.accuracy_greedy,sft.accuracy_greedy",
                             "Comma-separated dotted keys of the run's result.json to report.")
  seeds: str = config.flag("0,1,2", "Seeds (the first is the run the perturbations perturb).")
  perturbations: str = config.flag(",".join(PERTURBATIONS),
                                   f"Comma-separated among {', '.join(PERTURBATIONS)}.")
  workdir: str = config.flag("workdirs/perturbations", "Root of the variants' runs.")
  data_dir: str = config.flag("workdirs/data", "Where the world's datasets are materialised.")
  out: str = config.flag("experiments/results/perturbations/sft_grpo_tiny.json",
                         "The JSON report; its figure (learning curves) goes beside it (.png).")
  curve_metric: str = config.flag("accuracy_greedy", "The held-out metric whose learning "
                                  "curve each stage of each variant contributes to the figure.")

  def __post_init__(self):
    seeds = sweeps.parse_seeds(self.seeds)
    if seeds[0] != 0:
      raise ValueError(f"--seeds must start with 0 (the run the perturbations perturb), "
                       f"got {self.seeds!r}")
    unknown = set(self.perturbation_list) - set(PERTURBATIONS)
    if unknown:
      raise ValueError(f"--perturbations: unknown {', '.join(sorted(unknown))} (known: "
                       f"{', '.join(PERTURBATIONS)})")
    if not self.metric_list:
      raise ValueError("--metrics must name at least one result.json key")
    if not os.path.exists(self.experiment_flagfile):
      raise ValueError(f"--experiment_flagfile={self.experiment_flagfile} does not exist")

  @property
  def perturbation_list(self) -> list[str]:
    return [p for p in self.perturbations.split(",") if p]

  @property
  def metric_list(self) -> list[str]:
    return [m for m in self.metrics.split(",") if m]


def variants(cfg: PerturbationConfig) -> dict[str, tuple[tuple[str, ...], str]]:
  """name -> (stage flags, XLA flags), seeds first."""
  out = {f"seed{s}": ((f"--seed={s}",), "") for s in sweeps.parse_seeds(cfg.seeds)}
  for name in cfg.perturbation_list:
    flags, xla = PERTURBATIONS[name]
    out[name] = (("--seed=0", *flags), xla)
  return out


def perturbed_flagfile(path: str, extra: tuple[str, ...], out_dir: str) -> str:
  """A copy of flagfile `path` in out_dir with `extra` appended, whose --*_flagfile lines point
  at perturbed copies of their own flagfiles (the whole chain carries the perturbation)."""
  os.makedirs(out_dir, exist_ok=True)
  lines = []
  for line in open(path).read().splitlines():
    match = _FLAGFILE_LINE.match(line.strip())
    if match:
      line = f"--{match.group(1)}={perturbed_flagfile(match.group(2), extra, out_dir)}"
    lines.append(line)
  target = os.path.join(out_dir, os.path.basename(path))
  with open(target, "w") as f:
    f.write("\n".join([*lines, *extra]) + "\n")
  return target


def lookup(result: dict, dotted: str) -> float:
  value = result
  for part in dotted.split("."):
    if not isinstance(value, dict) or part not in value:
      raise KeyError(f"result.json has no {dotted!r} (stopped at {part!r}; keys there: "
                     f"{', '.join(value) if isinstance(value, dict) else type(value).__name__})")
    value = value[part]
  return float(value)


def _chain_digest(flags_dir: str) -> str:
  """A hash of the variant's perturbed flagfiles: a finished run is reused only for these."""
  h = hashlib.sha256()
  for name in sorted(os.listdir(flags_dir)):
    h.update(name.encode() + b"\0" + open(os.path.join(flags_dir, name), "rb").read())
  return h.hexdigest()[:16]


def run_variant(cfg: PerturbationConfig, name: str, flags: tuple[str, ...], xla: str) -> dict:
  """Runs one variant in its own workdir and stage root, or reads it back when it finished
  with the same flagfile chain (a changed flagfile reruns it, in fresh directories)."""
  flags_dir = os.path.join(cfg.workdir, name, "flags")
  shutil.rmtree(flags_dir, ignore_errors=True)
  top = perturbed_flagfile(cfg.experiment_flagfile, flags, flags_dir)
  digest = _chain_digest(flags_dir)
  root = os.path.join(cfg.workdir, name, digest)
  result_path = os.path.join(root, "run", "result.json")
  failed_path = os.path.join(root, "FAILED")
  if os.path.exists(failed_path):
    return {"flags": list(flags), "xla_flags": xla, "workdir": root,
            "failed": open(failed_path).read()}
  if not os.path.exists(result_path):
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in (env.get("XLA_FLAGS", ""), xla) if f)
    cmd = [sys.executable, "-m", cfg.experiment, f"--flagfile={top}",
           f"--workdir={root}/run", f"--stage_root={root}/stages", f"--data_dir={cfg.data_dir}"]
    print(f"[perturbations] {name}: XLA_FLAGS={env['XLA_FLAGS']!r} {' '.join(cmd[2:])}",
          flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stderr=subprocess.PIPE, text=True)
    sys.stderr.write(proc.stderr[-4000:])
    if proc.returncode:
      # A variant that fails (a stage missing its criterion) is a result, not a crash: the
      # report says which variant failed and why, and spreads over the others.
      errors = [line for line in proc.stderr.splitlines() if "Error" in line]
      os.makedirs(root, exist_ok=True)
      with open(failed_path, "w") as f:
        f.write(errors[-1] if errors else f"exit status {proc.returncode}")
      return run_variant(cfg, name, flags, xla)
    with open(os.path.join(root, "wall_s"), "w") as f:
      f.write(f"{time.perf_counter() - start:.1f}")
  with open(result_path) as f:
    result = json.load(f)
  return {"flags": list(flags), "xla_flags": xla, "workdir": root,
          "values": {m: lookup(result, m) for m in cfg.metric_list}}


def spread(runs: dict[str, dict], metric: str, seed_names: list[str]) -> dict:
  """Seed mean/std/se, each perturbation's distance from seed 0, and the all-run interval."""
  runs = {n: r for n, r in runs.items() if "values" in r}  # failed variants have none
  seed_names = [n for n in seed_names if n in runs]
  seeds = np.array([runs[n]["values"][metric] for n in seed_names], np.float64)
  ref = seeds[0]
  perturbed = {n: r["values"][metric] - ref for n, r in runs.items() if n not in seed_names}
  every = [r["values"][metric] for r in runs.values()]
  return {"seed_mean": float(seeds.mean()),
          "seed_std": float(seeds.std(ddof=1)) if len(seeds) > 1 else 0.0,
          "seed_range": float(seeds.max() - seeds.min()),
          "perturbation_minus_seed0": perturbed,
          "perturbation_max_abs": max(map(abs, perturbed.values()), default=0.0),
          "interval": [float(min(every)), float(max(every))]}


def stage_curves(cfg: PerturbationConfig, root: str) -> dict[str, list[list[float]]]:
  """{stage: [[step, value], ...]}: the held-out curve of --curve_metric of each stage a
  variant built in `root` (its stage root) and of the run itself, from their metrics.jsonl."""
  stage_root = os.path.join(root, "stages")
  dirs = {d.split("-")[0]: os.path.join(stage_root, d)
          for d in (sorted(os.listdir(stage_root)) if os.path.isdir(stage_root) else [])}
  dirs["run"] = os.path.join(root, "run")
  out = {}
  for stage, workdir in dirs.items():
    if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
      continue
    points = [[r["step"], r["metrics"][cfg.curve_metric]]
              for r in read_metrics(workdir, split="eval") if cfg.curve_metric in r["metrics"]]
    if points:
      out[stage] = points
  return out


def run(cfg: PerturbationConfig) -> dict:
  all_variants = variants(cfg)
  runs = {name: run_variant(cfg, name, flags, xla)
          for name, (flags, xla) in all_variants.items()}
  seed_names = [n for n in all_variants if n.startswith("seed")]
  out = {"experiment": cfg.experiment, "flagfile": cfg.experiment_flagfile, "runs": runs,
         "spread": {m: spread(runs, m, seed_names) for m in cfg.metric_list},
         "curve_metric": cfg.curve_metric,
         "failed": {name: r["failed"] for name, r in runs.items() if "failed" in r},
         "curves": {name: stage_curves(cfg, r["workdir"]) for name, r in runs.items()},
         "provenance": provenance.provenance()}
  os.makedirs(os.path.dirname(cfg.out) or ".", exist_ok=True)
  with open(cfg.out, "w") as f:
    json.dump(out, f, indent=1)
  plots.stage_curves(out["curves"], cfg.curve_metric, os.path.splitext(cfg.out)[0] + ".png",
                     title=f"{os.path.basename(cfg.experiment_flagfile)}: seeds and "
                           f"perturbations")
  for name, r in runs.items():
    if "failed" in r:
      print(f"[perturbations] {name} FAILED: {r['failed']}")
  print(f"{'metric':<28} {'seeds mean +- std':>20} {'perturbation max |d|':>22} interval")
  for m, s in out["spread"].items():
    print(f"{m:<28} {s['seed_mean']:>11.3f} +- {s['seed_std']:.3f} "
          f"{s['perturbation_max_abs']:>22.3f} [{s['interval'][0]:.3f}, {s['interval'][1]:.3f}]")
  return out
