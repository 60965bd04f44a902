"""DPO / cDPO / IPO on preference pairs from local files, from a real or a random model; and
DPO / cDPO / IPO / KTO on rater-labelled pairs of SFT samples on a preference world.

    python -m experiments.dpo --flagfile=experiments/configs/dpo_tiny.flags
    python -m experiments.dpo --flagfile=experiments/configs/dpo_llama3_1b_hh_v5e8.flags --dry_run
    python -m experiments.dpo --flagfile=experiments/configs/dpo_gold_tiny.flags

World mode (--world=gold|sycophancy|intransitive, no --data_files; rlhf_jax/runs/dpo_world.py):
builds or reuses the SFT stage (--sft_flagfile, cached under --stage_root with its pretraining
stage); policy and frozen reference start from the SFT params. --num_pairs train prompts
(drawn with replacement) get --ranking_k SFT samples each, ranked by the world's simulated
raters (rlhf_jax/worlds/registry.py; gold: calibrated to --rater_agreement); a pair is the rater's
first vs last response. KTO trains on the same rankings, unpaired: first
= desirable, last = undesirable. Training never sees the gold reward; the report does:
  ches.jsonl   per training pair: CHES under the SFT model (Razin 2024) and the change of the
               chosen/rejected log-probs, trained policy vs reference (likelihood displacement)
  result.json  the world's ground truth ("gold") and own metrics (e.g. the sycophancy rate)
               of the SFT and trained policies (and with --matched_sft, of SFT continued for
               as many steps) on held-out prompts, win rates against SFT with bootstrap CIs,
               the CHES summary, the label statistics.

The policy starts from --init_hf (a Hugging Face model directory), else --init_from (the
params of an earlier stage), else a random --model preset (smoke tests). The reference is
that same starting point, frozen; its log-probs are precomputed in one jitted pass over the
data (--precompute_ref, default) or recomputed inside every step. Reports held-out
preference accuracy (implicit reward), loss and chosen/rejected log-probs; writes
config.json, metrics.jsonl, tb/, checkpoints/ (resumes), params/, result.json, and with
--export_hf the trained policy as a Hugging Face directory.

--dry_run resolves the model's shapes and shardings on the mesh with eval_shape, prints the
analytic per-device memory (rlhf_jax.memory) and, unless --nodry_run_compile, compiles the real
train step and reference precompute pass on abstract arrays (rlhf_jax.plan) and prints what XLA
assigned beside it; no weights are loaded. The mesh is this host's devices when it has enough,
else as many fake CPU devices (a v5e-8 flagfile plans on a laptop). A --init_hf directory
without config.json falls back to the --model preset's shape there, so a real flagfile can be
checked before the checkpoint is downloaded.
"""
import math
import os
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax import memory, plan, provenance, sharding
from rlhf_jax.data import builders, file_datasets, packing, pairs
from rlhf_jax.models.transformer import Transformer
from rlhf_jax.pipeline import lm, real_models
from rlhf_jax.runs import dpo, dpo_world
from rlhf_jax.train import checkpoint, optim, preference, state as state_lib
from rlhf_jax.train import step as step_lib
from rlhf_jax.train.logging import write_json

def model_config(cfg: dpo.DPOConfig):
  """Parameters stored in float32 (Adam's master copy), computed in --dtype."""
  return real_models.model_config(cfg, lm.model_config, dry_run=cfg.dry_run)


def _mesh(cfg: dpo.DPOConfig):
  """The flags' mesh; a dry run of a fixed-size mesh plans on plan.plan_devices (this host's
  devices when it has enough, else fake CPU ones)."""
  sizes = (cfg.mesh_data, cfg.mesh_fsdp, cfg.mesh_tensor)
  devices = None
  if cfg.dry_run and -1 not in sizes:
    devices = plan.plan_devices(math.prod(sizes))
  return lm.setup(cfg, devices=devices)


def memory_estimate(cfg: dpo.DPOConfig, mcfg, mesh) -> dict:
  # LoRA: adapters and their optimizer state, the base params only; packed: rows of pairs
  return memory.estimate(real_models.lora_config(cfg, mcfg), dict(mesh.shape),
                         batch_size=cfg.batch_size if cfg.pack else 2 * cfg.batch_size,
                         seq_len=cfg.seq_len, num_microbatches=cfg.num_microbatches,
                         reference_params=(not cfg.precompute_ref
                                           and preference.needs_reference(cfg.loss)))


def dry_run(cfg: dpo.DPOConfig, mcfg, mesh) -> dict:
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(mcfg, rngs=nnx.Rngs(0))))
  shardings = sharding.param_shardings(abstract, mesh)
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract.to_pure_dict(), shardings)
  for x in jax.tree.leaves(params):
    x.sharding.shard_shape(x.shape)  # raises if a dimension does not divide its mesh axes
  optimizer = optim.make_optimizer(optim.OptimConfig(
      learning_rate=cfg.learning_rate, total_steps=cfg.steps, warmup_steps=cfg.warmup_steps))
  state = state_lib.abstract_state(optimizer, params, shardings)
  est = memory_estimate(cfg, mcfg, mesh)
  print(f"[dry run] mesh {dict(mesh.shape)}, {mcfg.num_params():,} parameters, "
        f"{len(jax.tree.leaves(state))} state arrays\n{memory.format_table(est)}")
  out = {"dry_run": True, "mesh": dict(mesh.shape), "num_params": mcfg.num_params(),
         "memory": est}
  if cfg.dry_run_compile:
    out["plan"] = plan.plan("dpo", mcfg, mesh, plan.Shapes(
        batch_size=cfg.batch_size, seq_len=cfg.seq_len, num_microbatches=cfg.num_microbatches,
        eval_batch_size=cfg.eval_batch_size, precompute_ref=cfg.precompute_ref))
    print(plan.format_plan(out["plan"]))
  return out


def init_policy(cfg: dpo.DPOConfig, mcfg, mesh):
  """(graphdef, params, shardings) from --init_hf, --init_from or a random init."""
  if cfg.init_hf:
    return real_models.load(cfg.init_hf, mesh, cfg)
  if cfg.init_from:
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(mcfg, rngs=nnx.Rngs(0))))
    shardings = sharding.param_shardings(abstract, mesh)
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract.to_pure_dict(), shardings)
    path = os.path.join(cfg.init_from, lm.PARAMS_DIR)
    path = path if os.path.isdir(path) else cfg.init_from
    return graphdef, checkpoint.load_params(path, target), shardings
  return sharding.init_sharded(lambda r: Transformer(mcfg, rngs=r), jax.random.key(cfg.seed),
                               mesh)


class PairData(NamedTuple):
  """The preference data of a file-mode run, read and encoded before any model exists."""
  report: file_datasets.Report
  train: Sequence  # records, KTO examples or packed rows
  test: Sequence | None  # records or KTO examples; None without a held-out split
  encode: Callable  # record (or KTO example) -> encoded pair
  train_encode: Callable  # an item of train -> encoded pair (packed rows are already)
  packed: packing.Packed | None


def _kto_examples(source, split: str, cfg: dpo.DPOConfig) -> list[dict]:
  """pairs.kto_examples of a split; its refusal (one prompt only) names the files and the fix."""
  try:
    return pairs.kto_examples([source[i] for i in range(len(source))])
  except ValueError as e:
    more = " or raise --test_fraction" if split == "test" else ""
    raise ValueError(f"--data_files={cfg.data_files}, {split} split: {e}; add records of other "
                     f"prompts{more}") from None


def _check_kl_pairs(encode, splits, cfg: dpo.DPOConfig) -> None:
  """A KTO example's KL pair puts its prompt with ANOTHER record's completion, which the
  build's per-record length check never saw: every example is encoded now, so one over
  --seq_len fails before the model is built, not mid-training."""
  for split in splits:
    for i in range(len(split)):
      try:
        encode(split[i])
      except ValueError as e:
        raise ValueError(f"--data_files={cfg.data_files}: a KTO KL pair (a prompt with another "
                         f"record's completion) does not fit: {e}") from None


def read_pairs(cfg: dpo.DPOConfig, tok, render_fn, render_id: str) -> PairData:
  """--data_files built and validated (records over --seq_len malformed), split by
  --test_fraction, made KTO examples or packed rows: every error in the data is raised before
  the model is loaded or anything compiles."""
  built = file_datasets.build_file_dataset(
      cfg.data_files.split(","), format=cfg.data_format, data_dir=cfg.data_dir,
      on_error=cfg.on_error, test_fraction=cfg.test_fraction or None, tokenizer=tok,
      max_len=cfg.seq_len, render_fn=render_fn, render_id=render_id, packed=cfg.pack)
  train_src = builders.load_split(built.builder, "train")
  test_src = builders.load_split(built.builder, "test") if cfg.test_fraction else None
  kto = cfg.loss == "kto"  # unpaired labels: each example with a mismatched KL partner
  encode = pairs.make_encoder(tok, cfg.seq_len, "pairs" if kto else cfg.data_format, render_fn,
                              response_len=cfg.response_len)
  if kto:
    encode = pairs.kto_encoder(encode)
    train_src = _kto_examples(train_src, "train", cfg)
    if test_src is not None:
      test_src = _kto_examples(test_src, "test", cfg)
    _check_kl_pairs(encode, [train_src, test_src or []], cfg)
  train_encode, packed = encode, None
  if cfg.pack:  # rows of several whole pairs, computed once; the loss reads their segments
    packed = packing.pack_pairs(packing.shuffled(
        [encode(train_src[i]) for i in range(len(train_src))], lm.data_seed(cfg)),
        cfg.seq_len, tok.pad_id)
    train_src, train_encode = packed.rows, lambda row: row
    print(f"packed {packed.examples} pairs into {len(packed.rows)} rows of {cfg.seq_len} "
          f"tokens ({packed.fill:.0%} full)")
  return PairData(built.report, train_src, test_src, encode, train_encode, packed)


def run(cfg: dpo.DPOConfig) -> dict:
  cfg = cfg.effective()
  mcfg = model_config(cfg)  # an unsupported --init_hf architecture stops here
  if cfg.world_mode and not cfg.dry_run:
    return dpo_world.run_world(cfg)
  mesh = _mesh(cfg)
  if cfg.dry_run:
    return dry_run(cfg, mcfg, mesh)
  tok, render_fn, render_id = real_models.load_tokenizer(cfg)
  real_models.check_vocabulary(tok, mcfg)
  data = read_pairs(cfg, tok, render_fn, render_id)
  train_src, test_src, encode, train_encode, packed = (data.train, data.test, data.encode,
                                                       data.train_encode, data.packed)
  graphdef, params, shardings = real_models.with_adapters(cfg, *init_policy(cfg, mcfg, mesh),
                                                          mesh)
  kto = cfg.loss == "kto"
  ref_params = None
  needs_ref = preference.needs_reference(cfg.loss)  # SimPO is reference-free
  if needs_ref and cfg.precompute_ref:
    train_src = dpo.with_reference(cfg, graphdef, params, shardings, mesh, train_src,
                                   train_encode)
    if test_src is not None:
      test_src = dpo.with_reference(cfg, graphdef, params, shardings, mesh, test_src, encode)
  elif needs_ref:  # a copy: the policy's buffers are donated to the train step
    ref_params = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings)(params)
  if kto:
    loss_fn = preference.kto_loss_fn(
        graphdef, beta=cfg.beta, desirable_weight=cfg.kto_desirable_weight,
        undesirable_weight=cfg.kto_undesirable_weight, average_logps=cfg.average_logps,
        ref_params=ref_params)
  else:
    loss_fn = preference.preference_loss_fn(
        graphdef, loss=cfg.loss, beta=cfg.beta, label_smoothing=cfg.label_smoothing,
        ipo_tau=cfg.ipo_tau, simpo_gamma=cfg.simpo_gamma, average_logps=cfg.average_logps,
        ref_params=ref_params)
  batch_shardings = {k: sharding.batch_sharding(mesh) for k in train_encode(train_src[0])}
  eval_shardings = {k: sharding.batch_sharding(mesh) for k in encode(test_src[0])} \
      if test_src is not None else None
  eval_fn = None if test_src is None else dpo.pair_eval_fn(
      step_lib.compile_eval_step(step_lib.make_eval_step(loss_fn), shardings, eval_shardings),
      test_src, cfg, encode, mesh)

  final, summary = dpo.train_pairs(cfg, mesh, loss_fn, params, shardings, batch_shardings,
                                   train_src, train_encode, eval_fn)
  real_models.export(cfg, graphdef, final.params)
  result = {"train": summary["train"], "eval": summary["eval"], "wall_s": summary["wall_s"],
            "data": {"train": packed.examples if packed else len(train_src),
                     "test": len(test_src) if test_src else 0,
                     "skipped": data.report.skipped,
                     "packed_rows": len(packed.rows) if packed else None,
                     "packed_fill": packed.fill if packed else None},
            "memory": memory_estimate(cfg, mcfg, mesh), "provenance": provenance.provenance()}
  write_json(os.path.join(cfg.workdir, "result.json"), result, indent=1)
  if summary["eval"] and "rewards/accuracies" in summary["eval"]:  # KTO has no pairs
    print(f"held-out preference accuracy {summary['eval']['rewards/accuracies']:.3f}, "
          f"loss {summary['eval']['loss']:.4f}")
  return result

