"""Starts a job of several CPU processes on this machine (127.0.0.1, gloo collectives): what
the multi-process tests run, and a command for running one by hand:

    python tests/distributed/launch_job.py 2 4 experiments.pretrain --flagfile=... --smoke
"""
import os
import socket
import subprocess
import sys

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start(module: str, args, *, processes: int, devices: int, extra_env=None,
          timeout_s: int = 120) -> list[subprocess.Popen]:
  """`python -m module args` as each process of a job of `processes` x `devices` CPU devices
  (a single process joins nothing). The non-coordinators start first: they wait for it."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", **(extra_env or {}))
  port = free_port()
  procs = []
  for i in reversed(range(processes)):
    job = ([f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}",
            f"--process_id={i}", f"--distributed_timeout_s={timeout_s}"] if processes > 1 else [])
    procs.append(subprocess.Popen([sys.executable, "-m", module, *args, *job], cwd=REPO_ROOT,
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True))
  return procs[::-1]  # process i at index i


def run(module: str, args, *, processes: int, devices: int, timeout_s: int = 900) -> list[str]:
  """Runs the job to its end; every process's output. Raises with the outputs' tails if a
  process failed."""
  procs = start(module, args, processes=processes, devices=devices)
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=timeout_s)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  if any(p.returncode for p in procs):
    tails = "\n".join(f"--- process {i} (exit {p.returncode}) ---\n{o[-4000:]}"
                      for i, (p, o) in enumerate(zip(procs, outs)))
    raise RuntimeError(f"{module} failed in a job of {processes} processes:\n{tails}")
  return outs


if __name__ == "__main__":
  for i, out in enumerate(run(sys.argv[3], sys.argv[4:], processes=int(sys.argv[1]),
                              devices=int(sys.argv[2]))):
    print(f"--- process {i} ---\n{out}")
