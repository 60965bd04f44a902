"""rlhf_jax.rewards.math_answers on hand-written tables: every rule of the module docstring,
with the near misses beside each match (a verifier that matches too much is as wrong as one
that matches too little)."""
from fractions import Fraction

import pytest

from rlhf_jax.rewards import math_answers as ma

# (predicted answer, reference answer, match?)
MATCH_TABLE = [
    ("72", "72", True),
    ("72", "72.0", True),
    ("72.000", "72", True),
    ("72", "720", False),
    ("72", "7.2", False),
    ("1,000", "1000", True),
    ("1,234,567", "1234567", True),
    ("1,234.5", "1234.50", True),
    ("(1,2)", "12", False),
    ("1,2", "12", False),
    ("12,34", "1234", False),  # not groups of three digits: a list, not a number
    ("1,2345", "12345", False),
    ("(1,2)", "(1, 2)", True),
    ("\\left( 1, 2 \\right)", "(1,2)", True),
    ("(1,2)", "(2,1)", False),
    ("\\frac{1}{2}", "0.5", True),
    ("1/2", "\\frac{1}{2}", True),
    (".5", "1/2", True),
    ("\\dfrac{3}{4}", "0.75", True),
    ("\\tfrac34", "3/4", True),
    ("\\frac{2}{4}", "\\frac{1}{2}", True),  # equal rationals, different forms
    ("0.333", "1/3", False),  # exact: a rounded decimal is not the fraction
    ("0.3333333333", "\\frac13", False),
    ("-3", "3", False),
    ("-3", "-3.0", True),
    ("-\\frac{1}{2}", "\\frac{-1}{2}", True),
    ("\u22125", "-5", True),  # Unicode minus
    ("$5", "5", True),
    ("\\$5.00", "5", True),
    ("-$5", "-5", True),
    ("50\\%", "50", True),  # percent sign dropped, not divided by 100
    ("50%", "0.5", False),
    ("5\\text{ cm}", "5", True),
    ("10 \\text{ dollars}", "10", True),
    ("\\text{(A)}", "(A)", True),
    ("\\text{(A)}", "(B)", False),
    ("30^\\circ", "30", True),
    ("30^{\\circ}", "30", True),
    ("1{,}000", "1000", True),
    ("1\\,000", "1000", True),
    ("72.", "72", True),  # a sentence's full stop
    ("x = 5", "5", True),
    ("x = 5", "6", False),
    ("x^2 + 1", "x^2+1", True),
    ("x^2 + 1", "x^2-1", False),
    ("\\frac{\\sqrt{3}}{2}", "\\dfrac{\\sqrt3}{2}", True),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt{2}}{2}", False),
    ("\\pi", "\\pi", True),
    ("  42  ", "42", True),
    ("4 2", "42", False),  # not a number (inner space), and a string never equals a number
    ("1/0", "1/0", True),  # a zero denominator is no number: compared as text
    ("1/0", "0", False),
    ("10" + "0" * 40, "1" + "0" * 41, True),  # huge integers, exactly
    ("10" + "0" * 40, "1" + "0" * 40 + "1", False),
    ("", "", False),  # an empty answer never matches
    (None, "5", False),
    ("5", None, False),
    (5, "5", False),  # not a string: no match, no exception
]


@pytest.mark.parametrize("predicted,reference,expected", MATCH_TABLE)
def test_answers_match_table(predicted, reference, expected):
  assert ma.answers_match(predicted, reference) is expected
  if isinstance(predicted, str) and isinstance(reference, str):
    assert ma.answers_match(reference, predicted) is expected  # symmetric


def test_match_table_is_large_and_balanced():
  assert len(MATCH_TABLE) >= 40
  assert 15 <= sum(e for _, _, e in MATCH_TABLE) <= len(MATCH_TABLE) - 15


# (completion, extracted answer)
EXTRACT_TABLE = [
    ("So the answer is \\boxed{72}.", "72"),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),  # nested braces
    ("first \\boxed{3}, no wait: \\boxed{4}", "4"),  # the last box wins
    ("\\fbox{ 7 }", "7"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces are not groups
    ("\\boxed{3} and then \\boxed{4", None),  # the final box is cut off: no answer
    ("\\boxed{}", None),
    ("The boxed answer \\boxed{5} beats #### 6", "5"),  # a box before ####
    ("Natalia sold 48/2 = 24 clips.\n#### 72", "72"),
    ("#### 1,234\nThat is all.", "1,234"),  # #### up to the end of its line
    ("#### \nso 5 it is", "5"),  # an empty #### line: the last number
    ("She has 3 apples and buys 4 more, so 7.", "7"),
    ("It costs $1,234.50 in total.", "$1,234.50"),
    ("It takes 2-5 hours", "5"),  # a binary minus is no sign
    ("we get (1+2)-4", "4"),
    ("The temperature is -7 degrees", "-7"),
    ("ratio 3/4.", "3/4"),
    ("The pair is (1,2)", "2"),
    ("no number at all", None),
    ("", None),
    (None, None),
]


@pytest.mark.parametrize("text,expected", EXTRACT_TABLE)
def test_extract_answer_table(text, expected):
  assert ma.extract_answer(text) == expected


def test_extract_without_last_number_needs_an_explicit_answer():
  assert ma.extract_answer("so 7", last_number=False) is None
  assert ma.extract_answer("so \\boxed{7}", last_number=False) == "7"
  assert ma.extract_answer("#### 7", last_number=False) == "7"


REFERENCE_TABLE = [
    ("Natalia sold 48/2 = 24 clips in May.\nShe sold 48+24 = 72 clips.\n#### 72", "72"),
    ("Total: 1,000 + 234 = 1,234\n#### 1,234", "1,234"),
    ("We get $\\sin 60^\\circ = \\boxed{\\frac{\\sqrt{3}}{2}}$.", "\\frac{\\sqrt{3}}{2}"),
    ("Thus $x = \\boxed{\\dfrac{1}{2}}$.", "\\dfrac{1}{2}"),
    ("72", "72"),  # a bare number is its own reference
    (" 1/2 ", "1/2"),
    ("\\frac{1}{2}", "\\frac{1}{2}"),
    ("The answer is 72", None),  # a reference is never guessed from the last number
    ("x^2+1", None),  # a bare non-number is not accepted either
    ("", None),
    (None, None),
]


@pytest.mark.parametrize("solution,expected", REFERENCE_TABLE)
def test_reference_answer_table(solution, expected):
  assert ma.reference_answer(solution) == expected


@pytest.mark.parametrize("answer,expected", [
    ("72", Fraction(72)),
    ("-0.25", Fraction(-1, 4)),
    ("1,234,567.5", Fraction(2469135, 2)),
    ("\\frac{-3}{-6}", Fraction(1, 2)),
    ("{-{5}}", Fraction(-5)),
    ("\\left( 1, 2 \\right)", "(1,2)"),
    ("x^2 + 1", "x^2+1"),
    ("1,2", "1,2"),
    ("\\frac{x}{2}", "\\frac{x}{2}"),
])
def test_normalize(answer, expected):
  got = ma.normalize(answer)
  assert type(got) is type(expected) and got == expected


@pytest.mark.parametrize("odd", [
    "9" * 5000,  # past int()'s digit limit: a string, not a ValueError
    "\\frac{" * 400 + "1" + "}{2}" * 400,  # deep nesting
    "\\boxed{" * 50,
    "{}}}{{",
    "\\frac",
    "/",
    "-" * 3000,
    "\x00\u2212$%",
])
def test_odd_inputs_never_raise(odd):
  ma.extract_answer(odd)
  ma.reference_answer(odd)
  ma.normalize(odd)
  assert ma.answers_match(odd, "1") is False
