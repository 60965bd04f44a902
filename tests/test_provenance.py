"""rlhf_jax.provenance: each fact against an independent reading of the same source (the
libraries' own __version__, jax.devices(), /proc/cpuinfo parsed here, git run here)."""
import json
import platform
import subprocess

import flax
import jax
import numpy as np
import optax
import pytest

from rlhf_jax import provenance


def _cpuinfo_flags() -> set[str] | None:
  """The flags line of /proc/cpuinfo, parsed without the library's helper."""
  try:
    with open("/proc/cpuinfo") as f:
      lines = f.read().splitlines()
  except OSError:
    return None
  for line in lines:
    if line.startswith("flags"):
      return set(line.split(":", 1)[1].split())
  return set()


def test_versions_are_the_imported_libraries():
  versions = provenance.provenance()["versions"]
  assert set(versions) == set(provenance.PACKAGES)
  assert versions["jax"] == jax.__version__
  assert versions["flax"] == flax.__version__
  assert versions["optax"] == optax.__version__
  assert versions["numpy"] == np.__version__


def test_a_missing_package_is_none(monkeypatch):
  monkeypatch.setattr(provenance, "PACKAGES", ("jax", "no-such-package-rlhf-jax"))
  assert provenance.provenance()["versions"] == {"jax": jax.__version__,
                                                 "no-such-package-rlhf-jax": None}


def test_devices_name_each_device():
  devices = provenance.provenance()["devices"]
  assert len(devices) == len(jax.devices()) == 8  # conftest's 8 fake CPU devices
  assert devices == [f"cpu:{i}" for i in range(8)]


def test_cpu_flags_agree_with_proc_cpuinfo():
  facts = provenance.provenance()
  assert set(facts["cpu_flags"]) <= set(provenance.CPU_FLAGS)
  flags = _cpuinfo_flags()
  if flags is None:
    pytest.skip("no /proc/cpuinfo")
  assert facts["cpu_flags"] == [f for f in provenance.CPU_FLAGS if f in flags]
  assert facts["cpu"]


def test_without_cpuinfo_the_processor_and_no_flags(monkeypatch):
  monkeypatch.setattr(provenance, "_cpuinfo", lambda: {})
  facts = provenance.provenance()
  assert facts["cpu"] == platform.processor() and facts["cpu_flags"] == []


def test_round_trips_through_json():
  facts = provenance.provenance()
  assert json.loads(json.dumps(facts)) == facts


def test_xla_flags_are_reported(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
  assert provenance.provenance()["xla_flags"] == "--xla_cpu_enable_fast_math=false"
  monkeypatch.delenv("XLA_FLAGS")
  assert provenance.provenance()["xla_flags"] == ""


def test_code_version_is_the_commit_unless_pinned(monkeypatch):
  monkeypatch.delenv("RLHF_JAX_CODE_VERSION", raising=False)  # a developer's own pin
  try:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=provenance._REPO,
                          capture_output=True, text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    pytest.skip("the library is not in a git checkout")
  facts = provenance.provenance()
  assert facts["code_version"] == head and isinstance(facts["dirty"], bool)
  monkeypatch.setenv("RLHF_JAX_CODE_VERSION", "dev-test")
  assert provenance.provenance()["code_version"] == "dev-test"


def test_outside_a_checkout_the_code_is_unknown(monkeypatch, tmp_path):
  monkeypatch.delenv("RLHF_JAX_CODE_VERSION", raising=False)
  monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # no enclosing repo
  monkeypatch.setattr(provenance, "_REPO", tmp_path)
  facts = provenance.provenance()
  assert facts["code_version"] is None and facts["dirty"] is None
