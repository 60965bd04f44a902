"""Responses that share a prompt, in one row: the prompt is computed once, not once per response.

    [bos + prompt | response 1 | response 2 | ... | response K | padding]     row_len tokens

  segment_ids  1 on the prompt, k + 1 on response k, 0 on padding
  prefix_ids   1 on every real token: each response's prefix segment is the prompt
  positions    the prompt 0 .. p-1; every response p, p+1, ... as if it followed the prompt alone
The model's mask (models/transformer.py) lets a token attend to its own segment and to its
prefix segment, causally: each response sees the prompt and itself, never another response, so
its hidden states are those of its own row [bos + prompt + response] (to float32 rounding: the
masked scores add exact zeros). A DPO pair (K = 2) costs p + c + r tokens instead of two rows
of seq_len; a K-way ranking p + sum of its responses instead of K rows.

What is scored, per response k (N = response_len slots, static):
  from_KxN     index of the hidden state that predicts its j-th token: the prompt's last token
               for j = 0, the response's previous token after
  targets_KxN  its tokens (pad after them); target_mask_KxN 1 on them
  ends_K       index of its last token (where a reward model reads its score); 0 for an empty
               response (a missing ranking slot: finite, and weighted 0 by the loss)
so the LM head runs on the K * N predicting states only: no logits for prompt positions.
"""
import numpy as np

PROMPT_SEGMENT = 1


def check_response_len(response_len: int, seq_len: int) -> None:
  if not 0 < response_len < seq_len:
    raise ValueError(f"--response_len={response_len} must be in (0, --seq_len={seq_len}): the "
                     "longest response (with eos) a shared-prompt row holds")


def shared_row(head: list[int], responses: list[list[int]], *, row_len: int, response_len: int,
               pad_id: int) -> dict:
  """The row of `head` (bos + prompt tokens) followed by `responses` (module docstring)."""
  p, k, n_slots = len(head), len(responses), response_len
  if p < 1:
    raise ValueError("a shared-prompt row needs at least one prompt token (bos)")
  tokens = np.full(row_len, pad_id, np.int32)
  positions = np.zeros(row_len, np.int32)
  segment_ids = np.zeros(row_len, np.int32)
  targets = np.full((k, n_slots), pad_id, np.int32)
  from_ = np.zeros((k, n_slots), np.int32)
  target_mask = np.zeros((k, n_slots), np.float32)
  ends = np.zeros(k, np.int32)
  tokens[:p], positions[:p], segment_ids[:p] = head, np.arange(p), PROMPT_SEGMENT
  at = p
  for i, response in enumerate(responses):
    n = len(response)
    if n > n_slots:
      raise ValueError(f"a response is {n} tokens (with eos), longer than --response_len="
                       f"{n_slots}; raise --response_len or filter the data")
    if at + n > row_len:
      raise ValueError(f"prompt ({p} tokens) and responses do not fit a shared row of "
                       f"{row_len} tokens (--seq_len + --response_len); raise one of them")
    tokens[at:at + n] = response
    positions[at:at + n] = p + np.arange(n)
    segment_ids[at:at + n] = PROMPT_SEGMENT + 1 + i
    targets[i, :n], target_mask[i, :n] = response, 1.0
    from_[i, :n] = [p - 1, *range(at, at + n - 1)][:n]
    ends[i] = at + n - 1 if n else 0
    at += n
  valid = np.arange(row_len) < at
  return {"tokens": tokens, "valid": valid, "positions": positions, "segment_ids": segment_ids,
          "prefix_ids": np.where(valid, PROMPT_SEGMENT, 0).astype(np.int32),
          "from": from_, "targets": targets, "target_mask": target_mask, "ends": ends}


def is_shared(batch) -> bool:
  """Whether a batch is in this layout (its prefix_ids key)."""
  return "prefix_ids" in batch
