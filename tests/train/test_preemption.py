"""Preemption: a SIGTERM makes the training loop save a checkpoint at the next step and exit
with status 85; the relaunched command resumes from it and ends bitwise where an uninterrupted
run ends. Past --preempt_deadline_s the process exits with 86 at once, its lock released and
the previous checkpoint intact. (Several processes: tests/distributed/.)"""
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from rlhf_jax.train import preemption, workdir_lock
from test_train_resume import SAVE_EVERY, STEPS, _cmd, _committed_steps, _env, _final_params


def _logged_steps(workdir) -> int:
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      return sum(1 for _ in f)
  except FileNotFoundError:
    return 0


def _sigterm_after(cmd, workdir, steps: int):
  """Starts cmd, sends SIGTERM once `steps` steps are logged; returns the finished process."""
  proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  deadline = time.time() + 240
  while _logged_steps(workdir) < steps and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=240)
  return proc, out, err


def test_sigterm_saves_exits_85_and_the_relaunch_resumes_bitwise(tmp_path):
  straight, preempted = tmp_path / "straight", tmp_path / "preempted"
  subprocess.run(_cmd(straight), env=_env(), check=True, capture_output=True, timeout=300)
  proc, out, err = _sigterm_after(_cmd(preempted, sleep=0.3), preempted, 4)
  assert proc.returncode == preemption.PREEMPTED_EXIT, err[-3000:]
  saved = _committed_steps(preempted)[-1]
  assert 4 <= saved < STEPS and saved % SAVE_EVERY, f"not a preemption save: {saved}"
  assert f"[preemption] SIGTERM: saved checkpoint {saved}" in out
  assert not os.path.exists(preempted / workdir_lock.LOCK)

  resumed = subprocess.run(_cmd(preempted), env=_env(), check=True, capture_output=True,
                           text=True, timeout=300)
  assert f"resumed from step {saved}" in resumed.stdout
  want, got = _final_params(straight), _final_params(preempted)
  assert want.keys() == got.keys()
  for k in want:
    assert np.array_equal(want[k], got[k]), k


def test_past_the_deadline_exits_86_with_the_previous_checkpoint_intact(tmp_path):
  """Each step sleeps 2 s, the deadline is 0.3 s: the notice arrives mid-step, the step cannot
  end in time, so no save happens and the process leaves at the deadline."""
  workdir = tmp_path / "run"
  cmd = _cmd(workdir, sleep=2.0) + ["--preempt-deadline", "0.3"]
  proc, out, err = _sigterm_after(cmd, workdir, SAVE_EVERY + 1)
  assert proc.returncode == preemption.PREEMPTED_UNSAVED_EXIT, err[-3000:]
  assert "no checkpoint saved within --preempt_deadline_s=0.3" in out
  assert _committed_steps(workdir) == [SAVE_EVERY]
  assert not os.path.exists(workdir / workdir_lock.LOCK)  # the relaunch is not refused
  resumed = subprocess.run(_cmd(workdir), env=_env(), check=True, capture_output=True,
                           text=True, timeout=300)
  assert f"resumed from step {SAVE_EVERY}" in resumed.stdout


def test_a_deadline_must_be_positive(tmp_path):
  with pytest.raises(ValueError, match="--preempt_deadline_s must be > 0"):
    preemption.Watch(str(tmp_path), 0)
