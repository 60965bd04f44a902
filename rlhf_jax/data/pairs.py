"""Preference pairs -> fixed-shape numpy batches (grain), for the DPO family.

Each normalised preference record (preference_formats: {prompt, prompt_kind, chosen,
rejected}) becomes TWO right-padded sequences sharing the prompt:

    [bos] + prompt + response + [eos]        (response = chosen, or rejected)

with loss_mask 1 on the response tokens and eos (the tokens whose log-probs make up
log pi(y|x)). Right padding with positions that follow `valid` (models/transformer.py) gives
the same logits as any other padding, and keeps both sequences of a pair in one shape.

Batch:
  chosen_tokens int32 BxT, chosen_valid bool BxT, chosen_mask float32 BxT; rejected_* alike;
  example_valid bool B (False only on the rows padding the last eval batch);
  ref_chosen_logps, ref_rejected_logps float32 B, when the source carries PRECOMPUTED
  reference log-probs (`WithReferenceLogps`), so the train step never runs the reference.

Prompts: text prompts are used verbatim; message prompts go through a render_fn
(preference_formats.RenderFn), `chat_render_fn(template)` when the tokenizer ships a chat
template, else preference_formats.default_render. Over-long pairs raise (no silent cut).
"""
from typing import Callable, Sequence

import grain
import numpy as np

from rlhf_jax.data import pipeline, shared_prefix
from rlhf_jax.data import preference_formats as pf
from rlhf_jax.data.chat import ChatTemplate
from rlhf_jax.data.tokenizer import Tokenizer

SIDES = ("chosen", "rejected")
REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")


def chat_render_fn(template: ChatTemplate) -> pf.RenderFn:
  """A render_fn from a chat template: prompt = the context with the generation cue,
  response = the rest of the rendered conversation (reply + end-of-turn tokens).

  A leading bos_token text the template writes itself is dropped: the pipeline adds bos."""
  bos = template.special_tokens.get("bos_token") or ""

  def strip_bos(text: str) -> str:
    return text[len(bos):] if bos and text.startswith(bos) else text

  def render(messages):
    messages = list(messages)
    if messages[-1]["role"] != "assistant":
      return strip_bos(template.render(messages, add_generation_prompt=True)), ""
    prompt = template.render(messages[:-1], add_generation_prompt=True)
    full = template.render(messages)
    if not full.startswith(prompt):
      raise ValueError(f"{template.origin}: the chat template renders the context "
                       f"differently once the reply is appended ({prompt[-40:]!r} is not a "
                       "prefix), so prompt and reply cannot be split; fix the template")
    return strip_bos(prompt), full[len(prompt):]

  return render


def _side(ids: list[int], first_target: int, seq_len: int, pad_id: int) -> tuple:
  n = len(ids)
  tokens = np.full(seq_len, pad_id, np.int32)
  tokens[:n] = ids
  mask = np.zeros(seq_len, np.float32)
  mask[first_target:n] = 1.0
  return tokens, np.arange(seq_len) < n, mask


def pair_example(record: dict, tokenizer: Tokenizer, seq_len: int, fmt: str = "pairs",
                 render_fn: pf.RenderFn = pf.default_render, response_len: int = 0) -> dict:
  """One record -> the chosen_*/rejected_* arrays (see the module docstring); with
  response_len > 0, one shared-prompt row of seq_len + response_len tokens instead
  (data/shared_prefix.py; chosen is response 1, rejected response 2)."""
  (prompt, chosen), (_, rejected) = pf.render_pairs(record, fmt, render_fn)
  head = [tokenizer.bos_id, *tokenizer.encode(prompt)]
  out = {"example_valid": np.True_}
  responses = []
  for side, response in zip(SIDES, (chosen, rejected)):
    ids = head + tokenizer.encode(response) + [tokenizer.eos_id]
    if len(ids) > seq_len:
      raise ValueError(f"{side} sequence of prompt {prompt[:40]!r} is {len(ids)} tokens (with "
                       f"bos/eos), longer than seq_len={seq_len}; raise --seq_len or filter "
                       "the data (build_file_dataset's max_len drops such records)")
    responses.append(ids[len(head):])
    if not response_len:
      out[f"{side}_tokens"], out[f"{side}_valid"], out[f"{side}_mask"] = _side(
          ids, len(head), seq_len, tokenizer.pad_id)
  if response_len:
    out.update(shared_prefix.shared_row(head, responses, row_len=seq_len + response_len,
                                        response_len=response_len, pad_id=tokenizer.pad_id))
  for key in REF_KEYS:
    if key in record:
      out[key] = np.float32(record[key])
  return out


class WithReferenceLogps(Sequence):
  """The records of `source` with their precomputed reference log-probs attached: a grain
  source, so the shuffled, resumable train order carries each pair's own reference values."""

  def __init__(self, source: Sequence[dict], chosen_N: np.ndarray, rejected_N: np.ndarray):
    if not len(source) == len(chosen_N) == len(rejected_N):
      raise ValueError(f"{len(source)} records but {len(chosen_N)}/{len(rejected_N)} "
                       "reference log-probs")
    self._source, self._chosen, self._rejected = source, chosen_N, rejected_N

  def __len__(self):
    return len(self._source)

  def __getitem__(self, i):
    return {**self._source[i], REF_KEYS[0]: self._chosen[i], REF_KEYS[1]: self._rejected[i]}


Encoder = Callable[[dict], dict]


def make_encoder(tokenizer: Tokenizer, seq_len: int, fmt: str,
                 render_fn: pf.RenderFn = pf.default_render, response_len: int = 0) -> Encoder:
  if response_len:
    shared_prefix.check_response_len(response_len, seq_len)
  return lambda r: pair_example(r, tokenizer, seq_len, fmt, render_fn, response_len)


def make_pair_train_iterator(source: Sequence[dict], *, batch_size: int, seed: int,
                             encode: Encoder, rows: slice = slice(None)) -> grain.DatasetIterator:
  """Infinite, seeded, resumable (get_state/set_state) batches, as
  pipeline.make_train_iterator: global shuffle, a fresh order every epoch, nothing dropped;
  this process's `rows` of each global batch."""
  ds = pipeline.global_order_batches(len(source), batch_size, seed=seed, repeat=True).map(
      pipeline.read_rows(source, encode, rows, batch_size, with_ids=True))
  return iter(ds.to_iter_dataset(pipeline._READ_OPTIONS))


def make_pair_eval_iterator(source: Sequence[dict], *, batch_size: int, encode: Encoder,
                            rows: slice = slice(None)):
  """One pass in order (this process's `rows` of each batch); the last batch is padded with
  example_valid=False rows (a copy of the first example), so every batch has one shape and
  padded rows are weighted 0."""
  filler = {**encode(source[0]), "example_valid": np.False_}
  ds = pipeline.global_order_batches(len(source), batch_size, seed=None, repeat=False).map(
      pipeline.read_rows(source, encode, rows, batch_size, filler))
  return iter(ds.to_iter_dataset(pipeline._READ_OPTIONS))


def kto_examples(records: Sequence[dict]) -> list[dict]:
  """KTO's examples, each {prompt, prompt_kind, response, kl_response, desirable}: a pair
  record gives a desirable (its chosen) and an undesirable (its rejected) example; an
  unpaired record (preference_formats "unpaired") gives its completion with its label. The
  `kl_response` is the same kind of response of the next record with ANOTHER prompt, so
  (prompt, kl_response) is a mismatched pair whose log-ratio estimates KL(pi || pi_ref) for
  KTO's z_0 (a fixed partner, as TRL builds its KL dataset once, so reference log-probs can
  be precomputed). Needs at least two distinct prompts."""
  text = lambda v: v.decode("utf-8") if isinstance(v, bytes) else v  # noqa: E731
  rows = []
  for r in records:
    r = {k: text(v) for k, v in r.items()}
    if "completion" in r:
      rows.append((r, [("completion", r["label"] == "true")]))
    else:
      rows.append((r, [("chosen", True), ("rejected", False)]))
  n, out = len(rows), []
  for i, (rec, sides) in enumerate(rows):
    partner = next((rows[(i + d) % n][0] for d in range(1, n)
                    if rows[(i + d) % n][0]["prompt"] != rec["prompt"]), None)
    if partner is None:
      raise ValueError("KTO's KL estimate needs examples of at least two distinct prompts")
    for side, desirable in sides:
      out.append({"prompt": rec["prompt"], "prompt_kind": rec["prompt_kind"],
                  "response": rec[side], "kl_response": partner.get(side, partner.get(
                      "completion")), "desirable": desirable})
  return out


def kto_encoder(encode: Encoder) -> Encoder:
  """KTO examples (kto_examples) -> the pair layout preference.kto_loss_fn reads: chosen_* =
  (prompt, response), rejected_* = (prompt, kl_response), desirable."""
  def enc(r):
    pair = {"prompt": r["prompt"], "prompt_kind": r["prompt_kind"], "chosen": r["response"],
            "rejected": r["kl_response"], **{k: r[k] for k in REF_KEYS if k in r}}
    return {**encode(pair), "desirable": np.bool_(r["desirable"])}
  return enc
