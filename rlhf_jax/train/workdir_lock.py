"""One run per workdir: a second run on the same --workdir would interleave two runs'
checkpoints, metrics and outputs. A training loop holds <workdir>/LOCK while it runs: the file
is created exclusively (O_EXCL), names the holder (host, pid, start time) and is removed when
the loop ends, however it ends.

A LOCK left by a run that was killed (SIGKILL, a preempted VM) is stale, and is taken over with
a note: on the same host its pid no longer runs; on any host, its heartbeat stopped. The holder
touches the file every HEARTBEAT_S seconds from a background thread, so a lock whose file was
not modified for STALE_AFTER_S is a dead run's, even from another host (a preemptible VM that
was replaced: the relaunch runs elsewhere) or with its pid reused by another program. A live
lock is refused, naming the holder and how to clear it. In a multi-process job process 0 holds
the lock for the job.
"""
import contextlib
import json
import os
import socket
import threading
import time

from rlhf_jax import distributed

LOCK = "LOCK"
HEARTBEAT_S = 30.0
# Several missed heartbeats, with room for clock skew between hosts sharing the filesystem.
STALE_AFTER_S = 150.0


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
      silent_s = _silent_s(path)
      same_host = holder is not None and holder.get("host") == me["host"]
      live = holder is not None and silent_s < STALE_AFTER_S and (
          not same_host or _alive(int(holder.get("pid", -1))))
      if live and not same_host:
        raise WorkdirLockedError(
            f"{workdir} is held by a run on host {holder.get('host')} (pid {holder.get('pid')}, "
            f"since {time.ctime(holder.get('started', 0))}; its last heartbeat {silent_s:.0f}s "
            f"ago, stale after {STALE_AFTER_S:.0f}s). Use another --workdir; if that run is "
            f"gone, wait for its lock to go stale or remove {path}") from None
      if live:
        raise WorkdirLockedError(
            f"{workdir} is in use by a running process (pid {holder['pid']} on this host, "
            f"since {time.ctime(holder.get('started', 0))}): two runs on one workdir would mix "
            "their checkpoints and metrics. Wait for it or use another --workdir") from None
      print_fn(f"[workdir] {path} was left by a run that no longer runs "
               f"({holder or 'unreadable'}; last heartbeat {silent_s:.0f}s ago); taking it over")
      os.remove(path)
      continue
    with os.fdopen(fd, "w") as f:
      json.dump(me, f)
    return path
  raise WorkdirLockedError(f"could not create {path}: another run took it meanwhile")


def _silent_s(path: str) -> float:
  """Seconds since the lock file was last modified (its holder's last heartbeat)."""
  try:
    return max(0.0, time.time() - os.path.getmtime(path))
  except OSError:
    return 0.0


def _heartbeat(path: str, stop: threading.Event, every_s: float) -> None:
  while not stop.wait(every_s):
    try:
      os.utime(path)
    except OSError:  # removed under us: nothing to keep alive
      return


def release(path: str) -> None:
  holder = _holder(path)
  if holder is not None and holder.get("pid") == os.getpid():
    os.remove(path)


@contextlib.contextmanager
def hold(workdir: str, *, heartbeat_s: float = HEARTBEAT_S):
  """The lock for the body's duration, kept fresh by a heartbeat thread (process 0 of a job;
  the others hold nothing)."""
  if not distributed.is_writer():
    yield
    return
  path = acquire(workdir)
  stop = threading.Event()
  beat = threading.Thread(target=_heartbeat, args=(path, stop, heartbeat_s), daemon=True,
                          name="workdir-lock-heartbeat")
  beat.start()
  try:
    yield
  finally:
    stop.set()
    beat.join()
    release(path)
