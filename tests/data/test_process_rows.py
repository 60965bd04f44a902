"""Per-process reading (rows=...): the processes of a job each read a block of rows of every
global batch; put side by side, their blocks are the 1-process batch, for any process count,
in the training, eval, prompt and pair pipelines, and a resumed position is the same for all.
(The pipelines in real multi-process jobs: tests/distributed/.)"""
import numpy as np
import pytest

from rlhf_jax.data import pairs, pipeline
from rlhf_jax.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
SOURCE = [{"prompt": f"q{i}?", "response": f"a{i * 7}."} for i in range(23)]
B = 8


def _blocks(processes):
  per = B // processes
  return [slice(p * per, (p + 1) * per) for p in range(processes)]


def _concat(batches):
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _equal(a, b):
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _train(rows, seed=3):
  return pipeline.make_train_iterator(SOURCE, batch_size=B, seq_len=24, seed=seed,
                                      tokenizer=TOK, kind="sft", rows=rows)


def _pair_train(rows):
  encode = lambda r: {"n": np.int32(int(r["response"][1:-1])), "example_valid": np.True_}
  return pairs.make_pair_train_iterator(SOURCE, batch_size=B, seed=5, encode=encode, rows=rows)


@pytest.mark.parametrize("make", [_train, _pair_train])
@pytest.mark.parametrize("processes", [2, 4])
def test_blocks_of_every_train_batch_make_the_global_batch(make, processes):
  whole = make(slice(None))
  parts = [make(rows) for rows in _blocks(processes)]
  for _ in range(7):  # past the first epoch (23 records, 8 per batch)
    _equal(_concat([next(p) for p in parts]), next(whole))


def test_other_blocks_give_another_batch():
  """The comparison can fail: a process reading the wrong block changes the batch."""
  a, b = _train(slice(0, 4)), _train(slice(4, 8))
  assert not np.array_equal(next(a)["tokens"], next(b)["tokens"])


def test_every_process_resumes_from_the_one_saved_position():
  parts = [_train(rows) for rows in _blocks(2)]
  for _ in range(3):
    for p in parts:
      next(p)
  states = [p.get_state() for p in parts]
  assert states[0] == states[1]  # one position for the job: process 0's checkpoint holds it
  resumed = [_train(rows) for rows in _blocks(2)]
  for r in resumed:
    r.set_state(states[0])
  for _ in range(3):
    _equal(_concat([next(r) for r in resumed]), _concat([next(p) for p in parts]))


def test_eval_and_prompt_blocks_keep_the_padded_last_batch():
  kw = dict(batch_size=B, seq_len=24, tokenizer=TOK, kind="sft")
  whole = list(pipeline.make_eval_iterator(SOURCE, **kw))
  parts = [list(pipeline.make_eval_iterator(SOURCE, rows=rows, **kw)) for rows in _blocks(2)]
  assert len(whole) == 3 and whole[-1]["example_valid"].sum() == 23 - 16
  for i, batch in enumerate(whole):
    _equal(_concat([p[i] for p in parts]), batch)
  kw = dict(batch_size=B, prompt_len=8, tokenizer=TOK)
  whole = list(pipeline.make_prompt_iterator(SOURCE, **kw))
  parts = [list(pipeline.make_prompt_iterator(SOURCE, rows=rows, **kw)) for rows in _blocks(4)]
  for i, batch in enumerate(whole):
    _equal(_concat([p[i] for p in parts]), batch)
  # The last block of the last batch is all padding: rows 16..23 hold 7 prompts and 1 filler.
  assert not parts[3][-1]["example_valid"][-1]
