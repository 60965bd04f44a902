"""Reward functions on text, built in or the user's own, named on the command line.

Every reward function follows one batched signature, so a user's function drops in beside
the built-ins:

  fn(prompts: list[str], completions: list[str], answers: list[str | None])
      -> Sequence[float | None]

one value per completion, in order; None (or NaN) means "could not be computed" (no
reference answer, a judge that timed out), and the row is then left out of that function's
statistics instead of being scored 0 (`losses.group_rewards` masks it). Batched rather than
per row so that a function can amortise work: one call to a model or a service per batch.

Built-ins (`BUILTINS`): "math" (the answer checked against the reference by
`math_answers`), "format_boxed" (an explicit final answer), "format_think" (DeepSeek-R1's
`<think>...</think>` then an answer).

`resolve("package.module:function")` IMPORTS AND RUNS USER CODE: the module's top level on
import, the function on every batch. Name only code you trust.

Several weighted functions are two flags of the same length, `--reward_fns=math,format_boxed
--reward_weights=1.0,0.1` (`parse_specs`): a weight cannot ride on the name with a colon,
because `module:function` already uses one.
"""
import importlib
import math
import numbers
import re
from typing import Callable, Optional, Sequence

import numpy as np

from rlhf_jax.rewards import math_answers

RewardFunction = Callable[[list, list, list], Sequence[Optional[float]]]

_THINK = re.compile(r"\s*<think>(.*?)</think>(.*)", re.DOTALL)


def math_reward(prompts, completions, answers):
  """1.0 when the completion's final answer equals the reference exactly, 0.0 otherwise; None
  where the answer gives no explicit reference (math_answers.reference_answer)."""
  del prompts
  out = []
  for completion, answer in zip(completions, answers):
    ref = None if answer is None else math_answers.reference_answer(answer)
    out.append(None if ref is None else
               float(math_answers.answers_match(math_answers.extract_answer(completion), ref)))
  return out


def format_boxed(prompts, completions, answers):
  """1.0 when the completion states its final answer explicitly (`\\boxed{}` or `####`), 0.0
  when only a last number could be guessed: teaches the format the verifier reads first."""
  del prompts, answers
  return [float(math_answers.extract_answer(c, last_number=False) is not None)
          for c in completions]


def format_think(prompts, completions, answers):
  """1.0 when the completion is `<think>...</think>` followed by a non-empty answer and no
  further think tag (DeepSeek-R1's format reward), else 0.0. A prompt that already ends
  with `<think>` (chat templates that open the block) counts as the completion's start."""
  del answers
  out = []
  for prompt, completion in zip(prompts, completions):
    if prompt.rstrip().endswith("<think>") and "<think>" not in completion:
      completion = "<think>" + completion
    m = _THINK.fullmatch(completion)
    ok = (m is not None and "<think>" not in m.group(1) and m.group(2).strip() != ""
          and "<think>" not in m.group(2) and "</think>" not in m.group(2))
    out.append(float(ok))
  return out


BUILTINS: dict[str, RewardFunction] = {
    "math": math_reward,
    "format_boxed": format_boxed,
    "format_think": format_think,
}


def resolve(spec: str) -> RewardFunction:
  """The reward function a flag names: a built-in name or "package.module:function" (the
  attribute may be dotted, "module:Class.method").

  A module:function spec IMPORTS AND RUNS USER CODE (the module's top level now, the
  function on every batch). Raises ValueError naming the problem and its fix.
  """
  spec = spec.strip()
  if spec in BUILTINS:
    return BUILTINS[spec]
  module_name, sep, attr = spec.partition(":")
  if not sep or not module_name.strip() or not attr.strip() or ":" in attr:
    raise ValueError(
        f"reward function {spec!r} is neither a built-in ({', '.join(BUILTINS)}) nor an "
        "import path 'package.module:function'; use one of those names, or write "
        "'my_rewards:my_fn' for a function my_fn in my_rewards.py")
  module_name, attr = module_name.strip(), attr.strip()
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(
        f"reward function {spec!r}: cannot import module {module_name!r} ({e}); the module "
        "must be importable from the working directory or PYTHONPATH: run from the "
        "directory that holds it, or add that directory to PYTHONPATH") from e
  fn = module
  for part in attr.split("."):
    if not hasattr(fn, part):
      public = sorted(n for n in dir(module) if not n.startswith("_")
                      and callable(getattr(module, n)))
      raise ValueError(
          f"reward function {spec!r}: module {module_name!r} has no attribute {attr!r}; "
          f"check the name after the colon (callables in the module: {', '.join(public)})")
    fn = getattr(fn, part)
  if not callable(fn):
    raise ValueError(
        f"reward function {spec!r} resolves to a {type(fn).__name__} object, not a callable; "
        "point the spec at a function fn(prompts, completions, answers) -> one float or None "
        "per completion")
  return fn


def _value(name: str, row: int, v) -> float:
  """One returned reward as a float (None -> NaN), or a ValueError naming it."""
  if v is None:
    return math.nan
  if isinstance(v, (bool, np.bool_, numbers.Real)):
    f = float(v)
    if not math.isinf(f):
      return f
  raise ValueError(
      f"reward function {name!r} returned {v!r} ({type(v).__name__}) for row {row}; each "
      "value must be a finite number, or None (or NaN) where it cannot be computed")


def call(fn: RewardFunction, name: str, prompts: Sequence[str], completions: Sequence[str],
         answers: Sequence[Optional[str]]) -> np.ndarray:
  """rewards float64 [len(completions)] of one reward function, NaN where it returned None.

  Checks what the function returned, since a user's function that returns a wrong length or a
  string would otherwise be broadcast or cast into a silently wrong reward.
  """
  n = len(completions)
  if len(prompts) != n or len(answers) != n:
    raise ValueError(f"reward function {name!r} called with {len(prompts)} prompts, {n} "
                     f"completions and {len(answers)} answers; pass one of each per row")
  out = fn(list(prompts), list(completions), list(answers))
  if hasattr(out, "__array__") and not isinstance(out, (str, bytes)):
    out = np.asarray(out)
    if out.ndim != 1:
      raise ValueError(f"reward function {name!r} returned an array of shape {out.shape}; "
                       f"return a flat list of {n} values, one per completion")
    out = out.tolist()
  if isinstance(out, (str, bytes, dict)) or not isinstance(out, (list, tuple)):
    raise ValueError(f"reward function {name!r} returned a {type(out).__name__}; return a "
                     f"list of {n} values (a float, or None), one per completion")
  if len(out) != n:
    raise ValueError(f"reward function {name!r} returned {len(out)} values for {n} "
                     "completions; return exactly one value (a float, or None) per completion")
  return np.array([_value(name, i, v) for i, v in enumerate(out)], np.float64)


def parse_specs(fns: str, weights: str = "") -> list[tuple[str, float]]:
  """[(spec, weight)] from `--reward_fns=a,b --reward_weights=wa,wb` (weights default to 1.0).

  Raises ValueError on an empty or repeated entry, a length mismatch, a weight that is not a
  finite number, or weights that are all zero (no reward at all).
  """
  names = [s.strip() for s in fns.split(",")]
  if not fns.strip() or any(not s for s in names):
    raise ValueError(f"--reward_fns={fns!r} has an empty entry; give a comma-separated list "
                     "of built-in names or module:function paths, e.g. math,format_boxed")
  repeated = sorted({s for s in names if names.count(s) > 1})
  if repeated:
    raise ValueError(f"--reward_fns lists {', '.join(repeated)} more than once; list each "
                     "function once and give it the summed weight in --reward_weights")
  if not weights.strip():
    return [(s, 1.0) for s in names]
  parts = [w.strip() for w in weights.split(",")]
  if len(parts) != len(names):
    raise ValueError(f"--reward_weights={weights!r} has {len(parts)} entries for "
                     f"{len(names)} reward functions; give one weight per function, in order")
  values = []
  for w in parts:
    try:
      values.append(float(w))
    except ValueError:
      raise ValueError(f"--reward_weights entry {w!r} is not a number; give comma-separated "
                       "floats such as 1.0,0.1") from None
    if not math.isfinite(values[-1]):
      raise ValueError(f"--reward_weights entry {w!r} is not finite; give finite weights")
  if not any(values):
    raise ValueError(f"--reward_weights={weights!r} are all zero, so no reward is left; give "
                     "at least one function a nonzero weight")
  return list(zip(names, values))
