"""TFDS array_record builders: build once, reuse, rebuild on a changed config, read via grain."""
import hashlib
import inspect

import numpy as np

from rlhf_jax.data import builders, pipeline
from rlhf_jax.data.tokenizer import ByteTokenizer
from rlhf_jax.worlds import arithmetic as ar

TINY = ar.ArithmeticConfig(max_digits=1, test_fraction=0.3, error_rate=0.3,
                           num_pretrain_texts=40, num_sft=20, num_test=10)


def _build(data_dir, config, calls):
  def records_fn():
    calls.append(config)
    return {"train": [{"text": f"record {i} of {config['n']}"} for i in range(config["n"])]}
  return builders.build_records(name="toy", config=config, records_fn=records_fn,
                                fields=("text",), data_dir=str(data_dir))


def test_built_once_reused_and_rebuilt_on_config_change(tmp_path):
  calls = []
  first = _build(tmp_path, {"n": 5}, calls)
  again = _build(tmp_path, {"n": 5}, calls)
  assert len(calls) == 1 and again.data_dir == first.data_dir
  changed = _build(tmp_path, {"n": 7}, calls)
  assert len(calls) == 2 and changed.data_dir != first.data_dir
  assert len(builders.load_split(changed, "train")) == 7
  assert len(builders.load_split(first, "train")) == 5


def test_records_round_trip_as_bytes(tmp_path):
  source = builders.load_split(_build(tmp_path, {"n": 5}, []), "train")
  texts = sorted(source[i]["text"] for i in range(len(source)))
  assert texts == [f"record {i} of 5".encode() for i in range(5)]


def test_arithmetic_world_end_to_end(tmp_path):
  built = ar.build_datasets(TINY, str(tmp_path))
  tok = ByteTokenizer()
  expected = ar.records(TINY)
  sft_test = builders.load_split(built["sft"], "test")
  assert sorted(sft_test[i]["prompt"].decode() for i in range(len(sft_test))) == sorted(
      r["prompt"] for r in expected["sft"]["test"])
  answered = {}
  for b in pipeline.make_prompt_iterator(sft_test, batch_size=4, prompt_len=8, tokenizer=tok):
    for row, answer, real in zip(b["prompt_tokens"], b["answers"], b["example_valid"]):
      if real:
        answered[tok.decode(row)] = str(answer)
  assert answered == {r["prompt"]: r["response"] for r in expected["sft"]["test"]}
  pretrain = builders.load_split(built["pretrain"], "train")
  it = pipeline.make_train_iterator(pretrain, batch_size=8, seq_len=64, seed=0, tokenizer=tok,
                                    kind="lm")
  batch = next(it)
  assert batch["tokens"].shape == (8, 64) and batch["valid"][:, 0].all()
  assert np.all(batch["tokens"][:, 0] == tok.bos_id)


def test_world_datasets_are_keyed_on_the_world_source(tmp_path, monkeypatch):
  # Same config, edited world generator (simulated by a different source digest): rebuilt,
  # so data written by an older version of the world is never reused.
  first = ar.build_datasets(TINY, str(tmp_path))["sft"]
  monkeypatch.setattr(builders, "_source_digest", lambda config: "edited")
  edited = ar.build_datasets(TINY, str(tmp_path))["sft"]
  assert edited.data_dir != first.data_dir
  with open(inspect.getsourcefile(ar.ArithmeticConfig), "rb") as f:
    expected = hashlib.sha256(f.read()).hexdigest()[:16]
  monkeypatch.undo()
  assert builders._source_digest(TINY) == expected
