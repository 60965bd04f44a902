"""Pretrain a base model on an embedded world's corpus (arithmetic: with systematic errors).

    python -m experiments.pretrain --flagfile=experiments/configs/pretrain_tiny.flags

Writes <workdir>/{config.json, metrics.jsonl, tb/, checkpoints/, params/, result.json} and
reports the base model's held-out metrics (rlhf_jax/worlds/heldout.py).
"""
import dataclasses
import os

import jax

from rlhf_jax import provenance
from rlhf_jax.data import builders
from rlhf_jax.pipeline import lm, worlds
from rlhf_jax.train.logging import write_json


@dataclasses.dataclass(frozen=True)
class PretrainConfig(lm.LMConfig, lm.ArithmeticFlags, lm.SycophancyFlags):
  pass


def run(cfg: PretrainConfig) -> dict:
  cfg = cfg.effective()
  mesh = lm.setup(cfg)
  datasets = lm.timed("build world data", lm.build_world, cfg)
  heldout = builders.load_split(datasets["sft"], "test")
  lm.check_criterion(cfg, heldout)
  graphdef, params, shardings = lm.init_model(cfg, mesh)
  eval_fn = lm.stage_eval_fn(cfg, mesh, graphdef, shardings, heldout)
  params, summary = lm.train_lm(cfg, mesh, graphdef, params, shardings,
                                builders.load_split(datasets["pretrain"], "train"), kind="lm",
                                eval_fn=eval_fn, stage="pretraining")
  result = {"train": summary["train"], "eval": summary["eval"], "wall_s": summary["wall_s"],
            "steps": summary["final_step"], "criterion": summary.get("criterion"),
            "provenance": provenance.provenance(),
            **worlds.heldout_metrics(cfg, graphdef, params, heldout, key=jax.random.key(cfg.seed))}
  write_json(os.path.join(cfg.workdir, "result.json"), result, indent=1)
  print(f"pretrain held-out: {lm.format_metrics(result, worlds.headline(cfg))}")
  return result

