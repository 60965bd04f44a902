"""Cloud TPU VMs: create a slice, copy this repository to every worker, install it, run one
experiment command on all workers at once, follow a worker's log, delete the slice.

    python -m launch.tpu_vm create  --name=rlhf-v5e --project=P --zone=us-west4-a \
        --accelerator_type=v5litepod-16 [--spot | --preemptible] [--queued]
    python -m launch.tpu_vm copy    --name=rlhf-v5e --project=P --zone=us-west4-a
    python -m launch.tpu_vm install --name=rlhf-v5e --project=P --zone=us-west4-a
    python -m launch.tpu_vm run     --name=rlhf-v5e --project=P --zone=us-west4-a \
        -- python -m experiments.dpo --flagfile=experiments/configs/dpo_llama3_1b_hh_v5e8.flags
    python -m launch.tpu_vm logs    --name=rlhf-v5e --project=P --zone=us-west4-a \
        --worker=3 --run_name=dpo_llama3_1b_hh_v5e8
    python -m launch.tpu_vm delete  --name=rlhf-v5e --project=P --zone=us-west4-a [--queued]

Add --dry_run to print the gcloud commands instead of running them. Every worker runs the same
command; JAX finds the other workers itself on TPU VMs (jax.distributed.initialize with no
arguments), so no coordinator flags are passed. docs/launch.md walks through a whole run.
"""
import dataclasses
import shlex
import sys

from launch import common, tpu_types
from launch.common import Command, LaunchError, Note
from rlhf_jax.pipeline.config import flag

ACTIONS = ("create", "copy", "install", "run", "logs", "delete")

# Left out of the copy: environments and outputs are per machine (each worker keeps its own
# .venv and workdirs/ across copies), caches are rebuilt.
COPY_EXCLUDES = (".venv", "workdirs", "__pycache__", "*.egg-info", ".pytest_cache", ".jax_cache")

USAGE = ("python -m launch.tpu_vm run --name=my-tpu --project=my-project --zone=us-west4-a -- "
         "python -m experiments.sft --flagfile=experiments/configs/sft_tiny.flags")


@dataclasses.dataclass(frozen=True)
class TpuVmConfig:
  action: str = flag("", "what to do (the first argument): " + ", ".join(ACTIONS))
  name: str = flag("", "the TPU VM (node) name, e.g. rlhf-v5e-16")
  project: str = flag("", "the Google Cloud project id")
  zone: str = flag("", "the zone holding the TPU, e.g. us-west4-a")
  accelerator_type: str = flag("", "create: the slice, e.g. " + tpu_types.EXAMPLES)
  version: str = flag("", "create: the TPU VM runtime image; default: the one recommended for "
                          "JAX on the slice's generation (e.g. v2-alpha-tpuv5-lite for v5e)")
  spot: bool = flag(False, "create: a Spot TPU (cheaper, may be preempted at any time)")
  preemptible: bool = flag(False, "create: a preemptible TPU (older form of Spot; not "
                                  "with --queued)")
  queued: bool = flag(False, "create/delete through a queued resource: the request waits "
                             "for capacity instead of failing")
  queued_resource_id: str = flag("", "the queued resource's id; default: <name>-qr")
  remote_dir: str = flag("rlhf_jax", "where the repository lives on each worker, relative to "
                                     "the worker's home directory")
  python: str = flag("python3.11", "install: the interpreter that creates the workers' venv "
                                   "(jax 0.10 needs Python >= 3.11)")
  apt_install: bool = flag(True, "install: apt-get install <python> and <python>-venv first "
                                 "(TPU VM images ship an older Python)")
  exclude: str = flag("", "copy: more comma-separated tar --exclude patterns, e.g. "
                          "checkpoints,data (default ones: " + ",".join(COPY_EXCLUDES) + ")")
  run_name: str = flag("", "run/logs: names the log files workdirs/logs/<run_name>/<host>.log "
                           "on each worker; default: the command's flagfile stem")
  detach: bool = flag(False, "run: start the command in the background on every worker and "
                             "return (follow it with `logs`); otherwise stream all workers' "
                             "output until it ends (closing the terminal stops the run)")
  worker: int = flag(0, "logs: which worker's log to follow (0-based)")
  dry_run: bool = flag(False, "print the commands instead of running them")

  def __post_init__(self):
    common.require_action(self.action, ACTIONS,
                          "give an action first: python -m launch.tpu_vm <action> --name=... "
                          "--project=... --zone=...")
    common.require(self.name, "name", "rlhf-v5e-16")
    common.check_pattern(self.name, r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", "name",
                         "lowercase letters, digits and '-', starting with a letter")
    common.require(self.project, "project", "my-project (gcloud projects list)")
    common.check_pattern(self.project, r"[a-z0-9.:-]+", "project",
                         "a project id such as my-project (not the display name)")
    common.require(self.zone, "zone", "us-west4-a (a zone with your TPU type)")
    common.check_pattern(self.zone, r"[a-z]+-[a-z]+[0-9]+-[a-z]", "zone",
                         "a zone such as us-west4-a or europe-west4-b, not a region")
    if self.action == "create":
      tpu_types.parse_accelerator_type(self.accelerator_type)
    if self.spot and self.preemptible:
      raise LaunchError("--spot and --preemptible exclude each other: pick one (--spot is "
                        "the current form)")
    if self.queued and self.preemptible:
      raise LaunchError("--preemptible has no queued-resource form: use --queued --spot")
    if self.queued_resource_id:
      common.check_pattern(self.queued_resource_id, r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?",
                           "queued_resource_id", "lowercase letters, digits and '-'")
    common.check_pattern(self.remote_dir, r"[A-Za-z0-9._/-]+", "remote_dir",
                         "a plain relative path such as rlhf_jax")
    common.check_pattern(self.python, r"python3(\.[0-9]+)?", "python",
                         "an interpreter name such as python3.11 or python3.12")
    if self.run_name:
      common.check_pattern(self.run_name, r"[A-Za-z0-9._-]+", "run_name",
                           "letters, digits, '.', '_' and '-'")
    if self.worker < 0:
      raise LaunchError(f"--worker={self.worker}: workers are numbered from 0")


def _gcloud(cfg: TpuVmConfig, *args: str) -> Command:
  return Command(("gcloud", "compute", "tpus", *args, f"--project={cfg.project}",
                  f"--zone={cfg.zone}"))


def _on_workers(cfg: TpuVmConfig, script: str, worker: str = "all") -> list[common.Step]:
  """`script` run by bash on the workers (bash -c, whatever the login shell), concurrently;
  after a note showing the script unquoted, since the command's nested quoting is hard to
  read."""
  where = "every worker" if worker == "all" else f"worker {worker}"
  return [Note(f"on {where}: {script}"),
          _gcloud(cfg, "tpu-vm", "ssh", cfg.name, f"--worker={worker}",
                  "--command=" + common.join(["bash", "-c", script]))]


def _queued_resource_id(cfg: TpuVmConfig) -> str:
  return cfg.queued_resource_id or f"{cfg.name}-qr"


def create(cfg: TpuVmConfig) -> list[common.Step]:
  tpu = tpu_types.parse_accelerator_type(cfg.accelerator_type)
  version = cfg.version or tpu.generation.runtime_version
  shape = (f"{cfg.accelerator_type}: {tpu.chips} chips on {tpu.hosts} "
           f"worker{'s' if tpu.hosts > 1 else ''}")
  if cfg.queued:
    qr = _queued_resource_id(cfg)
    argv = ["queued-resources", "create", qr, f"--node-id={cfg.name}",
            f"--accelerator-type={cfg.accelerator_type}", f"--runtime-version={version}"]
    if cfg.spot:
      argv.append("--spot")
    status = common.join(["gcloud", "compute", "tpus", "queued-resources", "describe", qr,
                         f"--project={cfg.project}", f"--zone={cfg.zone}"])
    return [Note(shape), _gcloud(cfg, *argv),
            Note(f"the request waits for capacity; copy once its state is ACTIVE:\n  {status}")]
  argv = ["tpu-vm", "create", cfg.name, f"--accelerator-type={cfg.accelerator_type}",
          f"--version={version}"]
  if cfg.spot:
    argv.append("--spot")
  if cfg.preemptible:
    argv.append("--preemptible")
  return [Note(shape), _gcloud(cfg, *argv)]


def copy(cfg: TpuVmConfig) -> list[common.Step]:
  """One archive of the working tree (uncommitted edits included), sent to every worker and
  unpacked over the previous copy. scp has no exclusions, so the tree is archived first
  (scp --recurse of the tree would send the local .venv, gigabytes); one file also copies
  much faster than many."""
  archive = common.GENERATED_DIR / f"{cfg.name}-repo.tar.gz"
  remote_archive = f"{cfg.remote_dir.replace('/', '_')}-repo.tar.gz"
  extra = tuple(p.strip() for p in cfg.exclude.split(",") if p.strip())
  excludes = [f"--exclude={pattern}" for pattern in (*COPY_EXCLUDES, *extra)]
  unpack = (f"mkdir -p {shlex.quote(cfg.remote_dir)} && tar -xzf {remote_archive} -C "
            f"{shlex.quote(cfg.remote_dir)} && rm {remote_archive}")
  return [
      Command(("mkdir", "-p", str(archive.parent))),
      Command(("tar", "-czf", str(archive), *excludes, "-C", str(common.REPO_ROOT), ".")),
      _gcloud(cfg, "tpu-vm", "scp", str(archive), f"{cfg.name}:{remote_archive}",
              "--worker=all"),
      *_on_workers(cfg, unpack),
  ]


def install(cfg: TpuVmConfig) -> list[common.Step]:
  """A venv in the repository on every worker with the project and jax[tpu] (libtpu)."""
  python = cfg.python
  steps = [f"cd {shlex.quote(cfg.remote_dir)}"]
  if cfg.apt_install:
    steps.append(f"sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get "
                 f"install -y -qq {python} {python}-venv")
  steps += [f"{python} -m venv .venv", ".venv/bin/pip install -q --upgrade pip",
            '.venv/bin/pip install -q -e ".[tpu]"',
            # Versions only: touching the TPU would wait for every worker's JAX to start.
            '.venv/bin/python -c "import jax; print(jax.__version__)"']
  return _on_workers(cfg, " && ".join(steps))


def _log_dir(run_name: str) -> str:
  return f"workdirs/logs/{run_name}"


def run(cfg: TpuVmConfig, command: list[str]) -> list[common.Step]:
  """The same command on every worker, from the repository with its venv active. Each worker
  writes workdirs/logs/<run_name>/<hostname>.log (hostnames end in -w-<worker>)."""
  common.require_command(command, USAGE)
  run_name = cfg.run_name or common.default_run_name(command)
  log_dir = _log_dir(run_name)
  log = f"{log_dir}/$(hostname).log"  # hostnames and log_dir need no quotes
  prelude = (f"cd {shlex.quote(cfg.remote_dir)} && mkdir -p {log_dir} && "
             ". .venv/bin/activate && ")
  experiment = common.join(command)
  logs_cmd = common.join(["python", "-m", "launch.tpu_vm", "logs", f"--name={cfg.name}",
                         f"--project={cfg.project}", f"--zone={cfg.zone}", "--worker=0",
                         f"--run_name={run_name}"])
  if cfg.detach:
    # setsid + nohup: the run outlives the ssh session that started it.
    script = prelude + f"(setsid nohup {experiment} > {log} 2>&1 < /dev/null &)"
    return [*_on_workers(cfg, script),
            Note(f"started in the background on every worker; follow worker 0 with:\n"
                 f"  {logs_cmd}")]
  # pipefail: the worker's exit status is the experiment's, not tee's.
  script = prelude + f"set -o pipefail && {experiment} 2>&1 | tee {log}"
  return [Note(f"every worker's output streams here; logs stay in {cfg.remote_dir}/{log_dir}/ "
               f"on each worker (follow one with `{logs_cmd}`)"),
          *_on_workers(cfg, script)]


def logs(cfg: TpuVmConfig, command: list[str]) -> list[common.Step]:
  run_name = cfg.run_name or (common.default_run_name(command) if command else "")
  if not run_name:
    raise LaunchError("logs needs the run: pass --run_name=<name used by run> (by default the "
                      "run's flagfile stem, e.g. --run_name=sft_tiny)")
  path = f"{shlex.quote(cfg.remote_dir)}/{_log_dir(run_name)}/*.log"
  return _on_workers(cfg, f"tail -n +1 -F {path}", worker=str(cfg.worker))


def delete(cfg: TpuVmConfig) -> list[common.Step]:
  if cfg.queued:
    # --force deletes the queued resource's TPU VM first, then the request.
    return [_gcloud(cfg, "queued-resources", "delete", _queued_resource_id(cfg), "--force")]
  return [_gcloud(cfg, "tpu-vm", "delete", cfg.name)]


def build(action: str | None, flag_argv: list[str], command: list[str]):
  """(steps, dry_run) for `python -m launch.tpu_vm <action> <flags> [-- command]`."""
  if action is not None:
    flag_argv = [f"--action={action}", *flag_argv]
  cfg = common.parse_flags(TpuVmConfig, flag_argv)
  if cfg.action == "run":
    steps = run(cfg, command)
  elif cfg.action == "logs":
    steps = logs(cfg, command)
  else:
    common.refuse_command(command, cfg.action)
    steps = {"create": create, "copy": copy, "install": install, "delete": delete}[
        cfg.action](cfg)
  return steps, cfg.dry_run


if __name__ == "__main__":
  sys.exit(common.main(build, doc=__doc__, config_cls=TpuVmConfig))
