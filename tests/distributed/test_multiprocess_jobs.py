"""Jobs of 2 processes x 4 CPU devices (127.0.0.1, gloo) against 1 process x 8 devices, through
the experiments' own command lines in --smoke mode:

  gold chain   pretrain -> SFT -> Bradley-Terry reward -> PPO, then DPO on the same SFT stage
  arithmetic   pretrain -> SFT -> GRPO

Every stage's logged metrics (each train step's loss and grad norm, every held-out number),
its results and its final parameters agree between the two jobs. The first train step's loss
is computed from the initial parameters and the first global batch, so its agreement says the
2 processes together fed exactly the 1-process batch (a process feeding the whole batch as its
own rows, or another process's rows, changes it by far more than the tolerance: see
test_the_tolerance_separates_other_batches).

Tolerance. The two jobs run the same XLA program on the same 8-way data-parallel mesh; they
differ in how cross-device sums are reduced (in-process tree vs. gloo across processes), i.e.
in the order of float32 additions. One reordered sum of 8 partials moves its result by at most
7 ulp (4e-7 relative); the runs take a few steps through reward normalisation, advantage
whitening and Adam, which divide by small statistics and amplify relative errors by up to
~100x. So we allow rtol 1e-4 (25x the largest difference we measured, 4e-6), with an absolute
floor of 1e-4 of each quantity's scale for values that cross zero.

Checkpoints: a 2-process run's checkpoint resumes in 1 process on another mesh (2x2x2), and a
1-process run's resumes in 2 processes, each ending where the uninterrupted run ended. A job
whose process is killed ends the other within seconds with an error saying so (exit 75).
"""
import glob
import json
import os
import re
import shutil
import signal
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import launch_job

CONFIGS = os.path.join(launch_job.REPO_ROOT, "experiments", "configs")
RTOL = 1e-4


def _job(root, processes, devices):
  """The gold chain (PPO), DPO on its SFT stage and the arithmetic chain (GRPO) under root."""
  common = ["--smoke", "--model=nano", f"--stage_root={root}/stages", f"--data_dir={root}/data"]
  runs = [("experiments.ppo", [f"--flagfile={CONFIGS}/ppo_tiny.flags", f"--workdir={root}/ppo",
                               f"--reward_flagfile={CONFIGS}/reward_gold_tiny.flags"]),
          ("experiments.dpo", [f"--flagfile={CONFIGS}/dpo_gold_tiny.flags",
                               f"--workdir={root}/dpo"]),
          ("experiments.grpo", [f"--flagfile={CONFIGS}/grpo_tiny.flags",
                                f"--workdir={root}/grpo"])]
  for module, args in runs:
    launch_job.run(module, [*args, *common], processes=processes, devices=devices)
  return root


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
  return {"two": _job(tmp_path_factory.mktemp("two_processes"), 2, 4),
          "one": _job(tmp_path_factory.mktemp("one_process"), 1, 8)}


def _workdirs(root):
  """{name: workdir} of every run of a job: stages by kind (their keys differ by root)."""
  out = {name: os.path.join(root, name) for name in ("ppo", "dpo", "grpo")}
  for d in glob.glob(os.path.join(root, "stages", "*")):
    kind = os.path.basename(d).rsplit("-", 1)[0]
    world = json.load(open(os.path.join(d, "config.json")))["world"]
    out[f"{kind}/{world}"] = d
  for d in glob.glob(os.path.join(root, "stages", "reward-*", "member_*")):
    out[f"reward/{os.path.basename(d)}"] = d
  return out


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {(r["split"], r["step"], k): v for line in f for r in [json.loads(line)]
            for k, v in r["metrics"].items()}


def _close(a, b, what):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  scale = max(float(np.abs(b).max(initial=0.0)), 1e-12)
  np.testing.assert_allclose(a, b, rtol=RTOL, atol=RTOL * scale, err_msg=what)


def _params(workdir):
  """A stage's saved params on this process's first device (whatever mesh wrote them)."""
  path = os.path.abspath(os.path.join(workdir, "params"))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(path).item_metadata.tree
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          meta)
    return jax.device_get(ckptr.restore(path, target))


def _leaves(tree, prefix=""):
  if isinstance(tree, dict):
    for k in sorted(tree):
      yield from _leaves(tree[k], f"{prefix}/{k}")
  else:
    yield prefix, np.asarray(tree)


@pytest.mark.slow  # the two jobs run every stage: ~3 min of the default suite's 15
def test_every_stage_logs_the_same_metrics(jobs):
  two, one = _workdirs(jobs["two"]), _workdirs(jobs["one"])
  assert sorted(two) == sorted(one)
  assert {"pretrain/gold", "sft/gold", "reward/gold", "pretrain/arithmetic",
          "sft/arithmetic", "ppo", "dpo", "grpo", "reward/member_0"} <= set(two)
  for name, workdir in one.items():
    if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
      continue  # the reward stage's metrics are its members'
    want, got = _metrics(workdir), _metrics(two[name])
    assert sorted(got) == sorted(want), name
    assert any(split == "train" for split, _, _ in want), name
    # One series per (split, metric) over the steps: its scale is the series' largest value
    # (an on-policy first step's KL is 1e-14 of rounding, its later steps are not).
    for split, metric in {(sp, k) for sp, _, k in want}:
      steps = sorted(st for sp, st, k in want if (sp, k) == (split, metric)
                     and (sp, st, k) not in SIGN_OF_ROUNDING.get(name, ()))
      _close([got[(split, st, metric)] for st in steps],
             [want[(split, st, metric)] for st in steps], f"{name} {split} {metric}")


# At DPO's first two steps the policy IS the reference (the warmup's first learning rate is
# 0, so step 1 leaves it unchanged): every reward margin is 0 up to rounding, so the share of
# positive margins is the sign of rounding noise (the margins themselves are compared, on the
# scale of their later steps).
SIGN_OF_ROUNDING = {"dpo": {("train", 1, "rewards/accuracies"),
                            ("train", 2, "rewards/accuracies")}}


@pytest.mark.slow  # the two jobs run every stage: ~3 min of the default suite's 15
def test_only_process_0_writes_and_results_agree(jobs):
  for name in ("ppo", "dpo", "grpo"):
    want = json.load(open(os.path.join(jobs["one"], name, "result.json")))
    got = json.load(open(os.path.join(jobs["two"], name, "result.json")))
    flat = lambda r: {p: v for p, v in _numbers(r)}
    for path, value in flat(want).items():
      if "wall" in path or "provenance" in path or "_s" == path[-2:]:
        continue  # timings and the machine differ by nature
      _close(flat(got)[path], value, f"{name} result {path}")
  # One writer: one TensorBoard event file per run, no duplicated metric records.
  for workdir in _workdirs(jobs["two"]).values():
    if os.path.exists(os.path.join(workdir, "metrics.jsonl")):
      assert len(glob.glob(os.path.join(workdir, "tb", "events*"))) == 1, workdir
      lines = open(os.path.join(workdir, "metrics.jsonl")).read().splitlines()
      keys = [(json.loads(x)["split"], json.loads(x)["step"]) for x in lines]
      assert len(keys) == len(set(keys)), workdir


def _numbers(tree, path=""):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _numbers(v, f"{path}/{k}")
  elif isinstance(tree, list):
    for i, v in enumerate(tree):
      yield from _numbers(v, f"{path}/{i}")
  elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
    yield path, tree


@pytest.mark.slow  # the two jobs run every stage: ~3 min of the default suite's 15
def test_every_stage_ends_with_the_same_parameters(jobs):
  two, one = _workdirs(jobs["two"]), _workdirs(jobs["one"])
  compared = 0
  for name, workdir in one.items():
    if not os.path.isdir(os.path.join(workdir, "params")):
      continue
    want, got = dict(_leaves(_params(workdir))), dict(_leaves(_params(two[name])))
    assert sorted(got) == sorted(want), name
    for path in want:
      if path == "/head_b":
        # A Bradley-Terry loss sees score differences only: the reward head's bias has
        # gradient 0 up to rounding, and Adam scales that rounding to lr-sized steps of
        # either sign. Its value is noise in both jobs (and cancels in every comparison).
        continue
      _close(got[path], want[path], f"{name} params {path}")
    compared += 1
  assert compared >= 6  # pretrain, SFT (2 worlds), reward member, DPO ...


@pytest.mark.slow  # the two jobs run every stage: ~3 min of the default suite's 15
def test_the_tolerance_separates_other_batches(jobs):
  """The comparison can fail: a stage's loss moves by far more than RTOL when the batch
  changes (here: the next step's batch, from params one small step away)."""
  m = _metrics(_workdirs(jobs["one"])["pretrain/gold"])
  first, second = m[("train", 1, "loss")], m[("train", 2, "loss")]
  assert abs(first - second) > 10 * RTOL * abs(first)


# ---------------------------------------------------------------------------------------
# Checkpoints across process counts and meshes

PRETRAIN = [f"--flagfile={CONFIGS}/pretrain_tiny.flags", "--model=nano", "--steps=4",
            "--save_every=2", "--keep_checkpoints=5", "--warmup_steps=1", "--batch_size=8",
            "--eval_batch_size=8", "--eval_prompts=8", "--log_every=1", "--criterion="]


def _pretrain(workdir, data_dir, processes, devices, *mesh):
  launch_job.run("experiments.pretrain", [*PRETRAIN, f"--workdir={workdir}",
                                          f"--data_dir={data_dir}", *mesh],
                 processes=processes, devices=devices)
  return dict(_leaves(_params(workdir)))


def test_checkpoints_resume_across_process_counts_and_meshes(tmp_path):
  data = tmp_path / "data"
  full = {"two": _pretrain(tmp_path / "two", data, 2, 4),
          "one": _pretrain(tmp_path / "one", data, 1, 8)}
  for written, resumed_as in (("two", (1, 8, "--mesh_data=2", "--mesh_fsdp=2",
                                       "--mesh_tensor=2")), ("one", (2, 4))):
    workdir = tmp_path / f"{written}_resumed"
    shutil.copytree(tmp_path / written / "checkpoints" / "2", workdir / "checkpoints" / "2")
    processes, devices, *mesh = resumed_as
    resumed = _pretrain(workdir, data, processes, devices, *mesh)
    log = open(workdir / "metrics.jsonl").read()
    assert '"step": 2' not in log and '"step": 3' in log  # it resumed, not restarted
    for path in full[written]:
      _close(resumed[path], full[written][path], f"{written} -> {resumed_as}: {path}")


def test_killing_one_process_ends_the_other_with_a_clear_error(tmp_path):
  # A peer that dies inside a collective aborts the survivor at once (gloo); one that dies
  # while the survivor waits on the coordination service is noticed by the heartbeat, here
  # after 10 s: either way the survivor ends well within the test's 60 s.
  procs = launch_job.start("experiments.pretrain", [
      *PRETRAIN, "--steps=100000", "--save_every=100000", "--eval_every=100000",
      "--heartbeat_timeout_s=10", f"--workdir={tmp_path}/w", f"--data_dir={tmp_path}/d"],
      processes=2, devices=4)
  deadline = time.monotonic() + 300
  while time.monotonic() < deadline:  # wait until both train, past their first steps
    line = procs[1].stdout.readline()
    step = re.match(r"step +(\d+)/", line)
    if (step and int(step.group(1)) >= 3) or not line:
      break
  procs[1].send_signal(signal.SIGKILL)
  killed = time.monotonic()
  out = procs[0].communicate(timeout=120)[0]
  procs[1].communicate()
  assert time.monotonic() - killed < 60
  assert procs[0].returncode == 75, out[-3000:]
  assert "its job lost a peer (another process died" in out, out[-3000:]


def _sigterm_at_step(procs, target: int, at_step: int):
  """SIGTERMs process `target`'s supervisor (it forwards the signal to its child) once that
  process printed step >= at_step; returns every process's output."""
  seen = ""
  while True:
    line = procs[target].stdout.readline()
    seen += line
    step = re.match(r"step +(\d+)/", line)
    if (step and int(step.group(1)) >= at_step) or not line:
      break
  procs[target].send_signal(signal.SIGTERM)
  outs = [p.communicate(timeout=120)[0] for p in procs]
  outs[target] = seen + outs[target]
  return outs


@pytest.mark.slow
def test_sigterm_to_one_process_saves_every_part_and_the_job_resumes(tmp_path):
  """The notice reaches one process; jax's preemption service has both stop at the same step,
  save their parts of one checkpoint and exit 85; the relaunched job resumes from it."""
  args = [*PRETRAIN, "--steps=100000", "--save_every=100000", "--eval_every=100000",
          f"--workdir={tmp_path}/w", f"--data_dir={tmp_path}/d"]
  saved = []
  for attempt in range(2):
    procs = launch_job.start("experiments.pretrain", args, processes=2, devices=4)
    outs = _sigterm_at_step(procs, target=1 - attempt, at_step=3)
    for p, out in zip(procs, outs):
      assert p.returncode == 85, out[-3000:]
    steps = {int(re.search(r"saved checkpoint (\d+)", out).group(1)) for out in outs}
    assert len(steps) == 1, steps  # one agreed step
    saved.append(steps.pop())
    assert os.path.exists(tmp_path / "w" / "checkpoints" / str(saved[-1]) / "commit_success.txt")
    if attempt:
      assert f"resumed from step {saved[0]}" in outs[0]
  assert saved[1] > saved[0]
