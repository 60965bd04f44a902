"""--response_len (data/shared_prefix.py) in the file-mode runs of a tiny Llama checkpoint: DPO
pairs and reward-model rankings in one row per prompt train as the two-row / K-row layouts do.

Same flags, seed and data, one layout or the other: the runs compute the same function in
another float32 summation order, so their losses agree to rounding. Step 1 is before any
update; later steps differ by the rounding carried through Adam's updates, which normalise the
gradient (a relative gradient change of ~1e-6 moves a parameter by ~1e-6 of the learning
rate), so agreement stays near float32 precision over a few steps.
"""
import numpy as np
import pytest

from experiments import reward as reward_main
from real_formats import write_jsonl
from rlhf_jax.pipeline import config
from rlhf_jax.pipeline.reward import RewardConfig
from rlhf_jax.runs import dpo_files
from rlhf_jax.runs.dpo import DPOConfig
from rlhf_jax.train.logging import read_metrics

# A loss near log 2 from a forward of a few hundred float32 reduction terms, carried over three
# steps: 1e-4 relative is ~100x the rounding and far below what a wrong mask or position moves
# (a response seeing the other one changes the log-probs by O(1) nats).
REL = 1e-4


def _losses(workdir):
  return [r["metrics"]["loss"] for r in read_metrics(workdir, split="train")]


def _dpo(tmp_path, data, hf_root, name, *extra):
  cfg = config.parse(DPOConfig, [
      f"--init_hf={hf_root['llama']}", f"--data_files={data}", "--data_format=pairs",
      "--test_fraction=0.25", f"--workdir={tmp_path / name}", f"--data_dir={tmp_path / 'data'}",
      "--seq_len=48", "--batch_size=8", "--eval_batch_size=8", "--steps=3",
      "--warmup_steps=1", "--eval_every=3", "--save_every=3", "--log_every=1",
      "--learning_rate=1e-2", "--beta=0.5", *extra])
  return cfg, dpo_files.run(cfg)


def test_shared_prompt_dpo_trains_as_two_rows(tmp_path, hf_root):
  data = write_jsonl(tmp_path / "pairs.jsonl", [
      {"prompt": f"{a} plus {a} is", "chosen": f" {2 * a}.", "rejected": f" {2 * a + 1}!"}
      for a in range(10, 42)])
  rows_cfg, rows = _dpo(tmp_path, data, hf_root, "rows")
  shared_cfg, shared = _dpo(tmp_path, data, hf_root, "shared", "--response_len=16")
  assert _losses(shared_cfg.workdir)[0] == pytest.approx(np.log(2), rel=REL)
  np.testing.assert_allclose(_losses(shared_cfg.workdir), _losses(rows_cfg.workdir), rtol=REL)
  np.testing.assert_allclose(shared["eval"]["loss"], rows["eval"]["loss"], rtol=REL)


def _reward(tmp_path, data, hf_root, name, *extra):
  flags = {"init_hf": hf_root["llama"], "data_files": data, "data_format": "hh_rlhf",
           "test_fraction": 0.25, "workdir": tmp_path / name, "data_dir": tmp_path / "data",
           "seq_len": 48, "batch_size": 8, "eval_batch_size": 8, "steps": 3,
           "warmup_steps": 1, "learning_rate": 3e-3, "log_every": 1, "eval_every": 3,
           "save_every": 3}
  cfg = config.parse(RewardConfig, [f"--{k}={v}" for k, v in flags.items()] + list(extra))
  return cfg, reward_main.run(cfg)


def test_shared_prompt_rankings_train_as_k_rows(tmp_path, hf_root):
  records = []
  for a in range(10, 42):
    head = f"\n\nHuman: What is {a} plus {a}?\n\nAssistant:"
    records.append({"chosen": f"{head} It is {2 * a}.", "rejected": f"{head} No idea."})
  data = write_jsonl(tmp_path / "hh.jsonl", records)
  rows_cfg, rows = _reward(tmp_path, data, hf_root, "rows")
  shared_cfg, shared = _reward(tmp_path, data, hf_root, "shared", "--response_len=16")
  np.testing.assert_allclose(_losses(shared_cfg.workdir), _losses(rows_cfg.workdir), rtol=REL)
  np.testing.assert_allclose(shared["eval"]["loss"], rows["eval"]["loss"], rtol=REL)


def test_response_len_with_pack_is_refused(tmp_path, hf_root):
  with pytest.raises(ValueError, match="--pack and --response_len"):
    _dpo(tmp_path, tmp_path / "none.jsonl", hf_root, "x", "--response_len=16", "--pack")
