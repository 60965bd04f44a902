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


PAIR_KEYS = ("tokens", "loss_mask", "valid", "segment_ids", "chosen_segment",
             "rejected_segment", "pair_valid", "example_valid")


def pack_pairs(pairs: Iterable[dict], seq_len: int, pad_id: int) -> Packed:
  """Preference pairs in data/pairs.py's layout (chosen_*/rejected_* right-padded rows, and
  ref_*_logps when precomputed) -> rows holding whole pairs, each pair's chosen and rejected
  as two adjacent segments (2k - 1 and 2k for the k-th pair of a row). A row's pairs are
  listed in chosen_segment / rejected_segment / pair_valid (P slots, P the most pairs any row
  holds; empty slots have segment 0 and pair_valid False), and ref_chosen_logps /
  ref_rejected_logps (R x P) when the pairs carry them. The DPO family's loss reads the
  sequence log-probs of each segment (train/preference.py: pair_logps)."""
  rows: list[dict] = []
  slots: list[list[tuple]] = []
  used, count, real = seq_len, 0, 0
  for pair in pairs:
    sides = [(np.asarray(pair[f"{s}_tokens"]), np.asarray(pair[f"{s}_mask"]),
              int(np.asarray(pair[f"{s}_valid"]).sum())) for s in ("chosen", "rejected")]
    n = sides[0][2] + sides[1][2]
    if n > seq_len:
      raise ValueError(f"a pair of {n} tokens does not fit a packed row of {seq_len}")
    if used + n > seq_len:
      rows.append(_row(seq_len, pad_id))
      slots.append([])
      used = 0
    row, k = rows[-1], len(slots[-1]) + 1
    for j, (tokens, mask, m) in enumerate(sides):
      row["tokens"][used:used + m] = tokens[:m]
      row["loss_mask"][used:used + m] = mask[:m]
      row["valid"][used:used + m] = True
      row["segment_ids"][used:used + m] = 2 * k - 1 + j
      used += m
    slots[-1].append(tuple(float(pair[k]) for k in ("ref_chosen_logps", "ref_rejected_logps")
                           if k in pair))
    count, real = count + 1, real + n
  if not rows:
    raise ValueError("no pair to pack")
  p = max(len(s) for s in slots)
  for row, pairs_in_row in zip(rows, slots):
    k = len(pairs_in_row)
    row["chosen_segment"] = np.where(np.arange(p) < k, 2 * np.arange(p) + 1, 0).astype(np.int32)
    row["rejected_segment"] = np.where(np.arange(p) < k, 2 * np.arange(p) + 2, 0).astype(
        np.int32)
    row["pair_valid"] = np.arange(p) < k
    if pairs_in_row and pairs_in_row[0]:
      refs = np.zeros((2, p), np.float32)
      refs[:, :k] = np.asarray(pairs_in_row, np.float32).T
      row["ref_chosen_logps"], row["ref_rejected_logps"] = refs
  return Packed(rows, count, real)


RANKING_KEYS = ("tokens", "valid", "segment_ids", "response_segment", "example_valid")


def pack_rankings(rankings: Iterable[dict], seq_len: int, pad_id: int) -> Packed:
  """Reward-model rankings (pipeline/reward_files.py's layout: tokens_BxKxT, valid_BxKxT,
  response_valid_BxK per prompt) -> rows holding whole rankings, each response a segment.
  response_segment (Q x K per row, Q the most rankings any row holds) names the segment of
  response k of the row's q-th ranking, 0 where there is none; the loss scores each segment
  at its last token (train/reward.py: ranking_scores)."""
  rows: list[dict] = []
  slots: list[list[list[int]]] = []
  used, count, real, k_max = seq_len, 0, 0, 0
  for ranking in rankings:
    present = np.flatnonzero(np.asarray(ranking["response_valid_BxK"]))
    lengths = [int(np.asarray(ranking["valid_BxKxT"])[j].sum()) for j in present]
    n, k_max = sum(lengths), max(k_max, len(ranking["response_valid_BxK"]))
    if n > seq_len:
      raise ValueError(f"a ranking of {n} tokens does not fit a packed row of {seq_len}")
    if used + n > seq_len:
      rows.append(_row(seq_len, pad_id))
      slots.append([])
      used = 0
    row, segs = rows[-1], []
    for j, m in zip(present, lengths):
      seg = int(row["segment_ids"].max()) + 1
      row["tokens"][used:used + m] = np.asarray(ranking["tokens_BxKxT"])[j][:m]
      row["valid"][used:used + m] = True
      row["segment_ids"][used:used + m] = seg
      segs.append(seg)
      used += m
    slots[-1].append(segs)
    count, real = count + 1, real + n
  if not rows:
    raise ValueError("no ranking to pack")
  q = max(len(s) for s in slots)
  for row, rankings_in_row in zip(rows, slots):
    row["response_segment"] = np.zeros((q, k_max), np.int32)
    for i, segs in enumerate(rankings_in_row):
      row["response_segment"][i, :len(segs)] = segs
    del row["loss_mask"]  # a reward model reads no per-token targets
  return Packed(rows, count, real)
