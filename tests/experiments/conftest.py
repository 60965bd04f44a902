"""Shared upstream stages of the experiment smoke tests, built once per session in --smoke
mode with the `nano` preset, each chain cached under one stage root, so each experiment's
test pays only for its own stage: the gold world's pretrain -> SFT -> reward model, and the
intransitive world's pretrain -> SFT -> pairwise preference model."""
import os
import subprocess
import sys

import pytest

from rlhf_jax.runs import ppo
from rlhf_jax.pipeline import chain, config, reward

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FLAGS_DIR = os.path.join(REPO_ROOT, "experiments", "configs")
PAIRWISE_FLAGS = f"{FLAGS_DIR}/reward_pairwise_intransitive_tiny.flags"


def run_experiment(module: str, *args: str) -> None:
  """Runs `python -m <module> <args>` from the repository root in a fresh process: the command
  a researcher types, on the machine's real devices (without the tests' 8 fake CPU devices,
  whose data-parallel size the flagfiles' batch shapes need not divide) and the real code
  version (a developer's RLHF_JAX_CODE_VERSION pin dropped). For the slow reruns."""
  env = {k: v for k, v in os.environ.items() if k != "RLHF_JAX_CODE_VERSION"}
  env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(
      "--xla_force_host_platform_device_count=8", "").strip()
  subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=env, check=True)


@pytest.fixture(scope="session")
def gold_stages(tmp_path_factory):
  """{"root": tmp dir, "args": flags every gold smoke run passes, "reward_dir": the stage}."""
  root = tmp_path_factory.mktemp("gold")
  args = ["--smoke", "--model=nano", f"--stage_root={root}/stages", f"--data_dir={root}/data",
          f"--reward_flagfile={FLAGS_DIR}/reward_gold_tiny.flags"]
  cfg = config.parse(ppo.PPOConfig, [f"--flagfile={FLAGS_DIR}/ppo_tiny.flags", *args,
                                  f"--workdir={root}/unused"]).effective()
  reward_dir = chain.ensure("reward", chain.upstream_config("reward", cfg.reward_flagfile, cfg))
  return {"root": root, "args": args, "reward_dir": reward_dir}


@pytest.fixture(scope="session")
def intransitive_stages(tmp_path_factory):
  """{"root", "args": flags every intransitive smoke run passes, "pairwise_dir": the pairwise
  preference-model stage}."""
  root = tmp_path_factory.mktemp("intransitive")
  args = ["--smoke", "--model=nano", f"--stage_root={root}/stages", f"--data_dir={root}/data"]
  rcfg = config.parse(reward.RewardConfig, [f"--flagfile={PAIRWISE_FLAGS}", *args,
                                         f"--workdir={root}/unused"])
  return {"root": root, "args": args, "pairwise_dir": chain.ensure("reward", rcfg)}
