"""Fixtures of the launcher tests."""
import subprocess

import pytest


@pytest.fixture
def nothing_runs(monkeypatch):
  """A dry run, or input refused, must start no process (the launchers' tests use it on every
  test: pytestmark = pytest.mark.usefixtures("nothing_runs"))."""
  def refuse(*args, **kwargs):
    raise AssertionError(f"a process was started: {args}")
  monkeypatch.setattr(subprocess, "run", refuse)
