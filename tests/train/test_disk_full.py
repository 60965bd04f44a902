"""A full disk: when a checkpoint's writes fail (here: from step 8 on, files may not grow past
4 KB, RLIMIT_FSIZE, so the next checkpoint's ~5 KB metadata file fails with EFBIG, the errno
of a full disk's kind), the run stops with an error naming the failed checkpoint and the intact
one; the earlier checkpoints are unharmed, and a relaunch with space again resumes from the
intact one and ends bitwise where an uninterrupted run ends."""
import re
import subprocess

import numpy as np

from rlhf_jax.train import checkpoint
from test_train_resume import STEPS, _cmd, _committed_steps, _env, _final_params


def test_a_failed_save_stops_the_run_and_keeps_the_previous_checkpoint(tmp_path):
  straight, full = tmp_path / "straight", tmp_path / "full"
  subprocess.run(_cmd(straight), env=_env(), check=True, capture_output=True, timeout=300)
  proc = subprocess.run(_cmd(full) + ["--disk-full-at", "8"], env=_env(), capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode != 0
  assert not (full / "final_params.npz").exists()
  last_line = proc.stderr.strip().splitlines()[-1]
  assert last_line.startswith(checkpoint.CheckpointWriteError.__module__ + ".CheckpointWriteError")
  match = re.search(r"could not write checkpoint (\d+) under .*: the disk is full .*"
                    r"checkpoint (\d+) is intact", last_line)
  assert match, last_line
  failed, intact = int(match[1]), int(match[2])
  assert intact < failed < STEPS
  assert _committed_steps(full)[-1] == intact  # the failed one never became a checkpoint

  resumed = subprocess.run(_cmd(full), env=_env(), check=True, capture_output=True, text=True,
                           timeout=300)
  assert f"resumed from step {intact}" in resumed.stdout
  assert "damaged" not in resumed.stdout  # the intact checkpoint restored as it was
  want, got = _final_params(straight), _final_params(full)
  for k in want:
    assert np.array_equal(want[k], got[k]), k
