"""Parsers from common preference / SFT / prompt file formats to normalised records.

Formats (the `format` flag value -> what one input record looks like):
  hh_rlhf       {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}: two full
                dialogues sharing a prefix (Anthropic HH-RLHF).
  ultrafeedback {"prompt": str, "chosen": [messages], "rejected": [messages]}
                (UltraFeedback-binarized); the response is each list's final assistant message.
  pairs         {"prompt": str, "chosen": str, "rejected": str}.
  unpaired      {"prompt": str | [messages], "completion": str, "label": bool}: one response
                labelled desirable (true) or undesirable (false), for KTO (TRL's layout).
  rankings      {"prompt": str | [messages], "responses": [str, ...]}: K >= 2 responses best
                first, or with "scores": [number, ...] (higher is better) to rank them by
                (tied scores are malformed: a ranking needs a strict order).
  sft_messages  {"messages": [messages]}: a conversation; loss on the assistant turns.
  prompts       {"prompt": str | [messages], "answer": str (optional)}: prompts for online RL,
                with the reference answer a verifier checks responses against, if any.
  gsm8k         {"question": str, "answer": "<worked solution> #### 72"} (GSM8K): a prompt
                with its reference solution; the answer after "####" is what is verified.
  math          {"problem": str, "solution": "... \\boxed{\\frac{1}{2}} ..."} (MATH), or with
                an "answer" field holding the final answer (MATH-500 style), used when present.
A message is {"role": "system"|"user"|"assistant"|"tool", "content": str}. Other keys of a
record (ids, scores) are ignored.

Normalised records (all fields text, so they go straight into an array_record TFDS build):
  preference (hh_rlhf, ultrafeedback, pairs):
    {"prompt", "prompt_kind", "chosen", "rejected"}
  rankings:     {"prompt", "prompt_kind", "responses"}  responses JSON-encoded, best first
  unpaired:     {"prompt", "prompt_kind", "completion", "label"}  label "true" / "false"
  sft_messages: {"messages"}                         JSON-encoded message list
  prompts, gsm8k, math: {"prompt", "prompt_kind", "response"}  response is the reference
                   answer or solution ("" when there is none), so the records fit
                   pipeline.make_prompt_iterator as is; gsm8k and math prompts are a user
                   message (prompt_kind "messages"), which a chat template renders
  prompt_kind is "text" (prompt is raw text the responses continue, e.g. HH's
  "\\n\\nHuman: Hi\\n\\nAssistant:" with chosen " Hello.") or "messages" (prompt is a
  JSON-encoded message list: the conversation before the response; chosen/rejected are the
  CONTENT of the final assistant message). A chat template consumes a record through a
  `render_fn(messages) -> (prompt_text, response_text)`: given a conversation ending in an
  assistant message, prompt_text is everything before that message's content (with the
  generation cue) and response_text its content; given one ending in another role,
  response_text is "" and prompt_text ends with the generation cue (add_generation_prompt).
  `default_render` is a plain "role: content" stand-in; `render_pairs` applies any render_fn.

Problems raise `Malformed(reason, detail)`, reason one of REASONS, so callers can count them.
"""
import json
from typing import Any, Callable, Sequence

from rlhf_jax.data.tokenizer import Tokenizer

FORMATS = ("hh_rlhf", "ultrafeedback", "pairs", "unpaired", "rankings", "sft_messages",
           "prompts", "gsm8k", "math")
PROMPT_FORMATS = ("prompts", "gsm8k", "math")
PREFERENCE_FORMATS = ("hh_rlhf", "ultrafeedback", "pairs")
PREFERENCE_FIELDS = ("prompt", "prompt_kind", "chosen", "rejected")
FIELDS = {"hh_rlhf": PREFERENCE_FIELDS, "ultrafeedback": PREFERENCE_FIELDS,
          "pairs": PREFERENCE_FIELDS, "sft_messages": ("messages",),
          "rankings": ("prompt", "prompt_kind", "responses"),
          "unpaired": ("prompt", "prompt_kind", "completion", "label"),
          **{f: ("prompt", "prompt_kind", "response") for f in PROMPT_FORMATS}}
ROLES = ("system", "user", "assistant", "tool")
HH_ASSISTANT = "\n\nAssistant:"

REASONS = (
    "invalid_json",         # a JSONL line that does not parse
    "missing_field",        # a required key is absent
    "wrong_type",           # a field (or the record) has the wrong type
    "bad_messages",         # a message list that is empty, has unknown roles, ends wrongly, ...
    "no_shared_prompt",     # hh_rlhf: the two dialogues share no assistant turn to split at
    "empty_prompt",
    "empty_response",       # a response that is empty or whitespace only
    "identical_responses",  # chosen == rejected
    "too_long",             # over max_len tokens after tokenisation (bos/eos included)
    "no_answer",            # gsm8k / math: the reference solution states no final answer
    "tied_scores",          # rankings: two responses with the same score
    "bad_text",             # a string that is not Unicode text (an unpaired surrogate escape)
)

Messages = list[dict[str, str]]
RenderFn = Callable[[Sequence[dict]], tuple[str, str]]


class Malformed(ValueError):
  """A record that cannot be used; `reason` is one of REASONS."""

  def __init__(self, reason: str, detail: str):
    assert reason in REASONS, reason
    super().__init__(f"{reason}: {detail}")
    self.reason = reason
    self.detail = detail


def _field(obj: Any, key: str, types: type | tuple[type, ...]) -> Any:
  if not isinstance(obj, dict):
    raise Malformed("wrong_type", f"record is a {type(obj).__name__}, expected an object")
  if key not in obj or obj[key] is None:
    raise Malformed("missing_field", f"no {key!r} field")
  value = obj[key]
  if not isinstance(value, types):
    raise Malformed("wrong_type", f"{key!r} is a {type(value).__name__}")
  return value


def _messages(value: Any, what: str) -> Messages:
  """Validates a message list; returns clean {"role", "content"} dicts."""
  if not isinstance(value, list):
    raise Malformed("wrong_type", f"{what} is a {type(value).__name__}, expected a message list")
  if not value:
    raise Malformed("bad_messages", f"{what} is an empty message list")
  clean = []
  for i, m in enumerate(value):
    if not isinstance(m, dict):
      raise Malformed("wrong_type", f"{what}[{i}] is a {type(m).__name__}, expected a message")
    for key in ("role", "content"):
      if key not in m or m[key] is None:
        raise Malformed("missing_field", f"{what}[{i}] has no {key!r}")
      if not isinstance(m[key], str):
        raise Malformed("wrong_type", f"{what}[{i}].{key} is a {type(m[key]).__name__}")
    if m["role"] not in ROLES:
      raise Malformed("bad_messages", f"{what}[{i}] has role {m['role']!r}, not one of {ROLES}")
    clean.append({"role": m["role"], "content": m["content"]})
  return clean


def _check_responses(chosen: str, rejected: str) -> None:
  for name, text in (("chosen", chosen), ("rejected", rejected)):
    if not text.strip():
      raise Malformed("empty_response", f"{name} response is empty")
  if chosen == rejected:
    raise Malformed("identical_responses", "chosen and rejected responses are identical")


def _dumps(messages: Messages) -> str:
  return json.dumps(messages, ensure_ascii=False)


def split_hh_dialogues(chosen: str, rejected: str) -> tuple[str, str, str]:
  """(prompt, chosen_response, rejected_response) of two HH-RLHF dialogues.

  The prompt is the dialogues' common text up to and including the LAST "\\n\\nAssistant:"
  marker lying wholly inside their common prefix; the responses are the remainders, verbatim
  (so they usually start with a space, and when the dialogues diverge in an earlier assistant
  turn they carry the rest of the dialogue). prompt + response reproduces each dialogue.
  """
  common = 0
  for a, b in zip(chosen, rejected):
    if a != b:
      break
    common += 1
  cut = chosen.rfind(HH_ASSISTANT, 0, common)  # an occurrence ending within the common prefix
  if cut < 0:
    raise Malformed("no_shared_prompt",
                    f"the dialogues share no {HH_ASSISTANT!r} turn (common prefix "
                    f"{chosen[:min(common, 40)]!r})")
  end = cut + len(HH_ASSISTANT)
  return chosen[:end], chosen[end:], rejected[end:]


def parse_hh_rlhf(obj: Any) -> dict[str, str]:
  chosen, rejected = _field(obj, "chosen", str), _field(obj, "rejected", str)
  if chosen == rejected:
    raise Malformed("identical_responses", "chosen and rejected dialogues are identical")
  prompt, chosen_response, rejected_response = split_hh_dialogues(chosen, rejected)
  _check_responses(chosen_response, rejected_response)
  return {"prompt": prompt, "prompt_kind": "text", "chosen": chosen_response,
          "rejected": rejected_response}


def parse_ultrafeedback(obj: Any) -> dict[str, str]:
  prompt = _field(obj, "prompt", str)
  chosen = _messages(_field(obj, "chosen", list), "chosen")
  rejected = _messages(_field(obj, "rejected", list), "rejected")
  for name, conv in (("chosen", chosen), ("rejected", rejected)):
    if conv[-1]["role"] != "assistant":
      raise Malformed("bad_messages", f"{name} does not end with an assistant message")
  if chosen[:-1] != rejected[:-1]:
    raise Malformed("bad_messages", "chosen and rejected differ before the final assistant "
                    "message")
  context = chosen[:-1] or [{"role": "user", "content": prompt}]
  if not any(m["content"].strip() for m in context):
    raise Malformed("empty_prompt", "the prompt is empty")
  _check_responses(chosen[-1]["content"], rejected[-1]["content"])
  return {"prompt": _dumps(context), "prompt_kind": "messages",
          "chosen": chosen[-1]["content"], "rejected": rejected[-1]["content"]}


def parse_pairs(obj: Any) -> dict[str, str]:
  prompt = _field(obj, "prompt", str)
  chosen, rejected = _field(obj, "chosen", str), _field(obj, "rejected", str)
  if not prompt.strip():
    raise Malformed("empty_prompt", "the prompt is empty")
  _check_responses(chosen, rejected)
  return {"prompt": prompt, "prompt_kind": "text", "chosen": chosen, "rejected": rejected}


def _prompt_fields(prompt) -> dict[str, str]:
  """{"prompt", "prompt_kind"} of a text or message-list prompt (validated)."""
  if isinstance(prompt, str):
    if not prompt.strip():
      raise Malformed("empty_prompt", "the prompt is empty")
    return {"prompt": prompt, "prompt_kind": "text"}
  messages = _messages(prompt, "prompt")
  if messages[-1]["role"] == "assistant":
    raise Malformed("bad_messages", "a prompt message list must not end with an assistant "
                    "message")
  return {"prompt": _dumps(messages), "prompt_kind": "messages"}


def parse_unpaired(obj: Any) -> dict[str, str]:
  fields = _prompt_fields(_field(obj, "prompt", (str, list)))
  completion, label = _field(obj, "completion", str), _field(obj, "label", bool)
  if not completion.strip():
    raise Malformed("empty_response", "the completion is empty")
  return {**fields, "completion": completion, "label": "true" if label else "false"}


def parse_rankings(obj: Any) -> dict[str, str]:
  prompt = _field(obj, "prompt", (str, list))
  responses = _field(obj, "responses", list)
  if len(responses) < 2:
    raise Malformed("bad_messages", f"{len(responses)} responses; a ranking needs >= 2")
  for i, r in enumerate(responses):
    if not isinstance(r, str):
      raise Malformed("wrong_type", f"responses[{i}] is a {type(r).__name__}, expected a string")
    if not r.strip():
      raise Malformed("empty_response", f"responses[{i}] is empty")
  if len(set(responses)) < len(responses):
    raise Malformed("identical_responses", "two responses are identical")
  if obj.get("scores") is not None:
    scores = _field(obj, "scores", list)
    if len(scores) != len(responses) or not all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in scores):
      raise Malformed("wrong_type", f"scores must be {len(responses)} numbers, one per response")
    if len(set(scores)) < len(scores):
      raise Malformed("tied_scores", f"scores {scores} tie; a ranking needs a strict order")
    responses = [r for _, r in sorted(zip(scores, responses), key=lambda x: -x[0])]
  return {**_prompt_fields(prompt), "responses": json.dumps(responses)}


def parse_sft_messages(obj: Any) -> dict[str, str]:
  messages = _messages(_field(obj, "messages", list), "messages")
  if messages[-1]["role"] != "assistant":
    raise Malformed("bad_messages", "messages do not end with an assistant message")
  if not any(m["role"] == "user" and m["content"].strip() for m in messages):
    raise Malformed("empty_prompt", "no non-empty user message")
  for i, m in enumerate(messages):
    if m["role"] == "assistant" and not m["content"].strip():
      raise Malformed("empty_response", f"assistant message {i} is empty")
  return {"messages": _dumps(messages)}


def parse_prompts(obj: Any) -> dict[str, str]:
  prompt = _field(obj, "prompt", (str, list))
  answer = _field(obj, "answer", str) if isinstance(obj, dict) and obj.get("answer") is not None \
      else ""
  if isinstance(prompt, str):
    if not prompt.strip():
      raise Malformed("empty_prompt", "the prompt is empty")
    return {"prompt": prompt, "prompt_kind": "text", "response": answer}
  messages = _messages(prompt, "prompt")
  if messages[-1]["role"] == "assistant":
    raise Malformed("bad_messages", "a prompt message list must not end with an assistant "
                    "message")
  if not any(m["content"].strip() for m in messages):
    raise Malformed("empty_prompt", "the prompt is empty")
  return {"prompt": _dumps(messages), "prompt_kind": "messages", "response": answer}


def _question(text: str, answer: str) -> dict[str, str]:
  if not text.strip():
    raise Malformed("empty_prompt", "the question is empty")
  return {"prompt": _dumps([{"role": "user", "content": text}]), "prompt_kind": "messages",
          "response": answer}


def parse_gsm8k(obj: Any) -> dict[str, str]:
  question, answer = _field(obj, "question", str), _field(obj, "answer", str)
  if "####" not in answer or not answer.rsplit("####", 1)[1].strip():
    raise Malformed("no_answer", "the answer has no final '#### <number>' line")
  return _question(question, answer)


def parse_math(obj: Any) -> dict[str, str]:
  problem = _field(obj, "problem", str)
  if isinstance(obj.get("answer"), str) and obj["answer"].strip():
    return _question(problem, obj["answer"])
  solution = _field(obj, "solution", str)
  if "\\boxed" not in solution and "\\fbox" not in solution:
    raise Malformed("no_answer", "the solution has no \\boxed{...} final answer (and the record "
                    "no 'answer' field)")
  return _question(problem, solution)


PARSERS: dict[str, Callable[[Any], dict[str, str]]] = {
    "hh_rlhf": parse_hh_rlhf, "ultrafeedback": parse_ultrafeedback, "pairs": parse_pairs,
    "rankings": parse_rankings, "unpaired": parse_unpaired,
    "sft_messages": parse_sft_messages, "prompts": parse_prompts, "gsm8k": parse_gsm8k,
    "math": parse_math}


def parse(fmt: str, obj: Any) -> dict[str, str]:
  if fmt not in PARSERS:
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
  record = PARSERS[fmt](obj)
  for key, text in record.items():
    try:  # JSON can escape a lone surrogate ("\\ud800"); no tokenizer or dataset can store it
      text.encode("utf-8")
    except UnicodeEncodeError as e:
      raise Malformed("bad_text", f"{key} holds an unpaired surrogate {text[e.start]!r} at "
                      f"character {e.start}: not Unicode text") from None
  return record


# --- rendering (the hook a chat template plugs into) and the length check --------------------

def default_render(messages: Sequence[dict]) -> tuple[str, str]:
  """"role: content" lines; the prompt ends with the cue "assistant: ". See module doc."""
  messages = list(messages)
  response = ""
  if messages and messages[-1]["role"] == "assistant":
    response = messages.pop()["content"]
  prompt = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
  return prompt, response


def render_pairs(record: dict, fmt: str, render_fn: RenderFn = default_render, *,
                 train_answers: bool = False) -> list[tuple[str, str]]:
  """The (prompt_text, response_text) sequences a normalised record trains on: one per
  response for preferences (chosen first), the whole conversation for sft_messages (split at
  its final assistant message), (prompt, "") for prompts, or with train_answers (SFT on them)
  (prompt, reference answer). Text prompts are used verbatim; message lists go through
  render_fn."""
  record = {k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in record.items()}
  if fmt == "sft_messages":
    return [render_fn(json.loads(record["messages"]))]
  prompt_only = fmt in PROMPT_FORMATS and not train_answers
  responses = ([record["chosen"], record["rejected"]] if fmt in PREFERENCE_FORMATS else
               json.loads(record["responses"]) if fmt == "rankings" else
               [record["completion"]] if fmt == "unpaired" else
               [""] if prompt_only else [record["response"]])
  if record["prompt_kind"] == "text":
    return [(record["prompt"], r) for r in responses]
  context = json.loads(record["prompt"])
  if prompt_only:
    return [render_fn(context)]
  return [render_fn(context + [{"role": "assistant", "content": r}]) for r in responses]


def check_length(record: dict, fmt: str, tokenizer: Tokenizer, max_len: int,
                 render_fn: RenderFn = default_render, *, train_answers: bool = False,
                 packed: bool = False) -> None:
  """Raises Malformed("too_long") if a sequence is over max_len tokens framed as the
  pipelines frame them: [bos] + prompt + response + [eos] (prompts: [bos] + prompt, unless
  train_answers: SFT trains on their reference answers); with packed (--pack puts a pair's or
  a ranking's sequences in one row) if they are over it together. A conversation render_fn
  refuses (a chat template's raise_exception, a reply it cannot split off) is malformed
  ("bad_messages")."""
  try:
    sequences = render_pairs(record, fmt, render_fn, train_answers=train_answers)
  except ValueError as e:
    raise Malformed("bad_messages", f"the chat template cannot render it: {e}") from None
  total = 0
  for prompt, response in sequences:
    n = 1 + len(tokenizer.encode(prompt))
    if fmt not in PROMPT_FORMATS or train_answers:
      n += len(tokenizer.encode(response)) + 1
    if n > max_len:
      raise Malformed("too_long", f"{n} tokens (with bos/eos) > max_len={max_len}")
    total += n
  if packed and total > max_len:
    raise Malformed("too_long", f"{total} tokens in all (with bos/eos) > max_len={max_len}, "
                    "and packed its sequences share one row")
