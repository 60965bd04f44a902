"""Resuming with another configuration: refused when the change alters training.

A run resumes from its workdir's latest checkpoint whatever the flags say, so a changed flag
would silently mix two runs: a different --steps keeps the old learning-rate schedule for
the steps already taken, a different --batch_size or --learning_rate makes the curve of one
run out of two. Before a loop resumes, it compares the resolved configuration with the
<workdir>/config.json it wrote when it started:
  - a change to a flag that does not alter the trained model (how often it logs, evaluates,
    saves; where it exports; the evaluation's sizes) is accepted and printed;
  - any other change is refused, with the fields, their saved and new values, and the fix:
    a fresh --workdir, the saved values back, or --allow_config_change to resume anyway
    (the saved config.json is then replaced and the change printed).
"""
import json
import os
from typing import Any, Mapping

# Flags that change what a run reports, when or where, never what it trains; and the
# placement and memory layout of the same computation (the mesh, gradient-accumulation
# microbatches, rollout chunks: float summation order only; a checkpoint resumes across meshes).
NOT_TRAINING = frozenset({
    "workdir", "log_every", "eval_every", "save_every", "keep_checkpoints", "eval_prompts",
    "eval_batch_size", "eval_samples", "pass_k", "export_hf", "export_dtype", "export_lora",
    "dry_run", "dry_run_compile", "allow_config_change", "data_dir", "stage_root",
    "matched_sft", "mesh_data", "mesh_fsdp", "mesh_tensor", "num_microbatches",
    "rollout_chunk_rows",
    # What to do on a fault: relaunching a run that stopped on a NaN with
    # --on_nonfinite=skip is the point of the flag.
    "on_nonfinite", "preempt_deadline_s",
})


class ConfigChangedError(ValueError):
  """A resume whose configuration changes training (the message lists the fields)."""


def _normalised(config: Mapping[str, Any]) -> dict:
  """As config.json stores it (tuples as lists, other values as str)."""
  return json.loads(json.dumps(dict(config), sort_keys=True, default=str))


def changes(saved: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[dict, dict]:
  """({field: (saved, new)} that alter training, {field: (saved, new)} that do not)."""
  saved, new = _normalised(saved), _normalised(new)
  diff = {k: (saved.get(k), new.get(k)) for k in sorted(set(saved) | set(new))
          if saved.get(k) != new.get(k)}
  training = {k: v for k, v in diff.items() if k not in NOT_TRAINING}
  return training, {k: v for k, v in diff.items() if k in NOT_TRAINING}


def check_resume(workdir: str, config: Mapping[str, Any], *, print_fn=print) -> None:
  """Raises ConfigChangedError when `config` alters training against the saved
  <workdir>/config.json (unless its allow_config_change is set); prints accepted changes.
  Call it only when the run is about to resume from a checkpoint."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = json.load(f)
  training, other = changes(saved, config)
  show = lambda d: "; ".join(f"--{k}: {a!r} -> {b!r}" for k, (a, b) in d.items())  # noqa: E731
  if other:
    print_fn(f"[resume] changed flags that do not alter training: {show(other)}")
  if not training:
    return
  if config.get("allow_config_change"):
    print_fn(f"[resume] --allow_config_change: resuming with changed training flags: "
             f"{show(training)}")
    return
  raise ConfigChangedError(
      f"{workdir} holds a checkpoint of a run with other training flags: {show(training)}. "
      "Resuming would mix two runs. Use a fresh --workdir, pass the saved values again "
      f"({path}), or pass --allow_config_change to resume with the new ones")
