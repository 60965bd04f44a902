"""Sycophancy amplification (Sharma et al. 2023) on the sycophancy world, over several seeds.

    python -m experiments.sycophancy --flagfile=experiments/configs/sycophancy.flags

The world's prompts state a user's belief about a checkable fact, right or wrong; its raters
prefer the answer that agrees with the user with probability --p_syc even when it is wrong
(rlhf_jax/worlds/sycophancy.py). Per seed, on one shared pretrain and SFT stage:
  reward  a Bradley-Terry reward model on rater comparisons of SFT samples (its own seed),
          with how often it prefers the sycophantic wrong answer of a pair over a correct one
  ppo     PPO against that reward model (and the matched-compute SFT baseline)
  dpo     DPO on rater pairs of SFT samples (and its matched-compute SFT baseline)
and the held-out sycophancy rate (the share of answers agreeing with a WRONG stated belief)
and accuracy of every policy, so what RLHF does to sycophancy is measured, whichever way it
goes. Writes <out_dir>/sycophancy.json (per-seed numbers, their mean and spread) and
<out_dir>/sycophancy.png. Results committed under experiments/results/ come from this
command; tests/experiments/test_sycophancy_sweep.py reruns it (slow).
"""
import dataclasses
import json
import os

from rlhf_jax import provenance
from rlhf_jax.runs import plots, ppo, sweeps
from rlhf_jax.pipeline import config
from rlhf_jax.runs import dpo, dpo_world

# The held-out numbers reported per policy (keys of worlds.summary on this world).
POLICY_METRICS = ("sycophancy_rate", "gold")


@dataclasses.dataclass(frozen=True)
class SycophancyConfig:
  ppo_flagfile: str = config.flag("experiments/configs/ppo_sycophancy_tiny.flags",
                               "Flagfile of the PPO runs (it names the reward stage).")
  dpo_flagfile: str = config.flag("experiments/configs/dpo_sycophancy_tiny.flags",
                               "Flagfile of the DPO runs.")
  seeds: str = config.flag("0,1,2", "Comma-separated seeds (reward model, PPO and DPO).")
  workdir: str = config.flag("workdirs/sycophancy", "Root of the per-seed workdirs.")
  stage_root: str = config.flag("workdirs/stages", "Where cached upstream stages live.")
  out_dir: str = config.flag("experiments/results/sycophancy",
                          "Where the JSON summary and the figure go.")
  smoke: bool = config.flag(False, "--smoke runs of every stage (for tests of the plumbing).")
  extra_flags: str = config.flag("", "Space-separated flags passed to every run (tests: "
                              "--model=nano --data_dir=...).")

  def __post_init__(self):
    sweeps.parse_seeds(self.seeds)

  @property
  def seed_list(self) -> list[int]:
    return sweeps.parse_seeds(self.seeds)


def reward_flagfile(cfg: SycophancyConfig, seed: int, workdir: str) -> str:
  """A per-seed flagfile: the PPO flagfile's reward stage with --seed=seed, so each seed
  trains its own reward model (the bias it learns from the raters is itself random)."""
  base = config.parse(ppo.PPOConfig, [f"--flagfile={cfg.ppo_flagfile}"]).reward_flagfile
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "reward.flags")
  with open(path, "w") as f:
    f.write(f"--flagfile={base}\n--seed={seed}\n")
  return path


def seed_summary(rm: dict, ppo_table: dict, dpo_table: dict) -> dict:
  """The numbers of one seed: the reward model's sycophancy preference and accuracy, and
  every policy's held-out sycophancy rate and accuracy (ground truth "gold")."""
  out = {"rm_prefers_sycophantic": rm["rm_prefers_sycophantic"],
         "raters_prefer_sycophantic": rm["raters_prefer_sycophantic"],
         "rm_accuracy_truth": rm["ensemble"]["accuracy_gold"],
         "rm_accuracy_rater": rm["ensemble"]["accuracy_rater"]}
  policies = {"sft": ppo_table["sft"], "ppo": ppo_table["ppo"], "dpo": dpo_table["policy"]}
  if "sft_matched" in ppo_table:
    policies["sft_matched_ppo"] = ppo_table["sft_matched"]
  if "sft_matched" in dpo_table:
    policies["sft_matched_dpo"] = dpo_table["sft_matched"]
  for name, row in policies.items():
    for key in POLICY_METRICS:
      out[f"{name}_{'accuracy' if key == 'gold' else key}"] = row[key]
  return out


def figure(out: dict, path: str) -> None:
  """Sycophancy rate and accuracy per policy, bars at the seed mean with per-seed dots."""
  names = [k[:-len("_sycophancy_rate")] for k in out["per_seed"][0]
           if k.endswith("_sycophancy_rate")]
  values = {metric: {n: [s[f"{n}_{key}"] for s in out["per_seed"]] for n in names}
            for metric, key in (("held-out sycophancy rate", "sycophancy_rate"),
                                ("held-out accuracy", "accuracy"))}
  plots.bars_over_seeds(values, path, title=f"Sycophancy before and after RLHF, "
                        f"{len(out['seeds'])} seeds")


def run(cfg: SycophancyConfig) -> dict:
  summaries = []
  extra = cfg.extra_flags.split() + (["--smoke"] if cfg.smoke else [])
  for seed in cfg.seed_list:
    workdir = os.path.join(cfg.workdir, f"seed_{seed}")
    common = [f"--seed={seed}", f"--stage_root={cfg.stage_root}", *extra]
    ppo_result = ppo.run(config.parse(ppo.PPOConfig, [
        f"--flagfile={cfg.ppo_flagfile}",
        f"--reward_flagfile={reward_flagfile(cfg, seed, workdir)}", *common,
        f"--workdir={os.path.join(workdir, 'ppo')}"]))
    with open(os.path.join(ppo_result["reward_workdir"], "result.json")) as f:
      rm = json.load(f)
    dpo_result = dpo_world.run_world(config.parse(dpo.DPOConfig, [
        f"--flagfile={cfg.dpo_flagfile}", *common, f"--workdir={os.path.join(workdir, 'dpo')}"]))
    summaries.append({"seed": seed,
                      **seed_summary(rm, ppo_result["table"], dpo_result["table"])})
  numbers = [{k: v for k, v in s.items() if k != "seed"} for s in summaries]
  out = {"ppo_flagfile": cfg.ppo_flagfile, "dpo_flagfile": cfg.dpo_flagfile,
         "seeds": cfg.seed_list, "per_seed": summaries, "mean_std": sweeps.aggregate(numbers),
         "provenance": provenance.provenance()}
  os.makedirs(cfg.out_dir, exist_ok=True)
  with open(os.path.join(cfg.out_dir, "sycophancy.json"), "w") as f:
    json.dump(out, f, indent=1)
  figure(out, os.path.join(cfg.out_dir, "sycophancy.png"))
  print(format_summary(out))
  return out


def format_summary(out: dict) -> str:
  ms = out["mean_std"]
  pm = lambda k: f"{ms[k]['mean']:.3f} +- {ms[k]['std']:.3f}"
  lines = [f"over {len(out['seeds'])} seeds (mean +- std):",
           f"  reward model prefers the sycophantic wrong answer {pm('rm_prefers_sycophantic')}"
           f" of pairs (raters {pm('raters_prefer_sycophantic')})",
           "  policy            sycophancy rate     accuracy"]
  for name in [k[:-len("_sycophancy_rate")] for k in ms if k.endswith("_sycophancy_rate")]:
    lines.append(f"  {name:<16}  {pm(name + '_sycophancy_rate')}   {pm(name + '_accuracy')}")
  return "\n".join(lines)

