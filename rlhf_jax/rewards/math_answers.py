r"""Math answer verification without a computer algebra system: extract a model's final answer,
read a dataset's reference answer, and compare the two exactly, so a policy is rewarded for
the right value whatever form it writes it in, and never for a near miss.

Extraction (`extract_answer`), the first rule that applies:
  1. the LAST `\boxed{...}` or `\fbox{...}`, its braces balanced (`\{` and `\}` are escaped
     braces, not groups). When that last box never closes (a truncated completion) the answer
     is None: an earlier box is a draft the model went on from, not its final answer.
  2. the text after the last `####` up to the end of its line (GSM8K), when not empty;
  3. the last number in the text (see Numbers), only with `last_number=True`.
A reference (`reference_answer`) takes rules 1-2 only, or a whole string that is a number
("72", "1/2", "\frac{1}{2}"): a reference must be explicit, never guessed from the last number
of a solution.

Normalisation (`normalize`), in this order:
  - the Unicode minus is "-"; `\dfrac` and `\tfrac` are `\frac`; `\sqrt3` is `\sqrt{3}`;
  - removed: `\left`, `\right`, `\displaystyle`, the spacing commands `\, \; \: \! \ `,
    `\quad`, `\qquad`, LaTeX's thousands comma `{,}`, degrees (`^\circ`, `^{\circ}`, `°`),
    dollar signs (`$`, `\$`) and percent signs (`%`, `\%`): "50%" is 50, not 1/2, because
    GSM8K and MATH write the answer to "what percent" as the bare number;
  - `\text{...}`, `\textbf{...}` and `\mbox{...}` groups are dropped as units (`5\text{ cm}` is
    5), unless nothing else is left, then unwrapped (`\text{(A)}` is "(A)");
  - surrounding whitespace and one trailing period go, then a leading single-letter `x =`
    (`\boxed{x = 5}` answers 5).
  Numbers then become a `fractions.Fraction`: an optional sign, then an integer, a decimal
  (`72.0`, `.5`), an integer with thousands separators, or `a/b`, `\frac{a}{b}` or `\frac12`
  of numbers (signed and nested forms such as `-\frac{1}{2}` and `\frac{-1}{2}` too; a zero
  denominator is not a number). There is no scientific notation, no mixed number and no
  surd: `\frac{\sqrt{3}}{2}` stays a string. Anything else is a string with all whitespace
  removed (math mode ignores it, so `x^2 + 1` is `x^2+1`).
Thousands separators are commas between groups of exactly three digits after a first group of
1-3 digits: `1,234` and `1,234,567.5` are numbers; `1,2`, `12,34`, `1,2345` and `(1,2)` are
strings, so tuples and intervals never turn into numbers.

`answers_match` is exact rational equality when both sides are numbers (`0.5`, `1/2` and
`\frac{1}{2}` match; `0.333` and `1/3` do not), else equality of the normalised strings; a
number never equals a string. Nothing here raises on odd input: a verifier must not end a
training run, so an empty, unparsable or non-string answer simply does not match.
"""
import re
from fractions import Fraction
from typing import Optional, Union

_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
_INT = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)"
_DECIMAL = rf"(?:{_INT}(?:\.\d+)?|\.\d+)"
_PLAIN = re.compile(rf"{_DECIMAL}")
# A sign only where it cannot be a binary minus ("5-3"); a number never starts mid-number.
_NUMBER = re.compile(rf"(?:(?<![\w)\]}}])[-+])?\$?(?<![\d.]){_DECIMAL}(?:/{_DECIMAL})?")

_REWRITES = (
    (re.compile(r"\\[dt]frac(?![a-zA-Z])"), r"\\frac"),
    (re.compile(r"\\sqrt\s*(\w)"), r"\\sqrt{\1}"),
    (re.compile(r"\\(?:left|right|displaystyle|q?quad)(?![a-zA-Z])"), ""),
    (re.compile(r"\\[,;:! ]"), ""),
    (re.compile(r"\{,\}"), ""),
    (re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°"), ""),
    (re.compile(r"\\?[$%]"), ""),
)
_UNIT = re.compile(r"\\(?:text|textbf|mbox)\s*\{")
_VARIABLE = re.compile(r"[a-zA-Z]\s*=([^=]+)")


def _closing(text: str, start: int) -> int:
  """Index of the `}` that closes the group opened just before `start`, or -1 if none does."""
  depth, i = 1, start
  while i < len(text):
    c = text[i]
    if c == "\\":
      i += 2  # an escaped character, `\{` included, opens or closes nothing
      continue
    if c == "{":
      depth += 1
    elif c == "}":
      depth -= 1
      if depth == 0:
        return i
    i += 1
  return -1


def extract_answer(text: str, *, last_number: bool = True) -> Optional[str]:
  """The final answer of a completion, as written (see the module docstring), or None.
  `last_number=False` keeps only explicit answers (a box or `####`)."""
  if not isinstance(text, str):
    return None
  boxes = list(_BOX.finditer(text))
  if boxes:
    start = boxes[-1].end()
    end = _closing(text, start)
    inner = text[start:end].strip() if end >= 0 else ""
    return inner or None
  if "####" in text:
    tail = text.rsplit("####", 1)[1].split("\n", 1)[0].strip()
    if tail:
      return tail
  if last_number:
    numbers = [m.group(0) for m in _NUMBER.finditer(text)]
    return numbers[-1] if numbers else None
  return None


def reference_answer(solution: str) -> Optional[str]:
  """The answer of a dataset solution: its last box (MATH) or `####` line (GSM8K), or the
  whole string when it is a number; None otherwise (no guessing from the last number)."""
  explicit = extract_answer(solution, last_number=False)
  if explicit is not None:
    return explicit
  if isinstance(solution, str) and isinstance(normalize(solution), Fraction):
    return solution.strip()
  return None


def _drop_units(s: str) -> str:
  """`s` without its `\\text{...}` groups, or with them unwrapped if nothing else is left."""
  dropped, unwrapped, i = [], [], 0
  for m in _UNIT.finditer(s):
    if m.start() < i:
      continue  # a group inside a group already handled
    end = _closing(s, m.end())
    if end < 0:
      break
    dropped.append(s[i:m.start()])
    unwrapped += [s[i:m.start()], s[m.end():end]]
    i = end + 1
  dropped.append(s[i:])
  unwrapped.append(s[i:])
  rest = "".join(dropped)
  return rest if rest.strip().rstrip(".").strip() else "".join(unwrapped)


def _argument(s: str) -> tuple[Optional[str], str]:
  """(first argument of a LaTeX command, the rest): a brace group or one character."""
  s = s.lstrip()
  if s.startswith("{"):
    end = _closing(s, 1)
    return (None, s) if end < 0 else (s[1:end], s[end + 1:])
  if not s or s[0] == "\\":
    return None, s
  return s[0], s[1:]


def _number(s: str) -> Optional[Fraction]:
  """The exact value of a numeric answer, or None when it is not one."""
  s, negative = s.strip(), False
  while True:
    if s.startswith("{") and _closing(s, 1) == len(s) - 1:
      s = s[1:-1].strip()
    elif s[:1] in ("-", "+"):
      negative ^= s[0] == "-"
      s = s[1:].strip()
    else:
      break
  value = None
  try:
    if _PLAIN.fullmatch(s):
      value = Fraction(s.replace(",", ""))
    elif s.startswith("\\frac"):
      num, rest = _argument(s[len("\\frac"):])
      den, rest = _argument(rest) if num is not None else (None, rest)
      if den is not None and not rest.strip():
        value = _ratio(_number(num), _number(den))
    elif s.count("/") == 1:
      num, den = s.split("/")
      value = _ratio(_number(num), _number(den))
  except (ValueError, RecursionError):  # past int()'s digit limit, or absurdly nested
    return None
  return None if value is None else (-value if negative else value)


def _ratio(num: Optional[Fraction], den: Optional[Fraction]) -> Optional[Fraction]:
  return None if num is None or not den else num / den


def normalize(answer: str) -> Union[Fraction, str]:
  """The canonical form of an answer: a Fraction when it is a number, else a string without
  whitespace (rules in the module docstring)."""
  s = str(answer).replace("\u2212", "-")
  for pattern, repl in _REWRITES:
    s = pattern.sub(repl, s)
  s = _drop_units(s).strip()
  s = s[:-1].rstrip() if s.endswith(".") else s
  variable = _VARIABLE.fullmatch(s)
  s = variable.group(1).strip() if variable else s
  value = _number(s)
  return value if value is not None else "".join(s.split())


def answers_match(predicted: Optional[str], reference: str) -> bool:
  """Exact equality of two answers' normal forms: rational when both are numbers, textual
  when both are not. False for None, a non-string or an empty answer."""
  if not isinstance(predicted, str) or not isinstance(reference, str):
    return False
  p, r = normalize(predicted), normalize(reference)
  return p == r and p != ""  # a Fraction never equals a str
