"""Readers for local dataset files: JSONL, JSON and Parquet, one file or many.

Every reader yields `RawRecord`s: the decoded value plus where it came from, so a problem
found later (by a format parser or a length check) is reported as `file:line` (JSONL, 1-based
line number) or `file[index]` (JSON list / Parquet row, 0-based). A line that is not valid JSON
is yielded too, with `error` set, so the caller counts it like any other malformed record:
nothing a file holds is dropped silently. Blank JSONL lines are not records and are skipped.

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


def read_jsonl(path: str) -> Iterator[RawRecord]:
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        yield RawRecord(path, line_no, True, value=json.loads(line))
      except json.JSONDecodeError as e:
        yield RawRecord(path, line_no, True, error=f"invalid JSON: {e}")


def read_json(path: str) -> Iterator[RawRecord]:
  """A JSON list of records, or an object {"data": [records]}. A file that is not valid
  JSON, or has another shape, raises: there is no record to blame it on."""
  with open(path, encoding="utf-8") as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: invalid JSON: {e}") from e
  if isinstance(data, dict) and isinstance(data.get("data"), list):
    data = data["data"]
  if not isinstance(data, list):
    raise ValueError(f"{path}: expected a JSON list of records or {{\"data\": [...]}}, "
                     f"got {type(data).__name__}")
  for i, value in enumerate(data):
    yield RawRecord(path, i, False, value=value)


def read_parquet(path: str) -> Iterator[RawRecord]:
  import pyarrow.parquet as pq  # Imported lazily: only Parquet inputs need pyarrow.
  index = 0
  for batch in pq.ParquetFile(path).iter_batches():
    for row in batch.to_pylist():
      yield RawRecord(path, index, False, value=row)
      index += 1


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
