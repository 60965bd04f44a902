"""A damaged latest checkpoint (its files truncated, as a full disk or a cut copy leaves them):
the run warns naming it and the one it falls back to, resumes from the previous checkpoint and
ends bitwise where an undamaged run ends; the damaged files are kept aside, not reused."""
import os
import subprocess

import numpy as np

from test_train_resume import _cmd, _env, _final_params


def _truncate_state_files(step_dir):
  files = [os.path.join(root, f) for root, _, names in os.walk(os.path.join(step_dir, "state"))
           for f in names]
  assert files
  for path in files:
    with open(path, "r+b") as f:
      f.truncate(max(0, os.path.getsize(path) // 3))


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous(tmp_path):
  straight, damaged = tmp_path / "straight", tmp_path / "damaged"
  for workdir in (straight, damaged):
    subprocess.run(_cmd(workdir), env=_env(), check=True, capture_output=True, text=True)
  baseline = _final_params(straight)
  os.remove(damaged / "final_params.npz")
  ckpt = damaged / "checkpoints"
  steps = sorted(int(d) for d in os.listdir(ckpt) if d.isdigit())
  assert len(steps) >= 2
  _truncate_state_files(ckpt / str(steps[-1]))
  proc = subprocess.run(_cmd(damaged), env=_env(), capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = proc.stdout + proc.stderr
  assert (f"checkpoint {steps[-1]} under" in out
          and f"resuming from checkpoint {steps[-2]} instead" in out), out[-2000:]
  assert f"resumed from step {steps[-2]}" in out
  resumed = _final_params(damaged)
  for k in baseline:
    np.testing.assert_array_equal(resumed[k], baseline[k])
  aside = os.listdir(damaged / "checkpoints_damaged")
  assert len(aside) == 1 and aside[0].startswith(f"{steps[-1]}-")


def test_every_checkpoint_damaged_is_a_clear_error(tmp_path):
  workdir = tmp_path / "run"
  subprocess.run(_cmd(workdir), env=_env(), check=True, capture_output=True, text=True)
  ckpt = workdir / "checkpoints"
  for d in os.listdir(ckpt):
    if d.isdigit():
      _truncate_state_files(ckpt / d)
  proc = subprocess.run(_cmd(workdir), env=_env(), capture_output=True, text=True)
  assert proc.returncode != 0
  assert "every checkpoint under" in proc.stderr and "fresh --workdir" in proc.stderr
