"""The stage kinds a kill campaign interrupts, each as the command a researcher types: its
experiment main on its *_tiny flagfile, shrunk by flags so a run takes seconds yet saves
several checkpoints.

Why explicit flags and not --smoke: --smoke pins every run to 3 steps with a checkpoint at 2
(LMConfig.effective), one checkpoint before the final one and ~50 ms of training in a 4-7 s
process, so kills at uniform moments would almost never land in training. The flags below
keep the --smoke sizes (nano model, 8 held-out prompts, small batches) but train 12 steps
(offline, a checkpoint every 2) or 6 iterations / 4 rounds (online, a checkpoint every one).

Upstream stages (PPO needs pretrain -> SFT -> reward model) come from the cache under the
campaign's --stage_root, built by the first run that needs them. A stage's config is its
flagfile plus the run's model/smoke/directory flags (pipeline/chain.py), so cheap upstream
stages need flagfiles of their own: write_flagfiles puts a shrunk copy of each (3 steps, no
criterion) under <root>/flags and the kinds name those.

The code is run from a snapshot (snapshot_code): a campaign compares runs made minutes apart,
and an edit of the library in between would show up as a difference that no kill caused.
"""
import dataclasses
import os
import shutil

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The --smoke sizes every run and upstream stage shares (LMConfig.effective, registry.SMOKE_SIZES).
# --pretrain_texts is a world flag: it must agree along the chain (chain.WORLD_FLAGS).
_SMALL = ("--pretrain_texts=64", "--eval_prompts=8", "--eval_batch_size=8", "--batch_size=8",
          "--warmup_steps=1", "--log_every=1", "--criterion=")
# Sampled responses of the gold and intransitive worlds default to 120 and 40 tokens.
_SHORT = ("--max_new_tokens=16",)
_UPSTREAM_STEPS = ("--steps=3", "--eval_every=3", "--save_every=3")
_OFFLINE = ("--steps=12", "--save_every=2", "--eval_every=6")
_ONLINE = ("--steps=6", "--save_every=1", "--eval_every=3")


@dataclasses.dataclass(frozen=True)
class Stage:
  """An upstream stage's shrunk flagfile: the original, its own upstream and the flags."""
  flagfile: str  # under experiments/configs
  upstream: tuple[str, str] | None  # (flag naming its upstream's flagfile, that stage's name)
  flags: tuple[str, ...]


UPSTREAM = {
    "pretrain_tiny": Stage("pretrain_tiny.flags", None, _SMALL + _UPSTREAM_STEPS),
    "pretrain_gold_tiny": Stage("pretrain_gold_tiny.flags", None,
                                _SMALL + _SHORT + _UPSTREAM_STEPS),
    "pretrain_intransitive_tiny": Stage("pretrain_intransitive_tiny.flags", None,
                                        _SMALL + _SHORT + _UPSTREAM_STEPS),
    "sft_grpo_tiny": Stage("sft_grpo_tiny.flags", ("pretrain_flagfile", "pretrain_tiny"),
                           _SMALL + _UPSTREAM_STEPS),
    "sft_gold_tiny": Stage("sft_gold_tiny.flags", ("pretrain_flagfile", "pretrain_gold_tiny"),
                           _SMALL + _SHORT + _UPSTREAM_STEPS),
    "sft_intransitive_tiny": Stage("sft_intransitive_tiny.flags",
                                   ("pretrain_flagfile", "pretrain_intransitive_tiny"),
                                   _SMALL + _SHORT + _UPSTREAM_STEPS),
    "reward_gold_tiny": Stage("reward_gold_tiny.flags", ("sft_flagfile", "sft_gold_tiny"),
                              _SMALL + _SHORT + _UPSTREAM_STEPS + ("--num_rankings=16",)),
    "reward_pairwise_intransitive_tiny": Stage(
        "reward_pairwise_intransitive_tiny.flags", ("sft_flagfile", "sft_intransitive_tiny"),
        _SMALL + _SHORT + _UPSTREAM_STEPS + ("--num_rankings=16",)),
}


@dataclasses.dataclass(frozen=True)
class Kind:
  """A stage kind under test: `python -m <module> --flagfile=<flagfile> <flags>`."""
  module: str
  flagfile: str  # under experiments/configs
  upstream: tuple[str, str] | None  # (flag naming the upstream flagfile, UPSTREAM name)
  flags: tuple[str, ...]
  stage_root: bool = True  # has a --stage_root flag (pretraining, the first stage, has none)


KINDS = {
    "pretrain": Kind("experiments.pretrain", "pretrain_tiny.flags", None, _SMALL + _OFFLINE,
                     stage_root=False),
    "sft": Kind("experiments.sft", "sft_tiny.flags", ("pretrain_flagfile", "pretrain_tiny"),
                _SMALL + _OFFLINE),
    "reward": Kind("experiments.reward", "reward_gold_tiny.flags",
                   ("sft_flagfile", "sft_gold_tiny"),
                   _SMALL + _SHORT + _OFFLINE + ("--num_rankings=16",)),
    # Pairs from a file, a random nano policy: no upstream stage.
    "dpo": Kind("experiments.dpo", "dpo_tiny.flags", None, _SMALL + _OFFLINE),
    "ppo": Kind("experiments.ppo", "ppo_tiny.flags", ("reward_flagfile", "reward_gold_tiny"),
                _SMALL + _SHORT + _ONLINE + ("--batch_size=16", "--eval_batch_size=16")),
    "grpo": Kind("experiments.grpo", "grpo_tiny.flags", ("sft_flagfile", "sft_grpo_tiny"),
                 _SMALL + _ONLINE),
    "nash_md": Kind("experiments.nash_md", "nash_md_tiny.flags",
                    ("reward_flagfile", "reward_pairwise_intransitive_tiny"),
                    _SMALL + _SHORT + _ONLINE + ("--eval_samples=2",)),
    # The online DPO loop saves every round (its LoopConfig keeps save_every=1).
    "online_dpo": Kind("experiments.online_dpo", "online_dpo_tiny.flags",
                       ("reward_flagfile", "reward_gold_tiny"),
                       _SMALL + _SHORT + ("--rounds=4", "--prompts_per_round=8",
                                          "--steps_per_round=2")),
}


def snapshot_code(dest: str) -> str:
  """Copies the library, the experiment mains, their flagfiles and data to dest (the runs'
  working directory: `python -m experiments.X` imports rlhf_jax from there, before the
  installed checkout). Returns dest."""
  ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
  shutil.copytree(os.path.join(REPO, "rlhf_jax"), os.path.join(dest, "rlhf_jax"), ignore=ignore)
  for sub in ("configs", "data"):
    shutil.copytree(os.path.join(REPO, "experiments", sub),
                    os.path.join(dest, "experiments", sub))
  for name in os.listdir(os.path.join(REPO, "experiments")):
    if name.endswith(".py"):
      shutil.copy(os.path.join(REPO, "experiments", name), os.path.join(dest, "experiments"))
  return dest


def write_flagfiles(code_dir: str, flags_dir: str) -> None:
  """The shrunk upstream flagfiles, <flags_dir>/<name>.flags: the original (by absolute path:
  a flagfile's relative paths resolve against the working directory), its upstream's shrunk
  flagfile, then the flags (later lines override earlier ones)."""
  os.makedirs(flags_dir, exist_ok=True)
  for name, stage in UPSTREAM.items():
    lines = [f"--flagfile={os.path.join(code_dir, 'experiments', 'configs', stage.flagfile)}"]
    if stage.upstream:
      lines.append(f"--{stage.upstream[0]}={os.path.join(flags_dir, stage.upstream[1])}.flags")
    with open(os.path.join(flags_dir, f"{name}.flags"), "w") as f:
      f.write("\n".join(lines + list(stage.flags)) + "\n")


def command(kind: str, *, flags_dir: str, stage_root: str, data_dir: str,
            workdir: str) -> list[str]:
  """The experiment's argv after `python` (run in the code snapshot)."""
  k = KINDS[kind]
  argv = ["-m", k.module, f"--flagfile=experiments/configs/{k.flagfile}", "--model=nano",
          f"--data_dir={data_dir}", f"--workdir={workdir}"]
  if k.stage_root:
    argv.append(f"--stage_root={stage_root}")
  if k.upstream:
    argv.append(f"--{k.upstream[0]}={os.path.join(flags_dir, k.upstream[1])}.flags")
  return argv + list(k.flags)
