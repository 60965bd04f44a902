"""Pipelines: exact arrays on hand examples, errors, and seeded, resumable iteration."""
import json

import numpy as np
import pytest

from rlhf_jax.data import pipeline
from rlhf_jax.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
PAD, BOS, EOS = 256, 257, 258


def test_sft_example_by_hand():
  ex = pipeline.sft_example("1+2=", "3", TOK, seq_len=8)
  # position: 0    1    2    3    4    5    6    7
  # token:    bos  '1'  '+'  '2'  '='  '3'  eos  pad
  # A target is predicted from the previous position; only the response '3' (5) and eos (6)
  # are SFT targets. bos (0) is never a target, pad (7) neither.
  np.testing.assert_array_equal(ex["tokens"], [BOS, 49, 43, 50, 61, 51, EOS, PAD])
  np.testing.assert_array_equal(ex["loss_mask"], [0, 0, 0, 0, 0, 1, 1, 0])
  np.testing.assert_array_equal(ex["valid"], [1, 1, 1, 1, 1, 1, 1, 0])
  assert ex["tokens"].dtype == np.int32 and ex["loss_mask"].dtype == np.float32
  assert ex["valid"].dtype == bool


def test_lm_example_by_hand():
  ex = pipeline.lm_example("hi", TOK, seq_len=6)
  # position: 0    1    2    3    4    5
  # token:    bos  'h'  'i'  eos  pad  pad   -> every non-pad token after bos is a target.
  np.testing.assert_array_equal(ex["tokens"], [BOS, 104, 105, EOS, PAD, PAD])
  np.testing.assert_array_equal(ex["loss_mask"], [0, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(ex["valid"], [1, 1, 1, 1, 0, 0])


def test_prompt_example_is_left_padded():
  ex = pipeline.prompt_example("1+2=", "3", TOK, prompt_len=7)
  np.testing.assert_array_equal(ex["prompt_tokens"], [PAD, PAD, BOS, 49, 43, 50, 61])
  np.testing.assert_array_equal(ex["prompt_valid"], [0, 0, 1, 1, 1, 1, 1])
  assert ex["answers"] == "3"


def test_exact_fit_is_accepted_and_overlong_raises():
  assert pipeline.sft_example("1+2=", "3", TOK, seq_len=7)["valid"].all()
  with pytest.raises(ValueError, match=r"'1\+2=', '34'.*8 tokens.*seq_len=7"):
    pipeline.sft_example("1+2=", "34", TOK, seq_len=7)
  with pytest.raises(ValueError, match=r"'hello'.*7 tokens.*seq_len=6"):
    pipeline.lm_example("hello", TOK, seq_len=6)
  with pytest.raises(ValueError, match="prompt_len=4"):
    pipeline.prompt_example("1+2=", "3", TOK, prompt_len=4)


def test_bytes_records_are_decoded():
  batch = next(pipeline.make_eval_iterator([{"text": "é".encode()}], batch_size=1, seq_len=4,
                                           tokenizer=TOK, kind="lm"))
  np.testing.assert_array_equal(batch["tokens"][0], [BOS, 0xC3, 0xA9, EOS])


SOURCE = [{"text": f"{i}+{i}={2 * i}"} for i in range(12)]


def _train(seed, source=SOURCE, batch_size=4):
  return pipeline.make_train_iterator(source, batch_size=batch_size, seq_len=12, seed=seed,
                                      tokenizer=TOK, kind="lm")


def _take(it, n):
  return [next(it) for _ in range(n)]


def _rows(batches):
  return [TOK.decode(row) for b in batches for row in b["tokens"]]


def test_train_batch_keys_shapes_dtypes():
  batch = next(_train(0))
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      "tokens": ((4, 12), np.int32), "loss_mask": ((4, 12), np.float32),
      "valid": ((4, 12), bool), "example_valid": ((4,), bool),
      pipeline.EXAMPLE_ID: ((4,), np.int64)}


def test_train_batch_example_ids_name_their_records():
  """Each row's example id is the index of the record its tokens encode (what a NaN step's
  report names), across epochs."""
  for batch in _take(_train(3), 5):  # 20 rows of 12 records: into the second epoch
    for tokens, i in zip(batch["tokens"], batch[pipeline.EXAMPLE_ID]):
      assert TOK.decode(tokens) == SOURCE[int(i)]["text"]


def test_train_order_is_seeded():
  assert _rows(_take(_train(0), 6)) == _rows(_take(_train(0), 6))
  assert _rows(_take(_train(0), 6)) != _rows(_take(_train(1), 6))


def test_epochs_repeat_with_a_new_order():
  rows = _rows(_take(_train(0), 6))  # 12 examples, 4 per batch: two epochs.
  first, second = rows[:12], rows[12:]
  expected = sorted(r["text"] for r in SOURCE)
  assert sorted(first) == expected and sorted(second) == expected
  assert first != second


def test_resume_continues_exactly():
  uninterrupted = _take(_train(3), 10)
  it = _train(3)
  _take(it, 4)
  state = json.loads(json.dumps(it.get_state()))  # Must survive a JSON checkpoint.
  resumed = _train(3)
  resumed.set_state(state)
  for a, b in zip(uninterrupted[4:], _take(resumed, 6), strict=True):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_eval_is_one_ordered_pass_with_padded_last_batch():
  batches = list(pipeline.make_eval_iterator(SOURCE[:5], batch_size=2, seq_len=12,
                                             tokenizer=TOK, kind="lm"))
  assert len(batches) == 3 and all(b["tokens"].shape == (2, 12) for b in batches)
  assert _rows(batches)[:5] == [r["text"] for r in SOURCE[:5]]
  last = batches[-1]
  np.testing.assert_array_equal(last["example_valid"], [True, False])
  assert (last["tokens"][1] == PAD).all() and not last["valid"][1].any()
  assert not last["loss_mask"][1].any()


def test_prompt_iterator():
  source = [{"prompt": "1+2=", "response": "3"}, {"prompt": b"10+5=", "response": b"15"}]
  batches = list(pipeline.make_prompt_iterator(source, batch_size=3, prompt_len=8, tokenizer=TOK))
  assert len(batches) == 1
  b = batches[0]
  assert b["prompt_tokens"].shape == (3, 8) and b["prompt_tokens"].dtype == np.int32
  assert list(b["answers"]) == ["3", "15", ""]
  np.testing.assert_array_equal(b["example_valid"], [True, True, False])
  assert TOK.decode(b["prompt_tokens"][1]) == "10+5="
  assert (b["prompt_tokens"][:, -1] != PAD).all()  # Every row ends at the last column.
  np.testing.assert_array_equal(b["prompt_valid"], b["prompt_tokens"] != PAD)


def test_unknown_kind_raises():
  with pytest.raises(ValueError, match="kind"):
    pipeline.make_train_iterator(SOURCE, batch_size=2, seq_len=8, seed=0, tokenizer=TOK,
                                 kind="dpo")


def test_overlong_example_raises_through_the_pipeline():
  it = pipeline.make_train_iterator([{"text": "x" * 20}], batch_size=1, seq_len=8, seed=0,
                                    tokenizer=TOK, kind="lm")
  with pytest.raises(ValueError, match="seq_len=8"):
    next(it)


def test_decode_response_stops_at_eos():
  ids = np.array([*TOK.encode("85"), EOS, *TOK.encode("99"), PAD])
  assert pipeline.decode_response(ids, TOK) == "85"
  assert pipeline.decode_response(TOK.encode("7"), TOK) == "7"
