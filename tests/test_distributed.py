"""Joining a multi-process job (rlhf_jax/distributed.py): flag validation before anything
starts, detection of the job from the environment, a bounded wait for an unreachable
coordinator, and (in subprocesses) two CPU processes joining through the experiments' command
line."""
import os
import socket
import subprocess
import sys
import time

import pytest

from rlhf_jax import distributed
from rlhf_jax.pipeline import config

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
CONFIGS = os.path.join(REPO_ROOT, "experiments", "configs")


def _parse(*argv):
  return config.parse(distributed.DistributedConfig, list(argv))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_no_flags_is_a_single_process():
  cfg = _parse()
  assert not cfg.explicit
  assert distributed.detect_environment({}, on_tpu=False) is None


@pytest.mark.parametrize("argv,needle", [
    (["--coordinator_address=10.0.0.2:1234"], "missing --num_processes, --process_id"),
    (["--num_processes=2", "--process_id=1"], "missing --coordinator_address"),
    (["--coordinator_address=10.0.0.2", "--num_processes=2", "--process_id=0"], "HOST:PORT"),
    (["--coordinator_address=10.0.0.2:99999", "--num_processes=2", "--process_id=0"],
     "HOST:PORT"),
    (["--coordinator_address=10.0.0.2:1234", "--num_processes=2", "--process_id=2"],
     "must be in 0..1"),
    (["--distributed_timeout_s=0"], "must be positive"),
])
def test_bad_flags_are_refused_with_what_to_fix(argv, needle):
  with pytest.raises(ValueError, match=needle):
    _parse(*argv)


def test_split_argv_takes_only_the_job_flags_in_order():
  job, rest = distributed.split_argv(
      ["--flagfile=x.flags", "--num_processes=2", "--steps=3", "--process_id=1",
       "--coordinator_address=h:1", "--process_idx=7", "--heartbeat_timeout_s=5"])
  assert job == ["--num_processes=2", "--process_id=1", "--coordinator_address=h:1",
                 "--heartbeat_timeout_s=5"]
  assert rest == ["--flagfile=x.flags", "--steps=3", "--process_idx=7"]


SLURM = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "2",
         "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}


@pytest.mark.parametrize("env,on_tpu,expected", [
    ({}, True, "tpu"),
    (SLURM, False, "slurm"),
    ({**SLURM, "SLURM_NTASKS": "1"}, False, None),  # one task: runs like a laptop
    # the batch script itself (no srun step): one process
    ({k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"}, False, None),
    ({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "4"}, False, "mpi"),
    ({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "1"}, False, None),
])
def test_environment_detection(env, on_tpu, expected):
  assert distributed.detect_environment(env, on_tpu=on_tpu) == expected


def test_unreachable_coordinator_fails_within_its_timeout_naming_the_address():
  address = f"127.0.0.1:{_free_port()}"  # nothing listens there
  start = time.monotonic()
  with pytest.raises(distributed.DistributedStartupError, match=address):
    distributed.wait_for_coordinator(address, 1.0)
  assert time.monotonic() - start < 1.0 + 3.0  # the deadline plus one connection attempt


def test_reachable_coordinator_returns_at_once():
  with socket.socket() as server:
    server.bind(("127.0.0.1", 0))
    server.listen()
    start = time.monotonic()
    distributed.wait_for_coordinator(f"127.0.0.1:{server.getsockname()[1]}", 30.0)
    assert time.monotonic() - start < 5.0


def _experiment(process_id: int, port: int, *extra: str,
                name: str = "pretrain") -> subprocess.Popen:
  """`python -m experiments.<name>` as one process of a 2-process job of 4 CPU devices each."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  return subprocess.Popen(
      [sys.executable, "-m", f"experiments.{name}",
       f"--flagfile={os.path.join(CONFIGS, name + '_tiny.flags')}", "--smoke",
       "--workdir=/nonexistent/never-written", f"--coordinator_address=127.0.0.1:{port}",
       "--num_processes=2", f"--process_id={process_id}", "--distributed_timeout_s=60", *extra],
      cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_an_experiment_without_multi_process_support_joins_then_stops():
  """Both processes join the job (8 devices between them), then stop with the message that
  online DPO runs in one process only, before touching their workdir. (The experiments that
  do run in several processes: tests/distributed/.)"""
  port = _free_port()
  procs = [_experiment(i, port, name="online_dpo") for i in (1, 0)]  # the non-coordinator
  outs = [p.communicate(timeout=120)[0] for p in procs]  # first: it waits
  for p, out in zip(procs, outs):
    assert p.returncode != 0, out
    assert "joined a job of 2 processes, but OnlineDPOConfig runs in one process" in out, \
        out[-3000:]
  assert not os.path.exists("/nonexistent/never-written")


def test_a_process_without_its_coordinator_exits_with_a_clear_error():
  port = _free_port()
  proc = _experiment(1, port, "--distributed_timeout_s=2")
  start = time.monotonic()
  out = proc.communicate(timeout=60)[0]
  assert proc.returncode != 0
  assert f"could not reach the coordinator at 127.0.0.1:{port} within 2 s" in out, out[-3000:]
  assert time.monotonic() - start < 45  # start-up (imports) plus the 2 s deadline
