"""Shared driver of the language-modelling stages (pretrain, SFT) on an embedded world.

Both are next-token training with the same step, loop and checkpointing; they differ in
data (corpus text vs prompt/response with the loss on responses) and initialisation
(random vs the pretrained params). Held-out evaluation is the world's (rlhf_jax/worlds/heldout.py):
exact-match accuracy (arithmetic) or the gold reward of sampled responses (gold).
"""
import dataclasses
import os
import time

import jax

from rlhf_jax import runtime, sharding
from rlhf_jax.pipeline import criterion, worlds
from rlhf_jax.pipeline.config import flag, to_dict
from rlhf_jax.data import pipeline
from rlhf_jax.data.tokenizer import ByteTokenizer
from rlhf_jax.models.config import ATTENTION_IMPLS, PRESETS, REMAT_POLICIES, preset
from rlhf_jax.models import lora
from rlhf_jax.models.transformer import Transformer
from rlhf_jax.train import checkpoint, loop, optim, state as state_lib, step as step_lib
from rlhf_jax.train import lora as lora_train
from rlhf_jax.train.lm import lm_loss_fn
from rlhf_jax.train.logging import MetricsLogger
from rlhf_jax.worlds import registry

PARAMS_DIR = "params"  # <workdir>/params: the stage's final parameters


@dataclasses.dataclass(frozen=True)
class LMConfig:
  workdir: str = flag("workdirs/lm", "Run directory: checkpoints, metrics.jsonl, tb/, config.json.")
  model: str = flag("tiny", "Model preset.", choices=tuple(PRESETS))
  dtype: str = flag("float32", "Compute dtype.", choices=("float32", "bfloat16"))
  remat: str = flag("none", "What the backward pass recomputes instead of keeping: none, "
                    "block (each block from its input) or attention (the T x T scores).",
                    choices=REMAT_POLICIES)
  scan_layers: bool = flag(False, "Store the layers stacked and run them under one lax.scan: "
                           "compile time independent of depth (checkpoints are not "
                           "interchangeable with unscanned runs).")
  attention: str = flag("auto", "Attention: einsum (written out), fused "
                        "(jax.nn.dot_product_attention: cuDNN flash on GPU), auto (fused on "
                        "accelerators, einsum on CPU).", choices=ATTENTION_IMPLS)
  seq_len: int = flag(48, "Training sequence length (tokens, incl. bos/eos).")
  batch_size: int = flag(32, "Global batch size (sequences per step).")
  num_microbatches: int = flag(1, "Gradient-accumulation microbatches per step.")
  steps: int = flag(600, "Training steps (with --criterion: the step budget).")
  criterion: str = flag("", "The checked state the stage must reach: 'METRIC>=VALUE' or "
                        "'METRIC<=VALUE' conditions, comma-separated, on its held-out metrics, "
                        "checked every --eval_every steps; training stops once all hold and "
                        "fails if they never do within --steps (rlhf_jax/pipeline/criterion.py). "
                        "Empty: train exactly --steps steps.")
  learning_rate: float = flag(3e-3, "Peak learning rate.")
  warmup_steps: int = flag(50, "Linear warmup steps.")
  end_lr_ratio: float = flag(0.1, "Learning rate at --steps as a fraction of the peak (cosine "
                             "decay; 1.0: constant after warmup).")
  weight_decay: float = flag(0.1, "AdamW decoupled weight decay.")
  grad_clip_norm: float = flag(1.0, "Global gradient-norm clip.")
  seed: int = flag(0, "Seed of init, data order and sampling.")
  data_seed: int = flag(-1, "Seed of the training data order alone (-1: --seed); varies the "
                        "order with the init fixed.")
  log_every: int = flag(50, "Steps between progress lines / metric records.")
  eval_every: int = flag(200, "Steps between held-out loss evaluations (and at the end).")
  save_every: int = flag(200, "Steps between checkpoints.")
  keep_checkpoints: int = flag(2, "Checkpoints kept.")
  mesh_data: int = flag(-1, "Data-parallel mesh axis size (-1: fill).")
  mesh_fsdp: int = flag(1, "FSDP mesh axis size (-1: fill).")
  mesh_tensor: int = flag(1, "Tensor-parallel mesh axis size (-1: fill).")
  data_dir: str = flag("workdirs/data", "Where the world's TFDS datasets are materialised.")
  world: str = flag("arithmetic", "Embedded world (rlhf_jax/worlds/registry.py).",
                    choices=registry.NAMES)
  world_seed: int = flag(0, "Seed of the world (splits, corrupted pairs, corpora).")
  pretrain_texts: int = flag(8000, "Texts in the pretraining corpus.")
  eval_prompts: int = flag(500, "Held-out prompts for evaluation (capped by the test split).")
  eval_batch_size: int = flag(100, "Prompts per sampling batch at evaluation.")
  max_new_tokens: int = flag(0, "Response tokens sampled at evaluation (0: the world's "
                             "default, rlhf_jax/worlds/registry.py).")
  smoke: bool = flag(False, "A few steps of everything, for tests.")
  allow_config_change: bool = flag(False, "Resume a --workdir's checkpoint even though flags "
                                   "that alter training changed since it started "
                                   "(rlhf_jax/train/config_check.py).")
  on_nonfinite: str = flag("stop", "A step whose loss or gradients are NaN/inf: 'stop' the run "
                           "(naming the step and its examples, with a debug dump in "
                           "<workdir>/nonfinite/) or 'skip' its update (counted and logged); "
                           "the bad values never reach the state (rlhf_jax/train/nonfinite.py).",
                           choices=("stop", "skip"))
  preempt_deadline_s: float = flag(120.0, "Seconds from a SIGTERM to a written checkpoint: the "
                                   "run saves at the next step and exits with status 85, or "
                                   "with 86 if that takes longer (rlhf_jax/train/"
                                   "preemption.py). Keep it below the scheduler's grace "
                                   "period.")

  def __post_init__(self):
    positive = ("seq_len", "batch_size", "num_microbatches", "steps", "log_every", "eval_every",
                "save_every", "keep_checkpoints", "eval_prompts", "eval_batch_size")
    for name in positive:
      if getattr(self, name) < 1:
        raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
    if self.batch_size % self.num_microbatches:
      raise ValueError(f"--batch_size={self.batch_size} must be divisible by "
                       f"--num_microbatches={self.num_microbatches}")
    if not self.preempt_deadline_s > 0:
      raise ValueError(f"--preempt_deadline_s must be > 0, got {self.preempt_deadline_s}")
    if self.learning_rate <= 0:
      raise ValueError(f"--learning_rate must be > 0, got {self.learning_rate}")
    criterion.parse(self.criterion)  # syntax errors before anything runs
    if not 0.0 <= self.end_lr_ratio <= 1.0:
      raise ValueError(f"--end_lr_ratio must be in [0, 1], got {self.end_lr_ratio}")
    getattr(super(), "__post_init__", lambda: None)()  # a world's flags check themselves
    if self.max_new_tokens < 0:
      raise ValueError(f"--max_new_tokens must be >= 0, got {self.max_new_tokens}")
    if self.warmup_steps >= self.steps and not self.smoke:
      raise ValueError(f"--warmup_steps={self.warmup_steps} must be < --steps={self.steps}")

  def effective(self) -> "LMConfig":
    """The config actually run: --smoke shrinks every size to seconds and drops the
    criterion (a smoke run tests the plumbing; 3 steps reach no checked state)."""
    if not self.smoke:
      return self
    return dataclasses.replace(self, steps=3, criterion="", warmup_steps=1, log_every=1,
                               save_every=2,
                               eval_every=3, eval_prompts=8, eval_batch_size=8, batch_size=8,
                               num_microbatches=1,
                               max_new_tokens=min(worlds.max_new_tokens(self), 16))

  def world_config(self, **overrides):
    return worlds.world_config(self, **overrides)


def data_seed(cfg: LMConfig) -> int:
  return cfg.seed if cfg.data_seed < 0 else cfg.data_seed


def model_options(cfg) -> dict:
  """The ModelConfig fields a run's flags set on any model it builds or loads: the compute
  dtype and how the model is computed (models/config.py)."""
  return dict(dtype=cfg.dtype, remat=cfg.remat, scan_layers=cfg.scan_layers,
              attention=cfg.attention)


def model_config(cfg: LMConfig):
  return preset(cfg.model, **model_options(cfg))


@dataclasses.dataclass(frozen=True)
class ArithmeticFlags:
  """The arithmetic world's own flags: on the configs of the runs that can use that world."""
  error_rate: float = flag(0.4, "arithmetic: fraction of pretraining statements with "
                           "systematic errors.")
  min_digits: int = flag(2, "arithmetic: fewest digits per operand (2: operands 10..99).")
  max_digits: int = flag(2, "arithmetic: most digits per operand.")
  statements_per_text: int = flag(4, "arithmetic: statements per pretraining text.")


@dataclasses.dataclass(frozen=True)
class SycophancyFlags:
  """The sycophancy world's own flag: on the configs of the runs that can use that world."""
  p_syc: float = flag(0.7, "sycophancy: probability that a rater prefers an answer agreeing "
                      "with a wrong belief over a correct one (Sharma 2023).")

  def __post_init__(self):
    if not 0.0 < self.p_syc < 1.0:
      raise ValueError(f"--p_syc must be in (0, 1), got {self.p_syc}")
    getattr(super(), "__post_init__", lambda: None)()


def optim_config(cfg: LMConfig, total_steps: int) -> optim.OptimConfig:
  """AdamW with warmup and cosine decay over `total_steps` updates, from the config's flags
  (the warmup capped below the total, for runs shorter than the flagfile's warmup)."""
  return optim.OptimConfig(learning_rate=cfg.learning_rate, total_steps=total_steps,
                           warmup_steps=min(cfg.warmup_steps, total_steps - 1),
                           end_lr_ratio=cfg.end_lr_ratio,
                           weight_decay=cfg.weight_decay, grad_clip_norm=cfg.grad_clip_norm)


def setup(cfg: LMConfig, devices=None, *, sharded_eval: bool = True):
  """The run's mesh (over `devices`, default all), checked against the batch sizes.

  sharded_eval: the run feeds --eval_batch_size batches through a sharded step (held-out loss,
  DPO's pairs), so they must split over the data axes; runs that only SAMPLE at evaluation
  (PPO, GRPO, best-of-n, ...) pass False: a sampling batch that does not split is replicated
  (sharding.shard_global)."""
  runtime.enable_compilation_cache()
  mesh = sharding.make_mesh(cfg.mesh_data, cfg.mesh_fsdp, cfg.mesh_tensor, devices=devices)
  data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
  for name in ("batch_size", "eval_batch_size")[:2 if sharded_eval else 1]:
    if getattr(cfg, name) % data_parallel:
      raise ValueError(f"--{name}={getattr(cfg, name)} must be divisible by the data-parallel "
                       f"size mesh_data*mesh_fsdp={data_parallel}")
  if (cfg.batch_size // cfg.num_microbatches) % data_parallel:
    raise ValueError(f"each microbatch (--batch_size/--num_microbatches = "
                     f"{cfg.batch_size // cfg.num_microbatches}) must be divisible by the "
                     f"data-parallel size {data_parallel}")
  # No jax.set_mesh: every jit gets explicit shardings, and a process-global mesh would leak
  # into whatever runs next in the same process (tests call experiments in-process).
  return mesh


def abstract_params(graphdef_params_shardings):
  _, params, shardings = graphdef_params_shardings
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      params, shardings)


def init_model(cfg: LMConfig, mesh, init_from: str | None = None):
  """(graphdef, params, shardings): random init, or params loaded from another stage."""
  mcfg = model_config(cfg)
  g, params, shardings = sharding.init_sharded(lambda r: Transformer(mcfg, rngs=r),
                                               jax.random.key(cfg.seed), mesh)
  if init_from is not None:
    params = checkpoint.load_params(os.path.join(init_from, PARAMS_DIR),
                                    abstract_params((g, params, shardings)))
  return g, params, shardings


def heldout_loss_fn(cfg: LMConfig, mesh, graphdef, shardings, heldout_source):
  """eval_fn(params) -> held-out answer NLL per token and token accuracy (teacher forced)."""
  tok = ByteTokenizer()
  batch_shardings = {k: sharding.batch_sharding(mesh) for k in _BATCH_KEYS}
  eval_step = step_lib.compile_eval_step(step_lib.make_eval_step(lm_loss_fn(graphdef)),
                                         shardings, batch_shardings)
  source = [heldout_source[i] for i in range(min(cfg.eval_prompts, len(heldout_source)))]

  def eval_fn(params):
    batches = pipeline.make_eval_iterator(
        source, batch_size=cfg.eval_batch_size, seq_len=cfg.seq_len, tokenizer=tok, kind="sft",
        rows=sharding.process_rows(mesh, cfg.eval_batch_size))
    return step_lib.evaluate(eval_step, params,
                             (sharding.shard_batch(b, mesh) for b in batches))

  return eval_fn


# loss_drop: the held-out loss's fall since the previous evaluation (absent at the first), so
# "loss_drop<=0.01" reads "until the held-out loss has stopped falling".
_TEACHER_FORCED = ("loss", "token_accuracy", "loss_drop")


def check_criterion(cfg: LMConfig, heldout_source):
  """The --criterion's conditions; ValueError naming the stage's metrics unless each names
  one (a stage calls this before it builds its model: nothing compiles first)."""
  conditions = criterion.parse(cfg.criterion)
  criterion.check_names(conditions,
                        _TEACHER_FORCED + worlds.heldout_metric_names(cfg, heldout_source))
  return conditions


def stage_eval_fn(cfg: LMConfig, mesh, graphdef, shardings, heldout_source):
  """eval_fn(params) of a pretraining/SFT stage: the teacher-forced answer loss and token
  accuracy, plus the world's held-out metrics (sampled answers) when --criterion needs them."""
  conditions = check_criterion(cfg, heldout_source)
  loss_fn = heldout_loss_fn(cfg, mesh, graphdef, shardings, heldout_source)
  sampled = any(c.metric not in _TEACHER_FORCED for c in conditions)
  key = jax.random.key(cfg.seed)

  def metrics(params):
    out = dict(loss_fn(params))
    if sampled:
      out.update(worlds.heldout_metrics(cfg, graphdef, params, heldout_source, key=key))
    return out
  return LossDropEval(metrics)


class LossDropEval:
  """An evaluation plus loss_drop, the held-out loss's fall since the previous evaluation.
  That previous loss is state the loop restores on resume (restore(last logged evaluation),
  train/loop.py), so a resumed run reports and stops exactly as an uninterrupted one."""

  def __init__(self, metrics):
    self._metrics, self._previous = metrics, None

  def restore(self, last_eval: dict) -> None:
    self._previous = last_eval.get("loss")

  def __call__(self, params) -> dict:
    out = self._metrics(params)
    if self._previous is not None:
      out["loss_drop"] = self._previous - out["loss"]
    self._previous = out["loss"]
    return out


_BATCH_KEYS = ("tokens", "loss_mask", "valid", "example_valid")


def train_lm(cfg: LMConfig, mesh, graphdef, params, shardings, train_source, *, kind: str,
             eval_fn=None, config_dict=None, stage: str = "stage"):
  """Trains params on train_source (kind "lm" or "sft"); saves final params; returns
  (params, summary). eval_fn(params) -> dict runs every --eval_every steps and at the end."""
  it = pipeline.make_train_iterator(train_source, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                                    seed=data_seed(cfg), tokenizer=ByteTokenizer(), kind=kind,
                                    rows=sharding.process_rows(mesh, cfg.batch_size))
  batch_shardings = {k: sharding.batch_sharding(mesh) for k in _BATCH_KEYS}
  final, summary = run_training(cfg, mesh, lm_loss_fn(graphdef), params, shardings,
                                batch_shardings, it, eval_fn=eval_fn,
                                tokens_per_batch=cfg.batch_size * cfg.seq_len,
                                config_dict=config_dict, stage=stage)
  return final.params, summary


def run_training(cfg: LMConfig, mesh, loss_fn, params, shardings, batch_shardings, host_iter,
                 *, eval_fn, tokens_per_batch: int, config_dict=None, stage: str = "stage"):
  """The part every training stage shares: AdamW from the config's flags, a TrainState born
  sharded, the step compiled once with shardings and donation, checkpoints in --workdir
  (resumed automatically), metrics, and the final params saved to <workdir>/params.

  host_iter: a resumable iterator of host batches holding this process's rows of each global
  batch (sharding.process_rows) with get_state/set_state; loss_fn follows
  rlhf_jax/train/step.py's contract. With --criterion, training stops at the first
  evaluation where it holds, and a run that spends --steps without it raises
  criterion.StageCriterionError after saving its last checkpoint, never <workdir>/params.
  With LoRA adapters in params (models/lora.py) only they (and scalar heads) train, the base
  frozen (train/lora.py); the returned state's params are joined again.
  Returns (final TrainState, summary)."""
  conditions = criterion.parse(cfg.criterion)
  if conditions and eval_fn is None:
    raise ValueError(f"{stage}: --criterion={cfg.criterion} needs held-out evaluation, which "
                     f"this stage does not run; leave --criterion empty")
  ocfg = optim_config(cfg, cfg.steps)
  optimizer = optim.make_optimizer(ocfg)
  base = None
  if lora.split(params)[0]:  # LoRA: the state holds the adapters, the base is frozen
    train_state, train_step, base = lora_train.adapter_training(
        loss_fn, optimizer, params, shardings, batch_shardings, jax.random.key(cfg.seed),
        num_microbatches=cfg.num_microbatches, lr_schedule=optim.make_schedule(ocfg))
  else:
    train_state = state_lib.init_train_state(params, optimizer, jax.random.key(cfg.seed),
                                             param_shardings=shardings)
    step_fn = step_lib.make_train_step(loss_fn, optimizer, num_microbatches=cfg.num_microbatches,
                                       lr_schedule=optim.make_schedule(ocfg))
    train_step = step_lib.compile_train_step(
        step_fn, state_lib.state_shardings(optimizer, params, shardings), batch_shardings)
  manager = checkpoint.make_manager(cfg.workdir, save_every=cfg.save_every,
                                    max_to_keep=cfg.keep_checkpoints)
  logger = MetricsLogger(cfg.workdir)
  final, summary = loop.train(
      workdir=cfg.workdir, train_step=train_step, state=train_state,
      train_iter=_ShardedIterator(host_iter, mesh), total_steps=cfg.steps, manager=manager,
      logger=logger, eval_fn=eval_fn, eval_every=cfg.eval_every, log_every=cfg.log_every,
      tokens_per_batch=tokens_per_batch, config=config_dict or to_dict(cfg),
      on_nonfinite=cfg.on_nonfinite, preempt_deadline_s=cfg.preempt_deadline_s,
      params_view=None if base is None else (lambda adapters: lora.join(adapters, base)),
      stop_fn=(lambda metrics: criterion.met(conditions, metrics)) if conditions else None)
  if conditions:
    summary["criterion"] = {"criterion": cfg.criterion, "met": summary["stopped"],
                            "step": summary["final_step"], "budget": cfg.steps}
    if not summary["stopped"]:
      manager.close()
      logger.close()
      raise criterion.StageCriterionError(
          criterion.failure(stage, conditions, summary["eval"], summary["final_step"]))
    print(f"[{stage}] criterion {cfg.criterion} met at step {summary['final_step']} of "
          f"{cfg.steps}: {criterion.describe(conditions, summary['eval'])}")
  if base is not None:  # the stage's params are the whole model, adapters joined
    final = final.replace(params=lora.join(final.params, base))
  checkpoint.save_params(os.path.join(cfg.workdir, PARAMS_DIR), final.params)
  manager.close()
  logger.close()
  return final, summary


class _ShardedIterator:
  """Places each host batch on the mesh; forwards the resumable state of the grain iterator.
  A batch's "example_id" rows (pipeline.read_rows) stay on the host as `example_ids`, for the
  loop's report of a nonfinite step (train/nonfinite.py)."""

  def __init__(self, it, mesh):
    self._it, self._mesh = it, mesh
    self.example_ids = None

  def __next__(self):
    batch = dict(next(self._it))
    self.example_ids = batch.pop(pipeline.EXAMPLE_ID, None)
    return sharding.shard_batch(batch, self._mesh)

  def get_state(self):
    return self._it.get_state()

  def set_state(self, state):
    self._it.set_state(state)


def build_world(cfg: LMConfig):
  return worlds.build_datasets(cfg)


def format_metrics(metrics: dict, names) -> str:
  return "  ".join(f"{k} {metrics[k]:.3f}" for k in names)


def timed(label: str, fn, *args, **kwargs):
  start = time.perf_counter()
  out = fn(*args, **kwargs)
  print(f"[{label}] {time.perf_counter() - start:.1f}s")
  return out
