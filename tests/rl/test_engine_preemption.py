"""Preemption in the online loop (test_engine_loop's 3-iteration GRPO run): a SIGTERM arriving
during iteration 2's rollout lets that iteration finish, saves its checkpoint and ends the run
with preemption.Preempted (exit status 85); the relaunched run resumes from iteration 2 and
ends bitwise where the uninterrupted run ends."""
import dataclasses
import os
import signal

import jax
import numpy as np
import pytest

from rlhf_jax.rl import loop
from rlhf_jax.train import preemption
from test_engine_loop import build, evaluate, odd_first_token, run


class SigtermDuring:
  """odd_first_token that sends this process a SIGTERM during rollout `at`."""

  def __init__(self, at: int):
    self.at, self.rollouts = at, 0

  def __call__(self, exp):
    self.rollouts += 1
    if self.rollouts == self.at:
      os.kill(os.getpid(), signal.SIGTERM)
    return odd_first_token(exp)


def test_sigterm_saves_the_iteration_and_the_relaunch_resumes_bitwise(tmp_path, capsys):
  want, want_curve, _ = run(tmp_path / "straight")
  cfg, algorithm, state, train_step, mesh = build(tmp_path / "preempted")
  cfg = dataclasses.replace(cfg, save_every=100)  # the preemption save is the only one
  algorithm = dataclasses.replace(algorithm, scorer=SigtermDuring(at=2))
  with pytest.raises(preemption.Preempted) as e:
    loop.run(cfg, algorithm, state=state, train_step=train_step, mesh=mesh, evaluate=evaluate)
  assert e.value.code == preemption.PREEMPTED_EXIT and e.value.step == 2
  assert "[preemption] SIGTERM: saved iteration 2's checkpoint" in capsys.readouterr().out
  assert sorted(os.listdir(tmp_path / "preempted" / "checkpoints")) == ["2"]
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler was put back

  got, got_curve, _ = run(tmp_path / "preempted")
  assert "resumed from iteration 2" in capsys.readouterr().out
  jax.tree.map(np.testing.assert_array_equal, got.params, want.params)
  jax.tree.map(np.testing.assert_array_equal, got.opt_state, want.opt_state)
  assert got_curve == want_curve
