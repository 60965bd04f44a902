"""Cloud TPU accelerator types (`v5litepod-16`, `v4-32`, ...): what a slice is made of, for
the TPU VM and GKE launchers.

The number after the generation counts TensorCores on v4 and v5p (two per chip) and chips on
v5e (`v5litepod`) and v6e (one TensorCore per chip), as gcloud's --accelerator-type does. A
slice of up to 4 chips (v4, v5p) or 8 chips (v5e, v6e) is one host; larger slices have 4
chips per host. Runtime images: cloud.google.com/tpu/docs/runtimes ("PyTorch and JAX").
GKE labels and topologies: cloud.google.com/kubernetes-engine/docs/concepts/plan-tpus.
"""
import dataclasses
import math
import re

from launch.common import LaunchError


@dataclasses.dataclass(frozen=True)
class Generation:
  prefix: str  # what gcloud's --accelerator-type starts with
  cores_per_chip: int  # the type's number counts cores; chips = number / cores_per_chip
  runtime_version: str  # the TPU VM image recommended for JAX
  gke_accelerator: str  # the node label cloud.google.com/gke-tpu-accelerator
  topology_dims: int  # 3: AxBxC (v4, v5p); 2: AxB (v5e, v6e)
  max_single_host_chips: int  # slices up to this many chips run on one host


GENERATIONS = {
    g.prefix: g for g in (
        Generation("v4", 2, "tpu-ubuntu2204-base", "tpu-v4-podslice", 3, 4),
        Generation("v5p", 2, "v2-alpha-tpuv5", "tpu-v5p-slice", 3, 4),
        Generation("v5litepod", 1, "v2-alpha-tpuv5-lite", "tpu-v5-lite-podslice", 2, 8),
        Generation("v6e", 1, "v2-alpha-tpuv6e", "tpu-v6e-slice", 2, 8),
    )
}

# The usual topology of each slice size (several 3-D shapes can hold the same chips; pass
# --topology for another one).
DEFAULT_TOPOLOGIES = {
    2: {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
        256: "16x16"},
    3: {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
        256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"},
}

CHIPS_PER_MULTI_HOST_VM = 4

EXAMPLES = "v5litepod-16, v4-32, v5p-16, v6e-16"


@dataclasses.dataclass(frozen=True)
class TpuSlice:
  accelerator_type: str
  generation: Generation
  chips: int

  @property
  def hosts(self) -> int:
    if self.chips <= self.generation.max_single_host_chips:
      return 1
    return self.chips // CHIPS_PER_MULTI_HOST_VM

  @property
  def chips_per_host(self) -> int:
    return self.chips // self.hosts


def parse_accelerator_type(value: str, flag: str = "accelerator_type") -> TpuSlice:
  """`v5litepod-16` -> its slice; a LaunchError naming `--flag` and a valid spelling otherwise."""
  if not value:
    raise LaunchError(f"--{flag} is required: pass e.g. --{flag}=v5litepod-16 ({EXAMPLES})")
  match = re.fullmatch(r"(v[0-9][a-z]*)-([0-9]+)", value)
  generation = GENERATIONS.get(match.group(1)) if match else None
  if generation is None:
    hint = ""
    if match and match.group(1) == "v5e":
      hint = f"; TPU v5e is spelled v5litepod-{match.group(2)}"
    raise LaunchError(
        f"--{flag}={value!r} is not a TPU type this launcher knows: expected "
        f"<generation>-<size> with generation one of {', '.join(GENERATIONS)} "
        f"(e.g. {EXAMPLES}){hint}")
  size = int(match.group(2))
  cores = generation.cores_per_chip
  if size <= 0 or size % cores:
    raise LaunchError(f"--{flag}={value!r}: the size counts TensorCores on {generation.prefix} "
                      f"({cores} per chip), so it must be a positive multiple of {cores}")
  chips = size // cores
  if chips > generation.max_single_host_chips and chips % CHIPS_PER_MULTI_HOST_VM:
    raise LaunchError(f"--{flag}={value!r}: a multi-host slice has "
                      f"{CHIPS_PER_MULTI_HOST_VM} chips per host, so {chips} chips cannot be one")
  return TpuSlice(value, generation, chips)


def topology(tpu: TpuSlice, value: str = "", flag: str = "topology") -> str:
  """The slice's chip topology: `value` checked against the slice, or the usual one."""
  dims = tpu.generation.topology_dims
  if not value:
    default = DEFAULT_TOPOLOGIES[dims].get(tpu.chips)
    if default is None:
      raise LaunchError(f"{tpu.accelerator_type} ({tpu.chips} chips) has no usual topology: "
                        f"pass --{flag} with {dims} numbers whose product is {tpu.chips}")
    return default
  parts = value.split("x")
  if len(parts) != dims or not all(p.isdigit() and int(p) > 0 for p in parts):
    shape = "AxBxC" if dims == 3 else "AxB"
    raise LaunchError(f"--{flag}={value!r}: {tpu.generation.prefix} topologies are {shape}, "
                      f"e.g. {DEFAULT_TOPOLOGIES[dims].get(tpu.chips, '2x2')}")
  if math.prod(int(p) for p in parts) != tpu.chips:
    raise LaunchError(f"--{flag}={value!r} holds {math.prod(int(p) for p in parts)} chips but "
                      f"{tpu.accelerator_type} has {tpu.chips}")
  return value
