"""Supervised fine-tuning of the pretrained base on a small curated set (LIMA-style).

    python -m experiments.sft --flagfile=experiments/configs/sft_tiny.flags

Builds the pretraining stage first if it is not cached (see experiments/stages.py), then
fine-tunes on ~1,000 correct prompt/response pairs and reports held-out exact-match accuracy
of greedy and temperature-1 decoding before and after.
"""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp

from experiments import cli, lm, pretrain, stages, worlds
from rlhf_jax.data import builders


@dataclasses.dataclass(frozen=True)
class SFTConfig(lm.LMConfig):
  pretrain_flagfile: str = cli.flag("experiments/configs/pretrain_tiny.flags",
                                    "Flagfile of the pretraining stage this run starts from.")
  stage_root: str = cli.flag("workdirs/stages", "Where cached upstream stages live.")
  num_sft: int = cli.flag(1000, "Curated SFT examples (train split, correct answers).")

  def __post_init__(self):
    super().__post_init__()
    if self.num_sft < 1:
      raise ValueError(f"--num_sft must be >= 1, got {self.num_sft}")


# Flags an SFT run passes down to its pretraining stage: the model and world must be the same
# (SFT fine-tunes those params on that world), and mesh/smoke/data_dir are properties of the
# run. Changing any of them changes the stage's key, so the base is rebuilt, not mismatched.
SHARED_WITH_PRETRAIN = ("model", "world", "world_seed", "error_rate", "min_digits",
                        "max_digits", "statements_per_text", "pretrain_texts", "data_dir",
                        "mesh_data", "mesh_fsdp", "mesh_tensor", "smoke")


def pretrain_config(cfg: SFTConfig) -> pretrain.PretrainConfig:
  return stages.upstream_config(pretrain.PretrainConfig, cfg.pretrain_flagfile, cfg,
                                SHARED_WITH_PRETRAIN)


def stage_key_config(cfg: SFTConfig) -> dict:
  """This SFT run's stage key config, its pretraining stage folded in."""
  return stages.key_config(cfg, {"pretrain": stages.key_config(pretrain_config(cfg))})


def ensure_pretrained(cfg: SFTConfig) -> str:
  pcfg = pretrain_config(cfg)
  return stages.ensure_stage(
      "pretrain", stages.key_config(pcfg), cfg.stage_root,
      lambda workdir: pretrain.run(dataclasses.replace(pcfg, workdir=workdir)))


def run(cfg: SFTConfig) -> dict:
  cfg = cfg.effective()
  base_dir = ensure_pretrained(cfg)
  mesh = lm.setup(cfg)
  datasets = lm.build_world(cfg)
  heldout = builders.load_split(datasets["sft"], "test")
  sft_source = builders.load_split(datasets["sft"], "train")
  sft_source = [sft_source[i] for i in range(min(cfg.num_sft, len(sft_source)))]
  graphdef, params, shardings = lm.init_model(cfg, mesh, init_from=base_dir)
  key = jax.random.key(cfg.seed)
  before = lm.timed("eval base", worlds.heldout_metrics, cfg, graphdef, params, heldout, key=key)
  params, summary = lm.train_lm(cfg, mesh, graphdef, params, shardings, sft_source, kind="sft",
                                eval_fn=lm.heldout_loss_fn(cfg, mesh, graphdef, shardings, heldout))
  after = worlds.heldout_metrics(cfg, graphdef, params, heldout, key=key)
  result = {"base": before, "sft": after, "train": summary["train"], "eval": summary["eval"],
            "wall_s": summary["wall_s"],
            "pretrain_workdir": base_dir}
  with open(os.path.join(cfg.workdir, "result.json"), "w") as f:
    json.dump(result, f, indent=1)
  print("held-out            base  ->  SFT")
  for name in worlds.headline(cfg):
    print(f"  {name:<16} {before[name]:7.3f} -> {after[name]:7.3f}")
  return result


def continued_sft(scfg: SFTConfig, workdir: str, steps: int, mesh, graphdef, sft_params,
                  shardings):
  """SFT continued from sft_params for `steps` more steps with SFT's own batch, data and
  learning rate: the matched-compute baseline of an RLHF stage taking as many optimizer
  steps (what those steps buy without a reward signal). Returns the params."""
  cfg = dataclasses.replace(scfg.effective(), workdir=workdir, steps=steps,
                            warmup_steps=min(scfg.warmup_steps, steps - 1), eval_every=steps,
                            save_every=steps)
  source = builders.load_split(lm.build_world(cfg)["sft"], "train")
  params, _ = lm.train_lm(cfg, mesh, graphdef, jax.tree.map(jnp.copy, sft_params), shardings,
                          [source[i] for i in range(min(cfg.num_sft, len(source)))], kind="sft")
  return params


if __name__ == "__main__":
  cli.main(SFTConfig, run)
