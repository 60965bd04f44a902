"""pairs.py: chat-template rendering of message prompts and the reference-carrying source."""
import json

import numpy as np
import pytest

from rlhf_jax.data import pairs
from rlhf_jax.data.chat import ChatTemplate
from rlhf_jax.data.tokenizer import ByteTokenizer

TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}<end>"
            "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")


def test_chat_render_splits_prompt_and_reply_without_a_second_bos():
  render = pairs.chat_render_fn(ChatTemplate(TEMPLATE, {"bos_token": "<s>"}))
  convo = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
  assert render(convo) == ("<user>hi<end><assistant>", "yo<end>")
  assert render(convo[:1]) == ("<user>hi<end><assistant>", "")


def test_message_prompts_render_through_the_template():
  record = {"prompt": json.dumps([{"role": "user", "content": "2+2?"}]),
            "prompt_kind": "messages", "chosen": "4", "rejected": "5"}
  render = pairs.chat_render_fn(ChatTemplate(TEMPLATE, {"bos_token": "<s>"}))
  tok = ByteTokenizer()
  ex = pairs.pair_example(record, tok, 48, "ultrafeedback", render)
  chosen = ex["chosen_tokens"][ex["chosen_mask"] > 0]
  assert tok.decode(chosen) == "4<end>" and chosen[-1] == tok.eos_id
  assert tok.decode(ex["chosen_tokens"][ex["chosen_valid"]]) == "<user>2+2?<end><assistant>4<end>"


def test_reference_logps_ride_with_their_records():
  source = [{"prompt": "a", "prompt_kind": "text", "chosen": "b", "rejected": "c"}] * 3
  wrapped = pairs.WithReferenceLogps(source, np.arange(3.0), -np.arange(3.0))
  ex = pairs.pair_example(wrapped[2], ByteTokenizer(), 8)
  assert (ex["ref_chosen_logps"], ex["ref_rejected_logps"]) == (2.0, -2.0)
  with pytest.raises(ValueError, match="reference log-probs"):
    pairs.WithReferenceLogps(source, np.zeros(2), np.zeros(3))


def _records(n):
  return [{"prompt": f"{i}+1=", "prompt_kind": "text", "chosen": str(i + 1),
           "rejected": str(i)} for i in range(n)]


def test_eval_iterator_pads_the_last_batch():
  encode = pairs.make_encoder(ByteTokenizer(), 12, "pairs")
  batches = list(pairs.make_pair_eval_iterator(_records(3), batch_size=2, encode=encode))
  assert [b["example_valid"].tolist() for b in batches] == [[True, True], [True, False]]
  assert batches[1]["chosen_tokens"].shape == (2, 12)


def test_train_iterator_resumes():
  encode = pairs.make_encoder(ByteTokenizer(), 12, "pairs")
  it = pairs.make_pair_train_iterator(_records(5), batch_size=2, seed=3, encode=encode)
  next(it)
  state = it.get_state()
  expected = [next(it)["chosen_tokens"] for _ in range(3)]
  again = pairs.make_pair_train_iterator(_records(5), batch_size=2, seed=3, encode=encode)
  again.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(again)["chosen_tokens"], want)
