"""Every number a run reports goes to the workdir, so nothing is known only from a terminal.

  <workdir>/metrics.jsonl   one JSON object per log call: {"step", "split", "time", "metrics"}
  <workdir>/tb/             TensorBoard scalars, tag "<split>/<name>"
  <workdir>/config.json     the resolved config of the run

TensorBoard events are written with tensorboard's own EventFileWriter and protos: the
writers in flax/clu need tensorflow, which is not a dependency. A resumed run appends to
metrics.jsonl, so steps logged after the last checkpoint of a killed run appear twice;
readers keep the last record per (split, step) -- `read_metrics(..., dedupe=True)`.

In a job of several processes only process 0 writes (distributed.is_writer): the others log
the same replicated values, so their loggers and writes are no-ops.
"""
import json
import os
import time
from typing import Any, Mapping

from tensorboard.backend.event_processing import event_accumulator
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from rlhf_jax import distributed, sharding


def _to_float(value: Any) -> float:
  return float(sharding.to_host(value))


class MetricsLogger:
  """Appends metrics to metrics.jsonl and TensorBoard. Values may be device arrays:
  they are fetched here, so call it only at log steps (fetching blocks on the step)."""

  def __init__(self, workdir: str):
    self._writer = distributed.is_writer()
    if self._writer:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      self._tb = EventFileWriter(os.path.join(workdir, "tb"))

  def log(self, step: int, metrics: Mapping[str, Any], *, split: str = "train") -> dict:
    """Writes one record; returns the metrics as Python floats."""
    values = {k: _to_float(v) for k, v in metrics.items()}
    if not self._writer:
      return values
    now = time.time()
    record = {"step": int(step), "split": split, "time": now, "metrics": values}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    summary = summary_pb2.Summary(value=[
        summary_pb2.Summary.Value(tag=f"{split}/{k}", simple_value=v) for k, v in values.items()])
    self._tb.add_event(event_pb2.Event(wall_time=now, step=int(step), summary=summary))
    return values

  def flush(self) -> None:
    if self._writer:
      self._jsonl.flush()
      self._tb.flush()

  def close(self) -> None:
    if self._writer:
      self._jsonl.close()
      self._tb.close()


def write_json(path: str, obj: Any, **dump_kwargs) -> str:
  """Writes obj as JSON to path on process 0 only (the others hold the same values); the
  directory is created. Returns the path."""
  if distributed.is_writer():
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
      json.dump(obj, f, **dump_kwargs)
  return path


def write_config(workdir: str, config: Mapping[str, Any]) -> str:
  """Writes the run's resolved config to <workdir>/config.json (sorted keys, for diffs)."""
  return write_json(os.path.join(workdir, "config.json"), dict(config), indent=2,
                    sort_keys=True, default=str)


def read_metrics(workdir: str, *, split: str | None = None, dedupe: bool = True) -> list[dict]:
  """Records of metrics.jsonl, in step order; dedupe keeps the last per (split, step)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f if line.strip()]
  if split is not None:
    records = [r for r in records if r["split"] == split]
  if dedupe:
    records = list({(r["split"], r["step"]): r for r in records}.values())
  return sorted(records, key=lambda r: (r["step"], r["split"]))


def read_tensorboard_scalars(workdir: str) -> dict[str, list[tuple[int, float]]]:
  """All scalars under <workdir>/tb as {tag: [(step, value), ...]} (reads the event files)."""
  acc = event_accumulator.EventAccumulator(
      os.path.join(workdir, "tb"), size_guidance={event_accumulator.SCALARS: 0})
  acc.Reload()
  return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def format_duration(seconds: float) -> str:
  """h:mm:ss, hours unbounded (e.g. 27:03:09)."""
  s = max(0, int(round(seconds)))
  return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def format_progress(step: int, total_steps: int, loss: float, steps_per_sec: float,
                    tokens_per_sec: float | None) -> str:
  """The progress line, e.g.
  'step   120/1000 | loss 2.3456 | 12.50 steps/s | 3,200 tok/s | eta 0:01:10'."""
  width = len(str(total_steps))
  eta = (total_steps - step) / steps_per_sec if steps_per_sec > 0 else 0.0
  parts = [f"step {step:>{width}d}/{total_steps}", f"loss {loss:.4f}",
           f"{steps_per_sec:.2f} steps/s"]
  if tokens_per_sec is not None:
    parts.append(f"{tokens_per_sec:,.0f} tok/s")
  parts.append(f"eta {format_duration(eta)}")
  return " | ".join(parts)
