"""The command line: a user error is one message and the usage status, not a traceback, and
--verbose gives the traceback back."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
FLAGS = "--flagfile=experiments/configs/ppo_tiny.flags"


def _run(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "experiments.ppo", FLAGS, *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("flag, message", [
    ("--kl_coef=-1", "--kl_coef must be >= 0, got -1.0"),
    ("--no_such_flag=1", "Unknown command line flag 'no_such_flag'"),
    ("--init_hf=somewhere", "--init_hf, --reward_hf and --export_hf need --prompt_files"),
])
def test_a_user_error_is_one_message_and_the_usage_status(flag, message):
  proc = _run(flag)
  assert proc.returncode == 2, proc.stderr
  assert "Traceback" not in proc.stderr
  errors = [line for line in proc.stderr.splitlines() if "error:" in line]
  assert len(errors) == 1 and errors[0].startswith("python -m experiments.ppo: error: ")
  assert message in errors[0]


def test_verbose_keeps_the_traceback():
  proc = _run("--kl_coef=-1", "--verbose")
  assert proc.returncode not in (0, 2)
  assert "Traceback" in proc.stderr and "--kl_coef must be >= 0" in proc.stderr
