"""Preemption: a SIGTERM (a scheduler's notice before it evicts the job: a preemptible TPU VM or
GPU node, SLURM's --signal, Kubernetes' terminationGracePeriod) makes the training loops save a
checkpoint at the next step boundary and exit with PREEMPTED_EXIT; the relaunched command
resumes from that checkpoint (bitwise, as after any resume).

One process: a Python SIGTERM handler notes the notice; the loop asks `requested(step)` after
every step (a flag read, nothing waits on the device). Several processes: the checkpoint is a
collective save, so every process must stop at the SAME step, whichever of them got the signal
and whatever step each was at. jax.distributed's preemption service does that agreement (its
own SIGTERM handler, installed when the job joins; it picks the step after the furthest
process's and `reached_preemption_sync_point(step)` is true there on all processes), so the
loop asks it instead, and no Python handler replaces its handler.

The deadline: from the notice, the loop has --preempt_deadline_s to reach a step boundary and
finish writing. If it has not (a long online iteration, a slow filesystem), the process exits
with PREEMPTED_UNSAVED_EXIT at once, before the scheduler's SIGKILL, saying so (several
processes: counted from the agreed step, at most a step after the notice): the checkpoint
in progress is abandoned (orbax writes into a temporary directory, so the latest complete one
stays intact) and the workdir's lock is released for the relaunch. Set the deadline below the
scheduler's grace period.
"""
import os
import signal
import threading
import time

import jax
from jax.experimental import multihost_utils

from rlhf_jax.train import workdir_lock

# Outside sysexits' range (64-78, where 75 is a job that lost a peer, distributed.py), so a
# launcher can requeue on exactly these: saved, relaunch to resume from the new checkpoint...
PREEMPTED_EXIT = 85
# ...or the deadline passed before the save completed: the previous checkpoint is the latest.
PREEMPTED_UNSAVED_EXIT = 86


class Preempted(SystemExit):
  """Raised by a loop after its preemption checkpoint is written: the process exits with
  PREEMPTED_EXIT (the lock released and the stage left unfinished on the way out)."""

  def __init__(self, step: int, workdir: str):
    super().__init__(PREEMPTED_EXIT)
    self.step, self.workdir = step, workdir


class Watch:
  """with Watch(workdir, deadline_s) as preempt: ... preempt.requested(step) ...

  requested(step) must be called after every step (or iteration) by every process, with the
  step just completed: in a multi-process job the agreement protocol counts on it."""

  def __init__(self, workdir: str, deadline_s: float, *, print_fn=print):
    if deadline_s <= 0:
      raise ValueError(f"--preempt_deadline_s must be > 0, got {deadline_s}")
    self._workdir, self._deadline_s, self._print = workdir, deadline_s, print_fn
    self._notice: float | None = None
    self._timer: threading.Timer | None = None
    self._previous = None
    self._multi = jax.process_count() > 1

  def __enter__(self) -> "Watch":
    # Handlers can only be set in the main thread; elsewhere a SIGTERM keeps its default.
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    if self._timer is not None:
      self._timer.cancel()

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    self._start_deadline()

  def _start_deadline(self) -> None:
    if self._notice is not None:
      return
    self._notice = time.monotonic()
    self._timer = threading.Timer(self._deadline_s, self._expire)
    self._timer.daemon = True
    self._timer.start()

  def _expire(self) -> None:
    self._print(f"[preemption] no checkpoint saved within --preempt_deadline_s="
                f"{self._deadline_s:g} of the SIGTERM: exiting with status "
                f"{PREEMPTED_UNSAVED_EXIT} now; a relaunch resumes from the latest complete "
                f"checkpoint in {self._workdir}/checkpoints")
    workdir_lock.release(os.path.join(self._workdir, workdir_lock.LOCK))
    os._exit(PREEMPTED_UNSAVED_EXIT)

  def requested(self, step: int) -> bool:
    """Whether to save at `step` and exit (the same answer on every process)."""
    if self._multi:
      if not _reached_sync_point(step):
        return False
      self._start_deadline()
      return True
    return self._notice is not None

  def waited_s(self) -> float:
    return 0.0 if self._notice is None else time.monotonic() - self._notice


def _reached_sync_point(step: int) -> bool:
  try:
    return multihost_utils.reached_preemption_sync_point(step)
  except RuntimeError:  # the job disabled jax's preemption service: no agreed preemption
    return False
