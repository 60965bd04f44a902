"""Shared upstream stages for the gold-world experiment smoke tests: pretrain -> SFT ->
reward model, built once per session in --smoke mode with the `nano` preset, cached under one
stage root, so each experiment's test pays only for its own stage."""
import os

import pytest

from experiments import cli, ppo, reward

FLAGS_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "configs")


@pytest.fixture(scope="session")
def gold_stages(tmp_path_factory):
  """{"root": tmp dir, "args": flags every gold smoke run passes, "reward_dir": the stage}."""
  root = tmp_path_factory.mktemp("gold")
  args = ["--smoke", "--model=nano", f"--stage_root={root}/stages", f"--data_dir={root}/data",
          f"--reward_flagfile={FLAGS_DIR}/reward_gold_tiny.flags"]
  cfg = cli.parse(ppo.PPOConfig, [f"--flagfile={FLAGS_DIR}/ppo_tiny.flags", *args,
                                  f"--workdir={root}/unused"]).effective()
  reward_dir = reward.ensure_reward(cfg, reward.reward_config(cfg))
  return {"root": root, "args": args, "reward_dir": reward_dir}
