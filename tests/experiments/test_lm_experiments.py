"""Smoke runs of the pretrain and SFT experiments through their flagfiles, in-process, plus
the stage cache and flag validation."""
import json
import os

import pytest

from rlhf_jax.pipeline import chain, config, pretrain, sft, stages
from rlhf_jax.train.logging import read_metrics, read_tensorboard_scalars

FLAGS_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "configs")


def _sft_config(tmp_path, *extra):
  return config.parse(sft.SFTConfig, [
      f"--flagfile={FLAGS_DIR}/sft_tiny.flags",
      f"--pretrain_flagfile={FLAGS_DIR}/pretrain_tiny.flags", "--smoke",
      f"--workdir={tmp_path}/sft", f"--stage_root={tmp_path}/stages",
      f"--data_dir={tmp_path}/data", *extra])


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
  tmp_path = tmp_path_factory.mktemp("sft")
  cfg = _sft_config(tmp_path)
  return tmp_path, cfg, chain.run_stage("sft", cfg)


def test_sft_smoke_builds_pretrain_stage_and_reports_accuracy(sft_run):
  tmp_path, cfg, result = sft_run
  for stage in ("base", "sft"):
    for metric in ("accuracy_greedy", "accuracy_temp1"):
      assert 0.0 <= result[stage][metric] <= 1.0
  pre_dir = result["pretrain_workdir"]
  assert os.path.basename(pre_dir).startswith("pretrain-")
  assert os.path.exists(os.path.join(pre_dir, "STAGE_DONE"))
  for workdir in (pre_dir, cfg.workdir):
    assert os.path.isdir(os.path.join(workdir, "params"))
    assert os.listdir(os.path.join(workdir, "checkpoints"))
    with open(os.path.join(workdir, "config.json")) as f:
      assert json.load(f)["smoke"] is True
    train = read_metrics(workdir, split="train")
    assert [r["step"] for r in train] == [1, 2, 3]  # --smoke: 3 steps, logged every step
    assert all(r["metrics"]["loss"] > 0 for r in train)
    assert "train/loss" in read_tensorboard_scalars(workdir)
  with open(os.path.join(cfg.workdir, "result.json")) as f:
    assert json.load(f)["sft"] == result["sft"]


def test_stage_cache_reuses_and_rebuilds_on_upstream_change(sft_run, capsys):
  tmp_path, cfg, result = sft_run
  pcfg = chain.upstream_config("pretrain", cfg.pretrain_flagfile, cfg)
  assert chain.ensure("pretrain", pcfg, cfg.stage_root) == result["pretrain_workdir"]
  assert "cached" in capsys.readouterr().out
  changed = pcfg.__class__(**{**config.to_dict(pcfg), "steps": pcfg.steps + 1})
  assert stages.stage_key(chain.key_config("pretrain", changed)) != stages.stage_key(
      chain.key_config("pretrain", pcfg))


def test_a_world_flag_of_a_downstream_run_never_overrides_its_upstream_stage(tmp_path):
  """--error_rate describes the world's data: an SFT run whose value differs from its
  pretraining flagfile's is refused, naming both, instead of silently building another base."""
  cfg = _sft_config(tmp_path, "--error_rate=0.3")
  with pytest.raises(ValueError, match=r"--error_rate=0.3 here, 0.4 in .*pretrain_tiny.flags"):
    chain.upstream_config("pretrain", cfg.pretrain_flagfile, cfg)


def test_ensure_stage_runs_once_per_config(tmp_path):
  calls = []
  run = lambda workdir: calls.append(workdir)
  a = stages.ensure_stage("s", {"x": 1}, str(tmp_path), run, print_fn=lambda s: None)
  b = stages.ensure_stage("s", {"x": 1}, str(tmp_path), run, print_fn=lambda s: None)
  c = stages.ensure_stage("s", {"x": 2}, str(tmp_path), run, print_fn=lambda s: None)
  assert a == b != c
  assert calls == [a, c]


def test_a_half_built_stage_is_built_again_never_reused(tmp_path):
  """A build cut short (here its run raises after writing part of its output) leaves no
  STAGE_DONE: the next ensure_stage runs the stage again, which rewrites the output."""
  attempts = []

  def run(workdir):
    attempts.append(workdir)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "output.txt"), "w") as f:
      f.write("partial")
      if len(attempts) == 1:
        raise KeyboardInterrupt("killed mid-build")
      f.write(" then complete")

  quiet = lambda s: None
  with pytest.raises(KeyboardInterrupt):
    stages.ensure_stage("s", {"x": 1}, str(tmp_path), run, print_fn=quiet)
  workdir = attempts[0]
  assert not os.path.exists(os.path.join(workdir, "STAGE_DONE"))
  assert stages.ensure_stage("s", {"x": 1}, str(tmp_path), run, print_fn=quiet) == workdir
  assert len(attempts) == 2
  assert open(os.path.join(workdir, "output.txt")).read() == "partial then complete"
  assert sorted(os.listdir(workdir)) == ["STAGE_DONE", "output.txt"]  # no marker temp left
  stages.ensure_stage("s", {"x": 1}, str(tmp_path), run, print_fn=quiet)
  assert len(attempts) == 2  # complete now: reused


@pytest.mark.parametrize("flag, message", [
    ("--batch_size=0", "--batch_size must be >= 1"),
    ("--model=huge", "value should be one of"),
    ("--learning_rate=-1", "--learning_rate must be > 0"),
    ("--batch_size=30", "divisible by --num_microbatches"),
    ("--no_such_flag=1", "Unknown command line flag"),
])
def test_invalid_flags_fail_before_anything_runs(flag, message):
  extra = ["--num_microbatches=4"] if flag == "--batch_size=30" else []
  with pytest.raises(ValueError, match=message):
    config.parse(pretrain.PretrainConfig,
              [f"--flagfile={FLAGS_DIR}/pretrain_tiny.flags", flag, *extra])


def test_command_line_overrides_flagfile():
  cfg = config.parse(pretrain.PretrainConfig,
                  [f"--flagfile={FLAGS_DIR}/pretrain_tiny.flags", "--steps=70"])
  assert cfg.steps == 70 and cfg.model == "tiny"


def test_eval_batches_must_split_over_the_devices_only_where_a_step_shards_them(tmp_path):
  """8 devices: --eval_batch_size=100 cannot be split into 8 row blocks. A stage whose
  held-out loss runs through the sharded eval step refuses it; a run that only samples at
  evaluation (PPO, GRPO: its batches are replicated when they do not split) accepts it."""
  from rlhf_jax.pipeline import lm
  cfg = _sft_config(tmp_path, "--eval_batch_size=100", "--batch_size=16")
  with pytest.raises(ValueError, match="--eval_batch_size=100 must be divisible by the "
                                       "data-parallel size mesh_data\\*mesh_fsdp=8"):
    lm.setup(cfg)
  assert dict(lm.setup(cfg, sharded_eval=False).shape)["data"] == 8
