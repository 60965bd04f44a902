"""Sequence packing: several short training examples in one row, attention kept inside each.

A padded batch of short conversations spends most of its compute on padding: a row of
seq_len tokens holding a 60-token example is 1 - 60/seq_len wasted. Packing concatenates
examples into rows and marks them with segment ids (1, 2, ... per example, 0 on padding); the
model (models/transformer.py) masks attention across segments and restarts positions at each
segment's first token, so every example's logits, and so its loss, are those it gets alone
in a padded row. Only the row count changes: the same examples fill fewer rows.

Packing is greedy and order preserving: examples are taken in the given (seeded, shuffled)
order and each goes into the current row if it fits, else starts a new one. First-fit-
decreasing would fill rows slightly better but sort long examples together, so a batch would
no longer be a sample of the data. The packed rows are computed once (as TRL and MaxText
pack at dataset preparation); every epoch then shuffles the rows.
"""
from typing import Iterable, NamedTuple, Sequence

import numpy as np

PACKED_KEYS = ("tokens", "loss_mask", "valid", "segment_ids", "example_valid")


class Packed(NamedTuple):
  rows: list[dict]  # PACKED_KEYS, each row seq_len long
  examples: int
  real_tokens: int  # tokens of the examples (no padding)

  @property
  def fill(self) -> float:
    """Share of the rows' slots holding example tokens."""
    return self.real_tokens / max(1, len(self.rows) * len(self.rows[0]["tokens"]))


def _row(seq_len: int, pad_id: int) -> dict:
  return {"tokens": np.full(seq_len, pad_id, np.int32), "loss_mask": np.zeros(seq_len, np.float32),
          "valid": np.zeros(seq_len, bool), "segment_ids": np.zeros(seq_len, np.int32),
          "example_valid": np.True_}


def pack_examples(examples: Iterable[dict], seq_len: int, pad_id: int) -> Packed:
  """Examples in pipeline.py's padded layout (tokens, loss_mask, valid; each real part
  contiguous from column 0) -> packed rows of seq_len, in order."""
  rows: list[dict] = []
  used, count, real = seq_len, 0, 0
  for ex in examples:
    n = int(np.asarray(ex["valid"]).sum())
    if n == 0:
      continue
    if not np.asarray(ex["valid"])[:n].all():
      raise ValueError("pack_examples needs right-padded examples (real tokens first)")
    if used + n > seq_len:
      rows.append(_row(seq_len, pad_id))
      used = 0
    row, seg = rows[-1], int(rows[-1]["segment_ids"].max()) + 1
    row["tokens"][used:used + n] = np.asarray(ex["tokens"])[:n]
    row["loss_mask"][used:used + n] = np.asarray(ex["loss_mask"])[:n]
    row["valid"][used:used + n] = True
    row["segment_ids"][used:used + n] = seg
    used, count, real = used + n, count + 1, real + n
  if not rows:
    raise ValueError("no example to pack")
  return Packed(rows, count, real)


def shuffled(examples: Sequence[dict], seed: int) -> list[dict]:
  """The examples in a seeded order (what to pack, so rows mix the data like batches do)."""
  order = np.random.default_rng(seed).permutation(len(examples))
  return [examples[int(i)] for i in order]
