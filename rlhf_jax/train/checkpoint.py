"""Checkpoints in <workdir>/checkpoints via orbax's CheckpointManager (pinned: V0 API,
orbax-checkpoint 0.12.x, StandardSave/StandardRestore + JsonSave/JsonRestore).

Items per step:
  "state": the TrainState (rng stored as uint32 key data: typed keys do not round-trip)
  "data":  the data iterator's get_state() dict, so a resume continues the data order
  "meta":  optional JSON (e.g. the config), written for humans, never needed to restore

Atomicity: orbax writes each step into a temporary directory and renames it into place
when complete, so a process killed mid-save leaves the previous step as the latest good
checkpoint (leftover tmp directories are ignored and cleaned on the next start). Saves are
asynchronous: device->host copies happen before save() returns (so the donated state can
be reused), the file writes in the background -- call manager.wait_until_finished()
before exiting (`train` does).
"""
import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

from rlhf_jax import distributed
from rlhf_jax.train.state import TrainState


def make_manager(workdir: str, *, save_every: int, max_to_keep: int | None = 3,
                 async_save: bool = True) -> ocp.CheckpointManager:
  """A manager saving every `save_every` steps (plus forced saves), keeping the last K.

  The save policy is exactly "step % save_every == 0" (plus forced saves): orbax's default
  also saves the first step of a run that has no checkpoint yet, which we do not want.
  """
  options = ocp.CheckpointManagerOptions(
      # Preemption saves are the loops' (train/preemption.py: they save and exit), so orbax's
      # own preemption policy, which would save and train on, is not added.
      save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(save_every),
      max_to_keep=max_to_keep,
      create=True,
      cleanup_tmp_directories=True,
      enable_async_checkpointing=async_save,
  )
  # orbax requires absolute paths (a relative --workdir would fail in its background thread).
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")), options=options,
                               item_names=("state", "data", "meta"))


def save(manager: ocp.CheckpointManager, step: int, state: TrainState,
         data_state: dict[str, Any], *, meta: dict[str, Any] | None = None,
         force: bool = False) -> bool:
  """Saves if `step` is a save step (or force). Returns whether a save was started.

  `step` is passed as a Python int (the loop's host-side counter) so deciding whether to
  save never waits on the device.
  """
  items = {"state": ocp.args.StandardSave(state), "data": ocp.args.JsonSave(data_state)}
  if meta is not None:
    items["meta"] = ocp.args.JsonSave(meta)
  try:  # also raises a failure of the previous save's background writes
    return manager.save(step, args=ocp.args.Composite(**items), force=force)
  except Exception as e:  # noqa: BLE001 -- any write failure: one clear error, below
    raise _write_error(manager, step, e) from e


def finish(manager: ocp.CheckpointManager) -> None:
  """Waits for the background writes of the last save; a failure is a CheckpointWriteError."""
  try:
    manager.wait_until_finished()
  except Exception as e:  # noqa: BLE001
    raise _write_error(manager, None, e) from e


def check(manager: ocp.CheckpointManager) -> None:
  """Raises CheckpointWriteError if a save's background writes have failed (does not wait for
  a save in progress): the loops call it at log steps, so a run whose disk filled stops there
  rather than training on to its next save."""
  try:
    manager.check_for_errors()
  except Exception as e:  # noqa: BLE001
    raise _write_error(manager, None, e) from e


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (a full disk, a quota, a lost mount). The previous
  checkpoints are intact: orbax writes a step into a temporary directory and renames it into
  place only when complete."""
  exit_status = 74  # sysexits' EX_IOERR


_DISK_FULL = ("no space left", "file too large", "quota exceeded", "errno 28", "errno 27",
              "errno 122", "resource_exhausted")


def _write_error(manager: ocp.CheckpointManager, step: int | None,
                 cause: Exception) -> CheckpointWriteError:
  text = f"{type(cause).__name__}: {cause}"
  manager.reload()  # what is on disk now: the failed step's temporary directory is not a step
  latest = manager.latest_step()
  kept = (f"checkpoint {latest} is intact and a relaunch of the same command resumes from it"
          if latest is not None else "no earlier checkpoint exists")
  unfinished = sorted(int(n.split(".")[0]) for n in os.listdir(manager.directory)
                      if ".orbax-checkpoint-tmp" in n and n.split(".")[0].isdigit())
  if unfinished:  # the failed save may be an earlier one, still writing in the background
    step = unfinished[-1]
  full = any(k in text.lower() for k in _DISK_FULL)
  what = "the disk is full (or a size/quota limit was hit)" if full else "the write failed"
  return CheckpointWriteError(
      f"could not write checkpoint{'' if step is None else f' {step}'} under "
      f"{manager.directory}: {what} ({text[:300]}). The run stopped; {kept}. "
      + ("Free space there (or point --workdir at a larger disk), then relaunch"
         if full else "Check that the directory is writable, then relaunch"))


DAMAGED_DIR = "checkpoints_damaged"  # <workdir>/checkpoints_damaged/<step>: kept, not reused


def restore_latest(manager: ocp.CheckpointManager, abstract_state: TrainState, *,
                   print_fn=print) -> tuple[TrainState, dict[str, Any]] | None:
  """(state, data_state) from the latest readable checkpoint, or None if there is none.

  abstract_state: a TrainState of jax.ShapeDtypeStruct with shardings (see
  state.abstract_state); arrays are restored directly into those shardings.

  A checkpoint that fails to restore (truncated or corrupted files: a disk that filled, a copy
  cut short) is moved to <workdir>/checkpoints_damaged/ (kept for inspection, never reused,
  and out of the way of the run's next save at that step) and the previous one is tried,
  with a warning naming both. Every checkpoint damaged: an error naming them.
  """
  damaged = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001 -- any failure of damaged files: try the previous
      damaged.append((step, f"{type(e).__name__}: {str(e)[:200]}"))
      _set_aside(manager, step)
      continue
    if damaged:
      print_fn(f"WARNING: checkpoint {damaged[0][0]} under {manager.directory} is damaged "
               f"({damaged[0][1]}); resuming from checkpoint {step} instead. Damaged "
               f"checkpoints {[s for s, _ in damaged]} moved to {DAMAGED_DIR}/")
    return restored["state"], restored["data"]
  if damaged:
    raise RuntimeError(f"every checkpoint under {manager.directory} is damaged: {damaged}; "
                       f"they were moved to {DAMAGED_DIR}/. Start over with a fresh --workdir "
                       "(or restore them from a copy)")
  return None


def _set_aside(manager: ocp.CheckpointManager, step: int) -> None:
  if jax.process_index() == 0:
    src = os.path.join(str(manager.directory), str(step))
    dest = os.path.join(os.path.dirname(str(manager.directory)), DAMAGED_DIR)
    os.makedirs(dest, exist_ok=True)
    os.replace(src, os.path.join(dest, f"{step}-{int(time.time())}"))
  distributed.barrier(f"checkpoint {step} set aside")  # every process sees it gone
  manager.reload()


def save_params(path: str, params) -> None:
  """Saves a parameter pytree alone (a stage's output for downstream stages), synchronously."""
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(path), params, force=True)


def _path_name(path) -> str:
  """"blocks/0/attn/wq": orbax stores integer dict keys as strings, so compare by text."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def load_params(path: str, abstract_params):
  """Restores params saved by save_params into abstract_params' shapes and shardings.

  Checks every tensor's shape first, so a checkpoint of another model size fails with the
  tensor's name and both shapes instead of an opaque orbax error."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no parameter checkpoint at {path}")
  with ocp.StandardCheckpointer() as ckptr:
    saved = ckptr.metadata(path).item_metadata.tree
    saved_flat = {_path_name(k): v for k, v in jax.tree_util.tree_flatten_with_path(saved)[0]}
    for k, want in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
      name = _path_name(k)
      got = saved_flat.get(name)
      if got is None:
        raise ValueError(f"checkpoint {path} has no tensor {name}; it was saved from a "
                         "different model (check the model preset flags)")
      if tuple(got.shape) != tuple(want.shape):
        raise ValueError(f"checkpoint {path}: tensor {name} has shape {tuple(got.shape)}, the "
                         f"model expects {tuple(want.shape)}; the checkpoint is of another "
                         "model size (check the model preset flags)")
    return ckptr.restore(path, abstract_params)
