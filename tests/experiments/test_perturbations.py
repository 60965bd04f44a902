"""The perturbation runner (rlhf_jax/runs/perturbations.py): its perturbed flagfile chains, the
environment each variant runs in, and the spread it reports, on a stand-in experiment that
writes back what it was given."""
import json
import os
import sys
import textwrap

import numpy as np
import pytest

from rlhf_jax.pipeline import config
from rlhf_jax.runs import perturbations

# A stand-in experiment: reads its flagfile chain as the real configs would (flags in order,
# the last occurrence winning, --sft_flagfile naming the upstream) and writes result.json.
_FAKE = textwrap.dedent("""
    import json, os, sys

    def read(path):
      flags = {}
      for line in open(path).read().splitlines():
        if line.startswith("--"):
          k, _, v = line[2:].partition("=")
          flags[k] = v
      return flags

    args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
    if "fast_math=true" in os.environ.get("XLA_FLAGS", "") and "FAIL_FAST_MATH" in os.environ:
      raise SystemExit("StageCriterionError: SFT missed its criterion")
    top = read(args["flagfile"])
    upstream = read(top["sft_flagfile"])
    os.makedirs(args["workdir"], exist_ok=True)
    result = {"top": {"seed": float(top.get("seed", -1)),
                      "data_seed": float(top.get("data_seed", -1))},
              "upstream_seed": float(upstream.get("seed", -1)),
              "devices": float("device_count=8" in os.environ.get("XLA_FLAGS", "")),
              "fast_math": float("fast_math=true" in os.environ.get("XLA_FLAGS", ""))}
    json.dump(result, open(os.path.join(args["workdir"], "result.json"), "w"))
    with open(os.path.join(args["workdir"], "metrics.jsonl"), "w") as f:
      f.write(json.dumps({"step": 1, "split": "eval", "time": 0.0,
                          "metrics": {"accuracy_greedy": result["top"]["seed"]}}) + "\\n")
    with open(os.path.join(os.path.dirname(__file__), "calls.txt"), "a") as f:
      f.write(args["workdir"] + "\\n")
""")


@pytest.fixture
def chain_files(tmp_path, monkeypatch):
  (tmp_path / "fake_experiment.py").write_text(_FAKE)
  monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  (tmp_path / "sft.flags").write_text("# upstream\n--steps=5\n")
  (tmp_path / "top.flags").write_text(f"# top\n--sft_flagfile={tmp_path}/sft.flags\n--lr=1\n")
  return tmp_path


def _config(tmp_path, *extra):
  return config.parse(perturbations.PerturbationConfig, [
      "--experiment=fake_experiment", f"--experiment_flagfile={tmp_path}/top.flags",
      "--metrics=top.seed,top.data_seed,upstream_seed,devices,fast_math",
      f"--workdir={tmp_path}/runs", f"--out={tmp_path}/out.json", *extra])


def test_every_variant_perturbs_the_whole_chain_and_its_environment(chain_files):
  out = perturbations.run(_config(chain_files))
  values = {name: r["values"] for name, r in out["runs"].items()}
  assert list(values) == ["seed0", "seed1", "seed2", "data_order", "sharded8", "threads1",
                          "fast_math"]
  for name, v in values.items():
    seed = float(name[4:]) if name.startswith("seed") else 0.0
    assert v["top.seed"] == v["upstream_seed"] == seed  # the upstream flagfile carries it too
    assert v["top.data_seed"] == (1000.0 if name == "data_order" else -1.0)
    assert v["devices"] == float(name == "sharded8")
    assert v["fast_math"] == float(name == "fast_math")
  with open(chain_files / "out.json") as f:
    assert json.load(f)["runs"] == out["runs"]
  # Each variant's learning curve, read back from its metrics.jsonl, and their figure.
  assert out["curves"]["seed2"] == {"run": [[1, 2.0]]}
  assert os.path.getsize(chain_files / "out.png") > 1000
  # The perturbed copies keep the original lines and append the variant's flags.
  copy = (chain_files / "runs" / "data_order" / "flags" / "top.flags").read_text()
  assert "--lr=1" in copy and copy.rstrip().endswith("--data_seed=1000")


def test_a_finished_variant_is_read_back_not_rerun(chain_files):
  first = perturbations.run(_config(chain_files, "--perturbations=threads1"))
  again = perturbations.run(_config(chain_files, "--perturbations=threads1,fast_math"))
  calls = (chain_files / "calls.txt").read_text().split()
  assert len(calls) == 5 and "/fast_math/" in calls[-1]  # only the new variant ran
  assert again["runs"]["threads1"] == first["runs"]["threads1"]
  # A changed flagfile in the chain reruns every variant, in fresh directories.
  (chain_files / "sft.flags").write_text("# upstream\n--steps=6\n")
  perturbations.run(_config(chain_files, "--perturbations=threads1"))
  calls = (chain_files / "calls.txt").read_text().split()
  assert len(calls) == 9 and len(set(calls)) == 9


def test_spread_against_numpy():
  runs = {"seed0": 0.50, "seed1": 0.56, "seed2": 0.47, "data_order": 0.53, "fast_math": 0.41}
  runs = {n: {"values": {"m": v}} for n, v in runs.items()}
  s = perturbations.spread(runs, "m", ["seed0", "seed1", "seed2"])
  seeds = np.array([0.50, 0.56, 0.47])
  assert s["seed_mean"] == pytest.approx(seeds.mean(), rel=1e-12)
  assert s["seed_std"] == pytest.approx(seeds.std(ddof=1), rel=1e-12)
  assert s["perturbation_minus_seed0"] == pytest.approx({"data_order": 0.03,
                                                         "fast_math": -0.09})
  assert s["perturbation_max_abs"] == pytest.approx(0.09)
  assert s["interval"] == [0.41, 0.56]


def test_a_missing_metric_names_the_keys_that_exist():
  with pytest.raises(KeyError, match="stopped at 'acc'.*keys there: accuracy_greedy"):
    perturbations.lookup({"sft": {"accuracy_greedy": 0.5}}, "sft.acc")


@pytest.mark.parametrize("flag, message", [
    ("--seeds=1,2", "must start with 0"),
    ("--perturbations=threads1,moon_phase", "unknown moon_phase"),
    ("--metrics=", "at least one"),
    ("--experiment_flagfile=/no/such.flags", "does not exist"),
])
def test_bad_flags_fail_before_anything_runs(flag, message, tmp_path):
  with pytest.raises(ValueError, match=message):
    config.parse(perturbations.PerturbationConfig, [flag])


def test_a_failing_variant_is_reported_and_left_out_of_the_spread(chain_files, monkeypatch):
  monkeypatch.setenv("FAIL_FAST_MATH", "1")
  cfg = _config(chain_files, "--perturbations=threads1,fast_math")
  out = perturbations.run(cfg)
  assert out["failed"] == {"fast_math": "StageCriterionError: SFT missed its criterion"}
  assert out["spread"]["top.seed"]["perturbation_minus_seed0"] == {"threads1": 0.0}
  again = perturbations.run(cfg)  # read back, not rerun
  assert again["failed"] == out["failed"]
  assert len((chain_files / "calls.txt").read_text().split()) == 4
