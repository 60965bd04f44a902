"""The programs a stage runs, on abstract arrays: what `rlhf_jax.plan` lowers and compiles.

Each program is the library's own function (step.make_train_step with the stage's real
loss_fn and state.state_shardings, sampling.sample / sample_groups, the rollout's reference
forward, the reward model's score_fn, DPO's reference precompute pass) jitted over
jax.ShapeDtypeStructs that carry the run's shardings, so compiling one allocates nothing. Each
comes with the analytic estimate (rlhf_jax.memory) of the same program.

Resident buffers: what stays on the devices between programs (the train state, frozen
models' params). A program "owns" the resident arguments it introduces (the train step its
state, the reference forward the reference's params); the sampler and DPO's precompute read
the policy's params, which the train state already holds.
"""
import dataclasses
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax import memory, sampling, sharding
from rlhf_jax.models import lora
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.transformer import ScalarHeadModel, Transformer
from rlhf_jax.pipeline.config import flag
from rlhf_jax.rl import rollout
from rlhf_jax.rl.algorithms import grpo, ppo
from rlhf_jax.train import lm, optim, preference, reward
from rlhf_jax.train import lora as lora_train
from rlhf_jax.train import state as state_lib
from rlhf_jax.train import step as step_lib

STAGES = ("sft", "reward", "dpo", "ppo", "grpo")
# Any valid values (here and in the losses below): hyperparameters change no shape, so no byte
# of the plan.
_OPTIM = optim.OptimConfig(learning_rate=1e-5, total_steps=1000, warmup_steps=10)


@dataclasses.dataclass(frozen=True)
class Shapes:
  """What a stage's programs run on; batch sizes are global (all devices) per optimizer step.
  Also the shape flags of `python -m rlhf_jax.plan`."""
  batch_size: int = flag(8, "Rows per optimizer step, all devices: sft sequences, reward "
                         "rankings (--ranking_k sequences each), dpo pairs (2 sequences "
                         "each), ppo/grpo responses.")
  seq_len: int = flag(128, "sft/reward/dpo sequence length (ppo/grpo train on "
                      "--prompt_len + --max_new_tokens).")
  num_microbatches: int = flag(1, "Microbatches per optimizer step (gradient accumulation).")
  eval_batch_size: int = flag(0, "dpo: pairs per reference precompute batch; 0: --batch_size.")
  ranking_k: int = flag(2, "reward: responses ranked per prompt.")
  precompute_ref: bool = flag(True, "dpo: reference log-probs precomputed (else the reference "
                              "runs inside every step).")
  prompt_len: int = flag(32, "ppo/grpo: prompt tokens.")
  max_new_tokens: int = flag(32, "ppo/grpo: sampled tokens per response.")
  rollout_prompts: int = flag(0, "ppo/grpo: prompts per rollout; 0: --batch_size (grpo: "
                              "--batch_size / --group_size).")
  group_size: int = flag(4, "grpo: samples per prompt.")
  grpo_kl: bool = flag(False, "grpo: kl_coef > 0, so the rollout runs the frozen reference.")
  forward_chunk_rows: int = flag(0, "ppo/grpo: rows per chunk of the rollout's log-prob "
                                 "forwards (0: all rows at once).")

  def rl_seq_len(self) -> int:
    return self.prompt_len + self.max_new_tokens

  def rollout_rows(self, stage: str) -> tuple[int, int]:
    """(prompts, rows) of one rollout."""
    g = self.group_size if stage == "grpo" else 1
    prompts = self.rollout_prompts or max(1, self.batch_size // g)
    return prompts, prompts * g


class Program(NamedTuple):
  name: str
  lower: Callable[[], jax.stages.Lowered]
  resident_bytes: int  # per device: the arguments that stay resident between programs
  owns_resident: bool  # those arguments are this program's own (not another's state)
  estimate: dict  # memory.estimate terms of this program alone


def nbytes(tree) -> int:
  """Bytes one device holds of a pytree of sharded ShapeDtypeStructs."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


def abstract_model(factory, mesh):
  """(graphdef, abstract params carrying their shardings, shardings) of nnx module factory."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: factory(nnx.Rngs(0))))
  shardings = sharding.param_shardings(state, mesh)
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state.to_pure_dict(), shardings)
  return graphdef, params, shardings


def _inputs(mesh, spec: dict) -> dict:
  """{name: (shape, dtype)} -> ShapeDtypeStructs sharded like real batches (leading dim)."""
  s = sharding.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=s) for k, (shape, dtype) in spec.items()}


def _sequences(mesh, rows: int, t: int, *names: str) -> dict:
  kinds = {"tokens": jnp.int32, "valid": jnp.bool_}
  return _inputs(mesh, {n: ((rows, t), kinds.get(n.split("_")[-1], jnp.float32))
                        for n in names})


def _train(name, loss_fn, params, shardings, batch, shapes: Shapes, estimate, frozen=None):
  """The real train step (make_train_step, compile_train_step's shardings and donation).
  `frozen` (params, shardings): a reference the loss closes over in the real run; here it is
  an argument (loss_fn builds the loss from it), so it counts as the resident buffer it is."""
  optimizer = optim.make_optimizer(_OPTIM)
  state = state_lib.abstract_state(optimizer, params, shardings)
  state_sh = state_lib.state_shardings(optimizer, params, shardings)
  batch_sh = jax.tree.map(lambda x: x.sharding, batch)
  make = lambda fn, **kw: step_lib.make_train_step(
      fn, optimizer, num_microbatches=shapes.num_microbatches,
      lr_schedule=optim.make_schedule(_OPTIM), **kw)
  if lora.split(params)[0]:  # LoRA: the state trains the adapters, the base is an input
    (train, base), (train_sh, base_sh) = (lora_train.trainable_split(params),
                                          lora_train.trainable_split(shardings))
    state = state_lib.abstract_state(optimizer, train, train_sh)
    jitted = step_lib.compile_train_step(
        make(loss_fn, join=lora.join), state_lib.state_shardings(optimizer, train, train_sh),
        batch_sh, frozen_shardings=base_sh)
    return Program(name, lambda: jitted.lower(state, base, batch),
                   nbytes(state) + nbytes(base), True, estimate)
  if frozen is None:
    jitted = step_lib.compile_train_step(make(loss_fn), state_sh, batch_sh)
    return Program(name, lambda: jitted.lower(state, batch), nbytes(state), True, estimate)
  ref, ref_sh = frozen
  metrics_sh = sharding.replicated(jax.tree.leaves(ref_sh)[0].mesh)
  jitted = jax.jit(sharding.traced_on(lambda st, b, r: make(loss_fn(r))(st, b),
                                      jax.tree.leaves(ref_sh)[0].mesh),
                   in_shardings=(state_sh, batch_sh, ref_sh),
                   out_shardings=(state_sh, metrics_sh), donate_argnums=0)
  return Program(name, lambda: jitted.lower(state, batch, ref), nbytes(state) + nbytes(ref),
                 True, estimate)


def _forward(name, fn, params, inputs, estimate, owns: bool):
  """A frozen model's forward, jitted with the shardings its abstract arguments carry."""
  traced = sharding.traced_on(fn, jax.tree.leaves(params)[0].sharding.mesh)  # as the runs do
  return Program(name, lambda: jax.jit(traced).lower(params, *inputs), nbytes(params), owns,
                 estimate)


def _key(mesh):
  key = jax.eval_shape(lambda: jax.random.key(0))
  return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(mesh))


def _sampler(stage, graphdef, params, mesh, shapes: Shapes, estimate):
  prompts, _ = shapes.rollout_rows(stage)
  p = shapes.prompt_len
  x = _inputs(mesh, {"tokens": ((prompts, p), jnp.int32), "valid": ((prompts, p), jnp.bool_)})
  cfg = sampling.SamplingConfig(max_new_tokens=shapes.max_new_tokens, eos_id=1, pad_id=0)
  if stage == "grpo":
    lower = lambda: sampling.sample_groups.lower(graphdef, params, x["tokens"], x["valid"],
                                                 _key(mesh), cfg=cfg,
                                                 group_size=shapes.group_size)
  else:
    lower = lambda: sampling.sample.lower(graphdef, params, x["tokens"], x["valid"],
                                          _key(mesh), cfg=cfg)
  return Program("sampler (KV cache)", lower, nbytes(params), False, estimate)


def _check(stage: str, mesh, shapes: Shapes) -> None:
  """Refuses shapes the real runs refuse: every batch is split over the data-parallel axes."""
  if stage not in STAGES:
    raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
  b, m = shapes.batch_size, shapes.num_microbatches
  if b < 1 or m < 1 or b % m:
    raise ValueError(f"--batch_size={b} must be a positive multiple of --num_microbatches={m}")
  if stage in ("sft", "reward", "dpo") and shapes.seq_len < 1:
    raise ValueError(f"--seq_len must be >= 1 for {stage}, got {shapes.seq_len}")
  rows = {"--batch_size / --num_microbatches": b // m}
  if stage == "dpo":
    rows["--eval_batch_size"] = shapes.eval_batch_size or b
  if stage in ("ppo", "grpo"):
    rows["prompts per rollout"] = shapes.rollout_rows(stage)[0]
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  for name, n in rows.items():
    if n % dp:
      raise ValueError(f"{name} = {n} is not divisible by the data-parallel size "
                       f"mesh_data * mesh_fsdp = {dp}")


def programs(stage: str, cfg: ModelConfig, mesh, shapes: Shapes) -> list[Program]:
  """The programs `stage` compiles for model shape cfg on mesh (see the module docstring)."""
  _check(stage, mesh, shapes)
  m = dict(mesh.shape)
  est = lambda **kw: memory.estimate(cfg, m, **kw)
  micro = dict(num_microbatches=shapes.num_microbatches)
  g, params, shardings = abstract_model(lambda r: Transformer(cfg, rngs=r), mesh)
  b, t = shapes.batch_size, shapes.seq_len
  if stage == "sft":
    batch = _sequences(mesh, b, t, "tokens", "valid", "loss_mask")
    return [_train("policy train step", lm.lm_loss_fn(g), params, shardings, batch, shapes,
                   est(batch_size=b, seq_len=t, **micro))]
  if stage == "reward":
    rg, rparams, rsh = abstract_model(lambda r: ScalarHeadModel(cfg, rngs=r), mesh)
    k = shapes.ranking_k
    batch = _inputs(mesh, {"tokens_BxKxT": ((b, k, t), jnp.int32),
                           "valid_BxKxT": ((b, k, t), jnp.bool_)})
    return [_train("reward model train step", reward.ranking_loss_fn(rg), rparams, rsh, batch,
                   shapes, est(batch_size=b * k, seq_len=t, scalar_head=True, **micro))]
  if stage == "dpo":
    return _dpo(g, params, shardings, mesh, shapes, est)
  return _rl(stage, cfg, g, params, shardings, mesh, shapes, est)


def _dpo(g, params, shardings, mesh, shapes: Shapes, est) -> list[Program]:
  b, t = shapes.batch_size, shapes.seq_len
  names = [f"{s}_{k}" for s in ("chosen", "rejected") for k in ("tokens", "valid", "mask")]
  pair = lambda rows: {**_sequences(mesh, rows, t, *names),
                       **_inputs(mesh, {"example_valid": ((rows,), jnp.bool_)})}
  train_est = est(batch_size=2 * b, seq_len=t, num_microbatches=shapes.num_microbatches,
                  reference_params=not shapes.precompute_ref)
  if not shapes.precompute_ref:
    loss = lambda ref: preference.preference_loss_fn(g, ref_params=ref)
    return [_train("policy train step + reference", loss, params, shardings, pair(b), shapes,
                   train_est, frozen=(params, shardings))]
  batch = {**pair(b), **_inputs(mesh, {k: ((b,), jnp.float32) for k in
                                       ("ref_chosen_logps", "ref_rejected_logps")})}
  e = shapes.eval_batch_size or b
  return [_train("policy train step", preference.preference_loss_fn(g), params, shardings,
                 batch, shapes, train_est),
          _forward("reference precompute pass", preference.reference_logps_fn(g), params,
                   (pair(e),), est(batch_size=2 * e, seq_len=t, train=False), owns=False)]


def _rl(stage, cfg, g, params, shardings, mesh, shapes: Shapes, est) -> list[Program]:
  """PPO: policy + value trained in one step, frozen reference and reward model; GRPO: the
  policy alone, the reference only with grpo_kl. Both sample with the policy."""
  t, b = shapes.rl_seq_len(), shapes.batch_size
  prompts, rows = shapes.rollout_rows(stage)
  micro = dict(num_microbatches=shapes.num_microbatches)
  seq = lambda n: _sequences(mesh, n, t, "tokens", "valid")
  forward_est = est(batch_size=min(rows, shapes.forward_chunk_rows or rows), seq_len=t,
                    train=False)
  out = []
  if stage == "ppo":  # the value model starts from a reward model: one shape for both
    vg, vparams, vsh = abstract_model(lambda r: ScalarHeadModel(cfg, rngs=r), mesh)
    batch = _sequences(mesh, b, t, *ppo.BATCH_KEYS)
    loss = ppo.ppo_loss_fn(g, vg, clip_eps=0.2, value_clip_eps=0.2, vf_coef=0.1,
                           entropy_coef=0.0)
    both = memory.add(est(batch_size=b, seq_len=t, **micro),
                      est(batch_size=b, seq_len=t, scalar_head=True, **micro))
    out.append(_train("policy + value train step", loss, {"policy": params, "value": vparams},
                      {"policy": shardings, "value": vsh}, batch, shapes, both))
    out.append(_forward("reward model forward", lambda p, x: reward.score_fn(vg)(
        p, x["tokens"], x["valid"]), vparams, (seq(rows),),
        est(batch_size=rows, seq_len=t, train=False, scalar_head=True), owns=True))
  else:
    batch = {**_sequences(mesh, b, t, "tokens", "valid", "mask", "old_logps",
                          *(("ref_logps",) if shapes.grpo_kl else ())),
             **_inputs(mesh, {"advantages": ((b,), jnp.float32)})}
    loss = grpo.grpo_loss_fn(g, clip_eps_low=0.2, clip_eps_high=0.28,
                             kl_coef=0.04 if shapes.grpo_kl else 0.0, aggregation="token",
                             max_new_tokens=shapes.max_new_tokens)
    out.append(_train("policy train step", loss, params, shardings, batch, shapes,
                      est(batch_size=b, seq_len=t, **micro)))
  if stage == "ppo" or shapes.grpo_kl:
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    logps = lambda p, x: rollout.in_row_chunks(  # noqa: E731
        lambda tk, v: rollout.policy_forward(g, p, tk, v, 1.0)[0], shapes.forward_chunk_rows,
        dp)(x["tokens"], x["valid"])
    out.append(_forward("reference forward", logps, params, (seq(rows),), forward_est,
                        owns=True))
  # sample_groups repeats the prompts' prefilled cache group_size times: both are live.
  cached = rows + (prompts if stage == "grpo" else 0)
  out.append(_sampler(stage, g, params, mesh, shapes,
                      est(batch_size=prompts, seq_len=shapes.prompt_len, train=False,
                          sample_batch=cached, sample_len=t)))
  return out
