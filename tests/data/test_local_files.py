"""Local file readers: JSONL, JSON and Parquet give the same records, with their locations."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlhf_jax.data import local_files as lf

RECORDS = [
    {"prompt": "Q1", "chosen": [{"role": "user", "content": "Q1"},
                                {"role": "assistant", "content": "é ok"}],
     "rejected": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "no"}]},
    {"prompt": "Q2", "chosen": [{"role": "assistant", "content": "a\nb"}],
     "rejected": [{"role": "assistant", "content": "c"}]},
]


def write_jsonl(path, records, blank_lines=False):
  lines = [json.dumps(r) for r in records]
  if blank_lines:
    lines = [lines[0], "", *lines[1:]]
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return str(path)


def write_json(path, records, wrapped=False):
  path.write_text(json.dumps({"data": records} if wrapped else records), encoding="utf-8")
  return str(path)


def write_parquet(path, records):
  pq.write_table(pa.Table.from_pylist(records), str(path))
  return str(path)


def test_three_formats_read_identically(tmp_path):
  paths = [write_jsonl(tmp_path / "a.jsonl", RECORDS), write_json(tmp_path / "a.json", RECORDS),
           write_json(tmp_path / "w.json", RECORDS, wrapped=True),
           write_parquet(tmp_path / "a.parquet", RECORDS)]
  for path in paths:
    assert [r.value for r in lf.read_file(path)] == RECORDS, path


def test_locations_are_jsonl_lines_and_json_parquet_indices(tmp_path):
  jsonl = write_jsonl(tmp_path / "a.jsonl", RECORDS, blank_lines=True)
  assert [r.where for r in lf.read_file(jsonl)] == [f"{jsonl}:1", f"{jsonl}:3"]
  js = write_json(tmp_path / "a.json", RECORDS)
  assert [r.where for r in lf.read_file(js)] == [f"{js}[0]", f"{js}[1]"]
  parquet = write_parquet(tmp_path / "a.parquet", RECORDS)
  assert [r.where for r in lf.read_file(parquet)] == [f"{parquet}[0]", f"{parquet}[1]"]


def test_invalid_jsonl_line_is_a_record_with_an_error(tmp_path):
  path = tmp_path / "a.jsonl"
  path.write_text('{"prompt": "x"}\n{"prompt": \n', encoding="utf-8")
  records = list(lf.read_file(str(path)))
  assert [(r.position, r.value, r.error is None) for r in records] == [
      (1, {"prompt": "x"}, True), (2, None, False)]
  assert "invalid JSON" in records[1].error


def test_bad_json_file_shapes_raise(tmp_path):
  (tmp_path / "obj.json").write_text('{"rows": []}')
  with pytest.raises(ValueError, match="expected a JSON list"):
    list(lf.read_file(str(tmp_path / "obj.json")))
  (tmp_path / "broken.json").write_text('[{"a": 1},')
  with pytest.raises(ValueError, match="invalid JSON"):
    list(lf.read_file(str(tmp_path / "broken.json")))


def test_globs_and_lists_resolve_in_sorted_order(tmp_path):
  b = write_jsonl(tmp_path / "b.jsonl", RECORDS[1:])
  a = write_jsonl(tmp_path / "a.jsonl", RECORDS[:1])
  assert lf.resolve_files(str(tmp_path / "*.jsonl")) == [a, b]
  assert lf.resolve_files([b, a]) == [b, a]
  assert [r.value for r in lf.read_records(str(tmp_path / "*.jsonl"))] == RECORDS
  with pytest.raises(FileNotFoundError):
    lf.resolve_files(str(tmp_path / "*.parquet"))
  (tmp_path / "c.csv").write_text("x")
  with pytest.raises(ValueError, match="unsupported"):
    lf.resolve_files(str(tmp_path / "c.csv"))


def test_digest_follows_contents_not_paths(tmp_path):
  a = write_jsonl(tmp_path / "a.jsonl", RECORDS)
  b = write_jsonl(tmp_path / "b.jsonl", RECORDS)
  assert lf.files_digest([a]) == lf.files_digest([b])
  write_jsonl(tmp_path / "b.jsonl", RECORDS[:1])
  assert lf.files_digest([a]) != lf.files_digest([b])
