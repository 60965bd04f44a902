"""Shared upstream stages of the intransitive-world smoke tests (pretrain -> SFT -> pairwise
preference model), built once per session in --smoke mode with the `nano` preset. Not a
conftest: test modules import the fixture (`from intransitive_stages import
intransitive_stages`); the build is cached in this module, so modules share it."""
import os

import pytest

from experiments import cli, reward

FLAGS_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "configs")
PAIRWISE_FLAGS = f"{FLAGS_DIR}/reward_pairwise_intransitive_tiny.flags"
_BUILT: dict = {}


@pytest.fixture(scope="session")
def intransitive_stages(tmp_path_factory):
  """{"root", "args": flags every intransitive smoke run passes, "pairwise_dir": the pairwise
  preference-model stage, "pairwise_result": its result.json}."""
  if not _BUILT:
    root = tmp_path_factory.mktemp("intransitive")
    args = ["--smoke", "--model=nano", f"--stage_root={root}/stages", f"--data_dir={root}/data"]
    rcfg = cli.parse(reward.RewardConfig, [f"--flagfile={PAIRWISE_FLAGS}", *args,
                                           f"--workdir={root}/unused"])
    pairwise_dir = reward.ensure_reward(rcfg, rcfg)
    _BUILT.update(root=root, args=args, pairwise_dir=pairwise_dir)
  return _BUILT
