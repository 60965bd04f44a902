"""The main job in --smoke mode through its flagfile: every stage, the table, the curve
figure, metrics/TensorBoard/checkpoints, resume, no recompiles after the first iteration,
and the refusals that must happen before anything compiles."""
import json
import math
import os

import pytest

from rlhf_jax.runs import ppo
from rlhf_jax.pipeline import config
from rlhf_jax.train.logging import read_metrics, read_tensorboard_scalars

from conftest import FLAGS_DIR


def _config(gold_stages, workdir, *extra):
  return config.parse(ppo.PPOConfig, [f"--flagfile={FLAGS_DIR}/ppo_tiny.flags",
                                   *gold_stages["args"], f"--workdir={workdir}", *extra])


@pytest.fixture(scope="module")
def ppo_run(gold_stages, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("ppo") / "run"
  cfg = _config(gold_stages, workdir)
  return cfg, ppo.run(cfg)


def test_smoke_reports_table_curve_and_logs(ppo_run, gold_stages):
  cfg, result = ppo_run
  assert result["reward_workdir"] == gold_stages["reward_dir"]
  assert set(result["table"]) == {"base", "sft", "ppo", "sft_matched"}
  for row in result["table"].values():
    for key in ("gold", "gold_se", "proxy", "proxy_se", "kl", "kl_se", "words"):
      assert math.isfinite(row[key]), (key, row)
  # The SFT row is the reference itself: its KL to SFT is exactly zero.
  assert result["table"]["sft"]["kl"] == 0.0
  assert [c["iteration"] for c in result["curve"]] == [0, 3]
  assert os.path.getsize(os.path.join(cfg.workdir, "ppo_curve.png")) > 1000
  train = read_metrics(str(cfg.workdir), split="train")
  assert [r["step"] for r in train] == [1, 2, 3]
  for r in train:
    for key in ("kl", "score", "clipfrac", "rollout_gold", "value_loss"):
      assert math.isfinite(r["metrics"][key])
  assert "train/kl" in read_tensorboard_scalars(str(cfg.workdir))
  with open(os.path.join(cfg.workdir, "result.json")) as f:
    assert json.load(f)["table"] == result["table"]


def test_iterations_after_the_first_compile_nothing(ppo_run):
  cfg, _ = ppo_run
  compiles = [r["metrics"]["compiles"] for r in read_metrics(str(cfg.workdir), split="train")]
  assert compiles[1:] == [0.0, 0.0]


def test_finished_run_resumes_without_training_again(ppo_run, gold_stages, capsys):
  cfg, result = ppo_run
  again = ppo.run(cfg)
  assert "resumed from iteration 3" in capsys.readouterr().out
  assert again["curve"] == result["curve"]
  assert len(read_metrics(str(cfg.workdir), split="train")) == 3


@pytest.mark.parametrize("extra, message", [
    (["--aggregate=wco"], "ensemble"),
    (["--kl_coef=-0.1"], "--kl_coef must be >= 0"),
    (["--num_minibatches=3"], "divisible"),
    (["--world=arithmetic"], "--world=gold"),
    # A pairwise preference model gives no scalar reward to maximise.
    ([f"--reward_flagfile={FLAGS_DIR}/reward_pairwise_intransitive_tiny.flags",
      "--world=intransitive"], "needs a scalar reward"),
])
def test_invalid_combinations_fail_before_compiling(gold_stages, tmp_path, extra, message):
  with pytest.raises(ValueError, match=message):
    ppo.run(_config(gold_stages, tmp_path / "bad", *extra))


def test_ptx_and_adaptive_kl(gold_stages, tmp_path):
  cfg = _config(gold_stages, tmp_path / "ptx", "--ptx_coef=0.5", "--adaptive_kl",
                "--kl_target=1000", "--nomatched_sft")
  result = ppo.run(cfg)
  train = read_metrics(str(cfg.workdir), split="train")
  # ptx_coef x the pretraining NLL of a byte model: positive.
  assert all(r["metrics"]["ptx"] > 0 for r in train)
  # KL far below the target lowers the coefficient by the clipped factor 1 - 0.2 n / horizon
  # per iteration (proportional controller, Ziegler 2019).
  kl_coefs = [r["metrics"]["kl_coef"] for r in train] + [result["final_kl_coef"]]
  assert kl_coefs[0] == pytest.approx(cfg.kl_coef)
  factor = 1 - 0.2 * cfg.effective().batch_size / cfg.kl_horizon
  assert kl_coefs[1:] == pytest.approx([cfg.kl_coef * factor ** i for i in range(1, 4)])
  assert "sft_matched" not in result["table"]


def test_ptx_rows_must_hold_a_pretraining_text(gold_stages, tmp_path):
  with pytest.raises(ValueError, match="--seq_len=48 must be >= 128"):
    _config(gold_stages, tmp_path / "bad", "--ptx_coef=0.5", "--seq_len=48")
