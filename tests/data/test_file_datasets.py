"""TFDS datasets over local files: every format round-trips, malformed records are reported
with their location or skipped and counted, edited files are rebuilt, unchanged ones reused."""
import json
import re

import pytest

from rlhf_jax.data import builders, file_datasets as fd, local_files, pipeline
from rlhf_jax.data import preference_formats as pf
from rlhf_jax.data.tokenizer import ByteTokenizer
from test_local_files import write_json, write_jsonl, write_parquet  # tests/data is on sys.path

HH = [{"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.",
       "rejected": "\n\nHuman: Hi\n\nAssistant: Go."},
      {"chosen": "\n\nHuman: 1+1?\n\nAssistant: 2\n\nHuman: 2+2?\n\nAssistant: 4",
       "rejected": "\n\nHuman: 1+1?\n\nAssistant: 2\n\nHuman: 2+2?\n\nAssistant: 5"}]
HH_EXPECTED = [
    {"prompt": "\n\nHuman: Hi\n\nAssistant:", "prompt_kind": "text", "chosen": " Hello.",
     "rejected": " Go."},
    {"prompt": "\n\nHuman: 1+1?\n\nAssistant: 2\n\nHuman: 2+2?\n\nAssistant:",
     "prompt_kind": "text", "chosen": " 4", "rejected": " 5"}]
U = {"role": "user", "content": "Q"}
UF = [{"prompt": "Q", "chosen": [U, {"role": "assistant", "content": "a"}],
       "rejected": [U, {"role": "assistant", "content": "b"}]}]
SFT = [{"messages": [U, {"role": "assistant", "content": "a"}]}]
PROMPTS = [{"prompt": "37+48="}, {"prompt": [U]}]
CASES = {
    "hh_rlhf": (HH, HH_EXPECTED),
    "ultrafeedback": (UF, [{"prompt": json.dumps([U]), "prompt_kind": "messages", "chosen": "a",
                            "rejected": "b"}]),
    "pairs": ([{"prompt": "P", "chosen": "a", "rejected": "b"}],
              [{"prompt": "P", "prompt_kind": "text", "chosen": "a", "rejected": "b"}]),
    "sft_messages": (SFT, [{"messages": json.dumps(SFT[0]["messages"])}]),
    "prompts": (PROMPTS, [{"prompt": "37+48=", "prompt_kind": "text", "response": ""},
                          {"prompt": json.dumps([U]), "prompt_kind": "messages",
                           "response": ""}]),
}


def _sorted(records):
  return sorted(records, key=lambda r: json.dumps(r, sort_keys=True))


def read_back(builder, split="train"):
  source = builders.load_split(builder, split)
  return _sorted([{k: v.decode() for k, v in source[i].items()} for i in range(len(source))])


@pytest.mark.parametrize("fmt", sorted(CASES))
def test_each_format_builds_and_reads_back_through_load_split(tmp_path, fmt):
  rows, expected = CASES[fmt]
  built = fd.build_file_dataset(write_jsonl(tmp_path / "in.jsonl", rows), format=fmt,
                                data_dir=str(tmp_path / "tfds"))
  assert read_back(built.builder) == _sorted(expected)
  assert (built.report.read, built.report.kept, built.report.skipped) == (len(rows),
                                                                          len(rows), {})


def test_jsonl_json_parquet_build_identical_records(tmp_path):
  rows = UF * 2 + [{"prompt": "R", "chosen": [{"role": "assistant", "content": "x"}],
                    "rejected": [{"role": "assistant", "content": "y"}]}]
  paths = [write_jsonl(tmp_path / "a.jsonl", rows), write_json(tmp_path / "a.json", rows),
           write_parquet(tmp_path / "a.parquet", rows)]
  built = [read_back(fd.build_file_dataset(p, format="ultrafeedback",
                                           data_dir=str(tmp_path / "tfds")).builder)
           for p in paths]
  assert len(built[0]) == 3 and built[0] == built[1] == built[2]


# One record per malformed reason (pairs format; too_long needs the tokenizer below).
BAD_LINES = {
    "missing_field": '{"prompt": "P", "chosen": "a"}',
    "wrong_type": '{"prompt": "P", "chosen": "a", "rejected": 7}',
    "empty_response": '{"prompt": "P", "chosen": "", "rejected": "b"}',
    "identical_responses": '{"prompt": "P", "chosen": "a", "rejected": "a"}',
    "empty_prompt": '{"prompt": "", "chosen": "a", "rejected": "b"}',
    "too_long": '{"prompt": "P", "chosen": "a", "rejected": "' + "b" * 20 + '"}',
    "invalid_json": '{"prompt": "P", "chosen": ',
}
GOOD_LINE = '{"prompt": "P", "chosen": "a", "rejected": "b"}'
TOK = dict(tokenizer=ByteTokenizer(), max_len=10)


def _bad_file(tmp_path):
  """Line 1 good; lines 2.. one per reason in BAD_LINES order; last line good."""
  path = tmp_path / "bad.jsonl"
  path.write_text("\n".join([GOOD_LINE, *BAD_LINES.values(), GOOD_LINE]) + "\n")
  return str(path)


def test_every_malformed_reason_raises_with_file_and_line(tmp_path):
  path = _bad_file(tmp_path)
  with pytest.raises(ValueError) as e:
    fd.build_file_dataset(path, format="pairs", data_dir=str(tmp_path / "tfds"), **TOK)
  message = str(e.value)
  assert f"{len(BAD_LINES)} malformed of {len(BAD_LINES) + 2} pairs records" in message
  for line_no, reason in enumerate(list(BAD_LINES)[:fd.SHOWN_IN_ERROR], start=2):
    assert f"{path}:{line_no}: {reason}: " in message
  assert f"{path}:{fd.SHOWN_IN_ERROR + 2}:" not in message  # only the first few are listed
  for reason in BAD_LINES:  # all are counted by reason
    assert f"'{reason}': 1" in message


def test_every_reason_is_detected_with_its_location_through_the_parser(tmp_path):
  report = fd.Report(format="pairs")
  kept = fd.parse_records(local_files.read_file(_bad_file(tmp_path)), "pairs", report, **TOK)
  assert len(kept) == 2 and report.skipped == {reason: 1 for reason in BAD_LINES}
  located = [re.match(r"(.*):(\d+): (\w+): ", p).groups() for p in report.problems]
  assert [(int(n), reason) for _, n, reason in located] == [
      (i, reason) for i, reason in enumerate(BAD_LINES, start=2)]
  report.check()


def test_json_and_parquet_problems_name_the_index(tmp_path):
  rows = [{"prompt": "P", "chosen": "a", "rejected": "b"}, {"prompt": "P", "chosen": "a"}]
  for path in (write_json(tmp_path / "x.json", rows), write_parquet(tmp_path / "x.parquet", rows)):
    with pytest.raises(ValueError, match=re.escape(f"{path}[1]: missing_field")):
      fd.build_file_dataset(path, format="pairs", data_dir=str(tmp_path / "tfds"))


def test_skip_mode_counts_per_reason_and_keeps_the_rest(tmp_path):
  data_dir = str(tmp_path / "tfds")
  built = fd.build_file_dataset(_bad_file(tmp_path), format="pairs", data_dir=data_dir,
                                on_error="skip", **TOK)
  report = built.report
  assert (report.read, report.kept) == (len(BAD_LINES) + 2, 2)
  assert report.skipped == {reason: 1 for reason in BAD_LINES}
  assert report.splits == {"train": 2} and len(builders.load_split(built.builder, "train")) == 2
  assert len(report.problems) == len(BAD_LINES)
  # The report is the dataset's metadata: a reused build (no re-parse) returns it unchanged.
  again = fd.build_file_dataset(_bad_file(tmp_path), format="pairs", data_dir=data_dir,
                                on_error="skip", **TOK)
  assert again.builder.data_dir == built.builder.data_dir and again.report == report
  assert fd.read_report(again.builder) == report


def test_edited_file_is_rebuilt_and_unchanged_file_reused(tmp_path, monkeypatch):
  reads = []
  real_read = local_files.read_file
  monkeypatch.setattr(local_files, "read_file", lambda p: reads.append(p) or real_read(p))
  data_dir = str(tmp_path / "tfds")
  rows = [{"prompt": "P", "chosen": "a", "rejected": "b"}]
  path = write_jsonl(tmp_path / "in.jsonl", rows)
  first = fd.build_file_dataset(path, format="pairs", data_dir=data_dir)
  assert len(reads) == 1
  write_jsonl(tmp_path / "in.jsonl", rows)  # rewritten, same contents (new mtime): reused
  same = fd.build_file_dataset(path, format="pairs", data_dir=data_dir)
  assert len(reads) == 1 and same.builder.data_dir == first.builder.data_dir
  # Edited in place, same length: a new build with the new record, never the stale one.
  write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b"}])
  edited = fd.build_file_dataset(path, format="pairs", data_dir=data_dir)
  assert len(reads) == 2 and edited.builder.data_dir != first.builder.data_dir
  assert [r["prompt"] for r in read_back(edited.builder)] == ["Q"]
  assert [r["prompt"] for r in read_back(first.builder)] == ["P"]


def test_tokenizer_max_len_and_format_are_in_the_config(tmp_path):
  data_dir = str(tmp_path / "tfds")
  path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "P", "chosen": "a", "rejected": "b"}])
  dirs = {fd.build_file_dataset(path, format="pairs", data_dir=data_dir, **kw).builder.data_dir
          for kw in ({}, dict(tokenizer=ByteTokenizer(), max_len=10),
                     dict(tokenizer=ByteTokenizer(), max_len=11), dict(on_error="skip"),
                     dict(name="other"))}
  assert len(dirs) == 5


def test_separate_split_files(tmp_path):
  train = write_jsonl(tmp_path / "train.jsonl", HH)
  test = write_json(tmp_path / "test.json", HH[:1])
  built = fd.build_file_dataset({"train": train, "test": test}, format="hh_rlhf",
                                data_dir=str(tmp_path / "tfds"))
  assert read_back(built.builder, "train") == _sorted(HH_EXPECTED)
  assert read_back(built.builder, "test") == HH_EXPECTED[:1]
  assert built.report.splits == {"train": 2, "test": 1}


def test_hashed_split_is_deterministic_complete_and_keyed_on_the_prompt(tmp_path):
  rows = [{"prompt": f"P{i}", "chosen": c, "rejected": "z"} for i in range(40) for c in "ab"]
  path = write_jsonl(tmp_path / "in.jsonl", rows)
  built = fd.build_file_dataset(path, format="pairs", data_dir=str(tmp_path / "tfds"),
                                test_fraction=0.25, split_seed=3)
  train, test = read_back(built.builder, "train"), read_back(built.builder, "test")
  assert len(train) + len(test) == 80 and 0 < len(test) < 40
  train_prompts, test_prompts = {r["prompt"] for r in train}, {r["prompt"] for r in test}
  assert not train_prompts & test_prompts  # both responses to a prompt land on one side
  assert test_prompts == {f"P{i}" for i in range(40)
                          if fd.hashed_split({"prompt": f"P{i}"}, 0.25, 3) == "test"}
  other_seed = {f"P{i}" for i in range(40) if fd.hashed_split({"prompt": f"P{i}"}, 0.25, 4)
                == "test"}
  assert other_seed != test_prompts


def test_prompt_records_feed_the_sampling_pipeline(tmp_path):
  path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "1+1="}, {"prompt": "2+2="}])
  built = fd.build_file_dataset(path, format="prompts", data_dir=str(tmp_path / "tfds"))
  tok = ByteTokenizer()
  batch = next(pipeline.make_prompt_iterator(builders.load_split(built.builder, "train"),
                                             batch_size=2, prompt_len=6, tokenizer=tok))
  assert sorted(tok.decode(row) for row in batch["prompt_tokens"]) == ["1+1=", "2+2="]


def test_render_fn_drives_the_length_check(tmp_path):
  path = write_jsonl(tmp_path / "in.jsonl", UF)
  long_template = lambda ms: ("<|long template|>" * 3, ms[-1]["content"])  # noqa: E731
  kw = dict(format="ultrafeedback", data_dir=str(tmp_path / "tfds"), tokenizer=ByteTokenizer(),
            max_len=22)  # bos + "user: Q\nassistant: " + "a" + eos = 22
  assert fd.build_file_dataset(path, **kw).report.kept == 1  # "user: Q\nassistant: " fits
  with pytest.raises(ValueError, match="too_long"):
    fd.build_file_dataset(path, render_fn=long_template, render_id="long", **kw)
  with pytest.raises(ValueError, match="pass render_id"):  # a lambda has no stable identity
    fd.build_file_dataset(path, render_fn=long_template, **kw)


def test_argument_errors(tmp_path):
  path = write_jsonl(tmp_path / "in.jsonl", HH)
  data_dir = str(tmp_path / "tfds")
  with pytest.raises(ValueError, match="format must be one of"):
    fd.build_file_dataset(path, format="sharegpt", data_dir=data_dir)
  with pytest.raises(ValueError, match="on_error"):
    fd.build_file_dataset(path, format="hh_rlhf", data_dir=data_dir, on_error="ignore")
  with pytest.raises(ValueError, match="both tokenizer and max_len"):
    fd.build_file_dataset(path, format="hh_rlhf", data_dir=data_dir, max_len=3)
  with pytest.raises(ValueError, match="no records"):  # everything skipped: not an empty build
    fd.build_file_dataset(path, format="pairs", data_dir=data_dir, on_error="skip")
  assert set(pf.FIELDS) == set(pf.FORMATS)
