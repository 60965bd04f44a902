"""The overoptimisation sweep: its summary arithmetic on a hand-made curve, the committed
results' consistency with their own curves, and (slow) a full rerun showing the effect."""
import json
import os

import numpy as np
import pytest

from rlhf_jax.runs import overoptimisation as oo, sweeps
from rlhf_jax.pipeline import config

from conftest import FLAGS_DIR

RESULTS = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "results",
                       "overoptimisation", "overoptimisation.json")


def _point(it, kl, proxy, gold, words=10.0):
  return {"iteration": it, "kl": kl, "proxy": proxy, "gold": gold, "words": words}


def test_seed_summary_finds_the_gold_peak():
  curve = [_point(0, 0.0, -0.1, 2.0), _point(10, 1.0, 0.5, 2.4, 14.0),
           _point(20, 3.0, 0.9, 2.1, 19.0), _point(30, 6.0, 1.2, 1.7, 23.0)]
  s = oo.seed_summary(curve)
  assert (s["gold_peak"], s["peak_iteration"], s["kl_at_gold_peak"]) == (2.4, 10, 1.0)
  assert s["gold_drop_after_peak"] == pytest.approx(2.4 - 1.7)
  assert s["proxy_gain_after_peak"] == pytest.approx(1.2 - 0.5)
  agg = sweeps.aggregate([{"x": 1.0}, {"x": 3.0}])
  assert agg["x"] == {"mean": 2.0, "std": pytest.approx(np.sqrt(2.0))}


def test_bad_seeds_are_refused():
  with pytest.raises(ValueError, match="--seeds"):
    config.parse(oo.OveroptimisationConfig, ["--seeds=0,0"])
  with pytest.raises(ValueError, match="--seeds"):
    config.parse(oo.OveroptimisationConfig, ["--seeds=a"])


def _check_effect(s):
  """What the committed sweep shows in every seed (experiments/results/overoptimisation/
  README.md): PPO with a weak KL penalty optimises the proxy (it gains more than 1.0 over SFT;
  measured 1.35-1.63) while gold gains little (at its best less than 0.3 over SFT; measured
  0.06-0.11): the proxy's gains are not gold's."""
  assert s["proxy_final"] - s["proxy_sft"] > 1.0, s["seed"]
  assert s["gold_peak"] - s["gold_sft"] < 0.3, s["seed"]


def _check_overoptimised(per_seed):
  """Gao et al.'s shape, gold falling after its peak while the proxy keeps rising, in at least
  one seed. Measured on the checked-state chain: seed 2 (gold -0.53, proxy +0.91 after the
  peak) and weakly seed 0 (-0.06, +0.20); seed 1's gold ended at its peak. The earlier chain
  showed it in all three seeds: at this scale the shape is not robust to the seed, which the
  README says."""
  assert any(s["gold_drop_after_peak"] > 0.05 and s["proxy_gain_after_peak"] > 0.05
             for s in per_seed)


@pytest.mark.skipif(not os.path.exists(RESULTS), reason="no committed sweep results")
def test_committed_results_match_their_curves_and_show_the_effect():
  with open(RESULTS) as f:
    out = json.load(f)
  assert len(out["seeds"]) == 3
  for s in out["per_seed"]:
    assert {k: v for k, v in s.items() if k != "seed"} == oo.seed_summary(
        out["curves"][str(s["seed"])])
    _check_effect(s)
  _check_overoptimised(out["per_seed"])


@pytest.mark.slow
def test_sweep_reproduces_overoptimisation(tmp_path):
  """Reruns the sweep and asks for the committed result's claim, not its numbers: on another
  CPU the float rounding, and so the numbers, differ."""
  oo.run(config.parse(oo.OveroptimisationConfig, [
      f"--flagfile={FLAGS_DIR}/overoptimisation.flags", f"--out_dir={tmp_path}/out",
      f"--workdir={tmp_path}/runs"]))
  with open(os.path.join(tmp_path, "out", "overoptimisation.json")) as f:
    out = json.load(f)
  # Where it ran: what a reader needs to judge numbers that differ from the committed ones.
  assert {"cpu", "versions", "devices"} <= out["provenance"].keys()
  for s in out["per_seed"]:
    _check_effect(s)
  _check_overoptimised(out["per_seed"])
  assert os.path.getsize(os.path.join(tmp_path, "out", "overoptimisation.png")) > 1000
