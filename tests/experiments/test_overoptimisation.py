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


@pytest.mark.skipif(not os.path.exists(RESULTS), reason="no committed sweep results")
def test_committed_results_match_their_curves_and_show_the_effect():
  with open(RESULTS) as f:
    out = json.load(f)
  assert len(out["seeds"]) == 3
  for s in out["per_seed"]:
    assert {k: v for k, v in s.items() if k != "seed"} == oo.seed_summary(
        out["curves"][str(s["seed"])])
  # Proxy up after the gold peak, gold down: in every seed.
  for s in out["per_seed"]:
    assert s["proxy_gain_after_peak"] > 0 and s["gold_drop_after_peak"] > 0


@pytest.mark.slow
def test_sweep_reproduces_overoptimisation(tmp_path):
  out = oo.run(config.parse(oo.OveroptimisationConfig, [
      f"--flagfile={FLAGS_DIR}/overoptimisation.flags", f"--out_dir={tmp_path}/out",
      f"--workdir={tmp_path}/runs"]))
  # The committed sweep measured a gold drop of 0.19 +- 0.09 and a proxy gain of 0.33 +- 0.31
  # after the gold peak (mean +- std over 3 seeds); ask for the sign in every seed.
  for s in out["per_seed"]:
    assert s["proxy_gain_after_peak"] > 0 and s["gold_drop_after_peak"] > 0
  assert os.path.getsize(os.path.join(tmp_path, "out", "overoptimisation.png")) > 1000
