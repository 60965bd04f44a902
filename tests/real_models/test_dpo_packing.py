"""DPO with packed pairs (--pack) from a tiny Llama checkpoint: the reference precomputed on
the packed rows, so step 1 is exactly DPO's log 2, and fewer rows than pairs."""
import numpy as np
import pytest

from real_formats import write_jsonl
from rlhf_jax.pipeline import config
from rlhf_jax.runs import dpo_files
from rlhf_jax.runs.dpo import DPOConfig
from rlhf_jax.train.logging import read_metrics


def test_packed_dpo_starts_at_log_2_and_learns(tmp_path, hf_root):
  data = write_jsonl(tmp_path / "pairs.jsonl", [
      {"prompt": f"{a} plus {a} is", "chosen": f" {2 * a}.", "rejected": f" {2 * a + 1}."}
      for a in range(10, 58)])
  cfg = config.parse(DPOConfig, [
      f"--init_hf={hf_root['llama']}", f"--data_files={data}", "--data_format=pairs",
      "--test_fraction=0.25", f"--workdir={tmp_path / 'run'}", f"--data_dir={tmp_path / 'data'}",
      "--seq_len=128", "--pack", "--batch_size=8", "--eval_batch_size=8", "--steps=4",
      "--warmup_steps=1", "--eval_every=4", "--save_every=4", "--log_every=1",
      "--learning_rate=1e-2", "--beta=0.5"])
  result = dpo_files.run(cfg)
  assert result["data"]["packed_rows"] < result["data"]["train"] / 2
  train = read_metrics(cfg.workdir, split="train")
  assert train[0]["metrics"]["loss"] == pytest.approx(np.log(2), rel=1e-4)
  assert train[-1]["metrics"]["loss"] < train[0]["metrics"]["loss"]
  assert 0.0 <= result["eval"]["rewards/accuracies"] <= 1.0
