"""rlhf_jax.rewards.functions: the built-ins on hand-written completions, resolve() of a
built-in and of a user's module:function, and every error naming its fix."""
import math
import sys

import numpy as np
import pytest

from rlhf_jax.rewards import functions as fns


def test_math_reward():
  completions = ["so \\boxed{72}", "#### 1,234", "the answer is 0.5", "\\boxed{71}",
                 "\\boxed{72}", "\\boxed{1/2}"]
  answers = ["She sold 72 clips.\n#### 72", "#### 1234", "\\boxed{\\frac{1}{2}}", "72",
             None, "The answer is 1/2"]
  got = fns.math_reward([""] * 6, completions, answers)
  # The last two have no explicit reference (None; a guessed last number), so no score.
  assert got == [1.0, 1.0, 1.0, 0.0, None, None]


def test_format_boxed():
  completions = ["\\boxed{5}", "#### 5", "so 5", "\\boxed{5", "\\boxed{}", "####   \nfive"]
  assert fns.format_boxed([""] * 6, completions, [None] * 6) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_format_think():
  cases = [
      ("Q:", "<think>2+2 is 4</think> 4", 1.0),
      ("Q:", "  <think>\nlong\nthought\n</think>\nThe answer is 4.", 1.0),
      ("Q:", "<think></think>4", 1.0),  # R1's format reward allows an empty thought
      ("Q:", "<think>2+2 is 4</think>   ", 0.0),  # no answer after the thought
      ("Q:", "4 <think>late</think> 4", 0.0),  # text before the thought
      ("Q:", "<think>never closed 4", 0.0),
      ("Q:", "<think>a</think> 4 <think>b</think> 5", 0.0),  # a second block
      ("Q:", "<think>a <think>b</think> 4", 0.0),  # nested opening tag
      ("Q:", "4", 0.0),
      ("Q: <think>", "2+2 is 4</think> 4", 1.0),  # the chat template opened the block
      ("Q: <think>", "<think>x</think> 4", 1.0),
  ]
  got = fns.format_think([p for p, _, _ in cases], [c for _, c, _ in cases], [None] * len(cases))
  assert got == [e for _, _, e in cases]


def test_resolve_builtins():
  assert fns.resolve("math") is fns.math_reward
  assert fns.resolve(" format_boxed ") is fns.format_boxed
  assert fns.resolve("format_think") is fns.format_think


@pytest.fixture
def user_module(tmp_path, monkeypatch):
  """A module my_rewards.py written into tmp_path, importable from there."""
  (tmp_path / "my_rewards.py").write_text(
      "class Scorers:\n"
      "  @staticmethod\n"
      "  def length(prompts, completions, answers):\n"
      "    return [float(len(c)) for c in completions]\n"
      "\n"
      "def halves(prompts, completions, answers):\n"
      "  return [0.5 if a else None for a in answers]\n"
      "\n"
      "NOT_A_FUNCTION = 3\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.delitem(sys.modules, "my_rewards", raising=False)
  yield "my_rewards"
  sys.modules.pop("my_rewards", None)


def test_resolve_user_function(user_module):
  fn = fns.resolve(f"{user_module}:halves")
  got = fns.call(fn, "halves", ["p", "q"], ["a", "b"], ["1", None])
  np.testing.assert_array_equal(got, [0.5, np.nan])
  length = fns.resolve(f"{user_module}:Scorers.length")  # a dotted attribute
  np.testing.assert_array_equal(fns.call(length, "length", ["p"], ["abc"], [None]), [3.0])


@pytest.mark.parametrize("spec,match", [
    ("mth", r"neither a built-in \(math, format_boxed, format_think\).*'package\.module:"),
    (":fn", "use one of those names, or write 'my_rewards:my_fn'"),
    ("module:", "use one of those names"),
    ("a:b:c", "import path 'package.module:function'"),
    ("no_such_module_xyz:fn", "importable from the working directory or PYTHONPATH"),
])
def test_resolve_bad_specs(spec, match):
  with pytest.raises(ValueError, match=match):
    fns.resolve(spec)


def test_resolve_missing_or_uncallable_attribute(user_module):
  with pytest.raises(ValueError, match=r"no attribute 'halvez'; check the name after the colon "
                     r"\(callables in the module: Scorers, halves\)"):
    fns.resolve(f"{user_module}:halvez")
  with pytest.raises(ValueError, match="no attribute 'Scorers.width'"):
    fns.resolve(f"{user_module}:Scorers.width")
  with pytest.raises(ValueError, match=r"resolves to a int object, not a callable; point the "
                     r"spec at a function fn\(prompts, completions, answers\)"):
    fns.resolve(f"{user_module}:NOT_A_FUNCTION")


def test_call_converts_values():
  out = fns.call(lambda p, c, a: [1, True, None, np.float32(0.25), float("nan"), np.bool_(0)],
                 "ok", ["p"] * 6, ["c"] * 6, [None] * 6)
  assert out.dtype == np.float64
  np.testing.assert_array_equal(out, [1.0, 1.0, np.nan, 0.25, np.nan, 0.0])
  arr = fns.call(lambda p, c, a: np.array([0.5, 2.0]), "arr", ["p"] * 2, ["c"] * 2, [None] * 2)
  np.testing.assert_array_equal(arr, [0.5, 2.0])


def test_call_passes_lists_in_order():
  seen = []

  def spy(prompts, completions, answers):
    seen.append((prompts, completions, answers))
    return [0.0] * len(completions)

  fns.call(spy, "spy", ("p1", "p2"), ("c1", "c2"), ("a1", None))
  assert seen == [(["p1", "p2"], ["c1", "c2"], ["a1", None])]


@pytest.mark.parametrize("returned,match", [
    ([1.0, 2.0, 3.0], r"'bad' returned 3 values for 4 completions; return exactly one value"),
    ("1234", r"'bad' returned a str; return a list of 4 values"),
    ({0: 1.0}, "returned a dict"),
    (7.0, "returned a float"),
    (np.zeros((2, 2)), r"array of shape \(2, 2\); return a flat list of 4 values"),
    ([1.0, "0.5", 0.0, 1.0], r"'bad' returned '0.5' \(str\) for row 1; each value must be a "
                             r"finite number, or None"),
    ([1.0, 0.0, math.inf, 1.0], r"returned inf \(float\) for row 2"),
    ([1.0, 0.0, 0.0, 1j], r"returned 1j \(complex\) for row 3"),
])
def test_call_rejects_bad_returns(returned, match):
  with pytest.raises(ValueError, match=match):
    fns.call(lambda p, c, a: returned, "bad", ["p"] * 4, ["c"] * 4, [None] * 4)


def test_call_rejects_mismatched_inputs():
  with pytest.raises(ValueError, match="2 prompts, 3 completions and 3 answers; pass one of each"):
    fns.call(fns.format_boxed, "format_boxed", ["p"] * 2, ["c"] * 3, [None] * 3)


def test_parse_specs():
  assert fns.parse_specs("math") == [("math", 1.0)]
  assert fns.parse_specs("math, format_boxed", "") == [("math", 1.0), ("format_boxed", 1.0)]
  assert fns.parse_specs("math,my.mod:fn", "1.0,-0.5") == [("math", 1.0), ("my.mod:fn", -0.5)]
  assert fns.parse_specs("math,format_think", "0,1e-1") == [("math", 0.0), ("format_think", 0.1)]


@pytest.mark.parametrize("names,weights,match", [
    ("", "", "has an empty entry; give a comma-separated list"),
    ("math,,format_boxed", "", "has an empty entry"),
    ("math,math", "", "lists math more than once; list each function once and give it the "
                      "summed weight"),
    ("math,format_boxed", "1.0", "has 1 entries for 2 reward functions; give one weight per"),
    ("math", "1.0,2.0", "has 2 entries for 1 reward functions"),
    ("math,format_boxed", "1.0,abc", "entry 'abc' is not a number; give comma-separated floats"),
    ("math", "nan", "entry 'nan' is not finite"),
    ("math", "inf", "entry 'inf' is not finite"),
    ("math,format_boxed", "0,0.0", "are all zero, so no reward is left; give at least one"),
])
def test_parse_specs_errors(names, weights, match):
  with pytest.raises(ValueError, match=match):
    fns.parse_specs(names, weights)
