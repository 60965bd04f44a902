"""A language-modelling stage with --criterion: stops where it holds, fails loudly and hands
nothing downstream where it never does, and refuses a metric it does not evaluate before
anything compiles."""
import json
import os

import pytest

from rlhf_jax.pipeline import chain, config, criterion, pretrain, sft

FLAGS_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "configs")


def _pretrain_config(tmp_path, *extra):
  # Not --smoke (which drops the criterion): a nano model on a few small batches.
  return config.parse(pretrain.PretrainConfig, [
      f"--flagfile={FLAGS_DIR}/pretrain_tiny.flags", "--model=nano", "--steps=6",
      "--warmup_steps=1", "--batch_size=8", "--eval_every=2", "--log_every=2",
      "--save_every=2", "--eval_prompts=8", "--eval_batch_size=8", "--pretrain_texts=64",
      f"--workdir={tmp_path}/pre",
      f"--data_dir={tmp_path}/data", *extra])


def test_a_stage_stops_at_the_first_evaluation_that_meets_its_criterion(tmp_path):
  # accuracy_temp1 >= 0 holds at every evaluation (it needs the sampled world metrics):
  # the stage stops at its first evaluation, step 2 of its budget of 6.
  cfg = _pretrain_config(tmp_path, "--criterion=accuracy_temp1>=0,loss<=1e9")
  result = chain.run_stage("pretrain", cfg)
  assert result["steps"] == 2
  assert result["criterion"] == {"criterion": "accuracy_temp1>=0,loss<=1e9", "met": True,
                                 "step": 2, "budget": 6}
  assert os.path.isdir(os.path.join(cfg.workdir, "params"))


def test_a_loss_plateau_criterion_compares_consecutive_evaluations(tmp_path):
  # loss_drop<=1e9 holds wherever it is defined: from the second evaluation (step 4) on.
  cfg = _pretrain_config(tmp_path, "--criterion=loss_drop<=1e9")
  result = chain.run_stage("pretrain", cfg)
  assert result["steps"] == 4
  evals = [json.loads(line) for line in open(os.path.join(cfg.workdir, "metrics.jsonl"))
           if '"eval"' in line]
  first, second = evals[0]["metrics"], evals[1]["metrics"]
  assert "loss_drop" not in first
  assert second["loss_drop"] == first["loss"] - second["loss"]


def test_a_stage_that_misses_its_criterion_fails_and_hands_nothing_on(tmp_path):
  cfg = _pretrain_config(tmp_path, "--criterion=accuracy_greedy>=1.01")
  with pytest.raises(criterion.StageCriterionError,
                     match=r"pretraining missed its criterion within its budget of 6 steps: "
                           r"reached accuracy_greedy [0-9.]+ \(expected >=1.01\)"):
    chain.ensure("pretrain", cfg, str(tmp_path / "stages"))
  (stage_dir,) = os.listdir(tmp_path / "stages")
  stage_dir = tmp_path / "stages" / stage_dir
  assert not os.path.exists(stage_dir / "STAGE_DONE")  # the cache never hands it downstream
  assert not os.path.exists(stage_dir / "params")
  assert os.listdir(stage_dir / "checkpoints")  # its last state kept, to inspect or resume
  evals = [json.loads(line) for line in open(stage_dir / "metrics.jsonl")
           if '"eval"' in line]
  assert [e["step"] for e in evals] == [2, 4, 6]


def test_a_criterion_on_a_metric_the_stage_does_not_evaluate_fails_before_training(tmp_path):
  cfg = _pretrain_config(tmp_path, "--criterion=greedy_gold>=1.5")
  names = r"accuracy_greedy, accuracy_temp1, loss, loss_drop"
  with pytest.raises(ValueError, match=r"greedy_gold.*" + names):
    chain.run_stage("pretrain", cfg)
  assert not os.path.exists(os.path.join(cfg.workdir, "checkpoints"))


def test_a_malformed_criterion_fails_at_parse():
  with pytest.raises(ValueError, match="METRIC>=VALUE"):
    config.parse(pretrain.PretrainConfig,
                 [f"--flagfile={FLAGS_DIR}/pretrain_tiny.flags", "--criterion=accuracy_greedy=0.5"])


def test_a_matched_compute_baseline_trains_its_steps_without_the_stage_criterion():
  # A stage with a criterion, continued for a matched number of steps (PPO's, DPO's and
  # GRPO's matched-SFT rows): a step count with nothing to reach, so no criterion and no
  # held-out evaluation are needed.
  scfg = config.parse(sft.SFTConfig, [f"--flagfile={FLAGS_DIR}/sft_grpo_tiny.flags"])
  assert scfg.criterion
  cfg = sft.matched_compute_config(scfg, "/tmp/x", 120)
  assert (cfg.criterion, cfg.steps, cfg.workdir, cfg.eval_every) == ("", 120, "/tmp/x", 120)
  assert cfg.learning_rate == scfg.learning_rate and cfg.batch_size == scfg.batch_size
