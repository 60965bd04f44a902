"""Shell hygiene of the launchers: every dry run is a bash script that shellcheck passes
(what a user pastes must mean what the launcher runs), and so is any shell script in launch/."""
import pathlib

import pytest

import launch_testing as lt
from launch import common, gke, slurm, tpu_vm

TPU = ["--name=rlhf-v5e", "--project=my-proj", "--zone=us-west4-a"]
# Arguments that need quoting: spaces, quotes, dollars, a glob.
HARD = ["python", "-m", "experiments.sft", "--flagfile=experiments/configs/sft_tiny.flags",
        "--note=it's a $test", "--glob=*"]

DRY_RUNS = {
    "tpu_vm create": (tpu_vm.build, ["create", *TPU, "--accelerator_type=v5litepod-16",
                                     "--queued", "--spot"]),
    "tpu_vm copy": (tpu_vm.build, ["copy", *TPU]),
    "tpu_vm install": (tpu_vm.build, ["install", *TPU]),
    "tpu_vm run": (tpu_vm.build, ["run", *TPU, "--", *HARD]),
    "tpu_vm run detached": (tpu_vm.build, ["run", *TPU, "--detach", "--", *HARD]),
    "tpu_vm logs": (tpu_vm.build, ["logs", *TPU, "--run_name=sft_tiny"]),
    "tpu_vm delete": (tpu_vm.build, ["delete", *TPU, "--queued"]),
    "gke apply tpu": (gke.build, ["apply", "--name=a", "--image=i", "--tpu_type=v4-32", "--",
                                  *HARD]),
    "gke apply gpu": (gke.build, ["apply", "--name=a", "--image=i", "--num_nodes=2",
                                  "--gpu_type=nvidia-h100-80gb", "--", *HARD]),
    # xpk refuses quotes in the command (its manifest puts the command between quotes).
    "gke xpk": (gke.build, ["xpk", "--name=a", "--image=i", "--gpu_type=nvidia-h100-80gb",
                            "--cluster=c", "--project=p", "--zone=us-west4-a", "--",
                            *HARD[:-2], "--note=a $test", "--glob=*"]),
    "gke logs": (gke.build, ["logs", "--name=a"]),
    "slurm": (slurm.build, ["--nodes=2", "--", *HARD]),
}


@lt.needs_shellcheck
@pytest.mark.parametrize("name", DRY_RUNS)
def test_dry_run_output_passes_shellcheck(name, tmp_path):
  build, argv = DRY_RUNS[name]
  path = tmp_path / "dry_run.sh"
  path.write_text(lt.dry_run(build, argv))
  # SC2016 ("expressions don't expand in single quotes"): the $(hostname) and ${NNODES} in
  # quotes are meant for the remote shell, not this one.
  result = lt.shellcheck(path, "--exclude=SC2016")
  assert result.returncode == 0, result.stdout


# Shell scripts kept in launch/ (none yet: the launchers are Python) are held to the same bar.
SCRIPTS = sorted(pathlib.Path(common.REPO_ROOT, "launch").rglob("*.sh"))


@lt.needs_shellcheck
@pytest.mark.parametrize("script", SCRIPTS, ids=str)
def test_shell_scripts_in_launch_pass_shellcheck(script):
  result = lt.shellcheck(script)
  assert result.returncode == 0, result.stdout


@lt.needs_shellcheck
def test_shellcheck_catches_bad_quoting(tmp_path):
  """The check above can fail: an unquoted variable in a script is reported."""
  path = tmp_path / "bad.sh"
  path.write_text("#!/bin/bash\nrm -rf $1/build\n")
  assert lt.shellcheck(path).returncode != 0
