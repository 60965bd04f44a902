"""The GRPO experiment in --smoke mode through its flagfile (nano model, tmp stage root):
every stage, the table and curve figure, metrics/TensorBoard/checkpoints, a finished-run
resume and a mid-run resume equal to the uninterrupted run, no compiles after the first
iteration, the kl_coef > 0 path, and the refusals that must come before anything compiles."""
import json
import math
import os
import shutil

import pytest

from rlhf_jax.runs import grpo
from rlhf_jax.pipeline import config
from rlhf_jax.compile_count import CompileCounter
from rlhf_jax.train.logging import read_metrics, read_tensorboard_scalars

from conftest import FLAGS_DIR


@pytest.fixture(scope="module")
def arith_stages(tmp_path_factory):
  root = tmp_path_factory.mktemp("grpo_stages")
  args = ["--smoke", "--model=nano", f"--stage_root={root}/stages", f"--data_dir={root}/data"]
  return {"root": root, "args": args}


def _config(stages, workdir, *extra):
  return config.parse(grpo.GRPOConfig, [f"--flagfile={FLAGS_DIR}/grpo_tiny.flags", *stages["args"],
                                     f"--workdir={workdir}", *extra])


@pytest.fixture(scope="module")
def grpo_run(arith_stages, tmp_path_factory):
  cfg = _config(arith_stages, tmp_path_factory.mktemp("grpo") / "run")
  return cfg, grpo.run(cfg)


EVAL_KEYS = ("accuracy_greedy", "accuracy_temp1", "pass_at_1", "pass_at_4", "pass_at_8",
             "reward_mean", "reward_std", "zero_variance_frac", "kl", "length",
             "truncated_frac")


def test_smoke_reports_table_curve_and_logs(grpo_run):
  cfg, result = grpo_run
  # Matched SFT on the prompts of GRPO's updates (absent when no group was informative) and,
  # with dynamic sampling, on every prompt rolled out.
  assert set(result["table"]) == {"base", "sft", "grpo", "sft_matched_rolled_out"} | (
      {"sft_matched"} if result["prompts_trained"] else set())
  assert result["prompts_trained"] <= cfg.effective().batch_size * 3
  for row in result["table"].values():
    for key in EVAL_KEYS:
      assert math.isfinite(row[key]), (key, row)
    for key in EVAL_KEYS[:8] + ("truncated_frac",):
      assert 0.0 <= row[key] <= 1.0, (key, row)
    # pass@k grows with k; pass@1 is the temperature-1 accuracy.
    assert row["pass_at_1"] <= row["pass_at_4"] <= row["pass_at_8"]
    assert row["pass_at_1"] == pytest.approx(row["accuracy_temp1"])
    assert 1.0 <= row["length"] <= 16.0
  assert result["table"]["sft"]["kl"] == 0.0  # the SFT row is the reference itself
  assert result["updates"] == 3 * cfg.num_minibatches
  assert [c["iteration"] for c in result["curve"]] == [0, 3]
  assert os.path.getsize(os.path.join(cfg.workdir, "grpo_curve.png")) > 1000
  assert os.path.isdir(os.path.join(cfg.workdir, "params"))
  train = read_metrics(str(cfg.workdir), split="train")
  assert [r["step"] for r in train] == [1, 2, 3]
  for r in train:
    for key in ("loss", "reward_mean", "reward_std", "zero_variance_frac",
                "clipfrac_per_token", "length", "truncated_frac", "compiles"):
      assert math.isfinite(r["metrics"][key]), key
    assert "kl_seq" not in r["metrics"]  # the flagfile's kl_coef is 0: no reference forward
    # Dynamic sampling (the flagfile's --dynamic_sampling_rounds): between one and R + 1
    # rollouts, stopping early only once the batch is full of informative groups.
    rounds, informative = r["metrics"]["rollout_rounds"], r["metrics"]["informative_groups"]
    assert 1 <= rounds <= cfg.dynamic_sampling_rounds + 1 and 0 <= informative <= 1
    assert informative == 1 or rounds == cfg.dynamic_sampling_rounds + 1
  assert cfg.dynamic_sampling_rounds > 0
  assert result["prompts_rolled_out"] == sum(
      r["metrics"]["rollout_rounds"] for r in train) * cfg.effective().batch_size
  assert "train/reward_mean" in read_tensorboard_scalars(str(cfg.workdir))
  with open(os.path.join(cfg.workdir, "result.json")) as f:
    assert json.load(f)["table"] == result["table"]


def test_iterations_after_the_first_compile_nothing(grpo_run):
  cfg, _ = grpo_run
  compiles = [r["metrics"]["compiles"] for r in read_metrics(str(cfg.workdir), split="train")]
  assert compiles[0] > 0 and compiles[1:] == [0.0, 0.0]


def test_finished_run_resumes_without_training_again(grpo_run, capsys):
  cfg, result = grpo_run
  again = grpo.run(cfg)
  assert "resumed from iteration 3" in capsys.readouterr().out
  assert again["curve"] == result["curve"]
  assert len(read_metrics(str(cfg.workdir), split="train")) == 3


def test_interrupted_run_resumes_bitwise(grpo_run, arith_stages, tmp_path, capsys):
  """Drop the last checkpoint (as if killed after iteration 2): the rerun continues from 2
  and its held-out evaluation at 3 (fixed sampling keys) equals the uninterrupted run's."""
  cfg, result = grpo_run
  workdir = tmp_path / "cut"
  shutil.copytree(cfg.workdir, workdir)
  shutil.rmtree(workdir / "checkpoints" / "3")
  again = grpo.run(_config(arith_stages, workdir, "--nomatched_sft"))
  assert "resumed from iteration 2" in capsys.readouterr().out
  assert again["curve"] == result["curve"]


def test_kl_path_and_other_estimators(arith_stages, tmp_path):
  cfg = _config(arith_stages, tmp_path / "kl", "--kl_coef=0.1", "--advantage=rloo",
                "--aggregation=sequence", "--group_size=4", "--nomatched_sft",
                "--dynamic_sampling_rounds=0")
  result = grpo.run(cfg)
  train = read_metrics(str(cfg.workdir), split="train")
  for r in train:
    assert math.isfinite(r["metrics"]["kl_seq"])
    assert math.isfinite(r["metrics"]["kl_per_token"])
  assert [r["metrics"]["compiles"] for r in train][1:] == [0.0, 0.0]
  assert "sft_matched" not in result["table"]
  assert all(r["metrics"]["rollout_rounds"] == 1 for r in train)  # no dynamic sampling


@pytest.mark.parametrize("extra", [
    ["--algorithm=gspo", "--clip_eps_low=3e-4", "--clip_eps_high=4e-4", "--kl_coef=0.05"],
    ["--algorithm=reinforce_pp", "--clip_eps_high=0.2", "--kl_coef=0.01", "--group_size=1",
     "--dynamic_sampling_rounds=0", "--num_minibatches=1"],
])
def test_gspo_and_reinforce_pp_run_through_the_engine(arith_stages, tmp_path, extra):
  """The two algorithms that exist only as engine modules (rl/algorithms/gspo.py,
  reinforce_pp.py) train, log their metrics and compile nothing after the first iteration."""
  cfg = _config(arith_stages, tmp_path / "alg", "--nomatched_sft", *extra)
  result = grpo.run(cfg)
  train = read_metrics(str(cfg.workdir), split="train")
  assert [r["metrics"]["compiles"] for r in train][1:] == [0.0, 0.0]
  for r in train:
    for key in ("loss", "clipfrac", "grad_norm", "reward_mean", "kl_seq"):
      assert math.isfinite(r["metrics"][key]), key
  assert set(result["table"]) == {"base", "sft", "grpo"}


@pytest.mark.parametrize("extra, message", [
    (["--group_size=1"], r"--group_size=1: .* pass --group_size=2 or more"),
    (["--advantage=rloo", "--group_size=1"], r"--advantage=rloo needs --group_size >= 2"),
    (["--kl_coef=-0.1"], "--kl_coef must be >= 0"),
    (["--dynamic_sampling_rounds=-1"], "--dynamic_sampling_rounds must be >= 0"),
    (["--pass_k=1,16"], r"--pass_k=1,16: .* k < n"),
    (["--std_ddof=2"], "--std_ddof must be 0 or 1"),
    (["--clip_eps_low=1.5"], "--clip_eps_low must be in"),
    (["--num_minibatches=3"], "divisible by --num_minibatches"),
    (["--world=gold"], "--world=arithmetic"),
    # Valid flags, but a microbatch of 8 * 2 / 4 = 4 rows on the 8 test devices.
    (["--group_size=2", "--num_minibatches=4"], "data-parallel size 8"),
])
def test_invalid_combinations_fail_before_compiling(arith_stages, tmp_path, extra, message):
  with CompileCounter() as cc:
    with pytest.raises(ValueError, match=message):
      grpo.run(_config(arith_stages, tmp_path / "bad", *extra))
  assert cc.count == 0, cc.names
  assert not os.path.exists(tmp_path / "bad")  # nothing written either
