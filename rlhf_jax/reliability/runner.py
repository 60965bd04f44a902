"""Launching a run as a subprocess, watching its workdir, and SIGKILLing it.

A launch is watched every ~1 ms (Watcher): when its training loop takes <dir>/LOCK (start-up
done: the process reached the loop, compiled what it needs to start), when a checkpoint
save's orbax temporary directory (<step>.orbax-checkpoint-tmp-<n>) appears in a checkpoints/
folder, when a finished checkpoint <step> appears. The reference run's record of these
(Timeline) places the kills of the interrupted runs:
  - uniform kills at a moment drawn uniformly from [start-up done, 0.95 x the reference's
    duration], shortened for a relaunch by the progress its checkpoints already hold (a
    relaunch resumes, so it has less to do);
  - save kills while a save's temporary directory exists, at a save drawn uniformly from
    those the launch still has to make.
A SIGKILLed process is reaped before the next launch, so its pid is gone and the LOCK it
left is stale: the relaunch must take it over by itself (train/workdir_lock.py).
"""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

TMP_MARK = "orbax-checkpoint-tmp"
POLL_S = 0.001
_NOT_RUN_DIRS = ("checkpoints", "checkpoints_damaged", "params", "tb")


@dataclasses.dataclass(frozen=True)
class KillPlan:
  after_s: float  # seconds after start-up
  skip_saves: int | None = None  # None: kill at after_s; n: at the (n+1)-th save after it


@dataclasses.dataclass
class Launch:
  rc: int  # exit status (-9 when killed)
  killed: bool
  kill_s: float | None  # when the kill was sent, after start-up
  saving: list[str]  # the save temporary directories that existed when the kill was sent
  startup_s: float | None  # launch -> LOCK taken (None: it never got there)
  duration_s: float
  saves: list[float]  # when each save's temporary directory appeared, after start-up
  checkpoints: dict[str, float]  # "<run dir>/<step>" -> when it appeared, after start-up
  log: str

  @property
  def during_save(self) -> bool:
    return bool(self.saving)


@dataclasses.dataclass(frozen=True)
class Timeline:
  """The reference run's: what the kills of the interrupted runs are placed by."""
  startup_s: float
  duration_s: float
  saves: tuple[float, ...]
  checkpoints: dict[str, float]

  @property
  def window_s(self) -> float:
    """Seconds from start-up to 0.95 x the duration: where uniform kills land."""
    return max(0.95 * self.duration_s - self.startup_s, 0.0)


class Watcher:
  """Polls a workdir for the LOCK of a given pid, save temporary directories and finished
  checkpoints, in the workdir and its immediate subdirectories (nested runs such as a reward
  model's member_0/ or a matched-SFT baseline)."""

  def __init__(self, workdir: str, pid: int, *, stale: set[str] | None = None):
    self.workdir, self.pid = workdir, pid
    # Temporary directories a killed launch left (the relaunch's manager removes them): no
    # save of this launch, until they are seen gone (a save of that step then has the name).
    self.stale = set(stale or ())
    self._dirs, self._dirs_at = [workdir], -1.0
    self.tmp_seen: set[str] = set()
    self.steps_seen: set[str] = set()

  def _run_dirs(self, now: float) -> list[str]:
    if now - self._dirs_at > 0.02:  # new nested runs appear rarely: look every 20 ms
      self._dirs_at = now
      try:
        names = os.listdir(self.workdir)
      except FileNotFoundError:
        names = []
      self._dirs = [self.workdir] + [os.path.join(self.workdir, n) for n in sorted(names)
                                     if n not in _NOT_RUN_DIRS
                                     and os.path.isdir(os.path.join(self.workdir, n))]
    return self._dirs

  def locked(self, now: float) -> bool:
    """Whether this pid holds a LOCK in one of the run directories."""
    for d in self._run_dirs(now):
      try:
        with open(os.path.join(d, "LOCK")) as f:
          if json.load(f).get("pid") == self.pid:
            return True
      except (OSError, ValueError):  # absent, or being written
        continue
    return False

  def scan(self, now: float) -> tuple[list[str], list[str]]:
    """(save temporary directories present, stale ones aside; finished checkpoints new since
    the last scan), each as "<run dir>/<name>" relative to the workdir."""
    tmp, new = [], []
    for d in self._run_dirs(now):
      try:
        names = os.listdir(os.path.join(d, "checkpoints"))
      except FileNotFoundError:
        continue
      rel = os.path.relpath(d, self.workdir)
      for n in sorted(names):
        key = os.path.normpath(os.path.join(rel, n))
        if TMP_MARK in n:
          tmp.append(key)
        elif n.isdigit() and key not in self.steps_seen:
          self.steps_seen.add(key)
          new.append(key)
    self.stale &= set(tmp)
    return [key for key in tmp if key not in self.stale], new


def _kill(proc: subprocess.Popen) -> None:
  os.killpg(proc.pid, signal.SIGKILL)  # its own session: the process and any children


def launch(argv: list[str], *, cwd: str, env: dict, workdir: str, log: str,
           plan: KillPlan | None = None, timeout_s: float = 3600.0) -> Launch:
  """Runs `python <argv>` to its end, or SIGKILLs it as `plan` says."""
  with open(log, "a") as out:
    out.write(f"\n=== launch: plan {plan}\n")
    out.flush()
    t0 = time.perf_counter()
    stale = set(Watcher(workdir, 0).scan(0.0)[0])
    proc = subprocess.Popen([sys.executable, *argv], cwd=cwd, env=env, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)
  watcher = Watcher(workdir, proc.pid, stale=stale)
  startup = None
  saves, checkpoints = [], {}
  killed = timed_out = False
  saving, kill_s = [], None
  skip = plan.skip_saves if plan else None
  try:
    while proc.poll() is None:
      now = time.perf_counter() - t0
      if startup is None and watcher.locked(now):
        startup = now
      tmp, new = watcher.scan(now)
      since = now - startup if startup is not None else None
      for save in tmp:
        if save not in watcher.tmp_seen:
          watcher.tmp_seen.add(save)
          saves.append(since)
          if skip is not None and since is not None and since >= plan.after_s:
            skip -= 1  # below zero: this is the save to kill in
      for name in new:
        checkpoints[name] = since
      if plan is not None and since is not None and since >= plan.after_s and (
          skip is None or (skip < 0 and tmp)):
        killed, saving, kill_s = True, tmp, since
        _kill(proc)
        break
      if now > timeout_s:
        timed_out = True
        _kill(proc)
        break
      time.sleep(POLL_S)
  finally:  # the campaign interrupted (Ctrl-C): no run left behind
    if proc.poll() is None:
      _kill(proc)
  rc = proc.wait()
  return Launch(124 if timed_out else rc, killed, kill_s, saving, startup,
                time.perf_counter() - t0, saves, checkpoints, log)


def timeline(ref: Launch) -> Timeline:
  """The reference launch's Timeline; RuntimeError when it failed or saved too little."""
  if ref.rc != 0 or ref.startup_s is None:
    raise RuntimeError(f"the reference run failed (exit status {ref.rc}; start-up "
                       f"{'seen' if ref.startup_s is not None else 'never seen'}): see {ref.log}")
  checkpoints = {k: v for k, v in ref.checkpoints.items() if v is not None}
  if len(checkpoints) < 2:  # a kill would have no checkpoint but the final one to resume from
    raise RuntimeError(f"the reference run saved {len(checkpoints)} checkpoints "
                       f"({sorted(checkpoints)}); a kill campaign needs several: lower the "
                       f"kind's save-every flag (kinds.py)")
  return Timeline(ref.startup_s, ref.duration_s, tuple(s for s in ref.saves if s is not None),
                  checkpoints)


def progress(workdir: str, ref: Timeline) -> float:
  """How far into the reference's run (seconds after start-up) the checkpoints in workdir
  reach: a relaunch resumes there."""
  reached = 0.0
  for key, at in ref.checkpoints.items():
    if os.path.isdir(os.path.join(workdir, os.path.dirname(key), "checkpoints",
                                  os.path.basename(key))):
      reached = max(reached, at)
  return reached


def plan_kill(ref: Timeline, workdir: str, rng: np.random.Generator, *,
              at_save: bool) -> KillPlan:
  """The next launch's kill: while a save is being written (at_save; a uniform kill when the
  run has no save left to make), or at a uniform moment of what is left of the run."""
  done = progress(workdir, ref)
  left = [s for s in ref.saves if s > done]
  if at_save and left:
    return KillPlan(0.0, int(rng.integers(len(left))))
  window = max(ref.window_s - done, 0.1 * ref.window_s)
  return KillPlan(float(rng.uniform(0.0, window)))
