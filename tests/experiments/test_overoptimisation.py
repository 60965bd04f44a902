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
  """The claim of experiments/results/overoptimisation/README.md, in every seed: after gold
  has peaked the proxy keeps rising (committed: by +0.68, +0.06, +0.26) while gold falls (by
  0.21, 0.10, 0.26). Measured on the committed run's CPU only (no other CPU's sweep exists;
  the main PPO job's numbers moved by up to 0.14 gold on an AVX-512 Xeon), and seed 1's proxy
  gain is small, so the claim is the sign, not a margin. Not claimed: that gold ends below SFT
  (by only 0.02-0.07 per seed)."""
  assert s["proxy_gain_after_peak"] > 0, s["seed"]
  assert s["gold_drop_after_peak"] > 0, s["seed"]


@pytest.mark.skipif(not os.path.exists(RESULTS), reason="no committed sweep results")
def test_committed_results_match_their_curves_and_show_the_effect():
  with open(RESULTS) as f:
    out = json.load(f)
  assert len(out["seeds"]) == 3
  for s in out["per_seed"]:
    assert {k: v for k, v in s.items() if k != "seed"} == oo.seed_summary(
        out["curves"][str(s["seed"])])
    _check_effect(s)


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
  assert os.path.getsize(os.path.join(tmp_path, "out", "overoptimisation.png")) > 1000
