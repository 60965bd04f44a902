"""Nash-MD-PG against a pairwise preference model vs PPO against a Bradley-Terry reward
model on the intransitive world, over several seeds (Munos et al. 2024's claim, measured).

    python -m experiments.nash_md_sweep --flagfile=experiments/configs/nash_md_sweep.flags

For every --seeds entry: experiments.nash_md (--nash_flagfile) and experiments.ppo on the
same world (--ppo_flagfile, a BT reward stage), sharing the pretraining and SFT stages (the
seed changes the RL runs only). Then every final policy, and SFT, is evaluated by ONE
evaluator (--final_eval_samples temperature-1 samples per held-out prompt, the same keys):
its style distribution, exploitability and TV distance to the Nash equilibrium. Writes
<out_dir>/nash_md.json (per seed: the final evaluation and the eval curve of each method;
the mean and std over seeds) and <out_dir>/nash_md.png (style shares, exploitability and
distance to Nash over training, both methods, every seed). The committed results under
experiments/results/nash_md/ come from this command; tests/experiments/test_nash_md_sweep.py
checks them and (slow) reruns it. --raters_judge adds Nash-MD judged by the raters' exact
probability, which separates the preference model's errors from the RL's.

Measured (nash_md_tiny.flags: tau 0.1, 16 prompts x 4 responses; 3 seeds, final policies, 176
held-out samples; formal / casual / poetic / malformed, exploitability, TV to Nash, TV to the
tau-regularised equilibrium from this SFT, (0.37, 0.40, 0.23, 0)):
  SFT                0.13 / 0.63 / 0.15 / 0.10   0.201          0.41   0.32
  Nash-MD (model)    0.34 / 0.48 / 0.05 / 0.14   0.193 +- 0.009 0.41   0.21
  Nash-MD (raters)   0.47 / 0.29 / 0.06 / 0.18   0.156 +- 0.019 0.42   0.28
  BT-PPO             0.72 / 0.01 / 0.00 / 0.27   0.266 +- 0.012 0.76   0.62
BT-PPO collapses onto formal in every seed, as predicted; Nash-MD keeps a mixture, is less
exploitable than BT-PPO in every seed, and judged by the raters less exploitable than SFT in
every seed (by the learned model: 2 of 3). It does NOT approach the equilibrium in 30
iterations: poetic never grows (formal, which poetic beats, has to dominate first, and a
style the policy stops sampling grows back slowly), and malformed text grows with formal (the
small SFT misspells topic words in the style it rarely wrote; a malformed answer loses to
everything, so it dominates the exploitability). Among well-formed answers alone, Nash-MD
judged by the raters is the least exploitable (0.09, by the model 0.15, SFT 0.18, BT-PPO
0.20).
"""
import dataclasses
import json
import os
import time

import jax
import numpy as np

from rlhf_jax import provenance
from rlhf_jax.runs import nash_md, plots, ppo
from rlhf_jax.pipeline import config, lm, reward as reward_stage, worlds
from rlhf_jax.runs.sweeps import aggregate, parse_seeds
from rlhf_jax.data.tokenizer import ByteTokenizer
from rlhf_jax.rl.rollout import RolloutStage
from rlhf_jax.sampling import SamplingConfig
from rlhf_jax.worlds import intransitive

METHODS = ("nash_md", "nash_md_raters", "bt_ppo")
FINAL_KEYS = ("share_formal", "share_casual", "share_poetic", "share_malformed",
              "exploitability", "nash_distance", "gold", "kl")


@dataclasses.dataclass(frozen=True)
class NashMDSweepConfig:
  nash_flagfile: str = config.flag("experiments/configs/nash_md_tiny.flags",
                                "Flagfile of the Nash-MD runs.")
  ppo_flagfile: str = config.flag("experiments/configs/ppo_intransitive_tiny.flags",
                               "Flagfile of the BT-PPO runs (a Bradley-Terry reward stage).")
  seeds: str = config.flag("0,1,2", "Comma-separated RL seeds.")
  bt_ppo: bool = config.flag(True, "Also run BT-PPO (otherwise Nash-MD only).")
  raters_judge: bool = config.flag(True, "Also run Nash-MD with the raters as judge (their exact "
                                "preference probability): the learned model's share of the "
                                "gap to the equilibrium.")
  workdir: str = config.flag("workdirs/nash_md_sweep", "Root of the per-run workdirs.")
  stage_root: str = config.flag("workdirs/stages", "Where cached upstream stages live.")
  data_dir: str = config.flag("workdirs/data", "Where the world's datasets are materialised.")
  model: str = config.flag("", "Model preset override for every run ('' keeps the flagfiles').")
  out_dir: str = config.flag("experiments/results/nash_md", "Where the JSON and figure go.")
  final_eval_samples: int = config.flag(16, "Samples per held-out prompt of the final evaluation.")
  smoke: bool = config.flag(False, "--smoke runs (for tests of the plumbing).")

  def __post_init__(self):
    parse_seeds(self.seeds)
    if self.final_eval_samples < 1:
      raise ValueError(f"--final_eval_samples must be >= 1, got {self.final_eval_samples}")

  @property
  def seed_list(self) -> list[int]:
    return parse_seeds(self.seeds)


def _run_args(cfg: NashMDSweepConfig, flagfile: str, seed: int, workdir: str) -> list[str]:
  return [f"--flagfile={flagfile}", f"--seed={seed}", f"--stage_root={cfg.stage_root}",
          f"--data_dir={cfg.data_dir}", f"--workdir={workdir}",
          *([f"--model={cfg.model}"] if cfg.model else []), *(["--smoke"] if cfg.smoke else [])]


def final_evaluator(ncfg: nash_md.NashMDConfig, samples: int, sft_dir: str):
  """evaluate(workdir or None for SFT) -> nash_md.style_eval's numbers, the same prompts,
  samples and keys for every policy."""
  ncfg = ncfg.effective()
  mesh = lm.setup(ncfg, sharded_eval=False)
  g, sft_params, _ = lm.init_model(ncfg, mesh, init_from=sft_dir)
  scfg = SamplingConfig(max_new_tokens=worlds.max_new_tokens(ncfg),
                        eos_id=ByteTokenizer.eos_id, pad_id=ByteTokenizer.pad_id)
  ev = nash_md.style_eval(ncfg, RolloutStage(g, scfg, worlds.world_prompt_len(ncfg)),
                          worlds.test_prompts(ncfg), sft_params, ncfg.world_config(),
                          samples=samples, key=jax.random.key(12345))

  def evaluate(workdir):
    params = sft_params if workdir is None else lm.init_model(ncfg, mesh, init_from=workdir)[1]
    out = ev(params)
    return {k: out[k] for k in FINAL_KEYS}
  return evaluate


def run(cfg: NashMDSweepConfig) -> dict:
  runs = {m: [] for m in METHODS if (m != "bt_ppo" or cfg.bt_ppo)
          and (m != "nash_md_raters" or cfg.raters_judge)}
  for seed in cfg.seed_list:
    for method, extra in (("nash_md", []), ("nash_md_raters", ["--judge=raters"])):
      if method not in runs:
        continue
      ncfg = config.parse(nash_md.NashMDConfig, _run_args(
          cfg, cfg.nash_flagfile, seed, os.path.join(cfg.workdir, f"{method}_seed_{seed}"))
          + extra)
      t0 = time.perf_counter()
      result = nash_md.run(ncfg)
      runs[method].append({"seed": seed, "workdir": ncfg.workdir, "curve": result["curve"],
                           "sft_workdir": result["sft_workdir"],
                           "wall_s": time.perf_counter() - t0})
    if cfg.bt_ppo:
      pcfg = config.parse(ppo.PPOConfig, _run_args(
          cfg, cfg.ppo_flagfile, seed, os.path.join(cfg.workdir, f"bt_ppo_seed_{seed}")))
      t0 = time.perf_counter()
      result = ppo.run(pcfg)
      sft_dir = reward_stage.read_manifest(result["reward_workdir"])["sft_workdir"]
      runs["bt_ppo"].append({"seed": seed, "workdir": pcfg.workdir, "curve": result["curve"],
                             "sft_workdir": sft_dir, "wall_s": time.perf_counter() - t0})

  sft_dirs = {r["sft_workdir"] for rs in runs.values() for r in rs}
  if len(sft_dirs) != 1:
    raise RuntimeError(f"the runs started from different SFT stages: {sorted(sft_dirs)}")
  evaluate = final_evaluator(ncfg, cfg.final_eval_samples, sft_dirs.pop())
  sft = evaluate(None)
  # Where Nash-MD with the flagfile's tau converges from this SFT (none at tau 0).
  target = nash_md.regularised_target(ncfg, sft, ncfg.world_config())

  def final(workdir):
    point = sft if workdir is None else evaluate(workdir)
    return {**point, **nash_md.target_distance(point, target)}

  out = {"seeds": cfg.seed_list, "nash_flagfile": cfg.nash_flagfile,
         "ppo_flagfile": cfg.ppo_flagfile if cfg.bt_ppo else None,
         "final_eval_samples": cfg.final_eval_samples,
         "nash": intransitive.nash_equilibrium(
             intransitive.preference_matrix(ncfg.world_config())).tolist(),
         "nash_tau": ncfg.nash_tau,
         "tau_equilibrium": None if target is None else target.tolist(),
         "sft": final(None), "provenance": provenance.provenance()}
  for method, rs in runs.items():
    per_seed = [{"seed": r["seed"], "final": final(r["workdir"]), "curve": r["curve"],
                 "wall_s": r["wall_s"]} for r in rs]
    out[method] = {"per_seed": per_seed,
                   "mean_std": aggregate([s["final"] for s in per_seed])}
  os.makedirs(cfg.out_dir, exist_ok=True)
  with open(os.path.join(cfg.out_dir, "nash_md.json"), "w") as f:
    json.dump(out, f, indent=1)
  figure(out, os.path.join(cfg.out_dir, "nash_md.png"))
  print(format_summary(out))
  return out


def figure(out: dict, path: str) -> None:
  """The sweep's figure from its JSON (so committed results can be redrawn)."""
  labels = {"nash_md": "Nash-MD (pairwise model)", "nash_md_raters": "Nash-MD (raters)",
            "bt_ppo": "PPO (BT reward)"}
  plots.styles_over_training({labels[m]: [s["curve"] for s in out[m]["per_seed"]]
                       for m in METHODS if m in out}, out["nash"], path,
                      title=f"Intransitive world, {len(out['seeds'])} seeds: held-out style "
                      "distribution, exploitability, distance to Nash")


def format_summary(out: dict) -> str:
  lines = [f"final policies ({out['final_eval_samples']} samples per held-out prompt), "
           f"mean +- std over seeds {out['seeds']}; Nash {np.round(out['nash'], 3).tolist()}",
           "              formal         casual         poetic         malformed      "
           "exploitability TV to Nash     TV to tau-eq.  KL"]
  row = lambda name, m: (f"  {name:<15}" + "".join(
      f" {m[k]['mean']:.3f} +- {m[k]['std']:.3f}" if isinstance(m[k], dict) else f" {m[k]:.3f}         "
      for k in ("share_formal", "share_casual", "share_poetic", "share_malformed",
                "exploitability", "nash_distance", "tau_distance", "kl") if k in m))
  lines.append(row("SFT", out["sft"]))
  for method in METHODS:
    if method in out:
      lines.append(row(method, out[method]["mean_std"]))
  return "\n".join(lines)

