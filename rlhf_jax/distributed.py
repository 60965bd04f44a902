"""Joining a multi-process JAX job (a TPU pod slice, a GPU cluster, several processes on one
machine) before anything touches a device.

Where a process learns its place, in this order:

  flags       --coordinator_address=HOST:PORT --num_processes=N --process_id=I, on the
              command line of every process (process 0 hosts the coordinator at HOST:PORT)
  Cloud TPU   a TPU VM or GKE TPU pod (libtpu installed and TPU chips present): JAX reads the
              slice's workers from the VM's metadata or the pod's environment
  SLURM       a job step started by srun with more than one task (SLURM_NTASKS > 1)
  Open MPI    mpirun with more than one rank (OMPI_COMM_WORLD_SIZE > 1)
  otherwise   one process: nothing to join, no flag needed

Every experiment joins through experiments/cli.py, so the same command runs on a laptop and on
every worker of a pod. A process that cannot reach the coordinator fails within
--distributed_timeout_s with an error naming the address, never hangs; once joined, a process
whose peer dies is ended by JAX's heartbeat within --heartbeat_timeout_s. On CPU the processes'
collectives go over gloo (XLA's CPU client has no other cross-process transport), which is what
lets tests run a multi-process job on one machine.
"""
import ctypes
import dataclasses
import glob
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Mapping, Sequence

import jax
from jax.experimental import multihost_utils

from rlhf_jax.pipeline import config


class DistributedStartupError(RuntimeError):
  """This process could not join its multi-process job: what is wrong and how to fix it."""


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  coordinator_address: str = config.flag(
      "", "HOST:PORT of process 0's coordinator; with --num_processes and --process_id. Empty: "
      "detected from the environment (Cloud TPU, SLURM, Open MPI), else a single process.")
  num_processes: int = config.flag(0, "Processes in the job (0: from the environment).")
  process_id: int = config.flag(-1, "This process's index in 0..num_processes-1 (-1: from "
                                "the environment).")
  distributed_timeout_s: int = config.flag(
      300, "Seconds to wait for the coordinator and for every process to join.")
  heartbeat_timeout_s: int = config.flag(
      100, "Seconds without a heartbeat after which the job's other processes are ended.")

  def __post_init__(self):
    given = {"--coordinator_address": bool(self.coordinator_address),
             "--num_processes": self.num_processes != 0,
             "--process_id": self.process_id != -1}
    if any(given.values()) and not all(given.values()):
      missing = ", ".join(k for k, v in given.items() if not v)
      raise ValueError(f"joining a job by flags needs --coordinator_address, --num_processes and "
                       f"--process_id together; missing {missing} (or give none of them to "
                       f"detect the job from the environment)")
    if self.coordinator_address:
      host, _, port = self.coordinator_address.rpartition(":")
      if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--coordinator_address={self.coordinator_address!r}: expected "
                         f"HOST:PORT, e.g. 10.0.0.2:1234 (process 0's address and a free port)")
      if self.num_processes < 1:
        raise ValueError(f"--num_processes={self.num_processes}: must be at least 1")
      if not 0 <= self.process_id < self.num_processes:
        raise ValueError(f"--process_id={self.process_id}: must be in 0..{self.num_processes - 1} "
                         f"(--num_processes={self.num_processes})")
    if self.distributed_timeout_s < 1 or self.heartbeat_timeout_s < 1:
      raise ValueError(f"--distributed_timeout_s={self.distributed_timeout_s} and "
                       f"--heartbeat_timeout_s={self.heartbeat_timeout_s} must be positive")

  @property
  def explicit(self) -> bool:
    return bool(self.coordinator_address)


FLAG_NAMES = tuple(f.name for f in dataclasses.fields(DistributedConfig))


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """(this module's flags, the rest): the job's topology is given per launch on the command
  line, apart from an experiment's flags (and its flagfiles, which stay machine-independent)."""
  mine, rest = [], []
  for arg in argv:
    name = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
    (mine if name in FLAG_NAMES else rest).append(arg)
  return mine, rest


def _int(env: Mapping[str, str], name: str) -> int:
  try:
    return int(env.get(name, "0"))
  except ValueError:
    return 0


def _on_cloud_tpu() -> bool:
  """libtpu installed and TPU chips on the PCI bus (/dev/accel* on v2-v4, /dev/vfio on v5+):
  JAX then finds the slice's workers itself (one worker is a job of one)."""
  return (importlib.util.find_spec("libtpu") is not None
          and bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")))


def detect_environment(env: Mapping[str, str] | None = None, *, on_tpu=None) -> str | None:
  """The multi-process environment this process runs in: "tpu", "slurm", "mpi" or None (a
  single process). SLURM and MPI count only with more than one task: a one-task allocation
  runs like a laptop."""
  env = os.environ if env is None else env
  on_tpu = _on_cloud_tpu() if on_tpu is None else on_tpu
  if on_tpu:
    return "tpu"
  slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
  if all(k in env for k in slurm) and _int(env, "SLURM_NTASKS") > 1:
    return "slurm"
  if "OMPI_MCA_orte_hnp_uri" in env and _int(env, "OMPI_COMM_WORLD_SIZE") > 1:
    return "mpi"
  return None


def wait_for_coordinator(address: str, timeout_s: float) -> None:
  """Returns once HOST:PORT accepts a TCP connection; raises DistributedStartupError after
  timeout_s. JAX's own client aborts the process (a C++ fatal error, no Python exception) when
  registration times out; checking first lets the error say what to fix."""
  host, _, port = address.rpartition(":")
  deadline = time.monotonic() + timeout_s
  last = None
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=min(2.0, timeout_s)):
        return
    except OSError as e:
      last = e
    if time.monotonic() >= deadline:
      raise DistributedStartupError(
          f"could not reach the coordinator at {address} within {timeout_s:g} s ({last}). Is "
          f"process 0 running with the same --coordinator_address, and is {address} its "
          f"address as seen from this machine (not 127.0.0.1 across hosts), with the port open? "
          f"Raise --distributed_timeout_s if process 0 starts later than the others.")
    time.sleep(0.25)


def join(cfg: DistributedConfig, env: Mapping[str, str] | None = None) -> str | None:
  """Joins the job cfg or the environment describes (before any device is touched); returns
  how ("flags", "tpu", "slurm", "mpi") or None for a single process."""
  how = "flags" if cfg.explicit else detect_environment(env)
  if how is None or (how == "flags" and cfg.num_processes == 1):
    return None
  # Only the CPU client reads this (GPU and TPU have their own transports); without it, CPU
  # processes would join the job but could not run a computation across it.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  timeouts = dict(initialization_timeout=cfg.distributed_timeout_s,
                  heartbeat_timeout_seconds=cfg.heartbeat_timeout_s)
  if how == "flags":
    if cfg.process_id != 0:
      wait_for_coordinator(cfg.coordinator_address, cfg.distributed_timeout_s)
    print(f"[distributed] process {cfg.process_id} of {cfg.num_processes}, coordinator "
          f"{cfg.coordinator_address}; waiting up to {cfg.distributed_timeout_s} s for all "
          f"to join", flush=True)
    jax.distributed.initialize(cfg.coordinator_address, cfg.num_processes, cfg.process_id,
                               **timeouts)
  else:
    print(f"[distributed] joining the {how} job (detected from the environment); waiting up "
          f"to {cfg.distributed_timeout_s} s for all processes", flush=True)
    jax.distributed.initialize(**timeouts)
  return how


# Set in the child that does a supervised process's work (supervise below).
SUPERVISED_ENV = "RLHF_JAX_SUPERVISED"
# The exit status of a process whose job lost a peer (a process died or was killed).
PEER_LOST_STATUS = 75


def multi_process(cfg: DistributedConfig, env: Mapping[str, str] | None = None) -> bool:
  """Whether this process is one of several in a job (flags or the environment)."""
  if cfg.explicit:
    return cfg.num_processes > 1
  return detect_environment(env) is not None


def _die_with_parent() -> None:
  """Linux: the child is killed when its supervisor dies (a SIGKILLed process of the job must
  not leave its work running as an orphan)."""
  if sys.platform.startswith("linux"):
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def supervise(command: Sequence[str]) -> int:
  """Runs this process's work in a child (`command` with SUPERVISED_ENV set) and returns its
  exit status, forwarding SIGTERM/SIGINT to it.

  Why: when a peer of a multi-process job dies, the collective library aborts the surviving
  processes from C++ (gloo: "Received data size doesn't match expected size. Is there a
  distributed collective mismatch?"), a message that names the wrong cause, and no Python code
  runs after it. The supervisor sees the child die of a signal and says what happened instead,
  exiting with PEER_LOST_STATUS so a launcher can tell it from a failure of the run itself."""
  child = subprocess.Popen(list(command), env=dict(os.environ, **{SUPERVISED_ENV: "1"}),
                           preexec_fn=_die_with_parent)
  forward = lambda sig, _frame: child.send_signal(sig)
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, forward)
  rc = child.wait()
  if rc < 0 and -rc not in (signal.SIGTERM, signal.SIGINT):
    print(f"[distributed] this process's work ended by signal {signal.Signals(-rc).name}: its "
          f"job lost a peer (another process died, was killed or lost its network), which "
          f"aborts every collective. Look for the first process that failed in the job's "
          f"logs; relaunch the whole job to resume from the last checkpoint.",
          file=sys.stderr, flush=True)
    return PEER_LOST_STATUS
  return rc if rc >= 0 else 128 - rc


def is_writer() -> bool:
  """Process 0 writes every file the processes of a job share (logs, metrics, TensorBoard,
  resolved flags, results, figures, stage markers, exports); the others compute the same values
  and write nothing but their own checkpoint shards (orbax's multi-host saves)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Every process waits here until all have arrived: what process 0 wrote before it (a stage's
  marker and results) is on disk before any process reads it. A no-op in one process."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def refuse_multi_process(num_processes: int, what: str) -> None:
  """Experiments that have not been made process-count independent (sweeps, online DPO,
  Nash-MD, best-of-n) stop here in a multi-process job instead of training every process on the
  whole batch and writing the same files."""
  if num_processes > 1:
    raise DistributedStartupError(
        f"joined a job of {num_processes} processes, but {what} runs in one process only (its "
        f"host-side sampling and outputs are not split across processes). Run it as one process "
        f"(all of a host's devices are used: 8 GPUs or a v5e-8 TPU VM in one process); "
        f"pretrain, SFT, reward, DPO, PPO and GRPO/RLOO/GSPO/REINFORCE++ run on many.")
