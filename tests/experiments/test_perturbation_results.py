"""The committed perturbation reports (experiments/results/perturbations/*.json, one per world's
chain): each consistent with its own runs, every variant finished, and each making its claims
in every variant (seeds, 8 fake devices, XLA fast math, ...); (slow) each report rerun, which
must make the same claims on whatever CPU runs it.

The claims and their margins are the ones docs/robustness.md states next to each report's table,
where the measured ranges they are set against are given."""
import json
import os

import numpy as np
import pytest

from rlhf_jax.runs import perturbations

from conftest import FLAGS_DIR, run_experiment

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "results",
                           "perturbations")


def _grpo_claims(v: dict) -> None:
  """Arithmetic: pretraining -> short SFT -> GRPO with both matched-compute SFT baselines.
  - every stage reached its checked state: the base >= 0.5 greedy and >= 0.4 temperature-1
    held-out accuracy (pretrain_tiny.flags), the short SFT >= 0.75 greedy (sft_grpo_tiny);
  - GRPO beats SFT at temperature 1 by more than 0.1 and greedy by more than 0.05;
  - GRPO beats SFT continued for as many steps on the prompts of its updates at temperature
    1: sign only, the smallest effect of the report."""
  assert v["table.base.accuracy_greedy"] >= 0.5
  assert v["table.base.accuracy_temp1"] >= 0.4
  assert v["table.sft.accuracy_greedy"] >= 0.75
  assert v["table.grpo.accuracy_temp1"] - v["table.sft.accuracy_temp1"] > 0.1
  assert v["table.grpo.accuracy_greedy"] - v["table.sft.accuracy_greedy"] > 0.05
  assert v["table.grpo.accuracy_temp1"] > v["table.sft_matched.accuracy_temp1"]


def _sycophancy_claims(v: dict) -> None:
  """Sycophancy world: pretraining -> SFT on correct answers.
  - SFT reached its checked state (greedy accuracy >= 0.9);
  - the base is sycophantic: it agrees with more than 40% of wrong beliefs at temperature 1
    (its corpus agrees with 60% of them);
  - SFT lowers the sycophancy rate the base starts from by more than 0.2."""
  assert v["sft.greedy_accuracy"] >= 0.9
  assert v["base.temp1_sycophancy_rate"] > 0.4
  assert v["base.temp1_sycophancy_rate"] - v["sft.temp1_sycophancy_rate"] > 0.2


def _gold_claims(v: dict) -> None:
  """Gold world, the main job: pretraining -> SFT -> reward model -> PPO (KL-penalised), and
  SFT continued for as many updates.
  - each stage raises the gold reward: SFT above the base, PPO above SFT by more than 0.05
    (measured +0.11 to +0.40);
  - PPO is above SFT continued for as many updates (sign only: measured +0.10 to +0.31);
  - PPO optimised its proxy: proxy reward above 0.5 (SFT's is about 0 by the reward model's
    normalisation)."""
  assert v["table.sft.gold"] > v["table.base.gold"]
  assert v["table.ppo.gold"] - v["table.sft.gold"] > 0.05
  assert v["table.ppo.gold"] > v["table.sft_matched.gold"]
  assert v["table.ppo.proxy"] > 0.5


def _intransitive_claims(v: dict) -> None:
  """Intransitive world: pretraining -> SFT on a skewed style mixture -> Bradley-Terry reward
  model -> PPO. No scalar reward fits a cyclic preference; the BT model ranks formal first,
  so PPO collapses onto formal and becomes more exploitable than SFT.
  - SFT passed its gate as it stood when the report ran (casual >= 0.4, malformed <= 0.25);
  - PPO's formal share exceeds SFT's by more than 0.2 (measured +0.34 to +0.64);
  - PPO's exploitability exceeds SFT's (measured 0.26-0.32 against 0.22-0.23)."""
  assert v["table.sft.share_casual"] >= 0.4
  assert v["table.sft.share_malformed"] <= 0.25
  assert v["table.ppo.share_formal"] - v["table.sft.share_formal"] > 0.2
  assert v["table.ppo.exploitability"] > v["table.sft.exploitability"]


# report -> (its claims, the variants it must hold, the perturbation flagfile that writes it)
REPORTS = {
    "grpo_tiny": (_grpo_claims, ("seed0", "seed1", "seed2", "data_order", "sharded8",
                                 "fast_math"), "perturb_grpo_tiny.flags"),
    "sft_sycophancy_tiny": (_sycophancy_claims, ("seed0", "seed1", "sharded8", "fast_math"),
                            "perturb_sft_sycophancy_tiny.flags"),
    "ppo_gold_tiny": (_gold_claims, ("seed0", "seed1", "data_order", "fast_math"),
                      "perturb_ppo_gold_tiny.flags"),
    "ppo_intransitive_tiny": (_intransitive_claims, ("seed0", "seed1", "sharded8", "fast_math"),
                              "perturb_ppo_intransitive_tiny.flags"),
}


def _load(name: str) -> dict:
  with open(os.path.join(RESULTS_DIR, f"{name}.json")) as f:
    return json.load(f)


@pytest.mark.parametrize("name", sorted(REPORTS))
def test_committed_report_is_consistent_with_its_runs(name):
  out = _load(name)
  _, expected, _ = REPORTS[name]
  assert set(expected) <= set(out["runs"])
  # (grpo_tiny.json predates the field: the runner then stopped at a failed variant)
  assert out.get("failed", {}) == {}
  assert all("values" in run for run in out["runs"].values())
  seeds = [n for n in out["runs"] if n.startswith("seed")]
  for metric, s in out["spread"].items():
    assert s == perturbations.spread(out["runs"], metric, seeds)
    values = np.array([out["runs"][n]["values"][metric] for n in seeds])
    assert s["seed_std"] == pytest.approx(values.std(ddof=1), rel=1e-12)
  for variant, curves in out["curves"].items():
    for steps_metric, stage in (("upstream_steps.pretrain", "pretrain"),
                                ("pretrain_steps", "pretrain")):
      # A stage with a criterion ends where it stopped: the steps the run reports.
      if steps_metric in out["runs"][variant]["values"]:
        assert curves[stage][-1][0] == out["runs"][variant]["values"][steps_metric]
  assert {"cpu", "versions", "devices"} <= set(out["provenance"])


@pytest.mark.parametrize("name", sorted(REPORTS))
def test_committed_report_makes_its_claims_in_every_variant(name):
  claims, _, _ = REPORTS[name]
  for variant, run in _load(name)["runs"].items():
    try:
      claims(run["values"])
    except AssertionError as e:
      raise AssertionError(f"{name}: variant {variant} breaks a claim") from e


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REPORTS))
def test_rerun_makes_the_claims(name, tmp_path):
  """35-70 minutes each on 2 cores: every variant of the chain from empty stages."""
  claims, _, flagfile = REPORTS[name]
  run_experiment("experiments.perturbations", f"--flagfile={FLAGS_DIR}/{flagfile}",
                 f"--workdir={tmp_path}/runs", f"--out={tmp_path}/{name}.json",
                 f"--data_dir={tmp_path}/data")
  with open(tmp_path / f"{name}.json") as f:
    out = json.load(f)
  assert out["failed"] == {}
  for variant, run in out["runs"].items():
    try:
      claims(run["values"])
    except AssertionError as e:
      raise AssertionError(f"{name}: variant {variant} breaks a claim") from e
  assert os.path.getsize(tmp_path / f"{name}.png") > 1000
