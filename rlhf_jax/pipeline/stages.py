"""Stage cache: an upstream stage (pretrain for SFT, SFT for reward models, all three for
PPO) is built once and reused while neither its config, its upstream configs, nor the code
changed. Which stages exist and how their configs are derived is chain.py's.

A stage's directory is <stage_root>/<name>-<key>, key = hash(its resolved config with the
resolved configs of its upstream stages folded in, the code version). A stage is complete
when its STAGE_DONE marker exists, written (atomically) only after the stage's run returned.
A half-built stage (killed, preempted, failed) is never used: its run is called again, which
resumes training from the stage's own checkpoints (bitwise, as any resume) and rewrites every
output; whatever the interrupted run had written is not read.
"""
import functools
import hashlib
import json
import os
import pathlib
import time
from typing import Any, Callable

import rlhf_jax
from rlhf_jax import distributed
from rlhf_jax.pipeline import config

_CODE_ROOT = pathlib.Path(rlhf_jax.__file__).parent


# Pins the code version (any string) instead of hashing the sources: for development, when
# the edits under way cannot change what an upstream stage computes. Never set it in CI.
CODE_VERSION_ENV = "RLHF_JAX_CODE_VERSION"


def code_version() -> str:
  """Hash of the library's sources (every stage's code lives there): any change invalidates
  stages (unless $RLHF_JAX_CODE_VERSION pins it)."""
  if os.environ.get(CODE_VERSION_ENV):
    return "pinned-" + os.environ[CODE_VERSION_ENV]
  return _source_hash((_CODE_ROOT,))


@functools.cache
def _source_hash(roots: tuple[pathlib.Path, ...]) -> str:
  """Hashed once per process: the code a process runs is what it imported at its start, so a
  source edit during a long sweep must not give its later stages new keys (and rebuild them
  from scratch); the next process sees the edit."""
  h = hashlib.sha256()
  for root in roots:
    for path in sorted(root.rglob("*.py")):
      h.update(str(path.relative_to(root.parent)).encode())
      h.update(path.read_bytes())
  return h.hexdigest()[:12]


def stage_key(config: dict[str, Any]) -> str:
  blob = json.dumps({"config": config, "code": code_version()}, sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:12]


def ensure_stage(name: str, config: dict[str, Any], stage_root: str,
                 run: Callable[[str], Any], *, print_fn=print) -> str:
  """Returns the stage's workdir, running `run(workdir)` first unless already complete."""
  workdir = os.path.join(stage_root, f"{name}-{stage_key(config)}")
  done_marker = os.path.join(workdir, "STAGE_DONE")
  if os.path.exists(done_marker):
    print_fn(f"[stage {name}] cached: {workdir}")
    return workdir
  print_fn(f"[stage {name}] building in {workdir}")
  start = time.perf_counter()
  run(workdir)
  if distributed.is_writer():
    os.makedirs(workdir, exist_ok=True)
    # Written whole or not at all (a kill mid-write leaves no marker, so the stage is rerun).
    with open(done_marker + ".tmp", "w") as f:
      f.write(json.dumps({"wall_s": time.perf_counter() - start}))
    os.replace(done_marker + ".tmp", done_marker)
  # Every process sees the marker and the stage's outputs before any reads them.
  distributed.barrier(f"stage {name} done")
  print_fn(f"[stage {name}] done in {time.perf_counter() - start:.1f}s")
  return workdir


def key_config(cfg, upstream: dict[str, Any] | None = None) -> dict[str, Any]:
  """What a stage's key hashes: its resolved flags (less the workdir, which the cache
  chooses) and its upstream stages' key configs."""
  out = {k: v for k, v in config.to_dict(cfg).items() if k != "workdir"}
  if upstream:
    out["upstream"] = upstream
  return out
