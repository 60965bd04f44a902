"""KTO on an unpaired file (TRL's layout: prompt, completion, label) from a tiny Qwen2
checkpoint, message prompts through the chat template; and the unpaired records' KTO examples
against a hand-built expectation."""
import numpy as np
import pytest

from real_formats import write_jsonl
from rlhf_jax.data import pairs
from rlhf_jax.data import preference_formats as pf
from rlhf_jax.pipeline import config
from rlhf_jax.runs import dpo_files
from rlhf_jax.runs.dpo import DPOConfig
from rlhf_jax.train.logging import read_metrics


def unpaired_records(n: int) -> list[dict]:
  rng = np.random.default_rng(0)
  out = []
  for i in range(n):
    a, b = (int(x) for x in rng.integers(2, 60, size=2))
    good = i % 2 == 0
    out.append({"prompt": [{"role": "user", "content": f"What is {a} plus {b}?"}],
                "completion": f"It is {a + b}." if good else "I will not say.", "label": good})
  return out


def test_kto_examples_of_unpaired_records_pair_each_with_another_prompt():
  records = [pf.parse("unpaired", r) for r in unpaired_records(3)]
  examples = pairs.kto_examples(records)
  assert [e["desirable"] for e in examples] == [True, False, True]
  for i, e in enumerate(examples):
    assert e["response"] == records[i]["completion"]
    assert e["kl_response"] == records[(i + 1) % 3]["completion"]  # the next, other prompt


def test_kto_trains_on_an_unpaired_file(tmp_path, hf_root):
  data = write_jsonl(tmp_path / "kto.jsonl", unpaired_records(40))
  cfg = config.parse(DPOConfig, [
      f"--init_hf={hf_root['qwen2']}", f"--data_files={data}", "--data_format=unpaired",
      "--loss=kto", "--test_fraction=0.25", f"--workdir={tmp_path / 'run'}",
      f"--data_dir={tmp_path / 'data'}", "--seq_len=64", "--batch_size=8",
      "--eval_batch_size=8", "--steps=4", "--warmup_steps=1", "--eval_every=4",
      "--save_every=4", "--log_every=1", "--kto_undesirable_weight=1.5"])
  result = dpo_files.run(cfg)
  train = read_metrics(cfg.workdir, split="train")
  # Step 1, policy == reference: every implicit reward is 0 and z_0 = 0, so the loss is
  # mean_i lambda_{y_i} (1 - sigmoid(0)) = mean_i lambda_{y_i} / 2 over the batch's labels.
  first = train[0]["metrics"]
  share = first["chosen_fraction"]
  assert first["loss"] == pytest.approx((share * 1.0 + (1 - share) * 1.5) / 2, rel=1e-4)
  assert np.isfinite(result["eval"]["loss"])


@pytest.mark.parametrize("flags, message", [
    (["--data_format=unpaired", "--loss=dpo"], "only KTO trains on"),
    (["--data_format=pairs", "--loss=kto"], "KTO needs desirable/undesirable labels"),
    (["--loss=kto", "--data_format=unpaired", "--kto_desirable_weight=0"], "must be > 0"),
])
def test_kto_flag_errors(flags, message, tmp_path):
  with pytest.raises(ValueError, match=message):
    config.parse(DPOConfig, [f"--data_files={tmp_path}/x.jsonl", *flags])
