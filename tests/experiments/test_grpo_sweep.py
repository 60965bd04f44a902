"""The GRPO sweep: its summary arithmetic on a hand-made table, the committed results'
consistency with their own tables and curves (and the effect they claim), and (slow) a
3-seed rerun that must show GRPO clearly above SFT and reproduce the committed numbers."""
import json
import os

import pytest

from rlhf_jax.runs import grpo_sweep, sweeps
from rlhf_jax.pipeline import config

from conftest import FLAGS_DIR, run_experiment

RESULTS = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "results", "grpo",
                       "grpo.json")


def _row(acc, greedy, p4):
  return {"accuracy_greedy": greedy, "accuracy_temp1": acc, "reward_mean": acc,
          "zero_variance_frac": 0.5, "kl": 1.0, "length": 3.0, "truncated_frac": 0.0,
          "pass_at_1": acc, "pass_at_4": p4}


def test_seed_summary():
  table = {"sft": _row(0.5, 0.6, 0.8), "grpo": _row(0.8, 0.85, 0.9),
           "sft_matched": _row(0.6, 0.7, 0.85)}
  s = grpo_sweep.seed_summary(table, [1, 4])
  assert s["gain_over_sft_accuracy_temp1"] == pytest.approx(0.3)
  assert s["gain_over_matched_accuracy_greedy"] == pytest.approx(0.15)
  assert s["gain_over_matched_pass_at_4"] == pytest.approx(0.05)
  assert s["sft_matched_kl"] == 1.0
  assert not any("rolled_out" in k for k in s)  # no such row, no such gain
  table["sft_matched_rolled_out"] = _row(0.75, 0.9, 0.95)
  s = grpo_sweep.seed_summary(table, [1, 4])
  assert s["gain_over_matched_rolled_out_accuracy_temp1"] == pytest.approx(0.05)
  assert s["gain_over_matched_rolled_out_accuracy_greedy"] == pytest.approx(-0.05)


def test_bad_seeds_are_refused():
  for seeds in ("0,0", "a", ""):
    with pytest.raises(ValueError, match="--seeds"):
      config.parse(grpo_sweep.GRPOSweepConfig, [f"--seeds={seeds}"])


@pytest.mark.skipif(not os.path.exists(RESULTS), reason="no committed sweep results")
def test_committed_results_are_consistent_and_show_the_effect():
  with open(RESULTS) as f:
    out = json.load(f)
  assert len(out["seeds"]) == 3
  for s in out["per_seed"]:
    run = out["runs"][str(s["seed"])]
    assert {k: v for k, v in s.items() if k != "seed"} == grpo_sweep.seed_summary(
        run["table"], out["pass_k"])
    curve = out["curves"][str(s["seed"])]
    # The table's SFT and GRPO rows are the curve's first and last evaluations.
    assert run["table"]["sft"] == curve[0] and run["table"]["grpo"] == curve[-1]
    assert curve[-1]["iteration"] == 60
    assert run["compiles_after_first_max"] == 0
  numbers = [{k: v for k, v in s.items() if k != "seed"} for s in out["per_seed"]]
  assert out["mean_std"] == sweeps.aggregate(numbers)
  for s in out["per_seed"]:
    _check_effect(s)


def _check_effect(s):
  """What the committed sweep measured in every seed: GRPO far above SFT, and above SFT
  continued for as many steps with the correct answers, on the prompts of GRPO's updates or
  on every prompt it rolled out, in temperature-1 accuracy (pass@1: +0.014 to +0.038). NOT
  in greedy accuracy (-0.008 to +0.016: tied) nor pass@8 (matched SFT 0.1-0.2 points
  higher: RL narrows the distribution)."""
  assert s["gain_over_sft_accuracy_greedy"] > 0.05, s["seed"]
  assert s["gain_over_sft_accuracy_temp1"] > 0.1, s["seed"]
  assert s["gain_over_matched_accuracy_temp1"] > 0.01, s["seed"]
  assert s["gain_over_matched_rolled_out_accuracy_temp1"] > 0.01, s["seed"]


@pytest.mark.slow
def test_sweep_reproduces_the_effect(tmp_path):
  run_experiment("experiments.grpo_sweep", f"--grpo_flagfile={FLAGS_DIR}/grpo_tiny.flags",
                 f"--out_dir={tmp_path}/out", f"--workdir={tmp_path}/runs",
                 f"--stage_root={tmp_path}/stages", f"--data_dir={tmp_path}/data")
  with open(os.path.join(tmp_path, "out", "grpo.json")) as f:
    out = json.load(f)
  # GRPO over SFT in every seed, and close to the committed per-seed numbers (same flags and
  # seeds; other hardware may differ in the last bits, so not bitwise).
  with open(RESULTS) as f:
    committed = {s["seed"]: s for s in json.load(f)["per_seed"]}
  for s in out["per_seed"]:
    _check_effect(s)
    assert s["grpo_accuracy_temp1"] == pytest.approx(
        committed[s["seed"]]["grpo_accuracy_temp1"], abs=0.03)
  assert os.path.getsize(os.path.join(tmp_path, "out", "grpo.png")) > 1000
