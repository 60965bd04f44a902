"""Numerical faults in the online loop (test_engine_loop's 3-iteration GRPO run): a reward of
NaN in iteration 2's rollout makes that iteration's optimizer steps NaN. Under stop the run
ends naming the step and the rollout rows, dumps them, and keeps iteration 1's checkpoint as
the latest; under skip those updates are dropped, counted and logged, and the run finishes
with finite parameters."""
import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from rlhf_jax.rl import loop
from rlhf_jax.train import nonfinite
from rlhf_jax.train.logging import read_metrics
from test_engine_loop import build, evaluate, odd_first_token

BAD_ITERATION = 2


class PoisonedScorer:
  """odd_first_token, with row 0's reward NaN in the rollout of BAD_ITERATION."""

  def __init__(self):
    self.rollouts = 0

  def __call__(self, exp):
    self.rollouts += 1
    rewards = odd_first_token(exp)
    if self.rollouts == BAD_ITERATION:
      rewards[0] = np.nan
    return rewards


def _run(workdir, policy):
  cfg, algorithm, state, train_step, mesh = build(workdir)
  cfg = dataclasses.replace(cfg, on_nonfinite=policy)
  algorithm = dataclasses.replace(algorithm, scorer=PoisonedScorer())
  return loop.run(cfg, algorithm, state=state, train_step=train_step, mesh=mesh,
                  evaluate=evaluate)


def test_stop_names_the_step_and_rows_and_keeps_the_previous_checkpoint(tmp_path):
  with pytest.raises(nonfinite.NonfiniteError) as e:
    _run(tmp_path, "stop")
  message = str(e.value)
  assert f"of iteration {BAD_ITERATION}'s rollout" in message
  first_bad = 2 * 2 * (BAD_ITERATION - 1)  # optimizer steps before the iteration
  step = int(message.split(":")[0].split()[-1])
  assert first_bad < step <= first_bad + 4
  assert "the latest checkpoint is step 1" in message
  assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == [1]
  info = json.loads((tmp_path / nonfinite.DUMP_DIR / f"step_{step}" / "info.json").read_text())
  assert info["iteration"] == BAD_ITERATION and len(info["rollout_rows"]) == 8
  with np.load(tmp_path / nonfinite.DUMP_DIR / f"step_{step}" / "batch.npz") as f:
    assert np.isnan(f["advantages"]).any()


def test_skip_counts_the_dropped_updates_and_finishes_finite(tmp_path):
  state, curve = _run(tmp_path, "skip")
  assert [p["iteration"] for p in curve] == [0, 1, 2, 3]
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
  train = {r["step"]: r["metrics"] for r in read_metrics(str(tmp_path), split="train")}
  skipped = train[BAD_ITERATION]["nonfinite_skipped"]
  assert 1 <= skipped <= 4 and "nonfinite_skipped" not in train[1]
  faults = read_metrics(str(tmp_path), split="faults")
  assert len(faults) == skipped
  assert all(4 < r["step"] <= 8 for r in faults)


def test_loop_config_refuses_an_unknown_policy(tmp_path):
  with pytest.raises(ValueError, match="on_nonfinite must be one of"):
    loop.LoopConfig(str(tmp_path), 1, on_nonfinite="ignore")
