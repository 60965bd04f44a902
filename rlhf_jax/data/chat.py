"""Chat templates rendered as Hugging Face does, and chat token ids with assistant-only loss masks.

ChatTemplate renders the jinja2 `chat_template` of tokenizer_config.json (or
chat_template.jinja, where transformers>=5 saves it) the way transformers'
apply_chat_template does: a sandboxed environment (ImmutableSandboxedEnvironment) with
trim_blocks and lstrip_blocks, the loopcontrols extension, a tojson filter that keeps
non-ASCII, `raise_exception` and `strftime_now` globals, `{% generation %}` blocks rendered
as plain text, and the special tokens (bos_token, eos_token, ...) plus add_generation_prompt
as variables. Tools and documents are not supported.

Masks are built prefix by prefix: the tokens of assistant message i are
    tokens(render(messages[:i+1])) minus tokens(render(messages[:i], add_generation_prompt=True)),
so the generation header ("<|start_header_id|>assistant<|end_header_id|>\\n\\n") is prompt and
the end-of-turn token is part of the response (the model must learn to stop). This needs
every such prefix to tokenize to a prefix of the full conversation; a template or tokenizer
that breaks that (templates that rewrite earlier turns, a BPE merge across the boundary) is
reported with a ValueError instead of producing a silently shifted mask.
"""
import datetime
import json
import pathlib
from typing import NamedTuple, Sequence

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from rlhf_jax.data.hf_tokenizer import read_special_tokens
from rlhf_jax.data.local_files import read_json_object, read_text
from rlhf_jax.data.tokenizer import Tokenizer

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}


class _Generation(jinja2.ext.Extension):
  """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask markers): the
  body is rendered unchanged; masks come from prefix rendering instead."""
  tags = {"generation"}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

  def _render(self, caller):
    return caller()


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[_Generation, jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env


class TemplateRenderError(ValueError):
  """The chat template raised while rendering a conversation: its raise_exception refusing
  it (e.g. roles that do not alternate) or an error in the template's own code. A reader
  counts the conversation as malformed."""


class NoChatTemplate(ValueError):
  """The tokenizer directory has no chat template (base models often have none); a broken
  template raises a plain ValueError instead, never mistaken for none."""


class ChatTemplate:
  """A compiled chat template plus the special-token strings it may reference. `origin` (the
  file it came from) names it in errors."""

  def __init__(self, source: str, special_tokens: dict[str, str] | None = None, *,
               origin: str = "chat template"):
    if not isinstance(source, str):
      raise ValueError(f"{origin}: chat_template is a {type(source).__name__}, expected a "
                       "jinja string")
    self.source, self.origin = source, origin
    self.special_tokens = dict(special_tokens or {})
    try:
      self._template = _environment().from_string(source)
    except Exception as e:  # noqa: BLE001 - jinja's syntax errors, and Python's for code it
      # generates from some (a {% break %} outside a loop)
      detail = (f"line {e.lineno}: {e.message}" if isinstance(e, jinja2.TemplateSyntaxError)
                else f"{type(e).__name__}: {e}")
      raise ValueError(f"{origin}: the chat template is not valid jinja ({detail}); fix the "
                       "template or pass another --tokenizer") from None

  @classmethod
  def from_file(cls, directory) -> "ChatTemplate":
    """From a tokenizer directory: chat_template.jinja if present, else tokenizer_config.json's
    chat_template (a string, or a list of named templates: the one named "default")."""
    directory = pathlib.Path(directory)
    jinja_file, config_file = directory / "chat_template.jinja", directory / "tokenizer_config.json"
    source, origin = None, str(jinja_file)
    if jinja_file.exists():
      source = read_text(jinja_file)
    elif config_file.exists():
      source, origin = read_json_object(config_file).get("chat_template"), str(config_file)
      if isinstance(source, list):
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        if "default" not in named:
          raise ValueError(f"{config_file}: chat templates {sorted(map(str, named))} include no "
                           "'default' (a list of {\"name\", \"template\"} objects)")
        source = named["default"]
    if not source:
      raise NoChatTemplate(f"{directory}: no chat_template in tokenizer_config.json and no "
                       "chat_template.jinja (base models often have none)")
    return cls(source, read_special_tokens(directory), origin=origin)

  def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = False,
             **variables) -> str:
    """The template's text for `messages`; extra `variables` reach the template (and win
    over the special tokens, as in transformers)."""
    try:
      return self._template.render(messages=[dict(m) for m in messages],
                                   add_generation_prompt=add_generation_prompt,
                                   **{**self.special_tokens, **variables})
    except Exception as e:  # noqa: BLE001 - the template is the file's code: any error is its
      raise TemplateRenderError(f"{self.origin}: the chat template failed on this "
                                f"conversation ({type(e).__name__}: {e}); fix the conversation "
                                "or the template") from e


class ChatTokens(NamedTuple):
  tokens: list[int]
  loss_mask: list[int]  # 1 on the tokens of assistant messages (end-of-turn included)


def _check_prefix(prefix_ids, full_ids, what: str, prefix_text: str, full_text: str,
                  origin: str):
  if full_ids[:len(prefix_ids)] == prefix_ids:
    return
  at = next((i for i, (a, b) in enumerate(zip(prefix_text, full_text)) if a != b),
            min(len(prefix_text), len(full_text)))
  detail = (f"the texts differ at character {at}: {prefix_text[at:at + 40]!r} vs "
            f"{full_text[at:at + 40]!r}" if not full_text.startswith(prefix_text) else
            "the text is a prefix but its tokens are not (a merge across the boundary)")
  raise ValueError(f"{origin}: chat template breaks the prefix property: {what}; {detail}. "
                   "Assistant loss masks need each rendered prefix to tokenize to a prefix of "
                   "the whole")


def _assistant_span(tokenizer: Tokenizer, template: ChatTemplate, messages, i: int,
                    **variables) -> tuple[list[int], list[int]]:
  """(tokens before assistant message i incl. the generation prompt, tokens up to its end)."""
  before_text = template.render(messages[:i], add_generation_prompt=True, **variables)
  after_text = template.render(messages[:i + 1], **variables)
  before, after = tokenizer.encode(before_text), tokenizer.encode(after_text)
  _check_prefix(before, after, f"messages[:{i}] + generation prompt vs messages[:{i + 1}]",
                before_text, after_text, template.origin)
  return before, after


def encode_chat(tokenizer: Tokenizer, template: ChatTemplate, messages: Sequence[Message],
                **variables) -> ChatTokens:
  """Token ids of a whole conversation and a mask that is 1 on assistant tokens only (SFT)."""
  full_text = template.render(messages, **variables)
  tokens = tokenizer.encode(full_text)
  mask = [0] * len(tokens)
  for i, message in enumerate(messages):
    if message["role"] != "assistant":
      continue
    before, after = _assistant_span(tokenizer, template, messages, i, **variables)
    _check_prefix(after, tokens, f"messages[:{i + 1}] vs the whole conversation",
                  template.render(messages[:i + 1], **variables), full_text, template.origin)
    mask[len(before):len(after)] = [1] * (len(after) - len(before))
  return ChatTokens(tokens, mask)


def encode_prompt(tokenizer: Tokenizer, template: ChatTemplate, messages: Sequence[Message],
                  **variables) -> list[int]:
  """Token ids of a prompt ending in the assistant generation header (for sampling)."""
  return tokenizer.encode(template.render(messages, add_generation_prompt=True, **variables))


def encode_prompt_response(tokenizer: Tokenizer, template: ChatTemplate,
                           messages: Sequence[Message], response: str,
                           **variables) -> tuple[list[int], list[int]]:
  """(prompt ids, response ids) of `response` as the assistant's reply to `messages`: the
  prompt is encode_prompt(messages); the response is the rest of the rendered conversation
  (the reply and the template's end-of-turn tokens). Preference pairs share the prompt."""
  conversation = [*messages, {"role": "assistant", "content": response}]
  before, after = _assistant_span(tokenizer, template, conversation, len(messages), **variables)
  return before, after[len(before):]
