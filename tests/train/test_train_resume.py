"""Exact resume: SIGKILL a training process mid-run, restart it, and get bitwise the same
final params as an uninterrupted run: a restart must resume from exactly the state the killed
run had checkpointed, with nothing recomputed differently."""
import os
import signal
import subprocess
import sys
import time

import numpy as np

import toy_train

from rlhf_jax import runtime

SCRIPT = os.path.join(os.path.dirname(__file__), "toy_train.py")
STEPS, SAVE_EVERY = 12, 3


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             RLHF_JAX_CACHE_DIR=runtime.enable_compilation_cache())
  env.pop("XLA_FLAGS", None)  # one device, like a plain run
  return env


def _cmd(workdir, sleep=0.0):
  return [sys.executable, SCRIPT, str(workdir), "--steps", str(STEPS),
          "--save-every", str(SAVE_EVERY), "--sleep", str(sleep)]


def _committed_steps(workdir):
  ckpt = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt):
    return []
  return sorted(int(d) for d in os.listdir(ckpt)
                if d.isdigit() and os.path.exists(os.path.join(ckpt, d, "commit_success.txt")))


def _final_params(workdir):
  with np.load(os.path.join(workdir, "final_params.npz")) as f:
    return {k: f[k] for k in f.files}


def test_sigkill_and_resume_is_bitwise_exact(tmp_path):
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  # The uninterrupted run goes alongside the one that gets killed.
  baseline = subprocess.Popen(_cmd(straight), env=_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  proc = subprocess.Popen(_cmd(killed, sleep=0.3), env=_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while not _committed_steps(killed) and time.time() < deadline and proc.poll() is None:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  at_kill = _committed_steps(killed)
  assert at_kill and at_kill[-1] < STEPS, f"kill missed the middle of training: {at_kill}"
  assert not os.path.exists(killed / "final_params.npz")

  resumed = subprocess.run(_cmd(killed), env=_env(), check=True, capture_output=True,
                           text=True, timeout=300)
  assert f"resumed from step {at_kill[-1]}" in resumed.stdout

  _, err = baseline.communicate(timeout=300)
  assert baseline.returncode == 0, err[-3000:]
  want, got = _final_params(straight), _final_params(killed)
  assert want.keys() == got.keys()
  for k in want:
    assert np.array_equal(want[k], got[k]), k
  # Guard: training moved the params, so the equality above is not vacuous.
  assert not np.array_equal(want["['embed']"], np.asarray(toy_train.init_params(0)["embed"]))
