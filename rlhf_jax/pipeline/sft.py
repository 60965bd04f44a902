"""Supervised fine-tuning of the pretrained base on a small curated set (LIMA-style).

    python -m experiments.sft --flagfile=experiments/configs/sft_tiny.flags

Starts from the pretraining stage (chain.py builds it first if it is not cached), then
fine-tunes on ~1,000 correct prompt/response pairs and reports held-out exact-match accuracy
of greedy and temperature-1 decoding before and after.
"""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp

from rlhf_jax import provenance
from rlhf_jax.data import builders
from rlhf_jax.pipeline import lm, real_models, sft_files, worlds
from rlhf_jax.pipeline.config import flag
from rlhf_jax.train.logging import write_json


@dataclasses.dataclass(frozen=True)
class SFTConfig(lm.LMConfig, lm.ArithmeticFlags, lm.SycophancyFlags, real_models.HFFlags,
                sft_files.SFTFileFlags):
  pretrain_flagfile: str = flag("experiments/configs/pretrain_tiny.flags",
                                    "Flagfile of the pretraining stage this run starts from.")
  stage_root: str = flag("workdirs/stages", "Where cached upstream stages live.")
  num_sft: int = flag(1000, "Curated SFT examples (train split, correct answers).")

  def __post_init__(self):
    super().__post_init__()
    if self.num_sft < 1:
      raise ValueError(f"--num_sft must be >= 1, got {self.num_sft}")
    if self.file_mode:
      self.check_data_files()
    elif self.init_hf or self.export_hf:
      raise ValueError("--init_hf and --export_hf need --data_files (the world's SFT starts "
                       "from its own pretraining stage, in its byte vocabulary)")


def run(cfg: SFTConfig, base_dir: str) -> dict:
  """Fine-tunes the pretrained base in base_dir; writes <workdir>/result.json."""
  cfg = cfg.effective()
  mesh = lm.setup(cfg)
  datasets = lm.build_world(cfg)
  heldout = builders.load_split(datasets["sft"], "test")
  sft_source = builders.load_split(datasets["sft"], "train")
  sft_source = [sft_source[i] for i in range(min(cfg.num_sft, len(sft_source)))]
  lm.check_criterion(cfg, heldout)
  graphdef, params, shardings = lm.init_model(cfg, mesh, init_from=base_dir)
  eval_fn = lm.stage_eval_fn(cfg, mesh, graphdef, shardings, heldout)
  key = jax.random.key(cfg.seed)
  before = lm.timed("eval base", worlds.heldout_metrics, cfg, graphdef, params, heldout, key=key)
  params, summary = lm.train_lm(cfg, mesh, graphdef, params, shardings, sft_source, kind="sft",
                                eval_fn=eval_fn, stage="SFT")
  after = worlds.heldout_metrics(cfg, graphdef, params, heldout, key=key)
  result = {"base": before, "sft": after, "train": summary["train"], "eval": summary["eval"],
            "wall_s": summary["wall_s"], "steps": summary["final_step"],
            "criterion": summary.get("criterion"),
            "provenance": provenance.provenance(),
            "pretrain_workdir": base_dir, "pretrain_steps": _steps_of(base_dir)}
  write_json(os.path.join(cfg.workdir, "result.json"), result, indent=1)
  print("held-out            base  ->  SFT")
  for name in worlds.headline(cfg):
    print(f"  {name:<16} {before[name]:7.3f} -> {after[name]:7.3f}")
  return result


def _steps_of(stage_dir: str) -> int | None:
  """The steps an upstream stage trained (with a criterion: where it stopped)."""
  path = os.path.join(stage_dir, "result.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f).get("steps")


def matched_compute_config(scfg: SFTConfig, workdir: str, steps: int) -> SFTConfig:
  """The SFT stage's config for exactly `steps` more steps in `workdir`: a matched-compute
  baseline is a step count, so the stage's criterion is dropped (it has nothing to reach)."""
  return dataclasses.replace(scfg.effective(), workdir=workdir, steps=steps, criterion="",
                             warmup_steps=min(scfg.warmup_steps, steps - 1), eval_every=steps,
                             save_every=steps)


def continued_sft(scfg: SFTConfig, workdir: str, steps: int, mesh, graphdef, sft_params,
                  shardings):
  """SFT continued from sft_params for `steps` more steps with SFT's own batch, data and
  learning rate: the matched-compute baseline of an RLHF stage taking as many optimizer
  steps (what those steps buy without a reward signal). Returns the params."""
  cfg = matched_compute_config(scfg, workdir, steps)
  source = builders.load_split(lm.build_world(cfg)["sft"], "train")
  params, _ = lm.train_lm(cfg, mesh, graphdef, jax.tree.map(jnp.copy, sft_params), shardings,
                          [source[i] for i in range(min(cfg.num_sft, len(source)))], kind="sft")
  return params

