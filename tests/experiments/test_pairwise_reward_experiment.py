"""The pairwise preference model experiment (experiments.reward --reward_model=pairwise) in
--smoke mode on the intransitive world: its report, manifest and loader, and the refusals of
pairwise/scalar mix-ups before anything compiles."""
import json
import math
import os

import numpy as np
import pytest

from rlhf_jax.runs import ppo
from rlhf_jax.pipeline import config, lm, pairwise, reward
from rlhf_jax.train.logging import read_metrics

from conftest import PAIRWISE_FLAGS


def _result(stages):
  with open(os.path.join(stages["pairwise_dir"], "result.json")) as f:
    return json.load(f)


def test_smoke_reports_accuracy_ceilings_and_the_learned_matrix(intransitive_stages):
  result = _result(intransitive_stages)
  for key in ("accuracy_rater", "rater_vs_rater"):
    assert 0.0 <= result[key] <= 1.0, key
  # A smoke-trained nano model writes mostly malformed text: pairs of two malformed responses
  # are tied, and the majority-label numbers are NaN exactly when no pair is decided.
  for key in ("accuracy_gold", "rater_vs_gold"):
    assert (math.isnan(result[key]) if result["decided_pairs"] == 0
            else 0.0 <= result[key] <= 1.0), key
  learned = np.array(result["learned_matrix"])
  # Antisymmetric by construction: P(i > j) + P(j > i) = 1 on the same response pairs.
  np.testing.assert_allclose(learned + learned.T, 1.0, atol=1e-5)
  np.testing.assert_allclose(result["true_matrix"], [[0.5, 0.8, 0.3], [0.2, 0.5, 0.65],
                                                     [0.7, 0.35, 0.5]])
  assert math.isclose(sum(result["learned_nash"]), 1.0, abs_tol=1e-9)
  train = read_metrics(intransitive_stages["pairwise_dir"], split="train")
  assert [r["step"] for r in train] == [1, 2, 3]
  assert all(math.isfinite(r["metrics"]["loss"]) for r in train)


def test_manifest_loads_and_predicts_antisymmetric_probabilities(intransitive_stages):
  d = intransitive_stages["pairwise_dir"]
  manifest = reward.read_manifest(d)
  assert manifest["reward_model"] == "pairwise" and os.path.isdir(manifest["sft_workdir"])
  cfg = config.parse(reward.RewardConfig, [f"--flagfile={PAIRWISE_FLAGS}",
                                        *intransitive_stages["args"], "--workdir=unused"])
  mesh = lm.setup(cfg)
  _, sft_params, _ = lm.init_model(cfg, mesh, init_from=manifest["sft_workdir"])
  model = pairwise.load_preference_model(cfg, mesh, d, sft_params)
  a = ["certainly. the cat is calm.", "oh, the owl? so dark!", "um"]
  b = ["ah, the cat, calm as snow.", "oh, the owl? so dark!", "oh, the fox? so warm!"]
  ps = ["talk about the cat."] * 3
  p_ab, p_ba = model(ps, a, b, batch_size=4), model(ps, b, a, batch_size=4)
  np.testing.assert_allclose(p_ab + p_ba, 1.0, atol=1e-6)
  assert p_ab[1] == pytest.approx(0.5, abs=1e-6)  # a response against itself


def test_pairwise_stage_where_a_scalar_reward_is_needed_is_refused(intransitive_stages, tmp_path):
  cfg = config.parse(ppo.PPOConfig, [f"--reward_flagfile={PAIRWISE_FLAGS}", "--world=intransitive",
                                  *intransitive_stages["args"], f"--workdir={tmp_path}/ppo"])
  with pytest.raises(ValueError, match="scalar reward"):
    ppo.run(cfg)
  with pytest.raises(ValueError, match="holds a bt reward model"):
    bt_dir = tmp_path / "bt"
    bt_dir.mkdir()
    (bt_dir / reward.MANIFEST).write_text(json.dumps({"members": ["member_0"]}))
    pairwise.load_preference_model(None, None, str(bt_dir), None)


@pytest.mark.parametrize("extra, message", [
    (["--ranking_k=4"], "--ranking_k"),
    (["--reward_model=bt", "--ranking_k=3"], "--ranking_k"),
    (["--ensemble_size=2"], "--ensemble_size=1"),
])
def test_invalid_flags_are_refused(intransitive_stages, tmp_path, extra, message):
  with pytest.raises(ValueError, match=message):
    config.parse(reward.RewardConfig, [f"--flagfile={PAIRWISE_FLAGS}",
                                    *intransitive_stages["args"], f"--workdir={tmp_path}", *extra])


def test_evaluate_against_hand_labels():
  # 4 pairs: model probabilities, one rater label each, the raters' probability, the majority.
  out = pairwise.evaluate(probs=[0.9, 0.2, 0.5, 0.6], rater_labels=[1, 1, 0, 0],
                                 rater_p=[0.8, 0.35, 0.5, 0.7], truth=[1.0, 0.0, 0.5, 1.0])
  assert out["accuracy_rater"] == pytest.approx((1 + 0 + 0.5 + 0) / 4)
  assert out["accuracy_gold"] == pytest.approx(1.0)  # the tied pair is left out
  assert out["rater_vs_gold"] == pytest.approx((0.8 + 0.65 + 0.7) / 3)
  assert out["rater_vs_rater"] == pytest.approx(np.mean([0.68, 0.545, 0.5, 0.58]))
