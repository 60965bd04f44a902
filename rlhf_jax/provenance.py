"""Where a run happened: machine, library versions, devices and code, for every results JSON.

A committed number is reproducible only given these: float rounding differs across CPU
instruction sets (XLA picks other kernels with AVX-512 or AMX), across jax/jaxlib versions and
across device counts (a sharded reduction sums in another order). Cheap (no network, well under
a second), so every writer can call it.
"""
import importlib.metadata
import os
import pathlib
import platform
import subprocess

import jax

from rlhf_jax.pipeline.stages import CODE_VERSION_ENV

# The instruction sets that change which kernels XLA emits on a CPU, and so the rounding.
CPU_FLAGS = ("avx512f", "avx2", "fma", "amx_tile")
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "grain",
            "tensorflow-datasets")
_REPO = pathlib.Path(__file__).resolve().parent.parent


def _cpuinfo() -> dict[str, str]:
  """The first processor's fields of /proc/cpuinfo (the others repeat them); empty off Linux."""
  try:
    with open("/proc/cpuinfo") as f:
      first = f.read().split("\n\n")[0]
  except OSError:
    return {}
  return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in first.splitlines())}


def _version(package: str) -> str | None:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def _git(*args: str) -> str | None:
  """A git command's output in the library's checkout; None without git or outside a checkout
  (an installed package), where the code version is simply unknown."""
  try:
    return subprocess.run(["git", *args], cwd=_REPO, capture_output=True, text=True, check=True,
                          timeout=5).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None


def provenance() -> dict:
  """JSON-able facts about the machine, libraries, devices and code of this process."""
  cpu = _cpuinfo()
  status = _git("status", "--porcelain", "--", "rlhf_jax")
  return {
      "cpu": cpu.get("model name") or platform.processor(),
      "cpu_flags": [f for f in CPU_FLAGS if f in cpu.get("flags", "").split()],
      "cores": os.cpu_count(),
      "platform": platform.platform(),
      "python": platform.python_version(),
      "versions": {p: _version(p) for p in PACKAGES},
      # Count and kind: a sharded run reduces in another order than a single-device one.
      "devices": [f"{d.platform}:{d.id}" for d in jax.devices()],
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      # A developer's pin (stages.py) is the label the run's stages were cached under.
      "code_version": os.environ.get(CODE_VERSION_ENV) or _git("rev-parse", "--short", "HEAD"),
      # Uncommitted edits to the library: the commit alone does not name the code that ran.
      "dirty": None if status is None else bool(status),
  }
