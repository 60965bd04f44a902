"""A stage's checked state: what its held-out metrics must show before it hands a model on.

A language-modelling stage (pretrain, SFT) with `--criterion` trains until every condition
holds at one of its evaluations (every --eval_every steps), and stops there; --steps is then a
budget, not a prescription. A stage that spends its budget without meeting the criterion
raises StageCriterionError naming what it reached and what was expected, and the stage cache
never marks it done, so no downstream stage starts from a model that did not learn.

Why: a step count tuned on one machine is luck on another. Float reductions round differently
across CPUs (AVX2 vs AVX-512, thread counts, sharding), and a model that leaves a plateau at
step 550 on one machine may still sit on it at step 1,000 on the next. A measured criterion
states what the downstream stages rely on.

Syntax: comma-separated conditions "METRIC>=VALUE" or "METRIC<=VALUE", all of which must hold
at the same evaluation, e.g. "accuracy_greedy>=0.45" or "greedy_gold>=1.5,temp1_words<=12".
METRIC is one of the stage's held-out metrics: the world's (rlhf_jax/worlds/heldout.py:
accuracy_greedy, greedy_gold, temp1_sycophancy_rate, ...), the teacher-forced answer `loss`
and `token_accuracy`, or `loss_drop`, the loss's fall since the previous evaluation
("loss_drop<=0.01": until the held-out loss stops falling; never met at the first).
"""
import dataclasses
import re
from typing import Iterable, Mapping

_CONDITION = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=)\s*([-+0-9.eE]+)\s*$")


class StageCriterionError(RuntimeError):
  """A stage spent its step budget without reaching its criterion."""


@dataclasses.dataclass(frozen=True)
class Condition:
  metric: str
  op: str  # ">=" or "<="
  value: float

  def holds(self, metrics: Mapping[str, float]) -> bool:
    """False while the metric is not yet defined (loss_drop at the first evaluation)."""
    if self.metric not in metrics:
      return False
    x = metrics[self.metric]
    return x >= self.value if self.op == ">=" else x <= self.value

  def __str__(self):
    return f"{self.metric}{self.op}{self.value:g}"


def parse(text: str) -> tuple[Condition, ...]:
  """The conditions of a --criterion string ("" -> none); ValueError on bad syntax."""
  if not text.strip():
    return ()
  out = []
  for part in text.split(","):
    match = _CONDITION.match(part)
    if match is None:
      raise ValueError(f"--criterion condition {part!r} is not METRIC>=VALUE or METRIC<=VALUE "
                       f"(e.g. --criterion=accuracy_greedy>=0.45)")
    try:
      value = float(match.group(3))
    except ValueError:
      raise ValueError(f"--criterion condition {part!r}: {match.group(3)!r} is not a number")
    out.append(Condition(match.group(1), match.group(2), value))
  return tuple(out)


def check_names(conditions: Iterable[Condition], available: Iterable[str]) -> None:
  """ValueError unless every condition names a metric the stage evaluates."""
  available = sorted(set(available))
  unknown = [c.metric for c in conditions if c.metric not in available]
  if unknown:
    raise ValueError(f"--criterion names {', '.join(unknown)}, which this stage does not "
                     f"evaluate; its held-out metrics are: {', '.join(available)}")


def met(conditions: Iterable[Condition], metrics: Mapping[str, float]) -> bool:
  return all(c.holds(metrics) for c in conditions)


def describe(conditions: Iterable[Condition], metrics: Mapping[str, float]) -> str:
  """"accuracy_greedy 0.142 (expected >=0.45)" for each condition, joined."""
  return ", ".join(f"{c.metric} {metrics.get(c.metric, float('nan')):.4g} "
                   f"(expected {c.op}{c.value:g})" for c in conditions)


def failure(stage: str, conditions, metrics: Mapping[str, float], step: int) -> str:
  """The message of a stage that missed its criterion within its budget."""
  return (f"{stage} missed its criterion within its budget of {step} steps: reached "
          f"{describe(conditions, metrics)} at its last evaluation. Its model is not handed "
          f"downstream. Raise --steps (the budget), or look at the learning curve in "
          f"metrics.jsonl: a run still on a plateau needs a different learning rate or data, a "
          f"run that stopped improving needs a criterion it can reach.")
