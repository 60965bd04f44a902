"""Hypothesis strategies for the readers' inputs: records of every format, valid by
construction or broken in one place, and JSONL / JSON / Parquet files holding them next to
lines and bytes no JSON encoder writes (invalid UTF-8, a BOM, unbalanced or 5,000-deep
brackets, 5,000-digit numbers, lone surrogate escapes, truncated Parquet).

A written file knows what a reader must report: how many records it holds (None when the file
is broken as a whole, so only a clear error or an accidental parse is acceptable) and where
the records valid by construction are (`file:line` or `file[index]`), which must be kept.
"""
import copy
import dataclasses
import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import assume, strategies as st

from rlhf_jax.data import preference_formats as pf

CONTAINERS = ("jsonl", "json", "parquet")
TEXT = st.text(st.characters(codec="utf-8"), min_size=1, max_size=12).filter(str.strip)
# Values no parser expects in a field: wrong types, blanks, a lone surrogate (JSON can escape
# it, UTF-8 cannot encode it), non-finite numbers, nested containers.
ODD_STRINGS = st.sampled_from(["", "  \n", "\ud800", "x\udfffy", "\x00", "#### ", "\\boxed{}",
                               "\n\nAssistant:", "a" * 3000, *pf.ROLES])
ODD_NUMBERS = st.sampled_from([float("nan"), float("inf"), -0.0, 10**30, -1, True, False])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | TEXT | ODD_STRINGS | ODD_NUMBERS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["role", "content", "prompt", "chosen", "answer", "x"]) | TEXT, inner,
        max_size=3),
    max_leaves=6)
# Whole lines a JSONL file may hold that json.dumps never writes.
RAW_LINES = st.sampled_from([
    b"{", b"}", b"not json", b"\xff\xfe\xfd", b'{"prompt": "\xc3"}', b"\xef\xbb\xbf{}",
    b"[" * 5000 + b"]" * 5000, b"1" * 5000, b"NaN", b"null", b"[]", b'"text"', b"  ", b"\t",
    b"\x00", b'{"prompt": "\\ud800", "chosen": "a", "rejected": "b"}', b"\x1c",
    b'{"a": 1} {"b": 2}']) | st.binary(max_size=24).map(lambda b: b.replace(b"\n", b"").replace(
        b"\r", b""))


def _two_texts():
  return st.lists(TEXT, min_size=2, max_size=2, unique=True)


def _conversation():
  """user/assistant turns, alternating and starting with the user (every template takes it)."""
  return st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=2).map(
      lambda turns: [m for q, a in turns for m in ({"role": "user", "content": q},
                                                   {"role": "assistant", "content": a})])


def _user(q):
  return [{"role": "user", "content": q}]


def _rankings():
  responses = st.lists(TEXT, min_size=2, max_size=4, unique=True)
  scored = responses.flatmap(lambda rs: st.lists(
      st.integers(-100, 100), min_size=len(rs), max_size=len(rs), unique=True).map(
          lambda scores: {"responses": rs, "scores": scores}))
  return st.tuples(TEXT | TEXT.map(_user), responses.map(lambda rs: {"responses": rs}) | scored
                   ).map(lambda t: {"prompt": t[0], **t[1]})


VALID = {
    "hh_rlhf": st.tuples(TEXT, _two_texts()).map(lambda t: {
        "chosen": f"\n\nHuman: {t[0]}\n\nAssistant: {t[1][0]}",
        "rejected": f"\n\nHuman: {t[0]}\n\nAssistant: {t[1][1]}"}),
    "ultrafeedback": st.tuples(TEXT, _two_texts()).map(lambda t: {
        "prompt": t[0], "chosen": [*_user(t[0]), {"role": "assistant", "content": t[1][0]}],
        "rejected": [*_user(t[0]), {"role": "assistant", "content": t[1][1]}]}),
    "pairs": st.tuples(TEXT, _two_texts()).map(
        lambda t: {"prompt": t[0], "chosen": t[1][0], "rejected": t[1][1]}),
    "unpaired": st.tuples(TEXT | TEXT.map(_user), TEXT, st.booleans()).map(
        lambda t: {"prompt": t[0], "completion": t[1], "label": t[2]}),
    "rankings": _rankings(),
    "sft_messages": _conversation().map(lambda m: {"messages": m}),
    "prompts": st.tuples(TEXT | TEXT.map(_user), st.none() | TEXT).map(
        lambda t: {"prompt": t[0], **({"answer": t[1]} if t[1] else {})}),
    "gsm8k": st.tuples(TEXT, TEXT, st.integers(0, 999)).map(
        lambda t: {"question": t[0], "answer": f"{t[1]}\n#### {t[2]}"}),
    "math": st.tuples(TEXT, st.integers(0, 999), st.booleans()).map(
        lambda t: {"problem": t[0], **({"answer": str(t[1])} if t[2] else
                                       {"solution": f"so \\boxed{{{t[1]}}}"})}),
}
assert set(VALID) == set(pf.FORMATS)


def _paths(value, prefix=()):
  """Every position inside a JSON value (the root included)."""
  yield prefix
  items = value.items() if isinstance(value, dict) else enumerate(value) \
      if isinstance(value, list) else ()
  for key, child in items:
    yield from _paths(child, prefix + (key,))


@st.composite
def mutated(draw, valid, values=JSON_VALUES):
  """A value drawn from `valid` with one position replaced by one of `values`, deleted, or
  (in a list, e.g. of messages) repeated: roles that no longer alternate are what real
  templates refuse."""
  record = copy.deepcopy(draw(valid))
  path = draw(st.sampled_from(list(_paths(record))))
  value = draw(values)
  if not path:
    return value
  parent = record
  for key in path[:-1]:
    parent = parent[key]
  action = draw(st.sampled_from(["replace", "delete", "repeat"]))
  if action == "delete":
    del parent[path[-1]]
  elif action == "repeat" and isinstance(parent, list):
    parent.insert(path[-1], copy.deepcopy(parent[path[-1]]))
  else:
    parent[path[-1]] = value
  return record


def broken(fmt: str):
  """A record of `fmt` broken in one place (see mutated)."""
  return mutated(VALID[fmt])


@dataclasses.dataclass
class Written:
  paths: list[str]
  count: int | None  # records a reader must report; None: the file is broken as a whole
  valid: list[str]  # where the records valid by construction are: they must be kept


def _where(path, position, container):
  return f"{path}:{position}" if container == "jsonl" else f"{path}[{position}]"


def _jsonl(draw, fmt, path, clean) -> Written:
  valid = VALID[fmt].map(lambda r: ("valid", json.dumps(r).encode()))
  items = draw(st.lists(valid if clean else st.one_of(
      valid, broken(fmt).map(lambda r: ("broken", json.dumps(r).encode())),
      RAW_LINES.map(lambda b: ("raw", b)), st.just(("blank", b""))),
      min_size=3 if clean else 0, max_size=8 if clean else 6))
  newline = draw(st.sampled_from([b"\n", b"\r\n"]))
  data = draw(st.sampled_from([b"", b"\xef\xbb\xbf"])) + newline.join(b for _, b in items)
  data += draw(st.sampled_from([b"", newline]))
  with open(path, "wb") as f:
    f.write(data)
  # The reader's own line rules: universal newlines, whitespace-only lines are not records.
  lines = list(io.TextIOWrapper(io.BytesIO(data), encoding="utf-8-sig",
                                errors="surrogateescape"))
  count = sum(1 for line in lines if line.strip())
  valid = [_where(path, i + 1, "jsonl") for i, (kind, _) in enumerate(items) if kind == "valid"]
  return Written([path], count, valid)


def _records(draw, fmt, clean):
  kinds = draw(st.lists(st.sampled_from(["valid"] if clean else ["valid", "broken"]),
                        min_size=3 if clean else 0, max_size=8 if clean else 6))
  return kinds, [draw(VALID[fmt] if k == "valid" else broken(fmt)) for k in kinds]


def _json(draw, fmt, path, clean) -> Written:
  kinds, records = _records(draw, fmt, clean)
  layout = draw(st.sampled_from(["list", "data"] if clean else ["list", "data", "garbage"]))
  if layout == "garbage":
    data = draw(RAW_LINES | st.sampled_from([b'{"data": 3}', b'{"rows": []}', b"[1, 2"]))
    count, valid = None, []
  else:
    value = records if layout == "list" else {"data": records, "meta": 1}
    data = draw(st.sampled_from([b"", b"\xef\xbb\xbf"])) + json.dumps(value).encode()
    count = len(records)
    valid = [_where(path, i, "json") for i, k in enumerate(kinds) if k == "valid"]
  with open(path, "wb") as f:
    f.write(data)
  return Written([path], count, valid)


def _parquet(draw, fmt, path, clean) -> Written:
  kinds, records = _records(draw, fmt, clean)
  assume(all(isinstance(r, dict) for r in records))  # a Parquet row is an object
  # Columns are the union of the records' keys (from_pylist would take the first record's):
  # a key a record lacks is null there, which readers must treat as absent.
  keys = list(dict.fromkeys(k for r in records for k in r)) or ["id"]
  try:  # Parquet holds one type per column: mixed records cannot be written at all
    table = pa.table({k: pa.array([r.get(k) for r in records],
                                  None if records else pa.string()) for k in keys})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
  except (pa.ArrowException, AttributeError, TypeError, ValueError, OverflowError):
    assume(False)
  data = sink.getvalue().to_pybytes()
  damage = "none" if clean else draw(st.sampled_from(["none", "truncate", "empty", "garbage"]))
  count, valid = len(records), [_where(path, i, "parquet") for i, k in enumerate(kinds)
                                if k == "valid"]
  if damage != "none":
    count, valid = None, []
    data = {"truncate": data[:draw(st.integers(0, max(len(data) - 1, 0)))], "empty": b"",
            "garbage": draw(st.binary(max_size=64)) + b"PAR1"}[damage]
  with open(path, "wb") as f:
    f.write(data)
  return Written([path], count, valid)


WRITERS = {"jsonl": _jsonl, "json": _json, "parquet": _parquet}


@st.composite
def files(draw, fmt: str, container: str, directory: str, name: str = "data") -> Written:
  """One or two files of `container` in `directory` holding `fmt` records (see Written); a
  third of the inputs hold valid records only, so acceptance is exercised too."""
  written = Written([], 0, [])
  clean = draw(st.integers(0, 2)) == 0
  for i in range(draw(st.integers(1, 2))):
    part = WRITERS[container](draw, fmt, os.path.join(directory, f"{name}{i}.{container}"),
                              clean)
    written.paths += part.paths
    written.valid += part.valid
    written.count = None if None in (written.count, part.count) else written.count + part.count
  return written
