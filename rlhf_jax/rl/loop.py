"""The ONE online loop every online algorithm runs in:

    for each iteration it (resumed from the latest checkpoint):
      batch, stats, rng = algorithm.collect(it, params)     rollout -> score -> train rows
      epochs x minibatches of the compiled train step       (rows shuffled by rng)
      log (metrics.jsonl + TensorBoard), progress line, compiles counted per iteration
      every eval_every: evaluate(params) -> a point of the curve
      every save_every: checkpoint of the train state, the curve and the algorithm's own
                        resumable state (KL coefficient, prompts seen, ptx data position)
      faults: a NaN/inf step stops the run or is skipped (train/nonfinite.py); a SIGTERM saves
              the iteration's checkpoint at its end and exits (train/preemption.py)

Everything that makes a resumed run bitwise equal to an uninterrupted one lives here: an
iteration's draws depend only on (seed, it) (the algorithm's collect derives them), the step's
randomness on (seed, step) (train/step.py), and the checkpoint holds what the loop and the
algorithm carry between iterations. The loop takes plain values and callables, never an
experiment's config.
"""
import dataclasses
import functools
import time
from typing import Callable, NamedTuple, Protocol

import jax
import numpy as np

from rlhf_jax import sharding
from rlhf_jax.compile_count import CompileCounter
from rlhf_jax.models import lora
from rlhf_jax.rl.rollout import Experience
from rlhf_jax.train import checkpoint, config_check, optim, state as state_lib, step as step_lib
from rlhf_jax.train import nonfinite, preemption, workdir_lock
from rlhf_jax.train import lora as lora_train
from rlhf_jax.train.logging import MetricsLogger, format_progress, write_config


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  workdir: str
  iterations: int
  epochs: int = 1  # passes over each rollout
  num_minibatches: int = 1  # optimizer updates per pass
  log_every: int = 1  # iterations between progress lines
  eval_every: int = 1  # iterations between held-out evaluations (and at the end)
  save_every: int = 1  # iterations between checkpoints (and at the end)
  keep_checkpoints: int = 2
  on_nonfinite: str = "stop"  # or "skip": a NaN/inf optimizer step (train/nonfinite.py)
  preempt_deadline_s: float = 120.0  # SIGTERM -> checkpoint -> exit 85 (train/preemption.py)

  def __post_init__(self):
    for name in ("iterations", "epochs", "num_minibatches", "log_every", "eval_every",
                 "save_every", "keep_checkpoints"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.on_nonfinite not in nonfinite.POLICIES:
      raise ValueError(f"on_nonfinite must be one of {nonfinite.POLICIES}, "
                       f"got {self.on_nonfinite!r}")

  @staticmethod
  def faults(cfg) -> dict:
    """The fault-handling fields from a run's flags (pipeline/lm.py's LMConfig)."""
    return {"on_nonfinite": cfg.on_nonfinite, "preempt_deadline_s": cfg.preempt_deadline_s}

  @property
  def updates(self) -> int:
    """Optimizer steps over the whole run."""
    return self.iterations * self.epochs * self.num_minibatches


class Iteration(NamedTuple):
  batch: dict  # the rollout's training rows (leading dim = rows), the loss_fn's batch keys
  stats: dict  # scalars logged beside the step's metrics
  shuffle_rng: np.random.Generator  # orders the rows into minibatches
  experience: object  # the iteration's (first) Experience, for describe()
  # The optimizer steps' row indices; None: epochs x num_minibatches shuffles (epoch_order).
  order: list | None = None
  # Logged step metrics: the last step's ("last"), or the mean over the iteration's steps
  # ("mean", with the last learning rate).
  metrics: str = "last"
  # Rows shuffled in blocks of this many consecutive rows (a group sharing its prompt).
  row_block: int = 1


class Algorithm(Protocol):
  """An online algorithm as the loop sees it (rlhf_jax/rl/algorithms/)."""

  progress_keys: tuple[str, ...]  # logged values shown on the progress line

  def collect(self, it: int, params) -> Iteration:
    """Iteration `it`'s training rows from the current params (sample, score, advantages)."""

  def extend_minibatch(self, minibatch: dict) -> dict:
    """A minibatch as the train step gets it (e.g. PPO-ptx adds a pretraining batch)."""

  def finish_iteration(self, values: dict) -> dict:
    """Derived values from the iteration's logged ones; updates carried state (adaptive
    KL). Returns the values to log."""

  def state_dict(self) -> dict:
    """What the algorithm carries between iterations (saved with every checkpoint)."""

  def load_state_dict(self, data: dict) -> None:
    """Restores state_dict() from a checkpoint."""


class StatelessAlgorithm:
  """Defaults of the Algorithm protocol for an algorithm that carries nothing between
  iterations and adds nothing to its minibatches."""

  def extend_minibatch(self, minibatch: dict) -> dict:
    return minibatch

  def finish_iteration(self, values: dict) -> dict:
    return values

  def state_dict(self) -> dict:
    return {}

  def load_state_dict(self, data: dict) -> None:
    del data


def epoch_order(rows: int, rng: np.random.Generator, *, epochs: int,
                num_minibatches: int, block: int = 1) -> list[np.ndarray]:
  """Row indices of each optimizer step: `epochs` passes over the rows, each shuffled and cut
  into `num_minibatches` minibatches. block > 1 shuffles runs of `block` consecutive rows
  (the groups of prompt-sharing rows), which stay whole and in order."""
  if rows % (num_minibatches * block):
    raise ValueError(f"{rows} rollout rows do not split into {num_minibatches} minibatches "
                     f"of whole blocks of {block} rows")
  mb = rows // num_minibatches
  order = []
  for _ in range(epochs):
    perm = rng.permutation(rows // block)
    perm = (perm[:, None] * block + np.arange(block)).reshape(-1) if block > 1 else perm
    order += [perm[j * mb:(j + 1) * mb] for j in range(num_minibatches)]
  return order


@functools.lru_cache(maxsize=None)
def _take_rows(mesh):
  """jit: (batch of global arrays or host arrays every process holds whole, row indices) ->
  those rows, sharded over the mesh's data axes (one compile per minibatch shape)."""
  return jax.jit(lambda batch, idx: jax.tree.map(lambda v: v[idx], batch),
                 out_shardings=sharding.batch_sharding(mesh))


def train_on_rollout(train_step, state, batch: dict, order, mesh, *, extend=lambda b: b):
  """One optimizer step per entry of `order` (row indices of the batch, the same on every
  process). extend may add host arrays of this process's rows (PPO-ptx's pretraining rows).
  Returns (state, the steps' metrics, on device)."""
  metrics = []
  for idx in order:
    minibatch = extend(_take_rows(mesh)(batch, np.asarray(idx, np.int32)))
    minibatch = {k: v if isinstance(v, jax.Array) else sharding.shard_batch(v, mesh)
                 for k, v in minibatch.items()}
    state, m = train_step(state, minibatch)
    metrics.append(m)
  return state, metrics


def _step_metrics(metrics: list, how: str) -> dict:
  if how == "last":
    return _floats(metrics[-1])
  host = [{k: sharding.to_host(v) for k, v in m.items()} for m in metrics]
  out = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
  if "learning_rate" in out:
    out["learning_rate"] = float(host[-1]["learning_rate"])
  return out


def _nonfinite_steps(cfg: LoopConfig, manager, logger, state, step: Iteration, order,
                     metrics: list, mesh, done: int) -> int:
  """How many of the iteration's optimizer steps were NaN/inf (their updates were not applied,
  train/nonfinite.py), under --on_nonfinite=skip; under stop, the first one ends the run with
  its rollout rows dumped."""
  bad = [i for i, m in enumerate(metrics) if nonfinite.is_bad(m)]
  if not bad:
    return 0
  last = int(sharding.to_host(state.step))
  if cfg.on_nonfinite == "skip":
    for i in bad:
      logger.log(last - len(metrics) + i + 1, {"nonfinite_skipped": 1.0}, split="faults")
    print(f"[nonfinite] iteration {done}: {len(bad)} of {len(metrics)} optimizer steps had a "
          "non-finite loss or gradient; their updates were skipped")
    return len(bad)
  i = bad[0]
  at = last - len(metrics) + i + 1
  rows = [int(r) for r in np.asarray(order[i]).reshape(-1)]
  path = nonfinite.dump(cfg.workdir, at, _take_rows(mesh)(step.batch, np.asarray(rows, np.int32)),
                        metrics[i], iteration=done, rollout_rows=rows)
  checkpoint.finish(manager)
  raise nonfinite.error(at, metrics[i], path, latest_checkpoint=manager.latest_step(),
                        where=f"rows {rows} of iteration {done}'s rollout (minibatch {i})")


def resume(workdir: str, state, *, save_every: int, keep: int):
  """(manager, logger, state, data): data is the latest checkpoint's extra data with the state
  restored into `state`'s shapes and shardings; None (and `state` as given) for a fresh run."""
  manager = checkpoint.make_manager(workdir, save_every=save_every, max_to_keep=keep)
  logger = MetricsLogger(workdir)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  restored = checkpoint.restore_latest(manager, abstract)
  if restored is None:
    return manager, logger, state, None
  return manager, logger, *restored


def _floats(tree) -> dict:
  return {k: float(sharding.to_host(v)) for k, v in tree.items()}


def run(cfg: LoopConfig, algorithm: Algorithm, **kwargs):
  """_run (below) holding <workdir>/LOCK (workdir_lock: one run per workdir)."""
  with workdir_lock.hold(cfg.workdir):
    return _run(cfg, algorithm, **kwargs)


def _run(cfg: LoopConfig, algorithm: Algorithm, *, state, train_step, mesh,
        evaluate: Callable[[object], dict], config: dict | None = None,
        describe: Callable[[Experience], dict] | None = None,
        initial_point: dict | None = None, params_view: Callable | None = None):
  """Trains `state` (a TrainState) for cfg.iterations; returns (state, curve).

  evaluate(params) -> dict is the held-out evaluation (run before training, at every
  eval_every and at the end; its points make the curve). describe(experience) -> dict adds
  world-specific metrics of an iteration's rollout to the log (optional). config is written
  to <workdir>/config.json. initial_point: the evaluation of the initial params when the
  caller has it already (it is then not evaluated again on a fresh run). params_view(params)
  -> the whole model's params, when the state holds only part of them (LoRA adapters:
  make_adapter_trainer); collect and evaluate see its output."""
  view = params_view or (lambda params: params)
  manager, logger, state, data = resume(cfg.workdir, state, save_every=cfg.save_every,
                                        keep=cfg.keep_checkpoints)
  if config is not None:
    if data is not None:  # resuming: a change that alters training is refused
      config_check.check_resume(cfg.workdir, config)
    write_config(cfg.workdir, config)
  curve, start = [], 0
  if data is not None:
    curve, start = data["curve"], int(manager.latest_step())
    algorithm.load_state_dict(data["algorithm"])
    print(f"resumed from iteration {start}")
  if start == 0:
    t0 = time.perf_counter()
    curve.append({"iteration": 0, **(initial_point or evaluate(view(state.params)))})
    print(f"[eval before training] {time.perf_counter() - t0:.1f}s")
    logger.log(0, curve[-1], split="eval")

  t_loop = time.perf_counter()
  with CompileCounter() as counter, preemption.Watch(
      cfg.workdir, cfg.preempt_deadline_s) as preempt:
    for it in range(start, cfg.iterations):
      counter.reset()  # compiles per iteration are logged: after the first there should be none
      step = algorithm.collect(it, view(state.params))
      rows = len(next(iter(step.batch.values())))
      order = step.order if step.order is not None else epoch_order(
          rows, step.shuffle_rng, epochs=cfg.epochs, num_minibatches=cfg.num_minibatches,
          block=step.row_block)
      state, metrics = train_on_rollout(train_step, state, step.batch, order, mesh,
                                        extend=algorithm.extend_minibatch)
      values = {**_floats(step.stats), **_step_metrics(metrics, step.metrics)}
      done = it + 1
      skipped = _nonfinite_steps(cfg, manager, logger, state, step, order, metrics, mesh, done)
      if skipped:
        values["nonfinite_skipped"] = float(skipped)
      if describe is not None:
        values.update(describe(step.experience))
      values = algorithm.finish_iteration(values)
      values["compiles"] = float(counter.count)
      logger.log(done, values)
      if done % cfg.log_every == 0 or done == cfg.iterations:
        rate = (done - start) / max(time.perf_counter() - t_loop, 1e-9)
        print(format_progress(done, cfg.iterations, values["loss"], rate, None)
              + "".join(f" | {k} {values[k]:.3f}" for k in algorithm.progress_keys
                        if k in values) + f" | compiles {counter.count}")
      if done % cfg.eval_every == 0 or done == cfg.iterations:
        curve.append({"iteration": done, **evaluate(view(state.params))})
        logger.log(done, curve[-1], split="eval")
      checkpoint.check(manager)  # the previous save's writes failed (a full disk): stop here
      preempted = preempt.requested(done)
      if manager.should_save(done) or done == cfg.iterations or preempted:
        checkpoint.save(manager, done, state,
                        {"curve": curve, "algorithm": algorithm.state_dict()},
                        force=done == cfg.iterations or preempted)
      if preempted:
        checkpoint.finish(manager)
        print(f"[preemption] SIGTERM: saved iteration {done}'s checkpoint "
              f"{preempt.waited_s():.1f}s after the notice; exiting with status "
              f"{preemption.PREEMPTED_EXIT}. Relaunch the same command to resume")
        raise preemption.Preempted(done, cfg.workdir)
  checkpoint.finish(manager)
  manager.close()
  logger.close()
  return state, curve


def make_trainer(loss_fn, params, param_shardings, batch_keys, mesh, *,
                 optim_cfg: optim.OptimConfig, num_microbatches: int, seed: int):
  """(TrainState born sharded, the train step compiled once with shardings and donation) for
  an online algorithm's loss_fn over batches with `batch_keys` (rows sharded over the data
  axes). params are donated to the state: pass a copy of anything you keep (the reference)."""
  optimizer = optim.make_optimizer(optim_cfg)
  state = state_lib.init_train_state(params, optimizer, jax.random.key(seed),
                                     param_shardings=param_shardings)
  train_step = step_lib.compile_train_step(
      step_lib.make_train_step(loss_fn, optimizer, num_microbatches=num_microbatches,
                               lr_schedule=optim.make_schedule(optim_cfg)),
      state_lib.state_shardings(optimizer, params, param_shardings),
      {k: sharding.batch_sharding(mesh) for k in batch_keys})
  return state, train_step


def make_adapter_trainer(loss_fn, params, param_shardings, batch_keys, mesh, *,
                         optim_cfg: optim.OptimConfig, num_microbatches: int, seed: int):
  """make_trainer for LoRA params (models/lora.py): the state holds the adapters and scalar
  heads only, the base is a frozen, non-donated input of the step (train/lora.py). Returns
  (state, train_step, params_view) with params_view(state.params) the whole model's params,
  for run(params_view=...)."""
  optimizer = optim.make_optimizer(optim_cfg)
  state, train_step, base = lora_train.adapter_training(
      loss_fn, optimizer, params, param_shardings,
      {k: sharding.batch_sharding(mesh) for k in batch_keys}, jax.random.key(seed),
      num_microbatches=num_microbatches, lr_schedule=optim.make_schedule(optim_cfg))
  return state, train_step, lambda adapters: lora.join(adapters, base)


def make_trainer_for(loss_fn, params, param_shardings, batch_keys, mesh, **kwargs):
  """(state, train_step, params_view): make_adapter_trainer when params hold LoRA adapters,
  else make_trainer with the identity view."""
  if lora.split(params)[0]:
    return make_adapter_trainer(loss_fn, params, param_shardings, batch_keys, mesh, **kwargs)
  state, train_step = make_trainer(loss_fn, params, param_shardings, batch_keys, mesh, **kwargs)
  return state, train_step, lambda p: p
