"""Kill campaign: SIGKILL each stage kind's experiment at random moments and during checkpoint
saves, relaunch the identical command (it resumes from its latest checkpoint by itself), and
check that the run ends bit for bit where one uninterrupted run of the same command does.

    python -m rlhf_jax.reliability.kill_campaign --kinds=pretrain,grpo --trials=3 \
        --kills_per_trial=3 --seed=0 --root=workdirs/kill_campaign

Per kind: two uninterrupted runs, a control (which also builds the kind's upstream stages in
the campaign's stage cache, shared by every run, so a kill only ever interrupts the stage under
test) and the reference, which must be identical (run_kind); then --trials trials, each in a
fresh workdir: --kills_per_trial launches killed (one of them, at a random position, while a
checkpoint save is being written; the others at uniform moments after start-up, runner.py),
then a last launch that runs to the end, and the comparison of its workdir with the
reference's (compare.py). Prints per kind the trials, kills, kills during a save, survivals
and every difference; the exit status is 1 when any trial did not survive (or the control
differs). docs/reliability.md has the last results.
"""
import dataclasses
import os
import shutil
import sys

import numpy as np
from absl import app, flags, logging

from rlhf_jax import provenance
from rlhf_jax.pipeline import config
from rlhf_jax.pipeline.config import flag
from rlhf_jax.reliability import compare, kinds, runner


@dataclasses.dataclass(frozen=True)
class CampaignConfig:
  kinds: str = flag(",".join(kinds.KINDS), f"Comma-separated stage kinds, of "
                    f"{', '.join(kinds.KINDS)}.")
  trials: int = flag(3, "Interrupted runs per kind, each compared with the reference.")
  kills_per_trial: int = flag(3, "SIGKILLs per trial (one of them during a checkpoint save).")
  seed: int = flag(0, "Seed of the kill moments.")
  root: str = flag("workdirs/kill_campaign", "Scratch directory: the code snapshot, stage "
                   "cache, datasets, every run's workdir and log (runs/<kind>/).")

  def __post_init__(self):
    unknown = sorted(set(self.kind_list) - set(kinds.KINDS))
    if unknown:
      raise ValueError(f"--kinds: unknown {unknown}; known: {', '.join(kinds.KINDS)}")
    for name in ("trials", "kills_per_trial"):
      if getattr(self, name) < 1:
        raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")

  @property
  def kind_list(self) -> list[str]:
    return [k for k in self.kinds.split(",") if k]


@dataclasses.dataclass
class KindResult:
  kind: str
  reference_s: float = 0.0
  trials: int = 0
  kills: int = 0
  during_save: int = 0
  ended_first: int = 0  # launches that ended by themselves before their kill was due
  survived: int = 0
  failures: list[str] = dataclasses.field(default_factory=list)  # one line per problem


def _env() -> dict:
  """The runs' environment: a developer's code-version pin dropped, so the stage cache keys
  hash the snapshot's sources."""
  return {k: v for k, v in os.environ.items() if k != "RLHF_JAX_CODE_VERSION"}


def _describe(i: int, launch: runner.Launch) -> str:
  if not launch.killed:
    return f"launch {i}: ran to its end, exit status {launch.rc}"
  where = f", during save {', '.join(launch.saving)}" if launch.saving else ""
  return f"launch {i}: SIGKILL {launch.kill_s:.2f}s after start-up{where}"


def run_trial(argv, *, code: str, workdir: str, ref_dir: str, ref: runner.Timeline,
              rng: np.random.Generator, kills: int, timeout_s: float, result: KindResult,
              print_fn=print) -> bool:
  """One trial: `kills` killed launches (one at a save), a last launch to the end, the
  comparison. Counts into result; returns whether the trial survived."""
  log = workdir + ".log"
  at_save = int(rng.integers(kills))
  launches = []
  for k in range(kills):
    plan = runner.plan_kill(ref, workdir, rng, at_save=k == at_save)
    launches.append(runner.launch(argv, cwd=code, env=_env(), workdir=workdir, log=log,
                                  plan=plan, timeout_s=timeout_s))
    if not launches[-1].killed:
      result.ended_first += 1
      break
  if launches[-1].killed:
    launches.append(runner.launch(argv, cwd=code, env=_env(), workdir=workdir, log=log,
                                  timeout_s=timeout_s))
  result.trials += 1
  result.kills += sum(launch.killed for launch in launches)
  result.during_save += sum(launch.during_save for launch in launches)
  for i, launch in enumerate(launches):
    print_fn(f"  {_describe(i, launch)}")
  name = os.path.basename(workdir)
  failed = [f"{name}: launch {i} exited with status {launch.rc} (log: {log})"
            for i, launch in enumerate(launches) if not launch.killed and launch.rc != 0]
  if not failed:
    failed = [f"{name}: {d}" for d in compare.compare_workdirs(ref_dir, workdir)]
  result.failures += failed
  print_fn(f"  {name}: {'survived' if not failed else f'{len(failed)} differences'}")
  return not failed


def run_kind(kind: str, cfg: CampaignConfig, *, code: str, print_fn=print) -> KindResult:
  """Two uninterrupted runs of `kind`, a control and the reference, then cfg.trials
  interrupted trials.

  The control builds the missing upstream stages and fills the persistent compilation cache,
  so the reference, which times the run for the kills, runs as fast as the relaunches will (a
  cold reference takes several times longer, and kills placed by its clock land after a warm
  run's end). The two must be identical: a run that differs from itself uninterrupted would
  make every difference of a trial meaningless."""
  runs = os.path.join(cfg.root, "runs", kind)
  shutil.rmtree(runs, ignore_errors=True)
  os.makedirs(runs)
  rng = np.random.default_rng([cfg.seed, list(kinds.KINDS).index(kind)])

  def argv(workdir):
    return kinds.command(kind, flags_dir=os.path.join(cfg.root, "flags"),
                         stage_root=os.path.join(cfg.root, "stages"),
                         data_dir=os.path.join(cfg.root, "data"), workdir=workdir)

  result = KindResult(kind)
  control_dir, ref_dir = os.path.join(runs, "control"), os.path.join(runs, "reference")
  print_fn(f"[{kind}] control run (builds missing upstream stages): {control_dir}")
  control = runner.launch(argv(control_dir), cwd=code, env=_env(), workdir=control_dir,
                          log=control_dir + ".log")
  if control.rc != 0:
    raise RuntimeError(f"the control run failed (exit status {control.rc}): see {control.log}")
  ref_launch = runner.launch(argv(ref_dir), cwd=code, env=_env(), workdir=ref_dir,
                             log=ref_dir + ".log")
  result.reference_s = ref_launch.duration_s
  ref = runner.timeline(ref_launch)
  in_order = sorted(ref.checkpoints, key=ref.checkpoints.get)
  print_fn(f"[{kind}] reference: {ref.duration_s:.1f}s (control {control.duration_s:.1f}s), "
           f"start-up {ref.startup_s:.1f}s, {len(ref.saves)} saves seen, checkpoints {in_order}")
  result.failures += [f"control: {d}" for d in compare.compare_workdirs(control_dir, ref_dir)]
  for t in range(cfg.trials):
    workdir = os.path.join(runs, f"trial_{t}")
    if run_trial(argv(workdir), code=code, workdir=workdir, ref_dir=ref_dir, ref=ref, rng=rng,
                 kills=cfg.kills_per_trial, timeout_s=10 * ref.duration_s + 120,
                 result=result, print_fn=print_fn):
      result.survived += 1
  return result


def campaign(cfg: CampaignConfig, print_fn=print) -> list[KindResult]:
  """Snapshots the code and writes the upstream flagfiles under cfg.root, then runs every
  kind; a kind whose reference run fails is reported as such."""
  code = os.path.join(cfg.root, "code")
  shutil.rmtree(code, ignore_errors=True)
  kinds.snapshot_code(code)
  kinds.write_flagfiles(code, os.path.join(cfg.root, "flags"))
  results = []
  for kind in cfg.kind_list:
    try:
      results.append(run_kind(kind, cfg, code=code, print_fn=print_fn))
    except RuntimeError as e:  # an uninterrupted run failed: nothing to compare with
      results.append(KindResult(kind, failures=[str(e)]))
    print_fn(format_table(results[-1:]))
  return results


def format_table(results: list[KindResult]) -> str:
  lines = [f"{'kind':<11} {'trials':>6} {'kills':>6} {'at save':>8} {'ended first':>12} "
           f"{'survived':>9} {'reference':>10}  differences"]
  for r in results:
    lines.append(f"{r.kind:<11} {r.trials:>6} {r.kills:>6} {r.during_save:>8} "
                 f"{r.ended_first:>12} {r.survived:>6}/{r.trials:<2} {r.reference_s:>9.1f}s  "
                 f"{len(r.failures) or 'none'}")
    lines += [f"    {f}" for f in r.failures]
  return "\n".join(lines)


def main(argv):
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
  try:
    cfg = config.parse(CampaignConfig, argv[1:])
  except ValueError as e:  # a bad flag: one line and the usage status, not a traceback
    print(f"python -m rlhf_jax.reliability.kill_campaign: error: {e}", file=sys.stderr)
    sys.exit(2)
  code = provenance.provenance()
  results = campaign(cfg)
  print("\nkill campaign: " + " ".join(f"--{k}={v}" for k, v in config.to_dict(cfg).items()))
  print(f"code: {code['code_version']}{' with uncommitted edits' if code['dirty'] else ''}, "
        f"{code['cpu']}, {code['cores']} cores")
  print(f"excluded metric/result keys (timing): {', '.join(sorted(compare.TIMING_KEYS))}")
  print(format_table(results))
  sys.exit(0 if all(r.trials and r.survived == r.trials and not r.failures for r in results)
           else 1)


def _parser(argv):
  """absl's own FLAGS marked parsed with none of ours (they live in CampaignConfig)."""
  flags.FLAGS([argv[0]])
  return argv


if __name__ == "__main__":
  app.run(main, flags_parser=_parser)
