"""The reward-model experiment: a bootstrap ensemble in --smoke mode through its flagfile
(on the session's cached SFT stage), its accuracy report and manifest, and its refusals."""
import json
import math
import os

import numpy as np
import pytest

from rlhf_jax.pipeline import chain, config, lm, reward
from rlhf_jax.train.logging import read_metrics

from conftest import FLAGS_DIR


def _config(gold_stages, workdir, *extra):
  args = [a for a in gold_stages["args"] if not a.startswith("--reward_flagfile")]
  return config.parse(reward.RewardConfig, [f"--flagfile={FLAGS_DIR}/reward_gold_tiny.flags",
                                         *args, f"--workdir={workdir}", *extra])


def test_bootstrap_ensemble_smoke(gold_stages, tmp_path):
  cfg = _config(gold_stages, tmp_path / "rm", "--ensemble_size=2", "--bootstrap")
  result = chain.run_stage("reward", cfg)
  assert len(result["members"]) == 2
  for m in result["members"] + [result["ensemble"]]:
    assert 0.0 <= m["accuracy_rater"] <= 1.0 and 0.0 <= m["accuracy_gold"] <= 1.0
  # The raters' ceilings: agreement with another rater and with gold, both above chance.
  assert 0.5 < result["rater_vs_rater"] < 1.0 and 0.5 < result["rater_vs_gold"] <= 1.0
  assert result["rater_temperature"] > 0
  with open(os.path.join(cfg.workdir, reward.MANIFEST)) as f:
    manifest = json.load(f)
  assert manifest["members"] == ["member_0", "member_1"]
  assert len(manifest["norm_mean"]) == 2 and all(s > 0 for s in manifest["norm_std"])
  for member in manifest["members"]:
    train = read_metrics(os.path.join(cfg.workdir, member), split="train")
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(math.isfinite(r["metrics"]["loss"]) for r in train)
  # Bootstrap resamples differ, so the two members' first losses differ.
  losses = [read_metrics(os.path.join(cfg.workdir, m), split="train")[0]["metrics"]["loss"]
            for m in manifest["members"]]
  assert losses[0] != losses[1]


def test_evaluate_against_hand_labels():
  # Two prompts, K = 3. Scores order responses 0 > 1 > 2 on both prompts.
  scores = [np.array([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]])]
  rank = np.array([[0, 1, 2], [2, 1, 0]])  # rater agrees on prompt 0, reverses prompt 1
  gold = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # one strict gold pair order + ties
  truth = np.where(gold[:, :, None] > gold[:, None, :], 1.0,
                   np.where(gold[:, :, None] < gold[:, None, :], 0.0, 0.5))
  # Raters prefer the gold-better response with 0.8, tied pairs are coin flips.
  rater = np.where(truth == 1.0, 0.8, np.where(truth == 0.0, 0.2, 0.5))
  out = reward.evaluate(scores, scores[0], rank, {"rater": rater, "truth": truth})
  assert out["members"][0]["accuracy_rater"] == pytest.approx(0.5)  # 3 of 6 rater pairs
  assert out["members"][0]["accuracy_gold"] == pytest.approx(1.0)  # (0 > 1), (0 > 2) right
  assert out["ensemble"] == out["members"][0]
  assert out["test_gold_pairs"] == 2
  # 6 pairs (i < j): 2 decided (agreement 0.8^2 + 0.2^2 = 0.68), 4 tied (0.5).
  assert out["rater_vs_rater"] == pytest.approx((2 * 0.68 + 4 * 0.5) / 6)
  assert out["rater_vs_gold"] == pytest.approx(0.8)


@pytest.mark.parametrize("extra, message", [
    (["--ranking_k=1"], "--ranking_k"),
    (["--rater_agreement=0.5"], "--rater_agreement"),
    (["--world=arithmetic"], "preference world"),
    (["--world=intransitive", "--ranking_k=4"], "--ranking_k=2"),
    (["--reward_model=pairwise", "--ranking_k=4"], "--ranking_k=2"),
    (["--reward_model=pairwise", "--ranking_k=2", "--ensemble_size=2"], "--ensemble_size=1"),
    (["--ensemble_size=0"], "--ensemble_size"),
])
def test_invalid_flags_are_refused(gold_stages, tmp_path, extra, message):
  with pytest.raises(ValueError, match=message):
    _config(gold_stages, tmp_path / "bad", *extra)


def test_loading_a_reward_stage_of_another_model_size_names_the_tensor(gold_stages, tmp_path):
  # The session's reward stage holds `nano` models; a `tiny` run must not load them.
  cfg = _config(gold_stages, tmp_path / "tiny", "--model=tiny")
  mesh = lm.setup(cfg)
  _, tiny_params, _ = lm.init_model(cfg, mesh)
  with pytest.raises(ValueError, match=r"tensor .* has shape .* another model size"):
    reward.load_reward_models(cfg, mesh, gold_stages["reward_dir"], tiny_params)
