"""One run per workdir: a second run on the same --workdir would interleave two runs'
checkpoints, metrics and outputs. A training loop holds <workdir>/LOCK while it runs: the file
is created exclusively (O_EXCL), names the holder (host, pid, start time) and is removed when
the loop ends, however it ends.

A LOCK left by a run that was killed (SIGKILL, a preempted VM) is stale: on the same host its
pid no longer runs (or is another program's), and it is taken over with a note. A LOCK from
another host cannot be checked from here: the run is refused, naming the holder and how to
clear it. In a multi-process job process 0 holds the lock for the job.
"""
import contextlib
import json
import os
import socket
import time

from rlhf_jax import distributed

LOCK = "LOCK"


class WorkdirLockedError(RuntimeError):
  """Another live run holds the workdir."""


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


def _holder(path: str) -> dict | None:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):  # vanished meanwhile, or half written by a killed run
    return None


def acquire(workdir: str, *, print_fn=print) -> str:
  """Creates <workdir>/LOCK for this process; returns its path. Raises WorkdirLockedError
  when a live run holds it; takes over a stale one."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK)
  me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
  for _ in range(2):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
      holder = _holder(path)
      same_host = holder is not None and holder.get("host") == me["host"]
      if holder is not None and not same_host:
        raise WorkdirLockedError(
            f"{workdir} is held by a run on host {holder.get('host')} (pid {holder.get('pid')}, "
            f"since {time.ctime(holder.get('started', 0))}). Use another --workdir; if that "
            f"run is gone, remove {path}") from None
      if holder is not None and _alive(int(holder.get("pid", -1))):
        raise WorkdirLockedError(
            f"{workdir} is in use by a running process (pid {holder['pid']} on this host, "
            f"since {time.ctime(holder.get('started', 0))}): two runs on one workdir would mix "
            "their checkpoints and metrics. Wait for it or use another --workdir") from None
      print_fn(f"[workdir] {path} was left by a run that no longer runs "
               f"({holder or 'unreadable'}); taking it over")
      os.remove(path)
      continue
    with os.fdopen(fd, "w") as f:
      json.dump(me, f)
    return path
  raise WorkdirLockedError(f"could not create {path}: another run took it meanwhile")


def release(path: str) -> None:
  holder = _holder(path)
  if holder is not None and holder.get("pid") == os.getpid():
    os.remove(path)


@contextlib.contextmanager
def hold(workdir: str):
  """The lock for the body's duration (process 0 of a job; the others hold nothing)."""
  if not distributed.is_writer():
    yield
    return
  path = acquire(workdir)
  try:
    yield
  finally:
    release(path)
