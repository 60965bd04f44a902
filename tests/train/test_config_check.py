"""Resuming with changed flags: a change that alters training is refused with the fields and
the fix; one that does not (logging, evaluation, placement) is accepted and printed."""
import dataclasses
import os

import pytest

from rlhf_jax.pipeline import config
from rlhf_jax.runs import dpo_files
from rlhf_jax.runs.dpo import DPOConfig
from rlhf_jax.train import config_check
from rlhf_jax.train.logging import read_metrics

FLAGS_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "configs")


def test_changes_split_training_from_reporting():
  saved = {"steps": 10, "learning_rate": 1e-3, "eval_every": 5, "mesh_fsdp": 1,
           "pass_k": "1,4", "model": "tiny"}
  new = {**saved, "steps": 20, "eval_every": 2, "mesh_fsdp": 4, "seed": 1}
  training, other = config_check.changes(saved, new)
  assert training == {"steps": (10, 20), "seed": (None, 1)}
  assert other == {"eval_every": (5, 2), "mesh_fsdp": (1, 4)}
  assert config_check.changes(saved, dict(saved)) == ({}, {})


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("resume")
  cfg = config.parse(DPOConfig, [
      f"--flagfile={FLAGS_DIR}/dpo_tiny.flags", "--steps=4", "--warmup_steps=1",
      "--eval_every=4", "--save_every=2", "--log_every=1", "--batch_size=8",
      "--eval_batch_size=8", f"--workdir={root}/run",
      f"--data_dir={root}/data",
      f"--data_files={os.path.join(FLAGS_DIR, '..', 'data', 'pairs_tiny.jsonl')}"])
  dpo_files.run(cfg)
  return cfg


def test_a_changed_schedule_is_refused_before_training(finished_run):
  records = len(read_metrics(finished_run.workdir))
  cfg = dataclasses.replace(finished_run, learning_rate=finished_run.learning_rate * 2,
                            steps=6)
  with pytest.raises(config_check.ConfigChangedError) as e:
    dpo_files.run(cfg)
  for name in ("--learning_rate", "--steps: 4 -> 6", "--allow_config_change"):
    assert name in str(e.value)
  assert len(read_metrics(finished_run.workdir)) == records  # nothing written


def test_reporting_changes_are_accepted_and_printed(finished_run, capsys):
  dpo_files.run(dataclasses.replace(finished_run, log_every=2, eval_every=2))
  out = capsys.readouterr().out
  assert "changed flags that do not alter training: --eval_every: 4 -> 2; --log_every" in out


def test_allow_config_change_resumes_with_the_new_flags(finished_run, capsys):
  cfg = dataclasses.replace(finished_run, seed=7, allow_config_change=True)
  dpo_files.run(cfg)
  assert "--allow_config_change: resuming with changed training flags: --seed: 0 -> 7" in (
      capsys.readouterr().out)
