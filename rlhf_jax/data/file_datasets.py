"""TFDS (array_record) datasets over local JSONL / JSON / Parquet files, validated and counted.

    built = build_file_dataset("data/hh/*.jsonl", format="hh_rlhf", data_dir=workdir,
                               test_fraction=0.05, tokenizer=tok, max_len=1024)
    train = builders.load_split(built.builder, "train")   # grain-ready, text fields as bytes
    built.report                                          # read / kept / skipped per reason

Never stale: the builder config name carries a hash of the input files' CONTENTS plus every
argument the records depend on (format, split, on_error, tokenizer identity, max_len and the
render function used for the length check). An edited file gets a new directory and is
rebuilt; unchanged inputs are reused without re-parsing. The hash costs one read of the files.

Never silently short: every record read is either kept or counted as skipped under a reason
(preference_formats.REASONS), read == kept + skipped is asserted, and the kept count is checked
against what the built splits hold. With on_error="raise" (default) any malformed record
fails the build with a ValueError naming the first few as file:line (JSONL) or file[index]
(JSON, Parquet) and the total count; with on_error="skip" they are dropped and the report
(counts per reason, the first problems) is stored in the dataset's metadata, so a reused
build returns the same report.

Splits: `files` is a path / glob / list of them (one "train" split, or "train" and "test" by a
deterministic hashed `test_fraction`), or a mapping {split: files} for separate files. The
hashed split is keyed on the prompt (the conversation for sft_messages), so all responses to
a prompt land on the same side.
"""
import dataclasses
import hashlib
import json
import re
from typing import Any, Mapping, NamedTuple, Sequence

import tensorflow_datasets as tfds

from rlhf_jax.data import builders
from rlhf_jax.data import local_files
from rlhf_jax.data import preference_formats as pf
from rlhf_jax.data.tokenizer import Tokenizer

ON_ERROR = ("raise", "skip")
SHOWN_IN_ERROR = 5      # problems listed in a raised ValueError
KEPT_IN_METADATA = 100  # problems stored in the dataset metadata (all are counted)

FileSpec = str | Sequence[str]


@dataclasses.dataclass
class Report:
  """What reading the files did. read == kept + sum(skipped.values())."""
  format: str
  read: int = 0
  kept: int = 0
  skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # reason -> count
  problems: list[str] = dataclasses.field(default_factory=list)      # "where: reason: detail"
  splits: dict[str, int] = dataclasses.field(default_factory=dict)   # split -> examples

  @property
  def num_skipped(self) -> int:
    return sum(self.skipped.values())

  def add_problem(self, where: str, error: pf.Malformed) -> None:
    self.skipped[error.reason] = self.skipped.get(error.reason, 0) + 1
    if len(self.problems) < KEPT_IN_METADATA:
      self.problems.append(f"{where}: {error}")

  def check(self) -> None:
    assert self.read == self.kept + self.num_skipped, self
    assert not self.splits or sum(self.splits.values()) == self.kept, self


def parse_records(raw: Sequence[local_files.RawRecord] | Any, fmt: str, report: Report, *,
                  tokenizer: Tokenizer | None = None, max_len: int | None = None,
                  render_fn: pf.RenderFn = pf.default_render, train_answers: bool = False,
                  packed: bool = False) -> list[dict[str, str]]:
  """Normalises raw records, counting every one in `report` as kept or skipped."""
  if fmt not in pf.FORMATS:
    raise ValueError(f"format must be one of {pf.FORMATS}, got {fmt!r}")
  kept = []
  for rec in raw:
    report.read += 1
    try:
      if rec.error is not None:
        raise pf.Malformed("invalid_json", rec.error)
      record = pf.parse(fmt, rec.value)
      if tokenizer is not None:
        pf.check_length(record, fmt, tokenizer, max_len, render_fn,
                        train_answers=train_answers, packed=packed)
    except pf.Malformed as e:
      report.add_problem(rec.where, e)
      continue
    kept.append(record)
    report.kept += 1
  return kept


def _raise_if_problems(report: Report) -> None:
  if report.num_skipped:
    shown = "\n  ".join(report.problems[:SHOWN_IN_ERROR])
    raise ValueError(
        f"{report.num_skipped} malformed of {report.read} {report.format} records "
        f"(by reason: {dict(sorted(report.skipped.items()))}); first "
        f"{min(SHOWN_IN_ERROR, report.num_skipped)}:\n  {shown}\n"
        "Fix the files, or pass --on_error=skip (on_error='skip' from Python) to drop and "
        "count them.")


def _split_key(record: Mapping[str, str]) -> str:
  if "prompt" in record:
    return record["prompt"]
  messages = json.loads(record["messages"])
  last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
  return json.dumps(messages[:last])


def hashed_split(record: Mapping[str, str], test_fraction: float, seed: int) -> str:
  """"test" for a deterministic ~test_fraction of prompts, else "train"."""
  digest = hashlib.sha256(f"{seed}:{_split_key(record)}".encode()).digest()
  return "test" if int.from_bytes(digest[:8], "big") / 2.0**64 < test_fraction else "train"


def tokenizer_identity(tokenizer: Tokenizer) -> dict[str, Any]:
  """What the length check depends on: the class, a name if it has one, the vocabulary size,
  special ids and the ids of a probe text (which differ between vocabularies)."""
  probe = "Hello, world! 123 héllo\n\nHuman: hi\n\nAssistant: <|im_start|> \t\n"
  cls = type(tokenizer)
  return {"class": f"{cls.__module__}.{cls.__qualname__}",
          "name": getattr(tokenizer, "name_or_path", None) or getattr(tokenizer, "name", None),
          "vocab_size": tokenizer.vocab_size,
          "special": [tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id],
          "probe": hashlib.sha256(json.dumps(tokenizer.encode(probe)).encode()).hexdigest()}


class LocalFileRecords(builders.WorldRecords):
  """WorldRecords over local files; the parse report lives in the dataset metadata."""

  def __init__(self, *, parse_fn, **kwargs):
    self._parse_fn = parse_fn
    self._report: Report | None = None
    super().__init__(records_fn=self._records, **kwargs)

  def _records(self):
    splits, self._report = self._parse_fn()
    return splits

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Records read from local files by rlhf_jax.data.file_datasets.",
        features=tfds.features.FeaturesDict({f: tfds.features.Text() for f in self._fields}),
        metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    generators = super()._split_generators(dl_manager)
    self.info.metadata["report"] = dataclasses.asdict(self._report)
    return generators


class FileDataset(NamedTuple):
  builder: LocalFileRecords
  report: Report


def read_report(builder: LocalFileRecords) -> Report:
  """The report stored with a built dataset."""
  return Report(**builder.info.metadata["report"])


def build_file_dataset(files: FileSpec | Mapping[str, FileSpec], *, format: str, data_dir: str,
                       name: str | None = None, on_error: str = "raise",
                       test_fraction: float | None = None, split_seed: int = 0,
                       tokenizer: Tokenizer | None = None, max_len: int | None = None,
                       render_fn: pf.RenderFn = pf.default_render,
                       render_id: str | None = None, train_answers: bool = False,
                       packed: bool = False) -> FileDataset:
  """Builds (or reuses, for identical inputs and arguments) an array_record TFDS dataset of
  normalised records (preference_formats.FIELDS[format]) read from local files.

  files: path / glob / list of them -> split "train" (plus "test" if test_fraction), or
    {split: path / glob / list} for separate files per split.
  format: one of preference_formats.FORMATS.
  name: the builder config name prefix (default: format); data lands in
    data_dir/local_file_records/<name>_<hash>/.
  on_error: "raise" (any malformed record fails the build) or "skip" (drop and count).
  test_fraction, split_seed: hashed train/test split of a single set of files.
  tokenizer, max_len: when given, records over max_len tokens are malformed ("too_long").
  render_fn, render_id: how message lists become text for the length check (a chat template
    plugs in here); render_id names it in the config hash (default: its qualified name;
    required for lambdas and closures, whose names do not identify them).
  train_answers: prompt formats' reference answers are trained on (SFT), so they count
    toward max_len.
  packed: a record's sequences share one row (--pack of pairs and rankings), so their total
    must fit max_len.
  """
  if format not in pf.FORMATS:
    raise ValueError(f"format must be one of {pf.FORMATS}, got {format!r}")
  if on_error not in ON_ERROR:
    raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
  if (tokenizer is None) != (max_len is None):
    raise ValueError("give both tokenizer and max_len (for the length check) or neither")
  name = name or format
  if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
    raise ValueError(f"name must be lowercase letters, digits and '_', got {name!r}")
  if isinstance(files, Mapping):
    if test_fraction is not None:
      raise ValueError("test_fraction splits a single set of files; got a split mapping")
    paths = {split: local_files.resolve_files(spec) for split, spec in files.items()}
  else:
    if test_fraction is not None and not 0.0 < test_fraction < 1.0:
      raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    paths = {"train": local_files.resolve_files(files)}
  if render_id is None:
    render_id = f"{render_fn.__module__}.{render_fn.__qualname__}"
    if tokenizer is not None and "<" in render_id:  # <lambda>, <locals>: not a stable identity
      raise ValueError(f"render_fn {render_id} has no stable name; pass render_id (it goes "
                       "into the dataset's config hash)")
  config = {
      "format": format, "on_error": on_error,
      "files": {split: local_files.files_digest(p) for split, p in paths.items()},
      "test_fraction": test_fraction, "split_seed": split_seed if test_fraction else None,
      "tokenizer": tokenizer_identity(tokenizer) if tokenizer is not None else None,
      "max_len": max_len, "render": render_id if tokenizer is not None else None,
      "train_answers": train_answers, "packed": packed,
  }

  def parse_fn():
    report = Report(format=format)
    splits = {}
    for split, split_paths in paths.items():
      for path in split_paths:
        splits.setdefault(split, []).extend(parse_records(
            local_files.read_file(path), format, report, tokenizer=tokenizer, max_len=max_len,
            render_fn=render_fn, train_answers=train_answers, packed=packed))
    if on_error == "raise":
      _raise_if_problems(report)
    if test_fraction is not None:
      records = splits.pop("train", [])
      for record in records:
        splits.setdefault(hashed_split(record, test_fraction, split_seed), []).append(record)
      splits.setdefault("train", [])
      splits.setdefault("test", [])
    report.splits = {split: len(records) for split, records in splits.items()}
    report.check()
    for split, records in splits.items():
      if not records:
        fix = ("too few prompts for a held-out split: raise --test_fraction or add records"
               if split == "test" and test_fraction is not None else
               f"check that they hold {format} records (--data_format; prompt files: "
               "--prompt_format) and are not empty")
        raise ValueError(f"split {split!r} has no records after parsing {paths} "
                         f"({report.read} read, skipped by reason: {report.skipped}): {fix}")
    return splits, report

  tfds.disable_progress_bar()
  builder = LocalFileRecords(parse_fn=parse_fn, name=name, fields=pf.FIELDS[format],
                             config=config, data_dir=data_dir)
  skip_stats = tfds.download.ComputeStatsMode.SKIP
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(compute_stats=skip_stats))
  report = read_report(builder)
  report.check()
  for split, n in report.splits.items():
    on_disk = builder.info.splits[split].num_examples
    if on_disk != n:
      raise AssertionError(f"split {split!r} holds {on_disk} examples, parsed {n}")
  return FileDataset(builder, report)
