"""Readers for local dataset files: JSONL, JSON and Parquet, one file or many.

Every reader yields `RawRecord`s: the decoded value plus where it came from, so a problem
found later (by a format parser or a length check) is reported as `file:line` (JSONL, 1-based
line number) or `file[index]` (JSON list / Parquet row, 0-based). A line that is not valid JSON
(or not UTF-8) is yielded too, with `error` set, so the caller counts it like any other
malformed record: nothing a file holds is dropped silently. Blank JSONL lines are not records
and are skipped. A file that cannot be read as a whole (JSON that does not parse, a damaged
Parquet file) raises a ValueError naming it.

JSON files hold either a list of records or {"data": [records]}. Parquet rows come back as
python dicts (nested lists/structs, e.g. message lists, become lists/dicts) through pyarrow.
The same records in the three formats read back identically.

`files_digest` hashes file CONTENTS, which is what dataset builders put in their config name:
a file edited in place gets a new digest (and a rebuild), an untouched one is reused.
"""
import dataclasses
import glob
import hashlib
import json
import os
from typing import Any, Iterator, Sequence

EXTENSIONS = (".jsonl", ".json", ".parquet")


@dataclasses.dataclass(frozen=True)
class RawRecord:
  """One record as read from a file. `value` is the decoded JSON value (normally a dict);
  `error` is a parse error message, in which case `value` is None."""
  path: str
  position: int  # 1-based line number (JSONL) or 0-based index (JSON list, Parquet row)
  by_line: bool  # True: position is a line number
  value: Any = None
  error: str | None = None

  @property
  def where(self) -> str:
    return f"{self.path}:{self.position}" if self.by_line else f"{self.path}[{self.position}]"


def resolve_files(spec: str | Sequence[str]) -> list[str]:
  """A path, a glob, or a list of them -> the matching files, each glob's matches sorted
  (so the order is deterministic). Raises if a pattern matches nothing or a file has an
  unsupported extension."""
  patterns = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
  if not patterns:
    raise ValueError("no input files given")
  paths = []
  for pattern in patterns:
    pattern = os.fspath(pattern)
    matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    matches = [m for m in matches if os.path.isfile(m)]
    if not matches:
      raise FileNotFoundError(f"no file matches {pattern!r}")
    for m in matches:
      if not m.endswith(EXTENSIONS):
        raise ValueError(f"{m}: unsupported file type; expected one of {EXTENSIONS}")
    paths.extend(matches)
  return paths


def _decode(text: str):
  """json.loads, or the error message: invalid JSON, a number too long for int() or nesting
  too deep for the parser (both raised as other exception types by json)."""
  try:
    return json.loads(text), None
  except (ValueError, RecursionError) as e:
    return None, f"invalid JSON: {type(e).__name__}: {e}"[:300]


def read_jsonl(path: str) -> Iterator[RawRecord]:
  """Invalid UTF-8 (kept by surrogateescape) makes that line a malformed record, not the
  whole file; a leading BOM is dropped (utf-8-sig)."""
  with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
    for line_no, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        line.encode("utf-8")
      except UnicodeEncodeError as e:
        byte = ord(line[e.start]) - 0xDC00
        yield RawRecord(path, line_no, True, error=f"invalid UTF-8 (byte 0x{byte:02x} at "
                        f"character {e.start}); save the file as UTF-8")
        continue
      value, error = _decode(line)
      yield RawRecord(path, line_no, True, value=value, error=error)


def read_json(path: str) -> Iterator[RawRecord]:
  """A JSON list of records, or an object {"data": [records]}. A file that is not valid
  JSON, or has another shape, raises: there is no record to blame it on."""
  data, error = _decode(read_text(path))
  if error is not None:
    raise ValueError(f"{path}: {error}")
  if isinstance(data, dict) and isinstance(data.get("data"), list):
    data = data["data"]
  if not isinstance(data, list):
    raise ValueError(f"{path}: expected a JSON list of records or {{\"data\": [...]}}, "
                     f"got {type(data).__name__}")
  for i, value in enumerate(data):
    yield RawRecord(path, i, False, value=value)


def read_parquet(path: str) -> Iterator[RawRecord]:
  """A file pyarrow cannot read (truncated, not Parquet) raises naming it, not pyarrow's error."""
  import pyarrow as pa  # Imported lazily: only Parquet inputs need pyarrow.
  import pyarrow.parquet as pq
  index = 0
  try:
    batches = pq.ParquetFile(path).iter_batches()
    for batch in batches:
      for row in batch.to_pylist():
        yield RawRecord(path, index, False, value=row)
        index += 1
  except (pa.ArrowException, OSError) as e:
    raise ValueError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e}); "
                     "rewrite it, e.g. with pandas.DataFrame.to_parquet") from None


_READERS = {".jsonl": read_jsonl, ".json": read_json, ".parquet": read_parquet}


def read_file(path: str) -> Iterator[RawRecord]:
  """Dispatches on the file extension."""
  for ext, reader in _READERS.items():
    if path.endswith(ext):
      return reader(path)
  raise ValueError(f"{path}: unsupported file type; expected one of {EXTENSIONS}")


def read_records(spec: str | Sequence[str]) -> Iterator[RawRecord]:
  """All records of all files matching spec (see resolve_files), file by file, in order."""
  for path in resolve_files(spec):
    yield from read_file(path)


def read_text(path) -> str:
  """A UTF-8 text file (a leading BOM dropped); other bytes raise naming the file."""
  try:
    with open(path, encoding="utf-8-sig") as f:
      return f.read()
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: invalid UTF-8 at byte {e.start}; save the file as UTF-8") from None


def read_json_object(path) -> dict:
  """A JSON object file (a tokenizer or model config.json); anything else raises naming it,
  a lone surrogate escape ("\\ud800", which no UTF-8 text can hold) included."""
  value, error = _decode(read_text(path))
  if error is not None:
    raise ValueError(f"{path}: {error}")
  if not isinstance(value, dict):
    raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
  try:
    json.dumps(value, ensure_ascii=False).encode("utf-8")
  except UnicodeEncodeError as e:
    raise ValueError(f"{path}: holds an unpaired surrogate escape ({e.object[e.start]!r}), "
                     "not Unicode text") from None
  return value


def file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def files_digest(paths: Sequence[str]) -> list[dict[str, str]]:
  """Per file, in order: the content hash and the extension (which picks the reader). The
  path itself is left out, so moving an unchanged file does not force a rebuild."""
  return [{"sha256": file_sha256(p), "ext": os.path.splitext(p)[1]} for p in paths]
