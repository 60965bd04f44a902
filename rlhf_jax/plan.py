"""Plan before renting: compile a stage's real programs for a mesh (on fake CPU devices unless
this host has enough of its own) and print each one's per-device memory, as XLA assigned it,
beside the analytic estimate of rlhf_jax.memory.

    python -m rlhf_jax.plan --stage=dpo --model=1b --dtype=bfloat16 --mesh_fsdp=8 \\
        --batch_size=32 --seq_len=1024 --num_microbatches=4

Nothing is materialised: every argument is a jax.ShapeDtypeStruct carrying the run's sharding,
and `jax.jit(f).lower(...).compile()` only plans buffers. The programs (plan_models.py): the
train step of every trained model (step.make_train_step with the stage's real loss_fn and
state.state_shardings), the frozen reference's and reward model's forwards, the sampler with
its KV cache, DPO's reference precompute pass.

Numbers per device and program, from `compiled.memory_analysis()`:
  argument  the inputs (train state, frozen params, batch), this device's shards
  output    the outputs; alias = outputs written into donated inputs (the train state)
  temp      XLA's scratch: activations kept for backprop, gradients, gathered weights,
            logits, KV cache, fusion temporaries, after buffer reuse
  peak      argument + output - alias + temp + generated code
and per stage: resident (train state and frozen params, held between programs) + the largest
transient (peak - resident arguments) of any program = what the devices must hold.

The CPU compiler partitions a program like the TPU/GPU ones (the same SPMD partitioner) but
fuses and schedules differently, keeps bfloat16 intermediates in float32 and never
rematerialises to fit a memory limit, so `temp` is the CPU's buffer assignment: close to, not
equal to, an accelerator's. Arguments and outputs are exact. docs/plan.md: what each number
means and how far the two agree.
"""
import dataclasses
import json
import math
import os
import re
import sys
import time

import jax
from absl import flags

from rlhf_jax import sharding
from rlhf_jax.models import hf
from rlhf_jax.models.config import ATTENTION_IMPLS, REMAT_POLICIES, ModelConfig, preset
from rlhf_jax.pipeline import config
from rlhf_jax.plan_models import STAGES, Shapes, programs

_DEVICE_FLAG = "--xla_force_host_platform_device_count"
RESIDENT_TERMS = ("params", "optimizer", "reference", "other_models")
TRANSIENT_TERMS = ("gradients", "activations", "gathered", "kv_cache")


@dataclasses.dataclass(frozen=True)
class PlanConfig(Shapes):
  stage: str = config.flag("dpo", "Which stage's programs to compile.", choices=STAGES)
  model: str = config.flag("tiny", "Model preset (rlhf_jax/models/config.py).")
  hf_config: str = config.flag("", "A Hugging Face model directory (its config.json) instead of "
                               "--model; parameters stored in float32 as the real runs do.")
  dtype: str = config.flag("", "Compute dtype; empty: the preset's (float32 for --hf_config).",
                           choices=("", "float32", "bfloat16"))
  remat: str = config.flag("none", "What the backward recomputes (--remat of the runs).",
                           choices=REMAT_POLICIES)
  scan_layers: bool = config.flag(False, "Layers stacked under one lax.scan (--scan_layers "
                                  "of the runs): deep models compile in seconds.")
  attention: str = config.flag("auto", "Attention implementation (--attention of the runs).",
                               choices=ATTENTION_IMPLS)
  mesh_data: int = config.flag(1, "Mesh 'data' axis size (-1: the remaining devices).")
  mesh_fsdp: int = config.flag(1, "Mesh 'fsdp' axis size (-1: the remaining devices).")
  mesh_tensor: int = config.flag(1, "Mesh 'tensor' axis size (-1: the remaining devices).")
  fake_devices: int = config.flag(0, "Devices to plan on (fake CPU ones unless this host has "
                                  "that many); 0: the mesh's size.")
  json: str = config.flag("", "Also write the plan as JSON to this path.")


def model_config(cfg: PlanConfig) -> ModelConfig:
  options = dict(remat=cfg.remat, scan_layers=cfg.scan_layers, attention=cfg.attention)
  if cfg.hf_config:
    return hf.config_from_hf(hf.read_hf_config(cfg.hf_config), dtype="float32",
                             compute_dtype=cfg.dtype or "float32", **options)
  return preset(cfg.model, **options, **({"dtype": cfg.dtype} if cfg.dtype else {}))


def plan_devices(n: int) -> list:
  """n devices to plan on: the default backend's when it has n (a TPU host compiles for its
  chips), else n fake CPU devices. XLA reads the CPU device count from XLA_FLAGS when jax's
  backends start, so the flag is set here unless it already asks for >= n; a process whose
  backends started with fewer devices cannot grow them and is refused (XLA_FLAGS left as it
  was)."""
  before = os.environ.get("XLA_FLAGS")
  found = re.search(rf"{_DEVICE_FLAG}=(\d+)", before or "")
  if not found or int(found.group(1)) < n:
    rest = re.sub(rf"{_DEVICE_FLAG}=\d+", "", before or "")
    os.environ["XLA_FLAGS"] = f"{rest} {_DEVICE_FLAG}={n}".strip()
  for devices in (jax.devices(), jax.devices("cpu")):
    if len(devices) >= n:
      return devices[:n]
  if before is None:
    del os.environ["XLA_FLAGS"]
  else:
    os.environ["XLA_FLAGS"] = before
  raise RuntimeError(
      f"jax already started with {len(jax.devices('cpu'))} CPU devices and the plan needs "
      f"{n}: run it in a fresh process (python -m rlhf_jax.plan --fake_devices={n} ...) or "
      f"set XLA_FLAGS={_DEVICE_FLAG}={n} before anything uses jax")


def _compiled(program) -> dict:
  t0 = time.perf_counter()
  stats = program.lower().compile().memory_analysis()
  if stats is None:
    raise RuntimeError(f"{program.name}: this backend reports no memory analysis")
  out = {"argument": stats.argument_size_in_bytes, "output": stats.output_size_in_bytes,
         "alias": stats.alias_size_in_bytes, "temp": stats.temp_size_in_bytes,
         "code": stats.generated_code_size_in_bytes}
  out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"] + out["code"]
  out["resident"] = program.resident_bytes
  out["transient"] = out["peak"] - program.resident_bytes
  out["compile_s"] = round(time.perf_counter() - t0, 2)
  return out


def _analytic(estimate: dict) -> dict:
  out = dict(estimate)
  out["resident"] = sum(estimate[k] for k in RESIDENT_TERMS)
  out["transient"] = sum(estimate[k] for k in TRANSIENT_TERMS)
  out["peak"] = estimate["total"]
  return out


def _stage_total(progs: dict, side: str) -> int:
  """Resident buffers of every program that owns them + the largest transient."""
  resident = sum(p[side]["resident"] for p in progs.values() if p["owns_resident"])
  return resident + max(p[side]["transient"] for p in progs.values())


def plan(stage: str, cfg: ModelConfig, mesh, shapes: Shapes, *, compile: bool = True) -> dict:
  """Compiles `stage`'s programs on `mesh` (any devices; fake CPU ones from the command line)
  and returns, in bytes per device, each program's compiled and analytic numbers and the
  stage's totals (module docstring). compile=False: the analytic numbers alone (seconds)."""
  progs = {}
  for program in programs(stage, cfg, mesh, shapes):
    progs[program.name] = {"analytic": _analytic(program.estimate),
                           "owns_resident": program.owns_resident}
    if compile:
      progs[program.name]["compiled"] = _compiled(program)
  total = {side: _stage_total(progs, side)
           for side in ("compiled", "analytic")[0 if compile else 1:]}
  return {"stage": stage, "mesh": dict(mesh.shape), "devices": mesh.devices.size,
          "platform": mesh.devices.flat[0].platform, "num_params": cfg.num_params(),
          "programs": progs, "total": total}


def format_plan(result: dict) -> str:
  """The plan as a table, GiB (MiB when the total is under 1 GiB) per device."""
  if "compiled" not in result["total"]:
    return _format_analytic(result)
  scale, unit = (2**30, "GiB") if result["total"]["compiled"] >= 2**30 else (2**20, "MiB")
  mesh = " ".join(f"{k}={v}" for k, v in result["mesh"].items())
  columns = ("argument", "output", "alias", "temp", "peak", "transient", "peak", "ratio")
  lines = [f"plan: {result['stage']}, {result['num_params']:,} parameters, mesh {mesh} on "
           f"{result['devices']} {result['platform']} devices; {unit} per device",
           f"{'':28}{' compiled (XLA memory_analysis) ':-^60}{'analytic':>10}",
           f"{'program':<28}" + "".join(f"{c:>10}" for c in columns)]
  for name, p in result["programs"].items():
    c, a = p["compiled"], p["analytic"]
    row = [c[k] / scale for k in ("argument", "output", "alias", "temp", "peak", "transient")]
    lines.append(f"{name:<28}" + "".join(f"{x:>10.3f}" for x in row)
                 + f"{a['peak'] / scale:>10.3f}{c['peak'] / max(a['peak'], 1):>10.2f}")
  c, a = result["total"]["compiled"], result["total"]["analytic"]
  lines.append(f"{'stage total':<28}{'':>40}{c / scale:>10.3f}{'':>10}{a / scale:>10.3f}"
               f"{c / max(a, 1):>10.2f}")
  lines.append("stage total = resident (train state, frozen params) + the largest transient "
               "(peak - resident arguments)\nof any program; ratio = compiled / analytic peak")
  return "\n".join(lines)


def _format_analytic(result: dict) -> str:
  mesh = " ".join(f"{k}={v}" for k, v in result["mesh"].items())
  lines = [f"plan (analytic, not compiled): {result['stage']}, {result['num_params']:,} "
           f"parameters, mesh {mesh}; GiB per device",
           f"{'program':<32}{'resident':>10}{'transient':>11}{'peak':>10}"]
  for name, p in result["programs"].items():
    a = p["analytic"]
    lines.append(f"{name:<32}" + "".join(f"{a[k] / 2**30:>10.3f} " for k in
                                         ("resident", "transient", "peak")))
  lines.append(f"{'stage total':<53}{result['total']['analytic'] / 2**30:>10.3f}")
  return "\n".join(lines)


def main(argv: list[str]) -> dict | None:
  if {"--help", "-h", "--helpfull"} & set(argv):
    fv = flags.FlagValues()
    config.define_flags(PlanConfig, fv)
    print(f"python -m rlhf_jax.plan [--flag=value ...] (docs/plan.md)\n\n"
          f"{fv.main_module_help() or fv}")
    return None
  try:
    cfg = config.parse(PlanConfig, argv)
  except ValueError as e:  # a user error is one line and the usage status, not a traceback
    sys.exit(f"python -m rlhf_jax.plan: {e} (--help lists the flags)")
  sizes = (cfg.mesh_data, cfg.mesh_fsdp, cfg.mesh_tensor)
  if not cfg.fake_devices and -1 in sizes:
    raise ValueError("a mesh axis of -1 needs --fake_devices (how many devices to fill)")
  devices = plan_devices(cfg.fake_devices or math.prod(sizes))
  mesh = sharding.make_mesh(*sizes, devices=devices)
  result = plan(cfg.stage, model_config(cfg), mesh, cfg)
  print(format_plan(result))
  if cfg.json:
    with open(cfg.json, "w") as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
