"""The bad-input campaign's verdicts: every generated input is run and classified as accepted,
a clear error, or a crash, and counted per target (the session summary prints the table).

Why a classifier instead of plain pytest.raises: the property is about the whole population of
inputs. A clear error is what experiments/cli.py turns into one line and exit status 2: a
ValueError or FileNotFoundError whose message names the file (or flag) at fault, raised before
anything compiles. Everything else is a crash: another exception type, one of the ValueError
subclasses that only leak from a dependency (JSONDecodeError, UnicodeError, pyarrow's
ArrowInvalid: their messages name no file), a message that names nothing the user can act on,
a compile before the error, or an accepted input whose result breaks the target's own check
(e.g. a record neither kept nor counted). A crash fails the test, after hypothesis shrinks it.

Profiles: "default" runs a few examples per target, derandomized (CI reproduces it exactly);
"slow" (pytest -m slow) runs many more, randomized.
"""
import dataclasses
import json
import os
import re
import traceback
from typing import Any, Callable, Sequence

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings

from rlhf_jax.compile_count import CompileCounter

USER_ERRORS = (ValueError, FileNotFoundError)
# ValueError subclasses raised by json, codecs and pyarrow themselves: their text names no
# file or record, so one reaching the user means a reader did not translate it.
LEAKED = (json.JSONDecodeError, UnicodeError, pa.ArrowException)

PROFILES = [pytest.param("default"), pytest.param("slow", marks=pytest.mark.slow)]
SLOW_FACTOR = 20  # the slow profile runs this many times the default examples
_BASE = settings(derandomize=True, deadline=None, database=None, print_blob=True,
                 suppress_health_check=list(HealthCheck))


@dataclasses.dataclass
class Counts:
  tried: int = 0
  accepted: int = 0
  clear: int = 0
  crashes: list[str] = dataclasses.field(default_factory=list)
  messages: set[str] = dataclasses.field(default_factory=set)  # distinct error shapes


COUNTS: dict[str, Counts] = {}


class Crash(AssertionError):
  """An input the target neither accepted nor refused clearly."""


def fuzz(profile: str, examples: int, *strategies) -> Callable:
  """Decorator: runs the decorated function (in place) as a hypothesis test over
  `strategies`, with `examples` examples under the default profile."""
  derandomize = profile != "slow"
  count = examples * (SLOW_FACTOR if profile == "slow" else 1)

  def run(body):
    settings(_BASE, max_examples=count, derandomize=derandomize)(given(*strategies)(body))()
  return run


def _shape(message: str) -> str:
  """A message with paths and numbers blanked, so equal errors collapse to one line."""
  message = re.sub(r"(/[^\s'\":,\]\[]+)+", "<path>", message.splitlines()[0] if message else "")
  return re.sub(r"\d+", "N", message)[:150]


def check(target: str, call: Callable[[], Any], *, names: Sequence[str],
          verify: Callable[[Any], None] | None = None,
          verify_error: Callable[[Exception], None] | None = None) -> Any:
  """Runs call() and classifies it for `target`.

  names: what a clear error must name, any one of them (the file, the flag). verify(result)
  checks an accepted result, verify_error(error) a clear error, each raising AssertionError
  when the target broke its contract. Returns the result, or the clear error. Raises Crash."""
  counts = COUNTS.setdefault(target, Counts())
  counts.tried += 1
  problem = None
  with CompileCounter() as compiles:
    try:
      result = call()
    except USER_ERRORS as e:
      result = e
      if isinstance(e, LEAKED):
        problem = f"{type(e).__name__} leaked"
      elif not any(n and n in str(e) for n in names):
        problem = f"the error names none of {list(names)}"
    except Exception as e:  # noqa: BLE001 - anything else is the finding
      result, problem = e, f"{type(e).__name__} raised"
  if compiles.count and problem is None:
    problem = f"compiled {compiles.names} first"
  if problem is None:
    try:
      if isinstance(result, USER_ERRORS):
        if verify_error:
          verify_error(result)
      elif verify:
        verify(result)
    except AssertionError as e:
      problem = f"broken contract: {e}"
  if problem is not None:
    detail = "".join(traceback.format_exception(result)) if isinstance(result, Exception) else ""
    counts.crashes.append(problem)
    raise Crash(f"{target}: {problem}\n{detail}")
  if isinstance(result, USER_ERRORS):
    counts.clear += 1
    counts.messages.add(_shape(str(result)))
  else:
    counts.accepted += 1
  return result


def summary() -> list[str]:
  """The table the session prints; with FUZZ_MESSAGES=1 also every distinct error shape (to
  review that each names the fix)."""
  if not COUNTS:
    return []
  width = max(len(t) for t in COUNTS)
  lines = [f"{'target':<{width}}  {'tried':>6} {'accepted':>8} {'clear':>6} {'crashes':>7}"]
  for target, c in sorted(COUNTS.items()):
    lines.append(f"{target:<{width}}  {c.tried:>6} {c.accepted:>8} {c.clear:>6} "
                 f"{len(c.crashes):>7}")
  total = [sum(getattr(c, k) for c in COUNTS.values()) for k in ("tried", "accepted", "clear")]
  crashes = sum(len(c.crashes) for c in COUNTS.values())
  lines.append(f"{'all':<{width}}  {total[0]:>6} {total[1]:>8} {total[2]:>6} {crashes:>7}")
  if os.environ.get("FUZZ_MESSAGES"):
    for target, c in sorted(COUNTS.items()):
      lines += [f"{target}: {m}" for m in sorted(c.messages)]
  return lines
