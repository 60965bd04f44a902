"""The stage cache across the whole chain pretrain -> SFT -> reward -> PPO: a changed flag
anywhere upstream changes every downstream key (so it rebuilds), unrelated flags do not."""
import os
import shutil

from experiments import cli, ppo, reward, sft, stages

from conftest import FLAGS_DIR


def _reward_key(sft_flagfile=f"{FLAGS_DIR}/sft_gold_tiny.flags"):
  rcfg = cli.parse(reward.RewardConfig, [f"--flagfile={FLAGS_DIR}/reward_gold_tiny.flags",
                                         f"--sft_flagfile={sft_flagfile}"])
  return stages.stage_key(reward.stage_key_config(rcfg))


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


def test_shared_flags_reach_every_upstream_stage():
  cfg = cli.parse(ppo.PPOConfig, [f"--flagfile={FLAGS_DIR}/ppo_tiny.flags", "--world_seed=7",
                                  "--model=nano", "--stage_root=/somewhere"])
  rcfg = reward.reward_config(cfg)
  scfg = reward.sft_config(rcfg)
  pcfg = sft.pretrain_config(scfg)
  for c in (rcfg, scfg, pcfg):
    assert (c.world_seed, c.model, c.world) == (7, "nano", "gold")
  assert rcfg.stage_root == scfg.stage_root == "/somewhere"
  plain = reward.reward_config(cli.parse(ppo.PPOConfig, [f"--flagfile={FLAGS_DIR}/ppo_tiny.flags"]))
  assert stages.stage_key(reward.stage_key_config(rcfg)) != stages.stage_key(
      reward.stage_key_config(plain))


def test_downstream_only_flags_do_not_touch_upstream_keys():
  a = reward.reward_config(cli.parse(ppo.PPOConfig, [f"--flagfile={FLAGS_DIR}/ppo_tiny.flags"]))
  b = reward.reward_config(cli.parse(ppo.PPOConfig, [f"--flagfile={FLAGS_DIR}/ppo_tiny.flags",
                                                     "--kl_coef=0.3", "--steps=7"]))
  assert stages.stage_key(reward.stage_key_config(a)) == stages.stage_key(
      reward.stage_key_config(b))


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
