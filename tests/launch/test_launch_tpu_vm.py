"""launch.tpu_vm: the exact gcloud commands of each action's dry run, the quoting of the
command run on every worker, and the errors for bad input (before anything runs)."""
import os
import subprocess
import sys

import pytest

import launch_testing as lt
from launch import common, tpu_vm

WHERE = ["--name=rlhf-v5e", "--project=my-proj", "--zone=us-west4-a"]
GCLOUD_WHERE = ["--project=my-proj", "--zone=us-west4-a"]
SFT = ["python", "-m", "experiments.sft", "--flagfile=experiments/configs/sft_tiny.flags"]


pytestmark = pytest.mark.usefixtures("nothing_runs")  # tests/launch/conftest.py


def remote_script(line: str) -> str:
  """The bash script inside `gcloud ... ssh --command=...`, as the worker receives it."""
  command = [w for w in lt.words(line) if w.startswith("--command=")]
  assert len(command) == 1, line
  bash, dash_c, script = lt.words(command[0].removeprefix("--command="))
  assert (bash, dash_c) == ("bash", "-c")
  return script


def test_run_starts_the_same_command_on_every_worker(monkeypatch):
  out = lt.dry_run(tpu_vm.build, ["run", *WHERE, "--", *SFT, "--steps=3"])
  [line] = lt.commands(out)
  words = lt.words(line)
  assert words[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "rlhf-v5e", "--worker=all"]
  assert words[-2:] == GCLOUD_WHERE
  assert remote_script(line) == (
      "cd rlhf_jax && mkdir -p workdirs/logs/sft_tiny && . .venv/bin/activate && "
      "set -o pipefail && python -m experiments.sft "
      "--flagfile=experiments/configs/sft_tiny.flags --steps=3 2>&1 | "
      "tee workdirs/logs/sft_tiny/$(hostname).log")
  # No coordinator flags: JAX finds the other TPU VM workers itself.
  assert "--coordinator_address" not in out


def test_run_detached_outlives_the_ssh_session():
  [line] = lt.commands(lt.dry_run(tpu_vm.build, ["run", *WHERE, "--detach", "--run_name=a1",
                                                  "--", *SFT]))
  assert remote_script(line) == (
      "cd rlhf_jax && mkdir -p workdirs/logs/a1 && . .venv/bin/activate && "
      "(setsid nohup python -m experiments.sft --flagfile=experiments/configs/sft_tiny.flags "
      "> workdirs/logs/a1/$(hostname).log 2>&1 < /dev/null &)")


@pytest.mark.parametrize("args", [
    ["a b", "it's", '"q"', "$HOME", "`date`", "x;y", "!x", "back\\slash", "*", "--k=v w"],
    ["--criterion=accuracy_greedy>=0.5,accuracy_temp1>=0.4"],
])
def test_experiment_arguments_reach_the_worker_unchanged(args):
  """Two shells read the command (the local one, then bash -c on the worker): each argument
  must arrive as typed, whatever its quotes and dollars."""
  [line] = lt.commands(lt.dry_run(tpu_vm.build, ["run", *WHERE, "--run_name=r", "--",
                                                 "python", "-m", "experiments.sft", *args]))
  script = remote_script(line)
  prefix = "cd rlhf_jax && mkdir -p workdirs/logs/r && . .venv/bin/activate && " \
           "set -o pipefail && "
  suffix = " 2>&1 | tee workdirs/logs/r/$(hostname).log"
  assert script.startswith(prefix) and script.endswith(suffix)
  experiment = script[len(prefix):-len(suffix)]
  assert lt.words(experiment) == ["python", "-m", "experiments.sft", *args]


def test_queued_resource_spot_create():
  out = lt.dry_run(tpu_vm.build, ["create", *WHERE, "--accelerator_type=v5litepod-16",
                                  "--queued", "--spot"])
  assert lt.commands(out) == [
      "gcloud compute tpus queued-resources create rlhf-v5e-qr --node-id=rlhf-v5e "
      "--accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite --spot "
      "--project=my-proj --zone=us-west4-a"]
  assert "# v5litepod-16: 16 chips on 4 workers" in out


@pytest.mark.parametrize("extra, expected", [
    (["--accelerator_type=v4-32", "--preemptible"],
     "--accelerator-type=v4-32 --version=tpu-ubuntu2204-base --preemptible"),
    (["--accelerator_type=v5p-16", "--version=v2-alpha-tpuv5-custom"],
     "--accelerator-type=v5p-16 --version=v2-alpha-tpuv5-custom"),
    (["--accelerator_type=v6e-8", "--spot"],
     "--accelerator-type=v6e-8 --version=v2-alpha-tpuv6e --spot"),
])
def test_tpu_vm_create(extra, expected):
  out = lt.dry_run(tpu_vm.build, ["create", *WHERE, *extra])
  assert lt.commands(out) == [
      f"gcloud compute tpus tpu-vm create rlhf-v5e {expected} --project=my-proj "
      "--zone=us-west4-a"]


def test_copy_archives_the_tree_without_venv_and_workdirs():
  archive = common.GENERATED_DIR / "rlhf-v5e-repo.tar.gz"
  mkdir, tar, scp, unpack = lt.commands(lt.dry_run(tpu_vm.build,
                                                   ["copy", *WHERE, "--exclude=checkpoints"]))
  assert lt.words(mkdir) == ["mkdir", "-p", str(archive.parent)]
  assert lt.words(tar) == [
      "tar", "-czf", str(archive), "--exclude=.venv", "--exclude=workdirs",
      "--exclude=__pycache__", "--exclude=*.egg-info", "--exclude=.pytest_cache",
      "--exclude=.jax_cache", "--exclude=checkpoints", "-C", str(common.REPO_ROOT), "."]
  assert lt.words(scp) == ["gcloud", "compute", "tpus", "tpu-vm", "scp", str(archive),
                           "rlhf-v5e:rlhf_jax-repo.tar.gz", "--worker=all", *GCLOUD_WHERE]
  assert "--worker=all" in unpack
  assert remote_script(unpack) == ("mkdir -p rlhf_jax && tar -xzf rlhf_jax-repo.tar.gz -C "
                                   "rlhf_jax && rm rlhf_jax-repo.tar.gz")


def test_install_makes_a_tpu_venv_on_every_worker():
  [line] = lt.commands(lt.dry_run(tpu_vm.build, ["install", *WHERE]))
  assert "--worker=all" in lt.words(line)
  assert remote_script(line) == (
      "cd rlhf_jax && sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive "
      "apt-get install -y -qq python3.11 python3.11-venv && python3.11 -m venv .venv && "
      ".venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -e \".[tpu]\" && "
      ".venv/bin/python -c \"import jax; print(jax.__version__)\"")
  [line] = lt.commands(lt.dry_run(tpu_vm.build, ["install", *WHERE, "--noapt_install",
                                                 "--python=python3.12"]))
  assert remote_script(line).startswith("cd rlhf_jax && python3.12 -m venv .venv && ")


def test_logs_follow_one_worker():
  [line] = lt.commands(lt.dry_run(tpu_vm.build, ["logs", *WHERE, "--worker=3",
                                                 "--run_name=sft_tiny"]))
  assert "--worker=3" in lt.words(line)
  assert remote_script(line) == "tail -n +1 -F rlhf_jax/workdirs/logs/sft_tiny/*.log"
  # The run name can also come from the run's own command.
  [again] = lt.commands(lt.dry_run(tpu_vm.build, ["logs", *WHERE, "--worker=3", "--", *SFT]))
  assert again == line


@pytest.mark.parametrize("extra, expected", [
    ([], "gcloud compute tpus tpu-vm delete rlhf-v5e --project=my-proj --zone=us-west4-a"),
    (["--queued"], "gcloud compute tpus queued-resources delete rlhf-v5e-qr --force "
                   "--project=my-proj --zone=us-west4-a"),
])
def test_delete(extra, expected):
  assert lt.commands(lt.dry_run(tpu_vm.build, ["delete", *WHERE, *extra])) == [expected]


@pytest.mark.parametrize("argv, message", [
    ([*WHERE], "give an action first"),
    (["start", *WHERE], "give an action first"),
    (["delete", "--name=x", "--project=p"], "--zone is required"),
    (["delete", "--name=x", "--zone=us-west4-a"], "--project is required"),
    (["delete", "--name=x", "--project=p", "--zone=us-west4"], "--zone='us-west4' is not valid"),
    (["delete", "--name=My_TPU", "--project=p", "--zone=us-west4-a"], "--name='My_TPU'"),
    (["create", *WHERE], "--accelerator_type is required"),
    (["create", *WHERE, "--accelerator_type=v5e-16"], "spelled v5litepod-16"),
    (["create", *WHERE, "--accelerator_type=tpu-16"], "not a TPU type this launcher knows"),
    (["create", *WHERE, "--accelerator_type=v4-7"], "multiple of 2"),
    (["create", *WHERE, "--accelerator_type=v5litepod-18"], "4 chips per host"),
    (["create", *WHERE, "--accelerator_type=v4-8", "--spot", "--preemptible"],
     "--spot and --preemptible"),
    (["create", *WHERE, "--accelerator_type=v4-8", "--queued", "--preemptible"],
     "use --queued --spot"),
    (["run", *WHERE], "no experiment command: put it after `--`"),
    (["run", *WHERE, "--", " "], "no experiment command"),
    (["copy", *WHERE, "--", *SFT], "`copy` takes no command"),
    (["logs", *WHERE], "--run_name"),
    (["delete", *WHERE, "--zonee=us-west4-a"], "Unknown command line flag 'zonee'"),
])
def test_bad_input_is_refused_before_anything_runs(argv, message, capsys):
  assert common.main(tpu_vm.build, argv) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and message in err, err


def test_without_dry_run_the_commands_run_in_order(monkeypatch):
  ran = []
  monkeypatch.setattr(subprocess, "run", lambda argv, check: ran.append(list(argv)))
  assert common.main(tpu_vm.build, ["delete", *WHERE, "--queued"]) == 0
  assert ran == [["gcloud", "compute", "tpus", "queued-resources", "delete", "rlhf-v5e-qr",
                  "--force", *GCLOUD_WHERE]]


def test_a_failing_command_stops_the_launcher_with_its_status(monkeypatch, capsys):
  def fail(argv, check):
    raise subprocess.CalledProcessError(3, argv)
  monkeypatch.setattr(subprocess, "run", fail)
  assert common.main(tpu_vm.build, ["delete", *WHERE]) == 3
  assert "exited with status 3" in capsys.readouterr().err


def test_module_entry_point(monkeypatch):
  monkeypatch.undo()  # this test starts the launcher itself
  env = {**os.environ, "PYTHONPATH": str(common.REPO_ROOT)}
  ok = subprocess.run([sys.executable, "-m", "launch.tpu_vm", "delete", *WHERE, "--dry_run"],
                      capture_output=True, text=True, env=env, cwd=common.REPO_ROOT)
  assert ok.returncode == 0, ok.stderr
  assert ok.stdout == ("gcloud compute tpus tpu-vm delete rlhf-v5e --project=my-proj "
                       "--zone=us-west4-a\n")
  bad = subprocess.run([sys.executable, "-m", "launch.tpu_vm", "run", *WHERE, "--dry_run"],
                       capture_output=True, text=True, env=env, cwd=common.REPO_ROOT)
  assert bad.returncode == 2 and "no experiment command" in bad.stderr
