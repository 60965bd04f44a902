"""`python -m experiments.X --flagfile=... --flag=value`: a typed config (rlhf_jax/pipeline/
config.py) parsed from the command line, the process joined to its multi-process job if it runs
in one (rlhf_jax/distributed.py: --coordinator_address/--num_processes/--process_id, or the
environment), then run.

A user error (a bad flag value, a missing or malformed file: the ValueError or
FileNotFoundError the configs and stages raise, naming the problem and its fix) ends the run
with that one message and exit status 2 (a usage error), not a traceback; --verbose keeps the
traceback, for when the error is the library's own. A fault of the run (a NaN step, a full
disk) is one message too, with its own status (RUN_FAULTS)."""
import os
import sys

import jax
from absl import app, flags, logging

from rlhf_jax import distributed
from rlhf_jax.pipeline import config
from rlhf_jax.train import checkpoint, nonfinite

USAGE_ERROR = 2
USER_ERRORS = (ValueError, FileNotFoundError)
# Faults of a run, reported as one message with their own exit status, so a scheduler can
# tell them from a usage error: a NaN/inf step (65) and a checkpoint that could not be written
# (74). A preemption exits through preemption.Preempted (85; 86 past the deadline).
RUN_FAULTS = (nonfinite.NonfiniteError, checkpoint.CheckpointWriteError)


def split_verbose(args: list[str]) -> tuple[bool, list[str]]:
  """(--verbose given, the other arguments)."""
  verbose = any(a in ("--verbose", "--verbose=true", "--verbose=True") for a in args)
  return verbose, [a for a in args if not a.startswith("--verbose")]


def user_error(main: str, error: Exception) -> int:
  """Prints `error` as one line naming the program and returns the usage status."""
  print(f"python -m {main}: error: {error}\n(rerun with --verbose for the traceback)",
        file=sys.stderr)
  return USAGE_ERROR


def main(config_cls, run, *, multi_process: bool = False) -> None:
  """Parses the command line into config_cls, then calls run(config).

  multi_process: the experiment splits its data, sampling and outputs across the processes of
  a job (docs/launch.md); the others stop with a clear error in a job of several processes.

  absl's global FLAGS are marked parsed with no flags of their own (libraries that read them,
  such as absl logging, see defaults); the experiment's flags live in the typed config."""
  def parser(argv):
    flags.FLAGS([argv[0]])
    return argv

  def main_fn(argv):
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    sys.stdout.reconfigure(line_buffering=True)  # progress lines show up when piped to a file
    verbose, args = split_verbose(argv[1:])
    name = os.path.splitext(os.path.basename(argv[0]))[0]
    try:
      job_args, args = distributed.split_argv(args)
      job = config.parse(distributed.DistributedConfig, job_args)
      cfg = config.parse(config_cls, args)  # every flag checked before joining or compiling
      if (multi_process and distributed.multi_process(job)
          and not os.environ.get(distributed.SUPERVISED_ENV)):
        sys.exit(distributed.supervise(sys.orig_argv))  # the work runs in a supervised child
      if distributed.join(job) and not multi_process:
        distributed.refuse_multi_process(jax.process_count(), config_cls.__name__)
      run(cfg)
    except RUN_FAULTS as e:
      if verbose:
        raise
      print(f"python -m experiments.{name}: {e}", file=sys.stderr)
      sys.exit(e.exit_status)
    except USER_ERRORS as e:
      if verbose:
        raise
      sys.exit(user_error(f"experiments.{name}", e))

  app.run(main_fn, flags_parser=parser)
