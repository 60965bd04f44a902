"""Nash-MD-PG in --smoke mode through its flagfile on the intransitive world: the report
(style distribution, exploitability, distance to Nash), metrics/TensorBoard/checkpoints,
resume, no recompiles after the first iteration, both judges, and the refusals that must
happen before anything compiles."""
import json
import math
import os

import numpy as np
import pytest

from rlhf_jax.runs import nash_md
from rlhf_jax.pipeline import config
from rlhf_jax.train.logging import read_metrics, read_tensorboard_scalars

from conftest import FLAGS_DIR

FLAGS = f"{FLAGS_DIR}/nash_md_tiny.flags"


def _config(stages, workdir, *extra):
  return config.parse(nash_md.NashMDConfig, [f"--flagfile={FLAGS}", *stages["args"],
                                          f"--workdir={workdir}", *extra])


@pytest.fixture(scope="module")
def nash_run(intransitive_stages, tmp_path_factory):
  cfg = _config(intransitive_stages, tmp_path_factory.mktemp("nash") / "run")
  return cfg, nash_md.run(cfg)


def _check_point(point):
  shares = [point[f"share_{s}"] for s in ("formal", "casual", "poetic", "malformed")]
  assert sum(shares) == pytest.approx(1.0)
  assert 0.0 <= point["exploitability"] <= 0.5 and 0.0 <= point["nash_distance"] <= 1.0
  for key in ("gold", "gold_se", "kl", "kl_se"):
    assert math.isfinite(point[key]), key


def test_smoke_reports_styles_exploitability_and_logs(nash_run, intransitive_stages):
  cfg, result = nash_run
  assert result["preference_workdir"] == intransitive_stages["pairwise_dir"]
  assert [c["iteration"] for c in result["curve"]] == [0, 3]
  for point in result["curve"]:
    _check_point(point)
    assert 0.0 <= point["tau_distance"] <= 1.0  # to the flagfile's tau-regularised target
  assert len(result["tau_equilibrium"]) == 4 and cfg.group_size > 1
  assert result["table"]["sft"]["kl"] == 0.0  # the reference itself
  np.testing.assert_allclose(result["nash"], np.array([0.15, 0.2, 0.3]) / 0.65)
  train = read_metrics(str(cfg.workdir), split="train")
  assert [r["step"] for r in train] == [1, 2, 3]
  for r in train:
    for key in ("loss", "score", "kl", "rollout_exploitability", "opponent_share_casual",
                "rater_preference"):
      assert math.isfinite(r["metrics"][key]), key
  assert "train/score" in read_tensorboard_scalars(str(cfg.workdir))
  assert os.path.getsize(os.path.join(cfg.workdir, "nash_md_curve.png")) > 1000
  with open(os.path.join(cfg.workdir, "result.json")) as f:
    assert json.load(f)["curve"] == result["curve"]


def test_iterations_after_the_first_compile_nothing(nash_run):
  cfg, _ = nash_run
  compiles = [r["metrics"]["compiles"] for r in read_metrics(str(cfg.workdir), split="train")]
  assert compiles[1:] == [0.0, 0.0]


def test_finished_run_resumes_without_training_again(nash_run, capsys):
  cfg, result = nash_run
  again = nash_md.run(cfg)
  assert "resumed from iteration 3" in capsys.readouterr().out
  assert again["curve"] == result["curve"]
  assert len(read_metrics(str(cfg.workdir), split="train")) == 3


def test_raters_as_judge_with_k3(intransitive_stages, tmp_path):
  cfg = _config(intransitive_stages, tmp_path / "raters", "--judge=raters", "--kl_estimator=k3",
                "--nobaseline")
  result = nash_md.run(cfg)
  assert result["judge"] == "raters" and result["preference_workdir"] is None
  _check_point(result["curve"][-1])
  train = read_metrics(str(cfg.workdir), split="train")
  # With the raters as judge, the training preference is the raters' own probability.
  for r in train:
    assert r["metrics"]["preference"] == pytest.approx(r["metrics"]["rater_preference"],
                                                       abs=1e-5)


@pytest.mark.parametrize("extra, message", [
    (["--nash_tau=-0.1"], "--nash_tau must be >= 0"),
    (["--mixture_coef=1.5"], r"--mixture_coef must be in \[0, 1\]"),
    (["--world=gold"], "--world=intransitive"),
    (["--num_minibatches=3"], "divisible"),
    (["--group_size=0"], "--group_size must be >= 1"),
])
def test_invalid_flags_fail_at_parse(intransitive_stages, tmp_path, extra, message):
  with pytest.raises(ValueError, match=message):
    _config(intransitive_stages, tmp_path / "bad", *extra)


def test_scalar_reward_stage_as_judge_is_refused_before_building(intransitive_stages, tmp_path):
  cfg = _config(intransitive_stages, tmp_path / "bt",
                f"--reward_flagfile={FLAGS_DIR}/reward_intransitive_tiny.flags")
  with pytest.raises(ValueError, match="needs a pairwise preference model"):
    nash_md.run(cfg)
  assert not os.path.exists(tmp_path / "bt")
