"""experiments.sft on local files from tiny Llama and Qwen2 checkpoints: multi-turn conversations
through the chat template with the loss on every assistant turn only, GSM8K solutions as the
assistant turn, the export reloaded by transformers, and SFT -> GRPO through the export."""
import json
import os

import numpy as np
import pytest
import torch
import transformers

from real_formats import gsm8k_records, write_jsonl
from experiments import sft as sft_main
from rlhf_jax.data import pipeline
from rlhf_jax.data.chat import ChatTemplate
from rlhf_jax.data.hf_tokenizer import HFTokenizer
from rlhf_jax.pipeline import config
from rlhf_jax.pipeline.sft import SFTConfig
from rlhf_jax.runs import grpo_files
from rlhf_jax.runs.grpo import GRPOConfig
from rlhf_jax.train.logging import read_metrics


def _conversations(n: int) -> list[dict]:
  out = []
  for r in gsm8k_records(n, seed=3):
    out.append({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": r["question"]},
        {"role": "assistant", "content": r["answer"].split("\n")[0]},
        {"role": "user", "content": "And the final number?"},
        {"role": "assistant", "content": r["answer"].split("#### ")[1]}]})
  return out


def _flags(root, model_dir, data, fmt, **extra):
  flags = {"init_hf": model_dir, "data_files": data, "data_format": fmt,
           "test_fraction": 0.25, "workdir": root / "run", "data_dir": root / "data",
           "seq_len": 96, "batch_size": 8, "eval_batch_size": 8, "steps": 6,
           "warmup_steps": 1, "learning_rate": 3e-3, "log_every": 1, "eval_every": 6,
           "save_every": 3, **extra}
  return [f"--{k}={v}" for k, v in flags.items()]


def test_chat_example_masks_every_assistant_turn_and_nothing_else(hf_root):
  tok = HFTokenizer.from_file(hf_root["qwen2"])
  template = ChatTemplate.from_file(hf_root["qwen2"])
  messages = _conversations(1)[0]["messages"]
  ex = pipeline.chat_example(messages, tok, template, 128)
  n = int(ex["valid"].sum())
  tokens, mask = ex["tokens"][:n], ex["loss_mask"][:n]
  assert tokens[0] == tok.bos_id and mask[0] == 0
  # The target spans, decoded, are exactly the two assistant replies with their end-of-turn.
  spans, start = [], None
  for i, m in enumerate(list(mask) + [0]):
    if m and start is None:
      start = i
    if not m and start is not None:
      spans.append(tokens[start:i])
      start = None
  assert len(spans) == 2
  for span, reply in zip(spans, (messages[2]["content"], messages[4]["content"])):
    # The template's end of turn is "<|im_end|>\n": the model learns to stop (<|im_end|> is
    # the eos the sampler stops at); decode drops the special token.
    assert list(span[-2:]) == [tok.eos_id, *tok.encode("\n")]
    assert tok.decode(span) == reply + "\n"
  assert ex["loss_mask"][n:].sum() == 0


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_multi_turn_sft_trains_and_exports(tmp_path, hf_root, family):
  data = write_jsonl(tmp_path / "chat.jsonl", _conversations(48))
  cfg = config.parse(SFTConfig, _flags(tmp_path, hf_root[family], data, "sft_messages",
                                       export_hf=tmp_path / "export"))
  result = sft_main.run(cfg)
  train = read_metrics(cfg.workdir, split="train")
  assert train[-1]["metrics"]["loss"] < train[0]["metrics"]["loss"]
  assert result["data"]["train"] + result["data"]["test"] == 48
  assert np.isfinite(result["eval"]["loss"])
  exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
  assert type(exported).__name__.lower().startswith(family)
  # Fine-tuning raised the likelihood of the assistant turns: transformers' NLL of a training
  # conversation's target tokens is lower under the export than under the initial checkpoint.
  tok = HFTokenizer.from_file(tmp_path / "export")
  ex = pipeline.chat_example(_conversations(48)[0]["messages"], tok,
                             ChatTemplate.from_file(tmp_path / "export"), 96)
  initial = transformers.AutoModelForCausalLM.from_pretrained(hf_root[family]).eval()
  assert _target_nll(exported, ex) < _target_nll(initial, ex)


def _target_nll(model, ex) -> float:
  tokens = torch.tensor(ex["tokens"][None].astype(np.int64))
  with torch.no_grad():
    logits = model(tokens, attention_mask=torch.tensor(ex["valid"][None].astype(np.int64))).logits
  logps = torch.log_softmax(logits[0, :-1].double(), -1).gather(1, tokens[0, 1:, None])[:, 0]
  mask = torch.tensor(ex["loss_mask"][1:]).double()
  return float(-(logps * mask).sum() / mask.sum())


def test_packed_sft_fills_fewer_rows_and_trains(tmp_path, hf_root):
  data = write_jsonl(tmp_path / "chat.jsonl", _conversations(48))
  cfg = config.parse(SFTConfig, _flags(tmp_path, hf_root["qwen2"], data, "sft_messages",
                                       seq_len=256, pack=True))
  result = sft_main.run(cfg)
  packed_rows, train = result["data"]["packed_rows"], result["data"]["train"]
  assert packed_rows < train / 2 and result["data"]["packed_fill"] > 0.5
  metrics = read_metrics(cfg.workdir, split="train")
  assert metrics[-1]["metrics"]["loss"] < metrics[0]["metrics"]["loss"]


def test_gsm8k_sft_then_grpo_from_its_export(tmp_path, hf_root):
  data = write_jsonl(tmp_path / "gsm8k.jsonl", gsm8k_records(40))
  sft_cfg = config.parse(SFTConfig, _flags(tmp_path / "sft", hf_root["qwen2"], data, "gsm8k",
                                           export_hf=tmp_path / "sft_export"))
  sft_main.run(sft_cfg)
  grpo_cfg = config.parse(GRPOConfig, [
      f"--init_hf={tmp_path / 'sft_export'}", f"--prompt_files={data}", "--prompt_format=gsm8k",
      f"--workdir={tmp_path / 'grpo'}", f"--data_dir={tmp_path / 'data'}",
      "--max_new_tokens=12", "--max_prompt_len=64", "--batch_size=8", "--group_size=2",
      "--num_minibatches=1", "--steps=2", "--warmup_steps=1", "--eval_every=2",
      "--save_every=2", "--eval_prompts=8", "--eval_batch_size=8", "--eval_samples=2",
      "--pass_k=1", "--kl_coef=0", "--reward_fns=math,format_boxed"])
  result = grpo_files.run(grpo_cfg)
  assert set(result["table"]) == {"initial", "grpo"}
  with open(os.path.join(grpo_cfg.workdir, "config.json")) as f:
    assert json.load(f)["init_hf"] == str(tmp_path / "sft_export")
