"""Is a resumed run's workdir what an uninterrupted run's is? Bit for bit where the library
promises it (train/loop.py, rl/loop.py: a resumed run computes exactly what the uninterrupted
one would have), with only timing left out.

Compared, in every run directory of the workdir (the workdir itself and the nested ones with
their own checkpoints: a reward model's member_<e>/, a matched-SFT baseline's matched_sft/):
  checkpoints  the latest step, and its "state" item leaf by leaf (params, optimizer state,
               step, rng key data) as bytes, and its "data" item (the data position) as JSON
  params/      the final parameters, leaf by leaf as bytes
  metrics      metrics.jsonl, the LAST record per (step, split) (a resumed run re-logs the
               steps after its last checkpoint), every value but TIMING_KEYS
  results      every other JSON file (result.json, reward_models.json, config.json), every
               number in it but those under TIMING_KEYS (strings hold paths, which differ)
A checkpoints_damaged/ directory (a checkpoint set aside at a resume) is itself a difference.
"""
import dataclasses
import json
import math
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from rlhf_jax.train.logging import read_metrics

# Keys whose values depend on the clock or on what this process compiled, not on what the run
# computed: wall-clock times, rates, and compiles (a resumed run compiles its steps again;
# with a warm persistent cache the count also depends on the cache). Left out at any depth of
# a metrics record or result file.
TIMING_KEYS = frozenset({
    "time",  # a metrics.jsonl record's wall-clock time
    "wall_s", "wall",  # a result's total and per-phase wall-clock seconds
    "steps_per_sec", "tokens_per_sec",  # rates (the offline loop prints them, logs none)
    "compiles",  # the online loop's compiles per iteration
})
_NOT_RESULTS = ("checkpoints", "params", "tb", "checkpoints_damaged")


@dataclasses.dataclass(frozen=True)
class Difference:
  where: str  # the file or item, relative to the workdir
  name: str  # the leaf, metric or key
  detail: str
  max_abs_diff: float | None = None

  def __str__(self):
    diff = "" if self.max_abs_diff is None else f" (max abs diff {self.max_abs_diff:.3g})"
    return f"{self.where}: {self.name}: {self.detail}{diff}"


def run_dirs(workdir: str) -> list[str]:
  """The workdir and its immediate subdirectories that hold checkpoints/, relative."""
  found = [""] if os.path.isdir(os.path.join(workdir, "checkpoints")) else []
  for name in sorted(os.listdir(workdir)):
    if os.path.isdir(os.path.join(workdir, name, "checkpoints")):
      found.append(name)
  return found


def _leaves(tree) -> dict[str, np.ndarray]:
  return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def restore_tree(path: str) -> dict[str, np.ndarray]:
  """An orbax pytree checkpoint (a step's "state" item, a params/ dir) as {leaf name: array},
  restored without a target: as saved."""
  with ocp.StandardCheckpointer() as ckptr:
    return _leaves(ckptr.restore(os.path.abspath(path)))


def compare_trees(where: str, ref: dict[str, np.ndarray],
                  got: dict[str, np.ndarray]) -> list[Difference]:
  """Leaf by leaf, bit for bit: same dtype, shape and bytes (NaNs compare by their bits)."""
  out = [Difference(where, name, "missing" if name in ref else "unexpected")
         for name in sorted(set(ref) ^ set(got))]
  for name in sorted(set(ref) & set(got)):
    a, b = ref[name], got[name]
    if a.dtype != b.dtype or a.shape != b.shape:
      out.append(Difference(where, name, f"{a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"))
    elif a.tobytes() != b.tobytes():
      diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
      out.append(Difference(where, name, f"{int(np.sum(a != b))} of {a.size} elements differ",
                            float(np.nanmax(diff)) if diff.size else None))
  return out


def _manager(checkpoints_dir: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(os.path.abspath(checkpoints_dir),
                               options=ocp.CheckpointManagerOptions(create=False),
                               item_names=("state", "data", "meta"))


def compare_checkpoints(ref_dir: str, got_dir: str, rel: str) -> list[Difference]:
  """The latest checkpoint of <run dir>/checkpoints: its step, state and data items."""
  where = os.path.join(rel, "checkpoints")
  with _manager(os.path.join(ref_dir, where)) as ref_mgr, \
       _manager(os.path.join(got_dir, where)) as got_mgr:
    step, got_step = ref_mgr.latest_step(), got_mgr.latest_step()
    if step != got_step:
      return [Difference(where, "latest step", f"{step} vs {got_step}")]
    data = [m.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
            for m in (ref_mgr, got_mgr)]
  item = os.path.join(where, str(step))
  out = compare_trees(os.path.join(item, "state"),
                      restore_tree(os.path.join(ref_dir, item, "state")),
                      restore_tree(os.path.join(got_dir, item, "state")))
  if data[0] != data[1]:
    out.append(Difference(os.path.join(item, "data"), "data position", f"{data[0]} vs {data[1]}"))
  return out


def _equal(a: float, b: float) -> bool:
  return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a)
                    and math.isnan(b))


def _numbers(obj, prefix: str = "") -> dict[str, float]:
  """Numeric leaves of JSON by path ("table/ppo/gold"), TIMING_KEYS left out."""
  if isinstance(obj, dict):
    items = ((str(k), v) for k, v in obj.items() if k not in TIMING_KEYS)
  elif isinstance(obj, list):
    items = ((str(i), v) for i, v in enumerate(obj))
  else:
    is_number = isinstance(obj, (int, float)) and not isinstance(obj, bool)
    return {prefix: obj} if is_number or isinstance(obj, bool) else {}
  out = {}
  for key, value in items:
    out.update(_numbers(value, f"{prefix}/{key}" if prefix else key))
  return out


def compare_numbers(where: str, ref, got) -> list[Difference]:
  """Every number (and boolean) of two JSON values, by path."""
  a, b = _numbers(ref), _numbers(got)
  out = [Difference(where, name, "missing" if name in a else "unexpected")
         for name in sorted(set(a) ^ set(b))]
  for name in sorted(set(a) & set(b)):
    if not _equal(a[name], b[name]):
      out.append(Difference(where, name, f"{a[name]!r} vs {b[name]!r}",
                            abs(float(a[name]) - float(b[name]))))
  return out


def compare_metrics(ref_dir: str, got_dir: str, rel: str) -> list[Difference]:
  """metrics.jsonl: the last record per (step, split), values but TIMING_KEYS."""
  where = os.path.join(rel, "metrics.jsonl")
  if not os.path.exists(os.path.join(ref_dir, where)):
    return []
  ref, got = ({(r["step"], r["split"]): r["metrics"] for r in read_metrics(os.path.join(d, rel))}
              for d in (ref_dir, got_dir))
  out = [Difference(where, f"{split} step {step}", "missing" if (step, split) in ref
                    else "unexpected")
         for step, split in sorted(set(ref) ^ set(got))]
  for step, split in sorted(set(ref) & set(got)):
    out += compare_numbers(where, {f"{split} step {step}": ref[step, split]},
                           {f"{split} step {step}": got[step, split]})
  return out


def _result_files(workdir: str) -> list[str]:
  found = []
  for root, dirs, files in os.walk(workdir):
    dirs[:] = sorted(d for d in dirs if d not in _NOT_RESULTS)
    found += [os.path.relpath(os.path.join(root, f), workdir) for f in sorted(files)
              if f.endswith(".json")]
  return found


def compare_workdirs(ref_dir: str, got_dir: str) -> list[Difference]:
  """Every difference between a reference run's workdir and a resumed run's."""
  out = []
  for rel in run_dirs(ref_dir):
    if not os.path.isdir(os.path.join(got_dir, rel, "checkpoints")):
      out.append(Difference(os.path.join(rel, "checkpoints"), "directory", "missing"))
      continue
    out += compare_checkpoints(ref_dir, got_dir, rel)
    out += compare_metrics(ref_dir, got_dir, rel)
    params = os.path.join(rel, "params")
    if os.path.isdir(os.path.join(ref_dir, params)):
      got_params = os.path.join(got_dir, params)
      out += (compare_trees(params, restore_tree(os.path.join(ref_dir, params)),
                            restore_tree(got_params)) if os.path.isdir(got_params)
              else [Difference(params, "directory", "missing")])
    if os.path.isdir(os.path.join(got_dir, rel, "checkpoints_damaged")):
      out.append(Difference(os.path.join(rel, "checkpoints_damaged"), "directory",
                            "a checkpoint was set aside as damaged at a resume"))
  ref_files, got_files = _result_files(ref_dir), _result_files(got_dir)
  out += [Difference(f, "file", "missing" if f in ref_files else "unexpected")
          for f in sorted(set(ref_files) ^ set(got_files))]
  for f in sorted(set(ref_files) & set(got_files)):
    with open(os.path.join(ref_dir, f)) as a, open(os.path.join(got_dir, f)) as b:
      out += compare_numbers(f, json.load(a), json.load(b))
  return out
