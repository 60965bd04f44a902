"""Online DPO in --smoke mode through its flagfile: rounds logged with finite metrics, no
compiles after the first round, the table and figure, resume at the next round with the same
result, both labelers, and the refusals that must happen before anything compiles."""
import json
import math
import os
import shutil

import pytest

from rlhf_jax.runs import online_dpo
from rlhf_jax.pipeline import config
from rlhf_jax.compile_count import CompileCounter
from rlhf_jax.train.logging import read_metrics, read_tensorboard_scalars

from conftest import FLAGS_DIR


def _config(gold_stages, workdir, *extra):
  return config.parse(online_dpo.OnlineDPOConfig,
                   [f"--flagfile={FLAGS_DIR}/online_dpo_tiny.flags", *gold_stages["args"],
                    f"--workdir={workdir}", *extra])


@pytest.fixture(scope="module")
def dpo_run(gold_stages, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("online_dpo") / "run"
  cfg = _config(gold_stages, workdir)
  return cfg, online_dpo.run(cfg)


def test_smoke_logs_rounds_table_and_figure(dpo_run, gold_stages):
  cfg, result = dpo_run
  assert result["reward_workdir"] == gold_stages["reward_dir"]
  assert result["optimizer_steps"] == 4  # smoke: 2 rounds x 2 steps
  assert set(result["table"]) == {"sft", "online_dpo", "sft_matched"}
  for name, row in result["table"].items():
    for key in ("gold", "gold_se", "words") + (("win_rate", "win_rate_lo", "win_rate_hi")
                                               if name != "sft" else ()):
      assert math.isfinite(row[key]), (name, key, row)
  dpo_row = result["table"]["online_dpo"]
  assert dpo_row["win_rate_lo"] <= dpo_row["win_rate"] <= dpo_row["win_rate_hi"]
  assert [c["iteration"] for c in result["curve"]] == [0, 1, 2]
  assert os.path.getsize(os.path.join(cfg.workdir, "online_dpo_gold.png")) > 1000
  train = read_metrics(str(cfg.workdir), split="train")
  assert [r["step"] for r in train] == [1, 2]
  for r in train:
    for key in ("loss", "rewards/accuracies", "label_agreement", "sample_gold",
                "sample_proxy", "grad_norm"):
      assert math.isfinite(r["metrics"][key]), (key, r)
    assert 0.0 <= r["metrics"]["label_agreement"] <= 1.0
  assert [r["step"] for r in read_metrics(str(cfg.workdir), split="eval")] == [0, 1, 2]
  assert "train/label_agreement" in read_tensorboard_scalars(str(cfg.workdir))
  with open(os.path.join(cfg.workdir, "result.json")) as f:
    assert json.load(f)["table"] == result["table"]


def test_rounds_after_the_first_compile_nothing(dpo_run):
  cfg, _ = dpo_run
  compiles = [r["metrics"]["compiles"] for r in read_metrics(str(cfg.workdir), split="train")]
  assert compiles[0] > 0  # the counter sees the first round's compiles
  assert compiles[1:] == [0.0]


def test_finished_run_resumes_without_training_again(dpo_run, capsys):
  cfg, result = dpo_run
  again = online_dpo.run(cfg)
  assert "resumed from iteration 2" in capsys.readouterr().out
  assert again["curve"] == result["curve"]
  assert len(read_metrics(str(cfg.workdir), split="train")) == 2


def test_interrupted_run_resumes_at_the_next_round_with_the_same_result(gold_stages, tmp_path,
                                                                      capsys):
  cfg = _config(gold_stages, tmp_path / "run", "--labeler=reward_model", "--nomatched_sft")
  first = online_dpo.run(cfg)
  shutil.rmtree(os.path.join(cfg.workdir, "checkpoints", "2"))  # as if killed in round 2
  capsys.readouterr()
  again = online_dpo.run(cfg)
  assert "resumed from iteration 1" in capsys.readouterr().out
  assert again["curve"] == first["curve"]
  assert again["table"] == first["table"]
  assert first["labeler"] == "reward_model" and set(first["table"]) == {"sft", "online_dpo"}


@pytest.mark.parametrize("extra, message", [
    (["--beta=0"], "--beta must be > 0"),
    (["--beta=-0.1"], "--beta must be > 0"),
    (["--aggregate=wco"], "ensemble"),
    (["--world=arithmetic"], "--world=gold"),
    (["--labeler=humans"], "labeler"),
    (["--seq_len=40"], "--seq_len"),
])
def test_invalid_flags_fail_before_compiling(gold_stages, tmp_path, extra, message):
  with CompileCounter() as counter, pytest.raises(ValueError, match=message):
    online_dpo.run(_config(gold_stages, tmp_path / "bad", *extra))
  assert counter.count == 0
  assert not os.path.exists(tmp_path / "bad")
