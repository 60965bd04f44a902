"""One run per workdir: a live holder is refused with who holds it; a lock left by a killed
run (its pid gone, or its heartbeat stopped: another host's, or a reused pid) or half written is
taken over; another host's live lock names how to clear it; the holder's heartbeat keeps its
lock fresh."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from rlhf_jax.train import workdir_lock


def _write(workdir, **holder):
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "LOCK").write_text(json.dumps({"host": socket.gethostname(), "started": 0.0,
                                            **holder}))


def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def test_a_live_holder_is_refused(tmp_path):
  sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    _write(tmp_path, pid=sleeper.pid)
    with pytest.raises(workdir_lock.WorkdirLockedError, match=f"pid {sleeper.pid}"):
      workdir_lock.acquire(str(tmp_path))
  finally:
    sleeper.kill()
    sleeper.wait()


def test_a_second_hold_in_this_process_is_refused_and_the_first_is_released(tmp_path):
  with workdir_lock.hold(str(tmp_path)):
    assert (tmp_path / "LOCK").exists()
    with pytest.raises(workdir_lock.WorkdirLockedError, match="another --workdir"):
      workdir_lock.acquire(str(tmp_path))
  assert not (tmp_path / "LOCK").exists()


@pytest.mark.parametrize("content", ["dead", "garbage"])
def test_a_stale_lock_is_taken_over(tmp_path, capsys, content):
  if content == "dead":
    _write(tmp_path, pid=_dead_pid())
  else:
    (tmp_path / "LOCK").write_text("{half a json")
  path = workdir_lock.acquire(str(tmp_path))
  assert json.loads(open(path).read())["pid"] == os.getpid()
  assert "no longer runs" in capsys.readouterr().out
  workdir_lock.release(path)


def _age(workdir, seconds):
  """Makes the lock's last heartbeat `seconds` old."""
  then = time.time() - seconds
  os.utime(workdir / "LOCK", (then, then))


def test_another_hosts_lock_names_the_holder_and_the_fix(tmp_path):
  _write(tmp_path, host="tpu-worker-7", pid=1234)
  _age(tmp_path, workdir_lock.STALE_AFTER_S / 2)
  with pytest.raises(workdir_lock.WorkdirLockedError, match="tpu-worker-7.*remove"):
    workdir_lock.acquire(str(tmp_path))


def test_a_lock_whose_heartbeat_stopped_is_taken_over_from_any_host(tmp_path, capsys):
  """A preempted VM's lock (another host) and a lock whose pid now belongs to another program
  (alive, but its heartbeat stopped) are both stale."""
  sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    for holder in ({"host": "tpu-worker-7", "pid": 1234}, {"pid": sleeper.pid}):
      _write(tmp_path, **holder)
      _age(tmp_path, workdir_lock.STALE_AFTER_S + 1)
      path = workdir_lock.acquire(str(tmp_path))
      assert "taking it over" in capsys.readouterr().out
      workdir_lock.release(path)
  finally:
    sleeper.kill()
    sleeper.wait()


def test_the_holders_heartbeat_keeps_its_lock_fresh(tmp_path):
  with workdir_lock.hold(str(tmp_path), heartbeat_s=0.05):
    _age(tmp_path, workdir_lock.STALE_AFTER_S + 1)
    time.sleep(0.5)  # ten heartbeats
    with pytest.raises(workdir_lock.WorkdirLockedError, match="another --workdir"):
      workdir_lock.acquire(str(tmp_path))
  assert not (tmp_path / "LOCK").exists()
