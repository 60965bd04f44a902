"""Numerical faults: a step whose loss or gradients are NaN or inf.

The train step (step.py) never lets such a step reach the state: when the loss or the global
gradient norm is not finite it keeps the previous params and optimizer state and reports
metrics["nonfinite"] = 1 (the step counter still advances: the batch is consumed). So no
checkpoint can hold the bad values. What the run does next is its --on_nonfinite policy:

  stop (the default): the run ends with NonfiniteError naming the step, the example ids of its
    batch (or its data position) and a debug dump <workdir>/nonfinite/step_<N>/ (the batch as
    batch.npz, the step's metrics and the data position in info.json). No checkpoint is written
    after the step; the latest precedes it.
  skip: the step's update is dropped and the run goes on; each skipped step is printed, logged
    in metrics.jsonl (split "faults", "nonfinite_skipped") and counted in the run's summary.

The offline loop reads a step's flag one step late, after dispatching the next step, so the
host never waits for the device; a checkpoint first settles the step it saves.
"""
import json
import os
from typing import Any, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

from rlhf_jax import distributed, sharding

POLICIES = ("stop", "skip")
DUMP_DIR = "nonfinite"  # <workdir>/nonfinite/step_<N>/


class NonfiniteError(RuntimeError):
  """A step's loss or gradients were not finite under --on_nonfinite=stop."""
  exit_status = 65  # sysexits' EX_DATAERR: retrying the same command fails the same way


def is_bad(metrics: Mapping[str, Any]) -> bool:
  """Whether a step's metrics flag it (fetches one replicated scalar)."""
  return float(sharding.to_host(metrics["nonfinite"])) > 0


def global_ids(local_ids) -> list[int] | None:
  """This process's example ids -> the global batch's (processes hold consecutive rows)."""
  if local_ids is None:
    return None
  ids = np.asarray(local_ids)
  if jax.process_count() > 1:
    ids = np.asarray(multihost_utils.process_allgather(ids, tiled=True))
  return [int(i) for i in ids.reshape(-1)]


def dump(workdir: str, step: int, batch: Mapping[str, Any], metrics: Mapping[str, Any],
         **info) -> str:
  """Writes <workdir>/nonfinite/step_<step>/{batch.npz, info.json}; returns the folder. Every
  process calls it (the batch's rows are gathered); process 0 writes. info: JSON-able context
  (example ids, data position, iteration, ...)."""
  path = os.path.join(workdir, DUMP_DIR, f"step_{step}")
  host = {k: sharding.to_host(v) for k, v in batch.items()}
  values = {k: float(sharding.to_host(v)) for k, v in metrics.items()}
  if distributed.is_writer():
    os.makedirs(path, exist_ok=True)
    np.savez(os.path.join(path, "batch.npz"), **host)
    with open(os.path.join(path, "info.json"), "w") as f:
      json.dump({"step": step, "metrics": values, **info}, f, indent=1, default=str)
  return path


def error(step: int, metrics: Mapping[str, Any], path: str, *, where: str,
          latest_checkpoint: int | None) -> NonfiniteError:
  """The stop policy's error: the step, what was not finite, where the batch came from."""
  values = {k: float(sharding.to_host(metrics[k])) for k in ("loss", "grad_norm")
            if k in metrics}
  saved = ("no checkpoint was written yet" if latest_checkpoint is None else
           f"the latest checkpoint is step {latest_checkpoint}, written before it")
  return NonfiniteError(
      f"step {step}: the loss or gradients are not finite ({values}); batch: {where}. The "
      f"update was not applied and {saved}; debug dump (batch.npz, info.json) in {path}. "
      "Check that data, lower --learning_rate or --grad_clip_norm, or pass "
      "--on_nonfinite=skip to drop such steps (each one counted and logged)")
