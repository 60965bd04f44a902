"""`python -m experiments.X --flagfile=... --flag=value`: a typed config (rlhf_jax/pipeline/
config.py) parsed from the command line, then run."""
import sys

from absl import app, flags, logging

from rlhf_jax.pipeline import config


def main(config_cls, run) -> None:
  """Parses the command line into config_cls, then calls run(config).

  absl's global FLAGS are marked parsed with no flags of their own (libraries that read them,
  such as absl logging, see defaults); the experiment's flags live in the typed config."""
  def parser(argv):
    flags.FLAGS([argv[0]])
    return argv

  def main_fn(argv):
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    sys.stdout.reconfigure(line_buffering=True)  # progress lines show up when piped to a file
    run(config.parse(config_cls, argv[1:]))

  app.run(main_fn, flags_parser=parser)
