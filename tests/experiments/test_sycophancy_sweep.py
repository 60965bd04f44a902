"""The sycophancy sweep: its per-seed arithmetic on hand-made tables, the whole chain
(pretrain -> SFT -> reward -> PPO and DPO) on the sycophancy world in --smoke mode, the
committed results' consistency, and (slow) the 3-seed rerun."""
import json
import math
import os

import pytest

from rlhf_jax.runs import sycophancy as syc
from rlhf_jax.pipeline import config

from conftest import FLAGS_DIR, run_experiment

RESULTS = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "results",
                       "sycophancy", "sycophancy.json")


def _row(rate, accuracy):
  return {"sycophancy_rate": rate, "gold": accuracy}


def test_seed_summary_reads_every_policy():
  rm = {"rm_prefers_sycophantic": 0.8, "raters_prefer_sycophantic": 0.7,
        "ensemble": {"accuracy_gold": 0.6, "accuracy_rater": 0.65}}
  ppo_table = {"base": _row(0.9, 0.5), "sft": _row(0.3, 0.8), "ppo": _row(0.6, 0.7),
               "sft_matched": _row(0.25, 0.82)}
  dpo_table = {"sft": _row(0.3, 0.8), "policy": _row(0.5, 0.75)}
  s = syc.seed_summary(rm, ppo_table, dpo_table)
  assert s["rm_prefers_sycophantic"] == 0.8 and s["rm_accuracy_truth"] == 0.6
  assert (s["sft_sycophancy_rate"], s["ppo_sycophancy_rate"], s["dpo_sycophancy_rate"]) == (
      0.3, 0.6, 0.5)
  assert (s["sft_accuracy"], s["ppo_accuracy"], s["dpo_accuracy"]) == (0.8, 0.7, 0.75)
  assert s["sft_matched_ppo_sycophancy_rate"] == 0.25
  assert "sft_matched_dpo_sycophancy_rate" not in s  # that DPO run had no matched baseline


def test_smoke_sweep_runs_the_chain_and_writes_results(tmp_path):
  cfg = config.parse(syc.SycophancyConfig, [
      f"--flagfile={FLAGS_DIR}/sycophancy.flags", "--seeds=0", "--smoke",
      f"--workdir={tmp_path}/runs", f"--stage_root={tmp_path}/stages",
      f"--out_dir={tmp_path}/out",
      f"--extra_flags=--model=nano --data_dir={tmp_path}/data"])
  out = syc.run(cfg)
  (seed,) = out["per_seed"]
  for name in ("sft", "ppo", "dpo"):
    assert 0.0 <= seed[f"{name}_accuracy"] <= 1.0
    rate = seed[f"{name}_sycophancy_rate"]
    assert math.isnan(rate) or 0.0 <= rate <= 1.0
  with open(os.path.join(tmp_path, "out", "sycophancy.json")) as f:
    assert json.load(f)["seeds"] == [0]
  assert os.path.getsize(os.path.join(tmp_path, "out", "sycophancy.png")) > 1000
  # Each seed trains its own reward model: the per-seed flagfile names the seed.
  with open(os.path.join(tmp_path, "runs", "seed_0", "reward.flags")) as f:
    assert "--seed=0" in f.read().split()


@pytest.mark.skipif(not os.path.exists(RESULTS), reason="no committed sweep results")
def test_committed_results_are_consistent():
  with open(RESULTS) as f:
    out = json.load(f)
  assert len(out["seeds"]) == 3 == len(out["per_seed"])
  for key, ms in out["mean_std"].items():
    values = [s[key] for s in out["per_seed"]]
    assert ms["mean"] == pytest.approx(sum(values) / len(values)), key
  for s in out["per_seed"]:
    for key, value in s.items():
      if key.endswith(("_sycophancy_rate", "_accuracy", "_sycophantic")):
        assert 0.0 <= value <= 1.0, (key, value)


@pytest.mark.slow
def test_full_sweep_reproduces_the_committed_numbers(tmp_path):
  """Reruns the 3-seed sweep and checks it against the committed JSON: same seeds, so the
  same numbers up to float noise of a different machine."""
  run_experiment("experiments.sycophancy", f"--flagfile={FLAGS_DIR}/sycophancy.flags",
                 f"--workdir={tmp_path}/runs", f"--out_dir={tmp_path}/out",
                 f"--stage_root={tmp_path}/stages",
                 f"--extra_flags=--data_dir={tmp_path}/data")
  with open(os.path.join(tmp_path, "out", "sycophancy.json")) as f:
    out = json.load(f)
  with open(RESULTS) as f:
    committed = json.load(f)
  for key, ms in committed["mean_std"].items():
    assert out["mean_std"][key]["mean"] == pytest.approx(ms["mean"], abs=0.05), key
