"""Bad-input campaign, command lines: every experiment's typed config (each experiments/*.py
main, found by reading its cli.main call, so a new experiment is covered without editing this
file) and the job flags every main parses, fed its CPU flagfile plus wrong types, negative,
zero and out-of-range numbers, non-finite floats, unknown flags and enum choices, empty
strings and missing files.

Property (tally.py): the config parses, or config.parse raises a ValueError naming a flag it
was given; what parses also passes the checks a run makes before compiling (effective(), the
mesh of lm.setup) or fails them the same way, and holds no NaN or infinite number. Then, in
subprocesses, the command line itself: a bad flag is one line and exit status 2. And flags
naming files that do not exist stop the run, in process, before anything compiles.
"""
import dataclasses
import glob
import importlib
import json
import math
import os
import re
import subprocess
import sys
import typing

import jax
import pytest
from hypothesis import strategies as st

import tally
from experiments import reward as reward_main, sft as sft_main
from rlhf_jax import distributed
from rlhf_jax.pipeline import config, lm
from rlhf_jax.runs import dpo_files, grpo_files, ppo_files

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
CONFIGS = os.path.join(ROOT, "experiments", "configs")


def _experiments() -> dict[str, tuple[type, list[str]]]:
  """name -> (config class, base argv: its CPU flagfile, when it has one)."""
  found = {}
  for path in sorted(glob.glob(os.path.join(ROOT, "experiments", "*.py"))):
    name = os.path.basename(path)[:-3]
    match = re.search(r"cli\.main\((\w+)\.(\w+)", open(path).read())
    if not match:
      continue
    module = importlib.import_module(f"experiments.{name}")
    cls = getattr(getattr(module, match[1]), match[2])
    flagfiles = [f for f in (f"{name}_tiny.flags", f"{name}.flags")
                 if os.path.exists(os.path.join(CONFIGS, f))]
    flagfiles += sorted(glob.glob(os.path.join(CONFIGS, f"{name}_*tiny.flags")))
    found[name] = cls, [f"--flagfile={os.path.join(CONFIGS, f)}" for f in flagfiles[:1]]
  return found


EXPERIMENTS = {**_experiments(), "job flags": (distributed.DistributedConfig, [])}
INTS = ["-1", "0", "1", "2", "3", "7", "-100", "1000000000", "2.5", "abc", "", "1e3",
        "99999999999999999999999"]
FLOATS = ["-1", "0", "0.5", "1", "1.5", "nan", "inf", "-inf", "1e308", "1e-320", "abc", ""]
BOOLS = ["true", "false", "maybe", "2", "", "yes"]
STRINGS = ["", " ", "/nonexistent/file.jsonl", "a,,b", "x" * 300, "é", "--x", "*", "metric>=",
           "accuracy_greedy>=2,loss<=-1"]


def _values(field: dataclasses.Field, hint) -> st.SearchStrategy[str]:
  """Odd values of the field's type, and its default (so some inputs are accepted)."""
  choices = field.metadata.get("choices")
  if choices:
    return st.sampled_from([*choices, "bogus", str(choices[-1]).upper() + "x"])
  odd = {bool: BOOLS, int: INTS, float: FLOATS}.get(hint, STRINGS)
  return st.sampled_from([str(field.default).lower() if hint is bool else str(field.default),
                          *odd])


@st.composite
def argv(draw, cls) -> tuple[list[str], list[str]]:
  """(flags, the names a clear error may name): one to three bad or odd flags."""
  hints = typing.get_type_hints(cls)
  fields = dataclasses.fields(cls)
  args, names = [], []
  for _ in range(draw(st.integers(1, 3))):
    kind = draw(st.sampled_from(["value", "value", "value", "bare", "negated", "unknown",
                                 "positional", "flagfile"]))
    field = draw(st.sampled_from(fields))
    value = draw(_values(field, hints[field.name]))
    args.append({"value": f"--{field.name}={value}", "bare": f"--{field.name}",
                 "negated": f"--no{field.name}", "unknown": "--no_such_flag=1",
                 "positional": "stray", "flagfile": "--flagfile=/nonexistent.flags"}[kind])
    names += {"unknown": ["no_such_flag"], "positional": ["stray"],
              "flagfile": ["nonexistent.flags"]}.get(kind, [field.name])
  return args, names


def _finite(cfg) -> None:
  for f in dataclasses.fields(cfg):
    value = getattr(cfg, f.name)
    assert not isinstance(value, float) or math.isfinite(value), f"accepted --{f.name}={value}"


def _parse_and_check(cls, args):
  """What a run does with its flags before it compiles anything."""
  cfg = config.parse(cls, args)
  _finite(cfg)
  if hasattr(cfg, "effective"):
    cfg = cfg.effective()
  if isinstance(cfg, lm.LMConfig):  # the mesh of a one-device (CPU) host, as the flagfiles'
    lm.setup(cfg, devices=jax.devices()[:1])
  return cfg


@pytest.mark.parametrize("profile", tally.PROFILES)
@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS))
def test_experiment_flags(experiment, profile):
  cls, base = EXPERIMENTS[experiment]

  @tally.fuzz(profile, 40, argv(cls))
  def run(drawn):
    args, names = drawn
    tally.check(f"flags {experiment}", lambda: _parse_and_check(cls, [*base, *args]),
                names=names)


def test_every_experiment_is_covered():
  """The discovery above finds every main (a regex that stopped matching would shrink the
  campaign silently)."""
  mains = [p for p in glob.glob(os.path.join(ROOT, "experiments", "*.py"))
           if "cli.main(" in open(p).read()]
  assert len(EXPERIMENTS) - 1 == len(mains) >= 14


def _cli(experiment: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", f"experiments.{experiment}", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


CLI_CASES = [  # tests/test_cli.py covers PPO's; these are the other mains
    ("dpo", "--beta=-1", "--beta must be > 0"),
    ("grpo", "--learning_rate=nan", "--learning_rate=nan: must be a finite number"),
    ("sft", "--data_format=bogus", "--data_format"),
    pytest.param("reward", "--steps=abc", "--steps", marks=pytest.mark.slow),
    pytest.param("best_of_n", "--on_error=maybe", "--on_error", marks=pytest.mark.slow),
    pytest.param("nash_md", "--no_such_flag=1", "no_such_flag", marks=pytest.mark.slow),
    pytest.param("sycophancy", "--flagfile=/nonexistent.flags", "nonexistent.flags",
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize("experiment, flag, message", CLI_CASES)
def test_a_bad_flag_is_one_line_and_status_2(experiment, flag, message):
  _, base = EXPERIMENTS[experiment]
  proc = _cli(experiment, *base, flag)
  assert proc.returncode == 2, proc.stderr
  assert "Traceback" not in proc.stderr, proc.stderr
  errors = [line for line in proc.stderr.splitlines() if "error:" in line]
  assert len(errors) == 1 and errors[0].startswith(f"python -m experiments.{experiment}: error:")
  assert message in errors[0], errors[0]


@pytest.fixture
def good_records(tmp_path):
  path = tmp_path / "pairs.jsonl"
  path.write_text("".join(json.dumps({"prompt": f"p{i}", "chosen": "yes", "rejected": "no"})
                          + "\n" for i in range(8)))
  return str(path)


MISSING = "/nonexistent/data.jsonl"
MISSING_FILE_RUNS = {  # experiment -> (its run function, flags naming a missing file)
    "sft": (sft_main.run, [f"--data_files={MISSING}"]),
    "reward": (reward_main.run, [f"--data_files={MISSING}"]),
    "dpo": (dpo_files.run, [f"--data_files={MISSING}"]),
    "dpo tokenizer": (dpo_files.run, ["--data_files={good}", "--tokenizer=/nonexistent/tok"]),
    "grpo": (grpo_files.run, [f"--prompt_files={MISSING}", "--max_new_tokens=4",
                              "--nomatched_sft"]),
    "ppo": (ppo_files.run, [f"--prompt_files={MISSING}", "--reward_hf=/nonexistent/rm",
                            "--max_new_tokens=4", "--nomatched_sft"]),
    "sft init_hf": (sft_main.run, ["--data_files={good}", "--init_hf=/nonexistent/model"]),
}


@pytest.mark.parametrize("case", sorted(MISSING_FILE_RUNS))
def test_missing_files_stop_the_run_before_it_compiles(case, good_records, tmp_path):
  run, flags = MISSING_FILE_RUNS[case]
  cls, base = EXPERIMENTS[case.split()[0]]
  flags = [f.format(good=good_records) for f in flags]
  cfg = config.parse(cls, [*base, *flags, f"--workdir={tmp_path / 'run'}", "--smoke",
                           f"--data_dir={tmp_path / 'data'}"])
  missing = [f.split("=", 1)[1] for f in flags if "nonexistent" in f]

  def went_ahead(_):
    raise AssertionError(f"{case}: the run went ahead without {missing}")
  tally.check(f"missing files {case.split()[0]}", lambda: run(cfg), names=missing,
              verify=went_ahead)
