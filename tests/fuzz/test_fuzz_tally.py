"""The classifier can fail a test: each kind of crash it must catch is raised as Crash (and
counted), a clear error and an acceptance are not. Its self-test target is dropped from the
session table afterwards, which reports the campaign's inputs only."""
import json

import jax
import jax.numpy as jnp
import pytest

import tally

TARGET = "classifier self-test"


@pytest.fixture(autouse=True)
def _forget_the_self_test():
  yield
  tally.COUNTS.pop(TARGET, None)


def _raise(error):
  def call():
    raise error
  return call


def test_accepted_and_clear_are_not_crashes():
  assert tally.check(TARGET, lambda: 3, names=["x.json"]) == 3
  error = tally.check(TARGET, _raise(ValueError("x.json: bad")), names=["x.json"])
  assert isinstance(error, ValueError)
  counts = tally.COUNTS[TARGET]
  assert (counts.tried, counts.accepted, counts.clear, counts.crashes) == (2, 1, 1, [])


@pytest.mark.parametrize("call, problem", [
    (_raise(KeyError("hidden_size")), "KeyError raised"),
    (_raise(ValueError("bad value")), "names none of"),
    (_raise(json.JSONDecodeError("Expecting value", "{", 0)), "JSONDecodeError leaked"),
    (lambda: jax.jit(lambda x: x + 1)(jnp.zeros(3)), "compiled"),
    (lambda: None, "broken contract: dropped"),
])
def test_every_kind_of_crash_fails(call, problem):
  def verify(_):
    raise AssertionError("dropped")
  with pytest.raises(tally.Crash, match=problem):
    tally.check(TARGET, call, names=["x.json"], verify=verify)
  assert len(tally.COUNTS[TARGET].crashes) == 1
