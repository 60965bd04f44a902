"""Grain pipelines: records -> fixed-shape numpy batches for training, eval and sampling.

Fixed shapes everywhere (one compile per shape, docs/math.md#conventions): every batch is
padded to `batch_size` rows and `seq_len` (or `prompt_len`) columns, so the last eval batch
never triggers a recompile.

Example kinds (records are dicts of text fields; bytes from TFDS are decoded here):
- "lm"  {"text"}: tokens = [bos] + encode(text) + [eos]; every token after bos is a target.
- "sft" {"prompt", "response"}: tokens = [bos] + encode(prompt) + encode(response) + [eos];
  only the response tokens and eos are targets.
Training batch (RIGHT-padded with pad_id):
  tokens        int32   BxT
  loss_mask     float32 BxT  1 iff token t is a training target, i.e. predicted from t-1
                             (never bos, never pad)
  valid         bool    BxT  non-pad tokens
  example_valid bool    B    False only for the rows padding the last eval batch
Prompt batch (for sampling; LEFT-padded so every prompt ends at column P-1):
  prompt_tokens int32 BxP [bos] + encode(prompt); prompt_valid bool BxP;
  answers <U (str) B, the reference "response"; example_valid bool B (padding rows hold a
  lone bos and answer "").
Examples longer than the row raise ValueError (no silent truncation: a cut answer would
train the model on a wrong target).

Everything runs in-process (no mp_prefetch, which needs absl flags parsed); order depends only
on the seed, and train iterators are resumable through get_state/set_state.
"""
from typing import Any, Callable, Iterator, Sequence

import grain
import numpy as np

from rlhf_jax.data import chat
from rlhf_jax.data.chat import ChatTemplate
from rlhf_jax.data.tokenizer import Tokenizer

KINDS = ("lm", "sft")

# Grain's default (16 threads, 500 batches ahead) oversubscribes a 2-core laptop and keeps
# the process alive for seconds after the last batch; a few batches ahead on two threads
# already hide the (cheap) tokenisation behind the train step.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _frame(ids: list[int], first_target: int, seq_len: int, pad_id: int, what: str) -> dict:
  """Right-pads ids to seq_len; targets are positions first_target..len(ids)-1."""
  if len(ids) > seq_len:
    raise ValueError(f"example {what} is {len(ids)} tokens (with bos/eos), longer than "
                     f"seq_len={seq_len}; raise seq_len or filter the data")
  n = len(ids)
  tokens = np.full(seq_len, pad_id, np.int32)
  tokens[:n] = ids
  loss_mask = np.zeros(seq_len, np.float32)
  loss_mask[first_target:n] = 1.0
  valid = np.zeros(seq_len, bool)
  valid[:n] = True
  return {"tokens": tokens, "loss_mask": loss_mask, "valid": valid, "example_valid": np.True_}


def lm_example(text: str, tokenizer: Tokenizer, seq_len: int) -> dict:
  """[bos] + text + [eos]; loss on everything after bos."""
  ids = [tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id]
  return _frame(ids, 1, seq_len, tokenizer.pad_id, repr(text[:60]))


def sft_example(prompt: str, response: str, tokenizer: Tokenizer, seq_len: int) -> dict:
  """[bos] + prompt + response + [eos]; loss on the response tokens and eos only."""
  head = [tokenizer.bos_id, *tokenizer.encode(prompt)]
  ids = head + tokenizer.encode(response) + [tokenizer.eos_id]
  return _frame(ids, len(head), seq_len, tokenizer.pad_id, repr((prompt[:40], response[:40])))


def chat_example(messages: Sequence[dict], tokenizer: Tokenizer, template: ChatTemplate,
                 seq_len: int) -> dict:
  """A whole conversation rendered by its chat template; the loss on EVERY assistant turn
  (with the template's end-of-turn token, which is how the model learns to stop) and nowhere
  else (chat.encode_chat). [bos] leads unless the template wrote it itself."""
  tokens, mask = chat.encode_chat(tokenizer, template, messages)
  if not tokens or tokens[0] != tokenizer.bos_id:
    tokens, mask = [tokenizer.bos_id, *tokens], [0, *mask]
  if len(tokens) > seq_len:
    raise ValueError(f"conversation {str(messages)[:60]!r} is {len(tokens)} tokens (with bos), "
                     f"longer than seq_len={seq_len}; raise seq_len or filter the data")
  example = _frame(tokens, 1, seq_len, tokenizer.pad_id, "")
  example["loss_mask"][:len(mask)] = np.asarray(mask, np.float32)
  return example


def prompt_example(prompt: str, response: str, tokenizer: Tokenizer, prompt_len: int) -> dict:
  """LEFT-padded [bos] + prompt, and the reference answer, for sampling."""
  ids = [tokenizer.bos_id, *tokenizer.encode(prompt)]
  if len(ids) > prompt_len:
    raise ValueError(f"prompt {prompt[:60]!r} is {len(ids)} tokens (with bos), longer than "
                     f"prompt_len={prompt_len}")
  tokens = np.full(prompt_len, tokenizer.pad_id, np.int32)
  tokens[prompt_len - len(ids):] = ids
  # Validity by position, not by id: a tokenizer may use one token as pad and bos (Qwen2's
  # <|endoftext|>), and the prompt's bos must stay valid.
  valid = np.arange(prompt_len) >= prompt_len - len(ids)
  return {"prompt_tokens": tokens, "prompt_valid": valid,
          "answers": np.str_(response), "example_valid": np.True_}


def decode_response(ids: Sequence[int], tokenizer: Tokenizer) -> str:
  """Text of sampled ids up to (not including) the first eos: what a verifier should see,
  since a fixed-length sampler keeps writing tokens after eos."""
  ids = [int(i) for i in ids]
  return tokenizer.decode(ids[:ids.index(tokenizer.eos_id)] if tokenizer.eos_id in ids else ids)


def _encoder(kind: str, tokenizer: Tokenizer, seq_len: int) -> Callable[[dict], dict]:
  if kind == "lm":
    return lambda r: lm_example(_text(r["text"]), tokenizer, seq_len)
  if kind == "sft":
    return lambda r: sft_example(_text(r["prompt"]), _text(r["response"]), tokenizer, seq_len)
  raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _stack(rows: Sequence[dict]) -> dict:
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def global_order_batches(num_records: int, batch_size: int, *, seed: int | None,
                         repeat: bool) -> grain.MapDataset:
  """Batches of record INDICES in the global order: shuffled with `seed` (a fresh order each
  epoch) and repeated forever, or one pass in the source's order (seed None, repeat False; the
  last batch short). Every process builds the same index batches and reads only its rows of
  each (`rows` below), so the global batch and the data order do not depend on the process
  count, and a process's data position is the same integer as every other's. (Sharding the
  records per process first, grain's usual per-host split, would make the order depend on it.)"""
  ds = grain.MapDataset.range(num_records)
  if seed is not None:
    ds = ds.shuffle(seed=seed)
  if repeat:
    ds = ds.repeat(None)
  return ds.batch(batch_size, drop_remainder=repeat)


# A training batch's record indices in its source (-1: filler), kept on the host by the
# training loop to name the examples of a step that went NaN (rlhf_jax/train/nonfinite.py).
EXAMPLE_ID = "example_id"


def read_rows(source: Sequence[dict], encode: Callable[[dict], dict], rows: slice,
              batch_size: int, filler: dict | None = None, *,
              with_ids: bool = False) -> Callable[[np.ndarray], dict]:
  """index batch -> this process's `rows` of it, read from `source` and encoded. A short last
  batch is first padded to batch_size with `filler` (example_valid False) rows. with_ids adds
  the rows' record indices as EXAMPLE_ID."""
  def read(indices: np.ndarray) -> dict:
    picked = (list(indices) + [-1] * (batch_size - len(indices)))[rows]
    batch = _stack([filler if i < 0 else encode(source[int(i)]) for i in picked])
    if with_ids:
      batch[EXAMPLE_ID] = np.asarray(picked, np.int64)
    return batch
  return read


def make_train_iterator(data_source: Sequence[dict], *, batch_size: int, seq_len: int, seed: int,
                        tokenizer: Tokenizer, kind: str, rows: slice = slice(None),
                        encode: Callable[[dict], dict] | None = None) -> grain.DatasetIterator:
  """Infinite, seeded, resumable training batches: this process's `rows` of each global batch
  (sharding.process_rows; all of them in one process).

  Shuffles globally, repeats forever with a fresh (seeded) order each epoch, and drops no
  examples: batches straddle epoch boundaries. `it.get_state()` is a JSON-able dict;
  `it.set_state(state)` on a new iterator over the same source and arguments continues with
  exactly the batches the uninterrupted iterator would have produced. encode(record) ->
  example replaces `kind`'s encoder (e.g. chat_example for message lists). Each batch holds
  its record indices as EXAMPLE_ID (int64, not for the step: the consumer takes its keys).
  """
  encode = encode or _encoder(kind, tokenizer, seq_len)
  ds = global_order_batches(len(data_source), batch_size, seed=seed, repeat=True).map(
      read_rows(data_source, encode, rows, batch_size, with_ids=True))
  return iter(ds.to_iter_dataset(_READ_OPTIONS))


def make_eval_iterator(data_source: Sequence[dict], *, batch_size: int, seq_len: int,
                       tokenizer: Tokenizer, kind: str, rows: slice = slice(None),
                       encode: Callable[[dict], dict] | None = None) -> Iterator[dict]:
  """One pass in the source's order (this process's `rows` of each batch). The last partial
  batch is PADDED to batch_size with all-pad rows (loss_mask 0, valid False, example_valid
  False), so sums over the batch are exact and the eval step keeps one shape."""
  pad = tokenizer.pad_id
  filler = {"tokens": np.full(seq_len, pad, np.int32), "loss_mask": np.zeros(seq_len, np.float32),
            "valid": np.zeros(seq_len, bool), "example_valid": np.False_}
  ds = global_order_batches(len(data_source), batch_size, seed=None, repeat=False).map(
      read_rows(data_source, encode or _encoder(kind, tokenizer, seq_len), rows, batch_size,
                filler))
  return iter(ds.to_iter_dataset(_READ_OPTIONS))


def make_prompt_iterator(data_source: Sequence[dict], *, batch_size: int, prompt_len: int,
                         tokenizer: Tokenizer,
                         rows: slice = slice(None)) -> Iterator[dict[str, Any]]:
  """One pass of prompt batches in the source's order (records {"prompt", "response"}; this
  process's `rows` of each); the last batch is padded with bos-only prompts, answer "" and
  example_valid False."""
  filler = prompt_example("", "", tokenizer, prompt_len) | {"example_valid": np.False_}
  encode = lambda r: prompt_example(_text(r["prompt"]), _text(r["response"]), tokenizer,
                                    prompt_len)
  ds = global_order_batches(len(data_source), batch_size, seed=None, repeat=False).map(
      read_rows(data_source, encode, rows, batch_size, filler))
  return iter(ds.to_iter_dataset(_READ_OPTIONS))
