"""What every launcher shares: the command line (`<action> --flag=value ... -- <experiment
command>`, flags parsed by the project's typed parser, rlhf_jax/pipeline/config.py), the steps a
launcher takes (commands to run, files to write) and how `--dry_run` prints them.

A dry run prints the steps as a shell script that does exactly what the launcher would do:
commands one per line, quoted for bash, and each generated file as a `cat > path <<'EOF'`
heredoc. Nothing is run, nothing is written.
"""
import dataclasses
import pathlib
import re
import shlex
import subprocess
import sys
from typing import Callable, Sequence, TextIO, TypeVar

from rlhf_jax.pipeline import config

C = TypeVar("C")

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
# Generated files (archives, JobSet YAML, sbatch scripts) go under workdirs/, which git ignores
# and the TPU copy step leaves out.
GENERATED_DIR = REPO_ROOT / "workdirs" / "launch"

# Ends a heredoc in the dry-run output; generated files are refused if a line equals it.
HEREDOC_END = "RLHF_JAX_EOF"


class LaunchError(ValueError):
  """A bad input, caught before anything runs; the message names the flag and the fix."""


def quote(arg: str) -> str:
  """`arg` as one shell word: in single quotes (shlex), or in double quotes with backslash,
  double quote, dollar and backquote escaped where that is shorter, since a command quoted at
  two levels (a remote script in gcloud's --command) reads far better with one level in double
  quotes. Never double quotes around a `!`, which an interactive bash expands from history."""
  single = shlex.quote(arg)
  if single == arg or "!" in arg:
    return single
  double = '"' + re.sub(r'([\\"$`])', r"\\\1", arg) + '"'
  return double if len(double) < len(single) else single


def join(argv: Sequence[str]) -> str:
  return " ".join(quote(arg) for arg in argv)


@dataclasses.dataclass(frozen=True)
class Command:
  """A program and its arguments, run without a shell (so nothing needs quoting to run it)."""
  argv: tuple[str, ...]

  def render(self) -> str:
    return join(self.argv)


@dataclasses.dataclass(frozen=True)
class WriteFile:
  """A generated file (a JobSet manifest, an sbatch script) the launcher writes."""
  path: pathlib.Path
  text: str
  executable: bool = False

  def render(self) -> str:
    body = self.text if self.text.endswith("\n") else self.text + "\n"
    chmod = f"\nchmod +x {shlex.quote(str(self.path))}" if self.executable else ""
    return (f"mkdir -p {shlex.quote(str(self.path.parent))}\n"
            f"cat > {shlex.quote(str(self.path))} <<'{HEREDOC_END}'\n{body}{HEREDOC_END}{chmod}")


@dataclasses.dataclass(frozen=True)
class Note:
  """A line for the user (what to run next); printed as a shell comment, never run."""
  text: str

  def render(self) -> str:
    return "\n".join(f"# {line}" if line else "#" for line in self.text.splitlines())


Step = Command | WriteFile | Note


def render(steps: Sequence[Step]) -> str:
  """The dry-run text of `steps`: a shell script, one command per line."""
  return "\n".join(step.render() for step in steps) + "\n"


def execute(steps: Sequence[Step], *, dry_run: bool, out: TextIO | None = None) -> None:
  """Prints the steps (dry run) or takes them in order, stopping at the first that fails."""
  out = out or sys.stdout
  if dry_run:
    out.write(render(steps))
    return
  for step in steps:
    if isinstance(step, Note):
      out.write(step.render() + "\n")
    elif isinstance(step, WriteFile):
      step.path.parent.mkdir(parents=True, exist_ok=True)
      step.path.write_text(step.text if step.text.endswith("\n") else step.text + "\n")
      if step.executable:
        step.path.chmod(0o755)
      out.write(f"wrote {step.path}\n")
    else:
      out.write(f"+ {step.render()}\n")
      out.flush()
      subprocess.run(step.argv, check=True)


def check_heredoc_safe(text: str, what: str) -> None:
  """A generated file whose line equals the heredoc end would print as a broken dry run."""
  if HEREDOC_END in text.splitlines():
    raise LaunchError(f"{what} contains a line '{HEREDOC_END}', which the dry run uses to end "
                      "the file: change that argument")


def split_argv(argv: Sequence[str]) -> tuple[str | None, list[str], list[str]]:
  """`[action] --flags... [-- command...]` -> (action or None, flags, command)."""
  argv = list(argv)
  command: list[str] = []
  if "--" in argv:
    cut = argv.index("--")
    argv, command = argv[:cut], argv[cut + 1:]
  action = None
  if argv and not argv[0].startswith("-"):
    action, argv = argv[0], argv[1:]
  return action, argv, command


def parse_flags(config_cls: type[C], flag_argv: Sequence[str]) -> C:
  """The project's typed flag parser; its errors (unknown flag, bad value) become LaunchError."""
  try:
    return config.parse(config_cls, flag_argv)
  except LaunchError:
    raise
  except ValueError as e:
    raise LaunchError(str(e)) from None


def require_action(action: str, actions: Sequence[str], usage: str) -> None:
  """The first argument must name one of the launcher's actions; usage shows the call."""
  if action not in actions:
    got = f" (got {action!r})" if action else ""
    raise LaunchError(usage.replace("<action>", "<" + "|".join(actions) + ">") + got)


def require(value: str, flag: str, example: str) -> None:
  if not value:
    raise LaunchError(f"--{flag} is required: pass e.g. --{flag}={example}")


def check_pattern(value: str, pattern: str, flag: str, rule: str) -> None:
  if not re.fullmatch(pattern, value):
    raise LaunchError(f"--{flag}={value!r} is not valid: {rule}")


def require_command(command: Sequence[str], usage: str) -> None:
  if not command or not any(arg.strip() for arg in command):
    raise LaunchError("no experiment command: put it after `--`, e.g.\n  " + usage)


def refuse_command(command: Sequence[str], action: str) -> None:
  if command:
    raise LaunchError(f"`{action}` takes no command after `--` (got {shlex.join(command)!r})")


def default_run_name(command: Sequence[str]) -> str:
  """A name for a run's logs: its flagfile's stem (e.g. sft_tiny), else its module's last part
  (e.g. sft), else 'run'."""
  for arg in command:
    if arg.startswith("--flagfile="):
      return pathlib.Path(arg.split("=", 1)[1]).stem or "run"
  for i, arg in enumerate(command[:-1]):
    if arg == "-m":
      return command[i + 1].rsplit(".", 1)[-1] or "run"
  return "run"


Build = Callable[[str | None, list[str], list[str]], tuple[list[Step], bool]]


def usage(doc: str, config_cls: type) -> str:
  """The module's docstring and every flag with its default and help."""
  lines = [doc.strip(), "", "flags:"]
  for field in dataclasses.fields(config_cls):
    default = field.default
    shown = ("true" if default else "false") if isinstance(default, bool) else repr(default)
    lines.append(f"  --{field.name} (default {shown}): {field.metadata['help']}")
  return "\n".join(lines) + "\n"


def main(build: Build, argv: Sequence[str] | None = None, *, doc: str = "",
         config_cls: type | None = None) -> int:
  """Runs a launcher: `build(action, flag_argv, command)` returns its steps and whether the
  flags asked for a dry run (print them) or not (take them). Bad input exits 2 with the
  message; a failing command exits with its status; --help prints `usage`."""
  argv = sys.argv[1:] if argv is None else argv
  action, flag_argv, command = split_argv(argv)
  if config_cls is not None and ({"-h", "--help", "--helpfull"} & {*flag_argv, action}):
    print(usage(doc, config_cls), end="")
    return 0
  try:
    steps, dry_run = build(action, flag_argv, command)
  except LaunchError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  try:
    execute(steps, dry_run=dry_run)
  except subprocess.CalledProcessError as e:
    print(f"error: {shlex.join(e.cmd)} exited with status {e.returncode}", file=sys.stderr)
    return e.returncode or 1
  except FileNotFoundError as e:
    print(f"error: {e.filename} is not installed or not on PATH", file=sys.stderr)
    return 127
  return 0
