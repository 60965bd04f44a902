"""SLURM GPU clusters: an sbatch script that runs one experiment command on N nodes with srun,
then `sbatch`.

    python -m launch.slurm --nodes=2 --gpus_per_node=8 --partition=gpu --account=my-account \
        --time=04:00:00 -- python -m experiments.dpo \
        --flagfile=experiments/configs/dpo_llama3_1b_hh_h100.flags --mesh_fsdp=16

--layout=process_per_node (default) starts one JAX process per node, driving all its GPUs;
--layout=process_per_gpu starts one per GPU (JAX's GPU performance notes recommend one per GPU
and suggest measuring both).
Under srun, jax.distributed.initialize reads the coordinator, the process count and the
process id from SLURM's environment, so no coordinator flags are passed. The repository must
be on a filesystem the nodes share, with a venv made by `pip install -e ".[cuda]"` (--venv).
Add --dry_run to print the script and the sbatch command instead; otherwise the script is
written to workdirs/launch/<job_name>.sbatch and submitted.
"""
import dataclasses
import pathlib
import shlex
import sys

from launch import common
from launch.common import Command, LaunchError, Note, WriteFile
from rlhf_jax.pipeline.config import flag

LAYOUTS = ("process_per_node", "process_per_gpu")

USAGE = ("python -m launch.slurm --nodes=2 --partition=gpu -- python -m experiments.sft "
         "--flagfile=experiments/configs/sft_tiny.flags")


@dataclasses.dataclass(frozen=True)
class SlurmConfig:
  nodes: int = flag(1, "how many nodes")
  gpus_per_node: int = flag(8, "GPUs per node")
  layout: str = flag("process_per_node", "process_per_node: one JAX process per node, driving "
                     "all its GPUs; process_per_gpu: one per GPU", choices=LAYOUTS)
  time: str = flag("01:00:00", "the job's time limit, e.g. 04:00:00 or 2-00:00:00")
  partition: str = flag("", "the partition (queue); default: the cluster's")
  account: str = flag("", "the account charged; default: yours")
  cpus_per_task: int = flag(0, "CPUs per process (data loading, compilation); 0: the "
                               "cluster's default, often 1")
  job_name: str = flag("", "the job's name; default: the command's flagfile stem")
  venv: str = flag(str(common.REPO_ROOT / ".venv"), "the venv with the project installed "
                                                    "(pip install -e \".[cuda]\")")
  output: str = flag(str(common.REPO_ROOT / "workdirs" / "slurm" / "%x-%j.out"),
                     "the job's output file (%x: job name, %j: job id)")
  script: str = flag("", "where to write the sbatch script; default: "
                         "workdirs/launch/<job_name>.sbatch")
  dry_run: bool = flag(False, "print the script and the sbatch command instead of running")

  def __post_init__(self):
    if self.nodes < 1:
      raise LaunchError(f"--nodes={self.nodes}: a job needs at least one node")
    if self.gpus_per_node < 1:
      raise LaunchError(f"--gpus_per_node={self.gpus_per_node}: a GPU job needs at least 1; "
                        "pass the nodes' GPU count, e.g. --gpus_per_node=8")
    if self.cpus_per_task < 0:
      raise LaunchError("--cpus_per_task must be 0 (the cluster's default) or more")
    common.check_pattern(self.time, r"([0-9]+-)?[0-9]+(:[0-9]{2}){0,2}", "time",
                         "minutes, HH:MM:SS or D-HH:MM:SS, e.g. --time=04:00:00")
    for name in ("partition", "account"):
      if getattr(self, name):
        common.check_pattern(getattr(self, name), r"[A-Za-z0-9_.,:+-]+", name,
                             "a SLURM name (letters, digits, '_', '.', '-')")
    if self.job_name:
      common.check_pattern(self.job_name, r"[A-Za-z0-9_.-]+", "job_name",
                           "letters, digits, '.', '_' and '-'")
    # #SBATCH lines end at whitespace, and a path with a newline would add lines.
    if any(c.isspace() for c in self.output):
      raise LaunchError(f"--output={self.output!r} has whitespace, which #SBATCH cannot "
                        "take: pass a path without spaces")
    common.require(self.venv, "venv", "/cluster/home/me/rlhf_jax/.venv")


def process_layout(cfg: SlurmConfig) -> tuple[list[str], str, str]:
  """(#SBATCH options, JAX_LOCAL_DEVICE_IDS, why) for the layout. Under SLURM, JAX gives each
  process the GPUs listed in JAX_LOCAL_DEVICE_IDS, or else only the GPU numbered
  SLURM_LOCALID (jax/_src/clusters/cluster.py), which suits neither layout as SLURM sets it
  up here, hence the explicit list."""
  if cfg.layout == "process_per_node":
    options = ["--ntasks-per-node=1", f"--gpus-per-node={cfg.gpus_per_node}"]
    ids = ",".join(str(i) for i in range(cfg.gpus_per_node))
    why = (f"One process per node drives all {cfg.gpus_per_node} GPUs; without this list JAX "
           "would give it only GPU 0 (SLURM_LOCALID).")
  else:
    # --gpus-per-task needs the task count stated (--ntasks), not only nodes.
    options = [f"--ntasks-per-node={cfg.gpus_per_node}",
               f"--ntasks={cfg.nodes * cfg.gpus_per_node}", "--gpus-per-task=1"]
    ids = "0"
    why = ("--gpus-per-task=1 binds each task to its own GPU, which the task sees as device 0; "
           "JAX would otherwise look for GPU number SLURM_LOCALID, which the task lacks.")
  if cfg.cpus_per_task:
    options.append(f"--cpus-per-task={cfg.cpus_per_task}")
  return options, ids, why


def sbatch_script(cfg: SlurmConfig, command: list[str], job_name: str) -> str:
  options, device_ids, why = process_layout(cfg)
  processes = cfg.nodes * (1 if cfg.layout == "process_per_node" else cfg.gpus_per_node)
  options = [f"--job-name={job_name}", f"--nodes={cfg.nodes}", *options, f"--time={cfg.time}"]
  if cfg.partition:
    options.append(f"--partition={cfg.partition}")
  if cfg.account:
    options.append(f"--account={cfg.account}")
  options.append(f"--output={cfg.output}")
  activate = pathlib.Path(cfg.venv) / "bin" / "activate"
  lines = [
      "#!/bin/bash",
      f"# {job_name}: {processes} JAX processes on {cfg.nodes} node(s) x {cfg.gpus_per_node} "
      f"GPUs ({cfg.layout}).",
      "# Generated by python -m launch.slurm (docs/launch.md).",
      *(f"#SBATCH {option}" for option in options),
      "set -eo pipefail",
      f"cd {shlex.quote(str(common.REPO_ROOT))}",
      "# shellcheck source=/dev/null",
      f"source {shlex.quote(str(activate))}",
      *(f"# {line}" for line in _wrap(why)),
      f"export JAX_LOCAL_DEVICE_IDS={device_ids}",
      "# JAX finds the coordinator, process count and process id in srun's environment.",
      "# --kill-on-bad-exit: one failed process ends the step instead of leaving the others",
      "# waiting for it in a collective.",
      f"srun --kill-on-bad-exit=1 {common.join(command)}",
  ]
  return "\n".join(lines) + "\n"


def _wrap(text: str, width: int = 96) -> list[str]:
  lines, line = [], ""
  for word in text.split():
    if line and len(line) + 1 + len(word) > width:
      lines.append(line)
      line = word
    else:
      line = f"{line} {word}".strip()
  return lines + [line] if line else lines


def build(action: str | None, flag_argv: list[str], command: list[str]):
  """(steps, dry_run) for `python -m launch.slurm <flags> -- command`."""
  if action is not None:
    raise LaunchError(f"launch.slurm takes no action (got {action!r}): pass flags, then `--` "
                      "and the command, e.g.\n  " + USAGE)
  cfg = common.parse_flags(SlurmConfig, flag_argv)
  common.require_command(command, USAGE)
  job_name = cfg.job_name or common.default_run_name(command)
  text = sbatch_script(cfg, command, job_name)
  common.check_heredoc_safe(text, "the sbatch script")
  script = pathlib.Path(cfg.script) if cfg.script else (
      common.GENERATED_DIR / f"{job_name}.sbatch")
  output_dir = pathlib.Path(cfg.output).parent
  follow = str(cfg.output).replace("%x", job_name).replace("%j", "<job id>")
  return [
      # SLURM does not create the output file's directory; the job would fail unseen.
      Command(("mkdir", "-p", str(output_dir))),
      WriteFile(script, text),
      Command(("sbatch", str(script))),
      Note(f"follow with: tail -f {follow}\nqueue: squeue --me; cancel: scancel <job id>"),
  ], cfg.dry_run


if __name__ == "__main__":
  sys.exit(common.main(build, doc=__doc__, config_cls=SlurmConfig))
