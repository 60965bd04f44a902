"""Typed configs <-> flag lists and flagfiles.

A stage's or experiment's config is a frozen dataclass whose fields carry their help text
(`flag(default, "help")`); `parse(Config, argv)` defines those flags on a FRESH FlagValues,
parses argv (flagfiles, then overrides, in order), and builds the config, whose __post_init__
validates it. Nothing touches absl's global FLAGS (the library never reads the process's
flags), so the stage chain and tests can parse several flagfiles in one process, and invalid
values fail here, before anything compiles. experiments/cli.py runs a config as a main.
"""
import dataclasses
import math
import typing
from typing import Any, Sequence, TypeVar

from absl import flags

C = TypeVar("C")


def flag(default: Any, help: str, *, choices: Sequence[str] | None = None):
  """A config field that is also a flag. `choices` makes a string flag an enum."""
  return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


def _define(field: dataclasses.Field, hint, fv: flags.FlagValues) -> None:
  name, default, meta = field.name, field.default, field.metadata
  if "help" not in meta:
    raise TypeError(f"config field {name} needs a help string: use cli.flag(default, help)")
  help_text = meta["help"]
  if meta.get("choices"):
    flags.DEFINE_enum(name, default, list(meta["choices"]), help_text, flag_values=fv)
  elif hint is bool:
    flags.DEFINE_bool(name, default, help_text, flag_values=fv)
  elif hint is int:
    flags.DEFINE_integer(name, default, help_text, flag_values=fv)
  elif hint is float:
    flags.DEFINE_float(name, default, help_text, flag_values=fv)
  elif hint is str:
    flags.DEFINE_string(name, default, help_text, flag_values=fv)
  else:
    raise TypeError(f"config field {name}: unsupported flag type {hint}")


def define_flags(config_cls, fv: flags.FlagValues) -> None:
  hints = typing.get_type_hints(config_cls)
  for field in dataclasses.fields(config_cls):
    _define(field, hints[field.name], fv)


def parse(config_cls: type[C], argv: Sequence[str]) -> C:
  """Builds config_cls from flags such as ["--flagfile=x.flags", "--steps=3"].

  Raises ValueError naming the flag for unknown flags, unparsable values, NaN or infinite
  numbers and values the config rejects."""
  fv = flags.FlagValues()
  define_flags(config_cls, fv)
  try:
    unparsed = fv(["prog", *argv], known_only=False)
  except flags.Error as e:
    raise ValueError(f"bad flags for {config_cls.__name__}: {e}") from None
  if len(unparsed) > 1:
    raise ValueError(f"unexpected positional arguments {unparsed[1:]}")
  values = {f.name: fv[f.name].value for f in dataclasses.fields(config_cls)}
  for name, value in values.items():  # absl parses "nan" and "inf"; no flag means either
    if isinstance(value, float) and not math.isfinite(value):
      raise ValueError(f"--{name}={value}: must be a finite number")
  return config_cls(**values)


def to_dict(config) -> dict[str, Any]:
  return dataclasses.asdict(config)
