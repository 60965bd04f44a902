"""Reward-model overoptimisation (Gao et al. 2023) on the gold world, over several seeds.

    python -m experiments.overoptimisation --flagfile=experiments/configs/overoptimisation.flags

Runs the PPO experiment with a small KL coefficient once per --seeds entry (same upstream
stages: one base, one SFT, one reward model; the seed changes PPO's sampling, prompt order and
minibatches), then summarises the held-out curves: the proxy reward (what PPO optimises) and
the gold reward r* (what it was meant to improve), against KL to SFT. Overoptimisation shows
as proxy still rising after gold has peaked. Writes <out_dir>/overoptimisation.json (every
curve, per-seed peak/final numbers and their mean and spread) and <out_dir>/overoptimisation.png.
Results committed under experiments/results/ come from this command (about 30 minutes on 2
CPU cores with cached stages); `pytest -m slow tests/experiments/test_overoptimisation.py` reruns it.
"""
import dataclasses
import json
import os

import numpy as np

from rlhf_jax import provenance
from rlhf_jax.runs import plots, ppo, sweeps
from rlhf_jax.pipeline import config


@dataclasses.dataclass(frozen=True)
class OveroptimisationConfig:
  ppo_flagfile: str = config.flag("experiments/configs/ppo_overoptimisation.flags",
                               "Flagfile of the PPO runs (a small --kl_coef).")
  seeds: str = config.flag("0,1,2", "Comma-separated PPO seeds.")
  workdir: str = config.flag("workdirs/overoptimisation", "Root of the per-seed PPO workdirs.")
  stage_root: str = config.flag("workdirs/stages", "Where cached upstream stages live.")
  out_dir: str = config.flag("experiments/results/overoptimisation",
                          "Where the JSON summary and the figure go.")
  smoke: bool = config.flag(False, "PPO --smoke runs (for tests of the plumbing).")

  def __post_init__(self):
    sweeps.parse_seeds(self.seeds)

  @property
  def seed_list(self) -> list[int]:
    return sweeps.parse_seeds(self.seeds)


def seed_summary(curve: list[dict]) -> dict:
  """Where gold peaked along one run, and what proxy and gold did after it."""
  gold = np.array([c["gold"] for c in curve])
  proxy = np.array([c["proxy"] for c in curve])
  peak = int(np.argmax(gold))
  return {"gold_sft": float(gold[0]), "gold_peak": float(gold[peak]),
          "gold_final": float(gold[-1]), "proxy_sft": float(proxy[0]),
          "proxy_at_gold_peak": float(proxy[peak]), "proxy_final": float(proxy[-1]),
          "kl_at_gold_peak": float(curve[peak]["kl"]), "kl_final": float(curve[-1]["kl"]),
          "words_at_gold_peak": float(curve[peak]["words"]),
          "words_final": float(curve[-1]["words"]),
          "peak_iteration": int(curve[peak]["iteration"]),
          "gold_drop_after_peak": float(gold[peak] - gold[-1]),
          "proxy_gain_after_peak": float(proxy[-1] - proxy[peak])}


def figure(out: dict, path: str) -> None:
  """The sweep's figure from its JSON summary (so committed results can be redrawn)."""
  plots.seeds_over_training(list(out["curves"].values()), path,
                            title=f"PPO against a learned reward, {len(out['seeds'])} seeds "
                            f"({out['ppo_flagfile']})")


def run(cfg: OveroptimisationConfig) -> dict:
  curves, summaries = {}, []
  for seed in cfg.seed_list:
    pcfg = config.parse(ppo.PPOConfig, [
        f"--flagfile={cfg.ppo_flagfile}", f"--seed={seed}", f"--stage_root={cfg.stage_root}",
        f"--workdir={os.path.join(cfg.workdir, f'seed_{seed}')}",
        *(["--smoke"] if cfg.smoke else [])])
    result = ppo.run(pcfg)
    curves[seed] = result["curve"]
    summaries.append({"seed": seed, **seed_summary(result["curve"])})
  numbers = [{k: v for k, v in s.items() if k != "seed"} for s in summaries]
  out = {"ppo_flagfile": cfg.ppo_flagfile, "seeds": cfg.seed_list, "per_seed": summaries,
         "mean_std": sweeps.aggregate(numbers), "curves": {str(k): v for k, v in curves.items()},
         "provenance": provenance.provenance()}
  os.makedirs(cfg.out_dir, exist_ok=True)
  with open(os.path.join(cfg.out_dir, "overoptimisation.json"), "w") as f:
    json.dump(out, f, indent=1)
  figure(out, os.path.join(cfg.out_dir, "overoptimisation.png"))
  ms = out["mean_std"]
  print(f"over {len(summaries)} seeds (mean +- std): gold SFT {ms['gold_sft']['mean']:.3f} -> "
        f"peak {ms['gold_peak']['mean']:.3f} +- {ms['gold_peak']['std']:.3f} at KL "
        f"{ms['kl_at_gold_peak']['mean']:.2f} -> final {ms['gold_final']['mean']:.3f} +- "
        f"{ms['gold_final']['std']:.3f} at KL {ms['kl_final']['mean']:.2f}; proxy after the "
        f"gold peak {ms['proxy_gain_after_peak']['mean']:+.3f} +- "
        f"{ms['proxy_gain_after_peak']['std']:.3f}")
  return out

