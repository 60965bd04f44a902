"""The stage cache across the whole chain pretrain -> SFT -> reward -> PPO: a changed flag
anywhere upstream changes every downstream key (so it rebuilds), unrelated flags do not."""
import importlib
import os
import shutil

import pytest

from rlhf_jax.runs import ppo
from rlhf_jax.pipeline import chain, config, reward, stages

from conftest import FLAGS_DIR


def _reward_key(sft_flagfile=f"{FLAGS_DIR}/sft_gold_tiny.flags"):
  rcfg = config.parse(reward.RewardConfig, [f"--flagfile={FLAGS_DIR}/reward_gold_tiny.flags",
                                         f"--sft_flagfile={sft_flagfile}"])
  return stages.stage_key(chain.key_config("reward", rcfg))


def _edited_copy(directory, name, old, new):
  """A copy of a flagfile in `directory` with one flag changed (nested flagfile paths in it
  stay relative to the repo root, where tests run)."""
  directory.mkdir()
  dst = directory / name
  shutil.copy(os.path.join(FLAGS_DIR, name), dst)
  text = dst.read_text()
  assert old in text
  dst.write_text(text.replace(old, new))
  return str(dst)


def test_an_upstream_flagfile_edit_changes_the_reward_key(tmp_path):
  base = _reward_key()
  assert _reward_key() == base  # deterministic
  sft_edit = _edited_copy(tmp_path / "a", "sft_gold_tiny.flags", "--steps=150", "--steps=151")
  assert _reward_key(sft_flagfile=sft_edit) != base
  pre_edit = _edited_copy(tmp_path / "b", "pretrain_gold_tiny.flags", "--steps=250",
                          "--steps=251")
  sft_on_edited_pre = _edited_copy(
      tmp_path / "c", "sft_gold_tiny.flags", "=experiments/configs/pretrain_gold_tiny.flags",
      f"={pre_edit}")
  assert _reward_key(sft_flagfile=sft_on_edited_pre) != base


def _ppo(*extra):
  return config.parse(ppo.PPOConfig, [f"--flagfile={FLAGS_DIR}/ppo_tiny.flags", *extra])


def _chain(cfg):
  """The reward, SFT and pretraining configs of a PPO run."""
  rcfg = chain.upstream_config("reward", cfg.reward_flagfile, cfg)
  scfg = chain.upstream_config("sft", rcfg.sft_flagfile, rcfg)
  return rcfg, scfg, chain.upstream_config("pretrain", scfg.pretrain_flagfile, scfg)


def test_run_flags_reach_every_upstream_stage():
  rcfg, scfg, pcfg = _chain(_ppo("--model=nano", "--stage_root=/somewhere", "--smoke"))
  for c in (rcfg, scfg, pcfg):
    assert (c.model, c.smoke, c.world) == ("nano", True, "gold")
  assert rcfg.stage_root == scfg.stage_root == "/somewhere"
  plain = _chain(_ppo())[0]
  assert stages.stage_key(chain.key_config("reward", rcfg)) != stages.stage_key(
      chain.key_config("reward", plain))


@pytest.mark.parametrize("flag, stage, flagfile", [
    ("--pretrain_texts=4000", "reward", "reward_gold_tiny.flags"),
    ("--world_seed=7", "reward", "reward_gold_tiny.flags"),
])
def test_a_world_flag_that_disagrees_with_an_upstream_flagfile_is_refused(flag, stage,
                                                                          flagfile):
  with pytest.raises(ValueError, match=rf"the {stage} stage must describe the same world as "
                     rf"this run: {flag} here, .* in .*{flagfile}"):
    _chain(_ppo(flag))


def test_an_upstream_flagfile_keeps_its_world_flags(tmp_path):
  """The pretraining flagfile's --pretrain_texts is its own: a reward flagfile with another
  value (passed down nowhere) is refused rather than overriding it."""
  reward_edit = _edited_copy(tmp_path / "r", "reward_gold_tiny.flags", "--model=tiny",
                             "--model=tiny\n--pretrain_texts=4000")
  rcfg = config.parse(reward.RewardConfig, [f"--flagfile={reward_edit}"])
  assert rcfg.pretrain_texts == 4000
  with pytest.raises(ValueError, match=r"--pretrain_texts=4000 here, 8000 in "):
    chain.key_config("reward", rcfg)


def test_downstream_only_flags_do_not_touch_upstream_keys():
  a = _chain(_ppo())[0]
  b = _chain(_ppo("--kl_coef=0.3", "--steps=7"))[0]
  assert stages.stage_key(chain.key_config("reward", a)) == stages.stage_key(
      chain.key_config("reward", b))


def test_pinned_code_version_ignores_source_edits(monkeypatch, tmp_path):
  """$RLHF_JAX_CODE_VERSION replaces the source hash in every key: an edit no longer
  rebuilds a stage, and a different pin (or none) gives a different key. Unpinned, the hash
  follows the sources from one process to the next, but not within a process."""
  config = {"steps": 3}
  monkeypatch.delenv(stages.CODE_VERSION_ENV, raising=False)  # a developer's own pin
  monkeypatch.setattr(stages, "_CODE_ROOT", tmp_path)
  (tmp_path / "mod.py").write_text("x = 1\n")
  unpinned = stages.stage_key(config)
  (tmp_path / "mod.py").write_text("x = 2\n")
  assert stages.stage_key(config) == unpinned  # mid-run: the code running is what was hashed
  stages._source_hash.cache_clear()  # a new process
  assert stages.stage_key(config) != unpinned  # the hash follows the sources
  monkeypatch.setenv(stages.CODE_VERSION_ENV, "dev")
  pinned = stages.stage_key(config)
  (tmp_path / "mod.py").write_text("x = 3\n")
  assert stages.stage_key(config) == pinned
  assert pinned not in (unpinned, stages.stage_key({"steps": 4}))
  monkeypatch.setenv(stages.CODE_VERSION_ENV, "other")
  assert stages.stage_key(config) != pinned


@pytest.mark.parametrize("module, config_name, flagfile, flag", [
    ("grpo", "GRPOConfig", "grpo_tiny.flags", "--p_syc=0.5"),
    ("nash_md", "NashMDConfig", "nash_md_tiny.flags", "--error_rate=0.3"),
    ("online_dpo", "OnlineDPOConfig", "online_dpo_tiny.flags", "--p_syc=0.5"),
    ("ppo", "PPOConfig", "ppo_tiny.flags", "--min_digits=1"),
])
def test_a_world_flag_exists_only_on_the_runs_of_its_world(module, config_name, flagfile, flag):
  """GRPO runs on arithmetic, Nash-MD on intransitive, online DPO on gold, PPO on the
  preference worlds: another world's flag is an unknown flag there, not a silent no-op."""
  cls = getattr(importlib.import_module(f"rlhf_jax.runs.{module}"), config_name)
  with pytest.raises(ValueError, match=f"Unknown command line flag '{flag[2:].split('=')[0]}'"):
    config.parse(cls, [f"--flagfile={FLAGS_DIR}/{flagfile}", flag])
