"""The training loop: a plain function, not a framework.

`train` resumes automatically: if the manager holds a checkpoint, the state (params,
optimizer, step, rng) and the data iterator's position are restored from it, and since
the step's randomness is fold_in(seed key, step) (step.py), the resumed run computes
exactly what the uninterrupted one would have.

Host work per step is one dispatch and one `next(train_iter)`: the step counter is a
Python int, metrics are fetched only at log steps, and a step's nonfinite flag is read after the
next step is dispatched, so the device runs ahead otherwise.

Faults: a NaN/inf step stops the run, or is skipped (train/nonfinite.py); a SIGTERM saves and
exits (train/preemption.py); a checkpoint that cannot be written stops the run with the
previous one intact (checkpoint.CheckpointWriteError).
"""
import time
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Protocol

import jax

from rlhf_jax.train import checkpoint, config_check, nonfinite, preemption, workdir_lock
from rlhf_jax.train.logging import MetricsLogger, format_progress, read_metrics, write_config
from rlhf_jax.train.state import TrainState


class ResumableIterator(Protocol):
  """An iterator of batches whose position is a JSON-able dict (e.g. a grain iterator)."""

  def __next__(self) -> Any: ...
  def get_state(self) -> dict: ...
  def set_state(self, state: dict) -> None: ...


def _abstract_like(state: TrainState) -> TrainState:
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def train(*, workdir: str, **kwargs) -> tuple[TrainState, dict]:
  """_train (below) holding <workdir>/LOCK (workdir_lock: one run per workdir)."""
  with workdir_lock.hold(workdir):
    return _train(workdir=workdir, **kwargs)


class _Pending(NamedTuple):
  """A dispatched step whose nonfinite flag is not read yet (train/nonfinite.py)."""
  step: int
  metrics: Mapping[str, Any]
  batch: Any
  position: dict | None  # the data iterator's state before the batch
  example_ids: Any  # this process's example ids of the batch, when the iterator knows them


def _train(*, workdir: str, train_step: Callable, state: TrainState,
          train_iter: ResumableIterator | Iterator, total_steps: int,
          manager=None, logger: MetricsLogger | None = None,
          eval_fn: Callable[[Any], Mapping[str, float]] | None = None, eval_every: int = 0,
          log_every: int = 10, tokens_per_batch: int | None = None,
          config: Mapping[str, Any] | None = None,
          stop_fn: Callable[[Mapping[str, float]], bool] | None = None,
          on_nonfinite: str = "stop", preempt_deadline_s: float = 120.0,
          params_view: Callable | None = None,
          print_fn: Callable[[str], None] | None = print) -> tuple[TrainState, dict]:
  """Runs `train_step` until state.step == total_steps, or until stop_fn(eval metrics) is
  true at an evaluation; returns (state, summary).

  train_step: the compiled step (compile_train_step); `state` is DONATED to it, so the
    caller's initial state must not be used afterwards (use the returned one).
  state: the fresh initial state; replaced by the latest checkpoint when `manager` has one
    (its shapes and shardings are the restore target).
  manager: checkpoint.make_manager(...) or None (no checkpoints, no resume). The loop
    saves whenever the manager's policy says so, and always at the end.
  eval_fn: eval_fn(params) -> dict of floats, run every `eval_every` steps and at the end,
    before that step's checkpoint. If it carries state between evaluations (a loss's drop
    since the previous one), eval_fn.restore(last logged evaluation) restores it on resume.
  config: written to <workdir>/config.json when given; a run that resumes first compares it
    with the saved one (config_check: a change that alters training is refused).
  stop_fn: stop_fn(eval metrics) -> True ends training at that evaluation (a stage's
    criterion, rlhf_jax/pipeline/criterion.py). A run resumed at an evaluation step checks
    that step's evaluation first, so a run killed after it stopped does not train on.
  on_nonfinite: "stop" or "skip", what a step with a NaN/inf loss or gradient does
    (train/nonfinite.py).
  preempt_deadline_s: a SIGTERM saves a checkpoint at the next step and raises
    preemption.Preempted (exit status 85), or exits with 86 when that takes longer
    (train/preemption.py).
  params_view: params_view(state.params) -> the params eval_fn sees, when the state holds part
    of them (LoRA adapters: their base joined).
  summary: start_step (0, or the step resumed from), final_step, wall_s, steps_per_sec,
    stopped (stop_fn held), skipped_nonfinite and the last logged "train" and "eval" metrics
    (a resumed run starts from those it had logged up to its checkpoint, so its summary is the
    uninterrupted run's even when it resumes at the last step).
  """
  if on_nonfinite not in nonfinite.POLICIES:
    raise ValueError(f"--on_nonfinite must be one of {nonfinite.POLICIES}, got {on_nonfinite!r}")
  say = print_fn or (lambda _: None)
  if config is not None:
    if manager is not None and manager.latest_step() is not None:
      config_check.check_resume(workdir, config, print_fn=say)
    write_config(workdir, config)
  if manager is not None:
    restored = checkpoint.restore_latest(manager, _abstract_like(state))
    if restored is not None:
      state, data_state = restored
      train_iter.set_state(data_state)
  step = start_step = int(state.step)
  if start_step:
    say(f"resumed from step {start_step}")

  summary: dict[str, Any] = {"start_step": start_step, "train": {}, "eval": {},
                             "stopped": False, "skipped_nonfinite": 0}
  t_start = t_last = time.perf_counter()
  last_logged = step
  positioned = hasattr(train_iter, "get_state")

  def settle(pending: _Pending | None) -> None:
    """Acts on a step's nonfinite flag (the policy), once its metrics are ready."""
    if pending is None or not nonfinite.is_bad(pending.metrics):
      return
    if on_nonfinite == "skip":
      summary["skipped_nonfinite"] += 1
      say(f"[nonfinite] step {pending.step}: loss or gradients not finite; update skipped "
          f"({summary['skipped_nonfinite']} so far)")
      if logger is not None:
        logger.log(pending.step, {"nonfinite_skipped": 1.0}, split="faults")
      return
    ids = nonfinite.global_ids(pending.example_ids)
    where = (f"example ids {ids}" if ids is not None else "ids unknown") + (
        f", data position {pending.position}" if pending.position is not None else "")
    path = nonfinite.dump(workdir, pending.step, pending.batch, pending.metrics,
                          example_ids=ids, data_position=pending.position)
    if manager is not None:
      checkpoint.finish(manager)  # an earlier save still being written completes
    raise nonfinite.error(pending.step, pending.metrics, path, where=where,
                          latest_checkpoint=manager.latest_step() if manager else None)

  view = params_view or (lambda params: params)
  eval_due = lambda at: bool(eval_fn is not None and eval_every and (
      at % eval_every == 0 or at == total_steps))

  def evaluate(at: int) -> None:
    summary["eval"] = dict(eval_fn(view(state.params)))
    if logger is not None:
      logger.log(at, summary["eval"], split="eval")
    if stop_fn is not None and stop_fn(summary["eval"]):
      summary["stopped"] = True

  if start_step:
    summary["train"], summary["eval"], eval_at = _logged_up_to(workdir, start_step)
    if summary["eval"] and hasattr(eval_fn, "restore"):
      eval_fn.restore(summary["eval"])
    if eval_due(start_step) and eval_at != start_step:  # killed before it was logged
      evaluate(start_step)
    elif eval_due(start_step) and stop_fn is not None:
      summary["stopped"] = bool(stop_fn(summary["eval"]))
  pending = None
  with preemption.Watch(workdir, preempt_deadline_s, print_fn=say) as preempt:
    while step < total_steps and not summary["stopped"]:
      position = train_iter.get_state() if positioned else None
      batch = next(train_iter)
      state, metrics = train_step(state, batch)
      step += 1
      settle(pending)  # the previous step's flag: the device is one step ahead of this read
      pending = _Pending(step, metrics, batch, position,
                         getattr(train_iter, "example_ids", None))
      if step % log_every == 0 or step == total_steps:
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        steps_per_sec = (step - last_logged) / max(now - t_last, 1e-9)
        t_last, last_logged = now, step
        if logger is not None:
          logger.log(step, values)
        if manager is not None:
          checkpoint.check(manager)  # a save whose writes failed (a full disk) stops the run
        tokens = steps_per_sec * tokens_per_batch if tokens_per_batch else None
        say(format_progress(step, total_steps, values["loss"], steps_per_sec, tokens))
        summary["train"] = values
      if eval_due(step):  # before the checkpoint: a resume at this step finds it logged
        evaluate(step)
      preempted = preempt.requested(step)
      if manager is not None and (preempted or manager.should_save(step)):
        settle(pending)  # never a checkpoint of a step not yet checked
        pending = None
        checkpoint.save(manager, step, state, train_iter.get_state(), force=preempted)
      if preempted:
        _exit_preempted(manager, step, workdir, preempt, say)
    settle(pending)

  if manager is not None:
    if manager.latest_step() != step:  # includes saves still being written
      checkpoint.save(manager, step, state, train_iter.get_state(), force=True)
    checkpoint.finish(manager)
  if logger is not None:
    logger.flush()
  wall = time.perf_counter() - t_start
  summary.update(final_step=step, wall_s=wall,
                 steps_per_sec=(step - start_step) / wall if wall > 0 else 0.0)
  return state, summary


def _logged_up_to(workdir: str, step: int) -> tuple[dict, dict, int | None]:
  """(last train metrics, last eval metrics, the eval's step) logged at or before `step` in
  <workdir>/metrics.jsonl ({} and None where there are none). Records after `step` are a killed
  run's steps past its checkpoint: the resumed run computes them again."""
  try:
    records = read_metrics(workdir)
  except FileNotFoundError:
    return {}, {}, None
  last = {"train": ({}, None), "eval": ({}, None)}
  for r in records:
    if r["step"] <= step and r["split"] in last:
      last[r["split"]] = (r["metrics"], r["step"])
  return last["train"][0], last["eval"][0], last["eval"][1]


def _exit_preempted(manager, step: int, workdir: str, preempt: preemption.Watch, say) -> None:
  """After a preemption save: waits for its writes and ends the run (preemption.Preempted)."""
  if manager is not None:
    checkpoint.finish(manager)
  saved = f"saved checkpoint {step}" if manager is not None else "no checkpoints (no manager)"
  say(f"[preemption] SIGTERM: {saved} {preempt.waited_s():.1f}s after the notice; exiting "
      f"with status {preemption.PREEMPTED_EXIT}. Relaunch the same command to resume")
  raise preemption.Preempted(step, workdir)
