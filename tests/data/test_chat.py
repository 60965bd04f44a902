"""Chat templates and assistant loss masks, against transformers' apply_chat_template on a
tokenizer the test trains itself (Llama-3 and ChatML templates)."""
import json

import pytest
import tokenizers
import transformers
from jinja2.exceptions import SecurityError
from tokenizers import decoders, models, pre_tokenizers, trainers

from rlhf_jax.data.chat import (ChatTemplate, TemplateRenderError, encode_chat, encode_prompt,
                                encode_prompt_response)
from rlhf_jax.data.hf_tokenizer import HFTokenizer

# Meta's Llama 3 template (bos before the first message, contents trimmed).
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")
# ChatML with a default system turn, block tags on their own (indented) lines, so the output
# depends on trim_blocks/lstrip_blocks, and {% generation %} marks for transformers' masks.
CHATML = """{% for message in messages %}
    {% if loop.first and message['role'] != 'system' %}
<|im_start|>system
You are a helpful assistant.<|im_end|>
    {% endif %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('Unknown role: ' + message['role']) }}
    {% endif %}
<|im_start|>{{ message['role'] }}
    {% if message['role'] == 'assistant' %}
        {% generation %}
{{ message['content'] }}<|im_end|>
        {% endgeneration %}
    {% else %}
{{ message['content'] }}<|im_end|>
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""
SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<|im_start|>", "<|im_end|>", "<pad>"]
CORPUS = ["What is two plus two? Four.", "Name a fox. The quick brown fox.",
          "You are a helpful assistant. Be brief.", "Another one? Sure: a red fox."] * 3
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fox."},
     {"role": "assistant", "content": "Fox."}, {"role": "user", "content": "Another?"},
     {"role": "assistant", "content": "  A quick brown fox, naïve. "}],
    [{"role": "user", "content": "Café?"}],
]


def _write(path, template, specials):
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
      vocab_size=330, special_tokens=SPECIALS,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.save(str(path / "tokenizer.json"))
  (path / "tokenizer_config.json").write_text(json.dumps(
      {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template, **specials}))
  return path


@pytest.fixture(scope="module", params=["llama3", "chatml"])
def chat_dir(request, tmp_path_factory):
  path = tmp_path_factory.mktemp(request.param)
  if request.param == "llama3":
    return _write(path, LLAMA3, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                                 "pad_token": "<pad>"})
  return _write(path, CHATML, {"eos_token": "<|im_end|>", "pad_token": "<pad>"})


def _ours(path):
  """ChatML has no bos token: name one (HFTokenizer requires it)."""
  has_bos = "bos_token" in json.loads((path / "tokenizer_config.json").read_text())
  return HFTokenizer.from_file(path) if has_bos else HFTokenizer.from_file(
      path, bos_token="<|im_start|>")


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_render_and_tokens_match_transformers(chat_dir, conversation, add_generation_prompt):
  ref = transformers.AutoTokenizer.from_pretrained(chat_dir)
  template = ChatTemplate.from_file(chat_dir)
  text = template.render(conversation, add_generation_prompt=add_generation_prompt)
  assert text == ref.apply_chat_template(conversation, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
  assert _ours(chat_dir).encode(text) == ref(text, add_special_tokens=False)["input_ids"]


def test_whitespace_control(chat_dir):
  text = ChatTemplate.from_file(chat_dir).render(CONVERSATIONS[0], add_generation_prompt=True)
  if "chatml" in chat_dir.name:  # trim_blocks/lstrip_blocks leave exactly the ChatML lines
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                    "<|im_start|>assistant\n4.<|im_end|>\n"
                    "<|im_start|>assistant\n")
  else:  # bos_token reaches the template
    assert text == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?"
                    "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n4.<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")


@pytest.mark.parametrize("conversation", CONVERSATIONS[:2])
def test_mask_is_the_assistant_turns(chat_dir, conversation):
  tok, template = _ours(chat_dir), ChatTemplate.from_file(chat_dir)
  out = encode_chat(tok, template, conversation)
  assert out.tokens == tok.encode(template.render(conversation))
  runs, current = [], []
  for t, m in zip(out.tokens + [None], out.loss_mask + [0]):
    if m:
      current.append(t)
    elif current:
      runs.append(current)
      current = []
  end = "<|im_end|>\n" if "chatml" in chat_dir.name else "<|eot_id|>"
  expected = [m["content"] if "chatml" in chat_dir.name else m["content"].strip()
              for m in conversation if m["role"] == "assistant"]
  assert [tok.tokenizer.decode(r, skip_special_tokens=False) for r in runs] == [
      e + end for e in expected]


@pytest.mark.parametrize("conversation", CONVERSATIONS[:2])
def test_mask_matches_transformers_generation_blocks(tmp_path, conversation):
  """transformers derives its mask from {% generation %} character spans, independently of
  our prefix rendering."""
  path = _write(tmp_path, CHATML, {"eos_token": "<|im_end|>", "pad_token": "<pad>"})
  ref = transformers.AutoTokenizer.from_pretrained(path).apply_chat_template(
      conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
  ours = encode_chat(_ours(path), ChatTemplate.from_file(path), conversation)
  assert ours.tokens == list(ref["input_ids"])
  assert ours.loss_mask == list(ref["assistant_masks"]) and sum(ours.loss_mask) > 3


def test_prompt_response(chat_dir):
  tok, template = _ours(chat_dir), ChatTemplate.from_file(chat_dir)
  prompt, response = encode_prompt_response(tok, template, CONVERSATIONS[1][:-1], "Red fox.")
  assert prompt == encode_prompt(tok, template, CONVERSATIONS[1][:-1])
  whole = encode_chat(tok, template, [*CONVERSATIONS[1][:-1],
                                      {"role": "assistant", "content": "Red fox."}])
  assert prompt + response == whole.tokens
  assert whole.loss_mask[len(prompt):] == [1] * len(response)
  assert tok.decode(response) == ("Red fox.\n" if "chatml" in chat_dir.name else "Red fox.")


def test_template_breaking_the_prefix_property_is_refused(tmp_path):
  reversed_turns = ("{% for m in messages | reverse %}<|im_start|>{{ m['role'] }}\n"
                    "{{ m['content'] }}<|im_end|>\n{% endfor %}"
                    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
  path = _write(tmp_path, reversed_turns, {"eos_token": "<|im_end|>", "pad_token": "<pad>"})
  with pytest.raises(ValueError, match=r"breaks the prefix property: messages\[:1\] \+ generation"
                                       r" prompt vs messages\[:2\]; the texts differ at character"):
    encode_chat(_ours(path), ChatTemplate.from_file(path), CONVERSATIONS[0])


def test_raise_exception_and_sandbox(tmp_path):
  path = _write(tmp_path, CHATML, {"eos_token": "<|im_end|>", "pad_token": "<pad>"})
  with pytest.raises(TemplateRenderError, match="TemplateError: Unknown role: tool"):
    ChatTemplate.from_file(path).render([{"role": "tool", "content": "x"}])
  with pytest.raises(TemplateRenderError) as refused:
    ChatTemplate("{{ messages.append(1) }}").render([])
  assert isinstance(refused.value.__cause__, SecurityError)


def test_chat_template_jinja_file(tmp_path, chat_dir):
  ref = transformers.AutoTokenizer.from_pretrained(chat_dir)
  ref.save_pretrained(tmp_path)  # transformers>=5 writes chat_template.jinja
  assert (ChatTemplate.from_file(tmp_path).render(CONVERSATIONS[1]) ==
          ref.apply_chat_template(CONVERSATIONS[1], tokenize=False))
  with pytest.raises(ValueError, match="no chat_template"):
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ChatTemplate.from_file(tmp_path)
