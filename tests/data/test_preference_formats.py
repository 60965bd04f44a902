"""Format parsers: hand examples with their expected normalised records, spelled out."""
import json

import pytest

from rlhf_jax.data import preference_formats as pf
from rlhf_jax.data.tokenizer import ByteTokenizer

H, A = "\n\nHuman:", "\n\nAssistant:"


class TestSplitHHDialogues:

  def test_single_turn(self):
    chosen = "\n\nHuman: What is 2+2?\n\nAssistant: 4."
    rejected = "\n\nHuman: What is 2+2?\n\nAssistant: 5."
    assert pf.parse_hh_rlhf({"chosen": chosen, "rejected": rejected}) == {
        "prompt": "\n\nHuman: What is 2+2?\n\nAssistant:", "prompt_kind": "text",
        "chosen": " 4.", "rejected": " 5."}

  def test_responses_sharing_their_first_words_still_split_at_the_marker(self):
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello there, friend."
    rejected = "\n\nHuman: Hi\n\nAssistant: Hello there. Go away."
    assert pf.split_hh_dialogues(chosen, rejected) == (
        "\n\nHuman: Hi\n\nAssistant:", " Hello there, friend.", " Hello there. Go away.")

  def test_multi_turn_splits_at_the_last_shared_assistant_turn(self):
    shared = "\n\nHuman: Name a fruit.\n\nAssistant: Apple.\n\nHuman: Another?\n\nAssistant:"
    chosen, rejected = shared + " Pear.", shared + " No."
    assert pf.split_hh_dialogues(chosen, rejected) == (shared, " Pear.", " No.")

  def test_dialogues_diverging_before_the_last_assistant_turn(self):
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke?\n\nAssistant: Knock knock."
    rejected = "\n\nHuman: Hi\n\nAssistant: Go away.\n\nHuman: Rude.\n\nAssistant: Yes."
    assert pf.split_hh_dialogues(chosen, rejected) == (
        "\n\nHuman: Hi\n\nAssistant:",
        " Hello!\n\nHuman: Joke?\n\nAssistant: Knock knock.",
        " Go away.\n\nHuman: Rude.\n\nAssistant: Yes.")

  def test_diverging_inside_a_later_human_turn_uses_the_earlier_assistant_marker(self):
    chosen = "\n\nHuman: Hi\n\nAssistant: Hey.\n\nHuman: Tell me X\n\nAssistant: X."
    rejected = "\n\nHuman: Hi\n\nAssistant: Hey.\n\nHuman: Tell me Y\n\nAssistant: Y."
    assert pf.split_hh_dialogues(chosen, rejected) == (
        "\n\nHuman: Hi\n\nAssistant:",
        " Hey.\n\nHuman: Tell me X\n\nAssistant: X.",
        " Hey.\n\nHuman: Tell me Y\n\nAssistant: Y.")

  def test_marker_cut_by_the_divergence_is_not_shared(self):
    # Both contain the marker, but their common prefix ends inside it ("...\n\nAssist").
    chosen = "\n\nHuman: Hi\n\nAssistant: a"
    rejected = "\n\nHuman: Hi\n\nAssist\n\nAssistant: b"
    with pytest.raises(pf.Malformed) as e:
      pf.split_hh_dialogues(chosen, rejected)
    assert e.value.reason == "no_shared_prompt"

  def test_no_shared_assistant_turn_is_malformed(self):
    with pytest.raises(pf.Malformed) as e:
      pf.parse_hh_rlhf({"chosen": "\n\nHuman: A\n\nAssistant: x",
                        "rejected": "\n\nHuman: B\n\nAssistant: y"})
    assert e.value.reason == "no_shared_prompt"

  @pytest.mark.parametrize("record, reason", [
      ({"chosen": H + " a" + A + " x"}, "missing_field"),
      ({"chosen": H + " a" + A + " x", "rejected": 3}, "wrong_type"),
      ({"chosen": H + " a" + A + " x", "rejected": H + " a" + A + " x"}, "identical_responses"),
      ({"chosen": H + " a" + A + " x", "rejected": H + " a" + A + "  "}, "empty_response"),
      (["not", "a", "dict"], "wrong_type"),
  ])
  def test_malformed(self, record, reason):
    with pytest.raises(pf.Malformed) as e:
      pf.parse_hh_rlhf(record)
    assert e.value.reason == reason


def _msg(role, content):
  return {"role": role, "content": content}


class TestUltraFeedback:

  def test_single_turn(self):
    record = {"prompt": "2+2?", "prompt_id": "abc", "score_chosen": 9.0,
              "chosen": [_msg("user", "2+2?"), _msg("assistant", "4")],
              "rejected": [_msg("user", "2+2?"), _msg("assistant", "5")]}
    assert pf.parse_ultrafeedback(record) == {
        "prompt": '[{"role": "user", "content": "2+2?"}]', "prompt_kind": "messages",
        "chosen": "4", "rejected": "5"}

  def test_multi_turn_prompt_is_the_conversation_before_the_final_message(self):
    context = [_msg("system", "Be brief."), _msg("user", "Hi"), _msg("assistant", "Hello"),
               _msg("user", "Bye")]
    record = {"prompt": "Hi", "chosen": context + [_msg("assistant", "Bye!")],
              "rejected": context + [_msg("assistant", "No.")]}
    out = pf.parse_ultrafeedback(record)
    assert json.loads(out["prompt"]) == context
    assert (out["chosen"], out["rejected"]) == ("Bye!", "No.")

  def test_response_only_lists_take_the_prompt_field(self):
    out = pf.parse_ultrafeedback({"prompt": "Q", "chosen": [_msg("assistant", "a")],
                                  "rejected": [_msg("assistant", "b")]})
    assert json.loads(out["prompt"]) == [_msg("user", "Q")]

  @pytest.mark.parametrize("record, reason", [
      ({"chosen": [_msg("user", "Q"), _msg("assistant", "a")],
        "rejected": [_msg("user", "Q"), _msg("assistant", "b")]}, "missing_field"),
      ({"prompt": "Q", "chosen": "a", "rejected": [_msg("assistant", "b")]}, "wrong_type"),
      ({"prompt": "Q", "chosen": [_msg("user", "Q"), {"role": "assistant"}],
        "rejected": [_msg("assistant", "b")]}, "missing_field"),
      ({"prompt": "Q", "chosen": [_msg("user", "Q"), _msg("assistant", "a")],
        "rejected": [_msg("user", "Q"), _msg("assistant", "")]}, "empty_response"),
      ({"prompt": "Q", "chosen": [_msg("user", "Q"), _msg("assistant", "a")],
        "rejected": [_msg("user", "Q"), _msg("assistant", "a")]}, "identical_responses"),
      ({"prompt": "Q", "chosen": [_msg("user", "Q"), _msg("assistant", "a")],
        "rejected": [_msg("user", "R"), _msg("assistant", "b")]}, "bad_messages"),
      ({"prompt": "Q", "chosen": [_msg("user", "Q")],
        "rejected": [_msg("user", "Q"), _msg("assistant", "b")]}, "bad_messages"),
      ({"prompt": "Q", "chosen": [], "rejected": [_msg("assistant", "b")]}, "bad_messages"),
      ({"prompt": "Q", "chosen": [_msg("robot", "Q"), _msg("assistant", "a")],
        "rejected": [_msg("robot", "Q"), _msg("assistant", "b")]}, "bad_messages"),
  ])
  def test_malformed(self, record, reason):
    with pytest.raises(pf.Malformed) as e:
      pf.parse_ultrafeedback(record)
    assert e.value.reason == reason


class TestPairs:

  def test_parse(self):
    assert pf.parse_pairs({"prompt": "Q", "chosen": "a", "rejected": "b", "id": 7}) == {
        "prompt": "Q", "prompt_kind": "text", "chosen": "a", "rejected": "b"}

  @pytest.mark.parametrize("record, reason", [
      ({"prompt": "Q", "chosen": "a"}, "missing_field"),
      ({"prompt": "Q", "chosen": "a", "rejected": None}, "missing_field"),
      ({"prompt": ["Q"], "chosen": "a", "rejected": "b"}, "wrong_type"),
      ({"prompt": "Q", "chosen": "\n ", "rejected": "b"}, "empty_response"),
      ({"prompt": "Q", "chosen": "a", "rejected": "a"}, "identical_responses"),
      ({"prompt": " ", "chosen": "a", "rejected": "b"}, "empty_prompt"),
  ])
  def test_malformed(self, record, reason):
    with pytest.raises(pf.Malformed) as e:
      pf.parse_pairs(record)
    assert e.value.reason == reason


class TestSFTMessages:

  def test_parse_keeps_the_whole_conversation(self):
    messages = [_msg("user", "Hi"), _msg("assistant", "Hello"), _msg("user", "2+2?"),
                _msg("assistant", "4")]
    out = pf.parse_sft_messages({"messages": messages + []})
    assert out == {"messages": json.dumps(messages)}

  @pytest.mark.parametrize("record, reason", [
      ({}, "missing_field"),
      ({"messages": "Hi"}, "wrong_type"),
      ({"messages": [_msg("user", "Hi")]}, "bad_messages"),
      ({"messages": [_msg("user", "Hi"), _msg("assistant", " ")]}, "empty_response"),
      ({"messages": [_msg("user", "Hi"), _msg("assistant", ""), _msg("user", "?"),
                     _msg("assistant", "ok")]}, "empty_response"),
      ({"messages": [_msg("system", "S"), _msg("assistant", "ok")]}, "empty_prompt"),
      ({"messages": [{"role": "user", "content": 5}, _msg("assistant", "ok")]}, "wrong_type"),
  ])
  def test_malformed(self, record, reason):
    with pytest.raises(pf.Malformed) as e:
      pf.parse_sft_messages(record)
    assert e.value.reason == reason


class TestPrompts:

  def test_text_and_messages(self):
    assert pf.parse_prompts({"prompt": "37+48="}) == {
        "prompt": "37+48=", "prompt_kind": "text", "response": ""}
    assert pf.parse_prompts({"prompt": [_msg("user", "Hi")]}) == {
        "prompt": '[{"role": "user", "content": "Hi"}]', "prompt_kind": "messages",
        "response": ""}

  @pytest.mark.parametrize("record, reason", [
      ({"text": "Hi"}, "missing_field"),
      ({"prompt": 3}, "wrong_type"),
      ({"prompt": ""}, "empty_prompt"),
      ({"prompt": [_msg("user", "Hi"), _msg("assistant", "Hey")]}, "bad_messages"),
  ])
  def test_malformed(self, record, reason):
    with pytest.raises(pf.Malformed) as e:
      pf.parse_prompts(record)
    assert e.value.reason == reason


class TestRenderingAndLength:

  def test_default_render(self):
    assert pf.default_render([_msg("user", "Hi"), _msg("assistant", "Hello")]) == (
        "user: Hi\nassistant: ", "Hello")
    assert pf.default_render([_msg("system", "S"), _msg("user", "Hi")]) == (
        "system: S\nuser: Hi\nassistant: ", "")

  def test_render_pairs_accepts_bytes_records_and_a_custom_render_fn(self):
    record = {"prompt": b'[{"role": "user", "content": "Q"}]', "prompt_kind": b"messages",
              "chosen": b"a", "rejected": b"b"}
    render = lambda ms: ("<" + ms[0]["content"] + ">", ms[-1]["content"])  # noqa: E731
    assert pf.render_pairs(record, "ultrafeedback", render) == [("<Q>", "a"), ("<Q>", "b")]
    text = {"prompt": "P", "prompt_kind": "text", "chosen": "a", "rejected": "bb"}
    assert pf.render_pairs(text, "pairs") == [("P", "a"), ("P", "bb")]

  def test_check_length_counts_bos_and_eos(self):
    tok = ByteTokenizer()
    record = {"prompt": "PP", "prompt_kind": "text", "chosen": "a", "rejected": "bbb"}
    pf.check_length(record, "pairs", tok, 7)  # longest: bos + PP + bbb + eos = 7
    with pytest.raises(pf.Malformed) as e:
      pf.check_length(record, "pairs", tok, 6)
    assert e.value.reason == "too_long" and "7 tokens" in str(e.value)
    prompt = {"prompt": "PPP", "prompt_kind": "text", "response": ""}
    pf.check_length(prompt, "prompts", tok, 4)  # bos + PPP
    with pytest.raises(pf.Malformed):
      pf.check_length(prompt, "prompts", tok, 3)

  def test_unknown_format(self):
    with pytest.raises(ValueError, match="format must be one of"):
      pf.parse("sharegpt", {})
