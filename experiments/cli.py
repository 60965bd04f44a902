"""`python -m experiments.X --flagfile=... --flag=value`: a typed config (rlhf_jax/pipeline/
config.py) parsed from the command line, the process joined to its multi-process job if it runs
in one (rlhf_jax/distributed.py: --coordinator_address/--num_processes/--process_id, or the
environment), then run."""
import os
import sys

import jax
from absl import app, flags, logging

from rlhf_jax import distributed
from rlhf_jax.pipeline import config


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
    job_args, args = distributed.split_argv(argv[1:])
    job = config.parse(distributed.DistributedConfig, job_args)
    cfg = config.parse(config_cls, args)  # every flag checked before joining or compiling
    if (multi_process and distributed.multi_process(job)
        and not os.environ.get(distributed.SUPERVISED_ENV)):
      sys.exit(distributed.supervise(sys.orig_argv))  # the work runs in a supervised child
    if distributed.join(job) and not multi_process:
      distributed.refuse_multi_process(jax.process_count(), config_cls.__name__)
    run(cfg)

  app.run(main_fn, flags_parser=parser)
