"""Pretrain a base model on the arithmetic world's corpus (with its systematic errors).

    python -m experiments.pretrain --flagfile=experiments/configs/pretrain_tiny.flags

Writes <workdir>/{config.json, metrics.jsonl, tb/, checkpoints/, params/} and reports the
base model's held-out exact-match accuracy (greedy and temperature 1).
"""
import dataclasses
import json
import os

import jax

from experiments import cli, lm
from rlhf_jax.data import builders


@dataclasses.dataclass(frozen=True)
class PretrainConfig(lm.LMConfig):
  pass


def run(cfg: PretrainConfig) -> dict:
  cfg = cfg.effective()
  mesh = lm.setup(cfg)
  datasets = lm.timed("build world data", lm.build_world, cfg)
  graphdef, params, shardings = lm.init_model(cfg, mesh)
  heldout = builders.load_split(datasets["sft"], "test")
  params, summary = lm.train_lm(cfg, mesh, graphdef, params, shardings,
                                builders.load_split(datasets["pretrain"], "train"), kind="lm",
                                eval_fn=lm.heldout_loss_fn(cfg, mesh, graphdef, shardings, heldout))
  result = {"train": summary["train"], "eval": summary["eval"], "wall_s": summary["wall_s"],
            **lm.heldout_accuracy(cfg, graphdef, params, heldout, key=jax.random.key(cfg.seed))}
  with open(os.path.join(cfg.workdir, "result.json"), "w") as f:
    json.dump(result, f, indent=1)
  print(f"pretrain: held-out accuracy greedy {result['accuracy_greedy']:.3f}, "
        f"temperature 1 {result['accuracy_temp1']:.3f}")
  return result


if __name__ == "__main__":
  cli.main(PretrainConfig, run)
