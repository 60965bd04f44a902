"""Best-of-n in --smoke mode through its flagfile: the per-n table against numbers recomputed
here from the stored samples (gold from the responses, selection from the proxy scores), the
KL bound and its exact finite-set value, the outputs, and the refusals that must happen
before anything compiles."""
import json
import math
import os

import numpy as np
import pytest

from rlhf_jax.runs import best_of_n
from rlhf_jax.pipeline import config
from rlhf_jax.compile_count import CompileCounter
from rlhf_jax.train.logging import read_metrics, read_tensorboard_scalars
from rlhf_jax.worlds import gold

from conftest import FLAGS_DIR


def _config(gold_stages, workdir, *extra):
  return config.parse(best_of_n.BestOfNConfig, [f"--flagfile={FLAGS_DIR}/best_of_n_tiny.flags",
                                             *gold_stages["args"], f"--workdir={workdir}",
                                             *extra])


@pytest.fixture(scope="module")
def bon_run(gold_stages, tmp_path_factory):
  cfg = _config(gold_stages, tmp_path_factory.mktemp("best_of_n") / "run")
  result = best_of_n.run(cfg)
  with open(os.path.join(cfg.workdir, "samples.json")) as f:
    samples = json.load(f)
  return cfg, result, samples


def _gold_and_proxy(samples):
  prompts, responses = samples["prompts"], samples["responses"]
  k = len(responses[0])
  flat = gold.gold_rewards([p for p in prompts for _ in range(k)],
                           [y for ys in responses for y in ys])
  return flat.reshape(len(prompts), k), np.array(samples["proxy"])


def test_table_has_every_n_with_finite_values(bon_run, gold_stages):
  cfg, result, _ = bon_run
  assert [row["n"] for row in result["per_n"]] == [1, 2, 4]
  assert result["n_max"] == 4 and result["prompts"] == 8
  assert result["reward_workdir"] == gold_stages["reward_dir"]
  for row in result["per_n"]:
    for key in best_of_n.PER_N_KEYS:
      assert math.isfinite(row[key]), (key, row)


def test_kl_bound_and_exact_kl(bon_run):
  _, result, _ = bon_run
  for row in result["per_n"]:
    n = row["n"]
    assert row["kl_bound"] == pytest.approx(math.log(n) - (n - 1) / n, abs=1e-6)
    assert -1e-6 <= row["kl_exact"] <= row["kl_bound"] + 1e-6, row
  assert result["per_n"][0]["kl_exact"] == pytest.approx(0.0, abs=1e-6)
  # With distinct proxy scores best-of-n moves away from uniform: KL grows with n.
  kls = [row["kl_exact"] for row in result["per_n"]]
  assert kls[0] < kls[1] < kls[2]


def test_selection_matches_the_samples(bon_run):
  """n = 1 selects every sample; n = n_max selects each prompt's highest-proxy sample."""
  _, result, samples = bon_run
  gold_NxK, proxy_NxK = _gold_and_proxy(samples)
  first, last = result["per_n"][0], result["per_n"][-1]
  assert first["gold"] == pytest.approx(gold_NxK.mean(), abs=1e-9)
  assert first["proxy"] == pytest.approx(proxy_NxK.mean(), abs=1e-9)
  best = proxy_NxK.argmax(axis=1)
  rows = np.arange(len(best))
  assert last["gold"] == pytest.approx(gold_NxK[rows, best].mean(), abs=1e-9)
  assert last["proxy"] == pytest.approx(proxy_NxK.max(axis=1).mean(), abs=1e-9)
  # Groups of n are unions of groups of every divisor of n: the selected proxy never falls.
  proxies = [row["proxy"] for row in result["per_n"]]
  assert all(a <= b + 1e-9 for a, b in zip(proxies, proxies[1:])), proxies


def test_outputs_in_the_workdir(bon_run):
  cfg, result, _ = bon_run
  with open(os.path.join(cfg.workdir, "result.json")) as f:
    assert json.load(f)["per_n"] == result["per_n"]
  records = read_metrics(str(cfg.workdir), split="eval")
  assert [r["step"] for r in records] == [1, 2, 4]
  assert records[-1]["metrics"]["gold"] == pytest.approx(result["per_n"][-1]["gold"])
  assert "eval/kl_exact" in read_tensorboard_scalars(str(cfg.workdir))
  with open(os.path.join(cfg.workdir, "config.json")) as f:
    assert json.load(f)["ns"] == "1,2,4"
  assert os.path.getsize(os.path.join(cfg.workdir, "best_of_n.png")) > 1000


@pytest.mark.parametrize("extra, message", [
    (["--aggregate=wco"], "--aggregate=wco: an ensemble aggregator needs --ensemble_size > 1"),
    (["--ns=3"], "--ns: every n must be >= 1 and divide --n_max=64"),
    (["--ns=1,two"], "--ns must be comma-separated integers"),
    (["--world=arithmetic"], "--world=gold"),
])
def test_invalid_combinations_fail_before_compiling(gold_stages, tmp_path, extra, message):
  with CompileCounter() as counter, pytest.raises(ValueError, match=message):
    best_of_n.run(_config(gold_stages, tmp_path / "bad", *extra))
  assert counter.count == 0, counter.names
