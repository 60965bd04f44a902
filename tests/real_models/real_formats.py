"""Tiny real-format inputs for the end-to-end runs on Hugging Face checkpoints: random Llama and
Qwen2 models written by transformers, a byte-level BPE tokenizer with a ChatML chat template
(Qwen2's format), and small GSM8K-, HH-RLHF-, UltraFeedback- and message-format files.

Everything is built in a session-scoped temporary directory: no download, and the models are
small enough (d 32, 2 layers) for the runs to take seconds."""
import json

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def gsm8k_records(n: int, seed: int = 0) -> list[dict]:
  """GSM8K-format records: a question and a worked answer ending in '#### <answer>'."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    a, b = (int(x) for x in rng.integers(2, 60, size=2))
    out.append({"question": f"Tom has {a} apples and buys {b} more. How many apples now?",
                "answer": f"He has {a} + {b} = {a + b} apples.\n#### {a + b}"})
  return out


def _corpus() -> list[str]:
  texts = [json.dumps(r) for r in gsm8k_records(200, seed=1)]
  texts += ["Human: hello there Assistant: hi, how can I help? The answer is \\boxed{12}. "
            "<think>step by step</think> #### 42 user assistant system"] * 20
  return texts


def write_tokenizer(directory) -> Tokenizer:
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(_corpus(), trainers.BpeTrainer(
      vocab_size=400, special_tokens=SPECIALS,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  directory.mkdir(parents=True, exist_ok=True)
  tok.save(str(directory / "tokenizer.json"))
  (directory / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|pad|>",
       "chat_template": CHATML}))
  return tok


def write_model(directory, family: str, vocab_size: int, *, seed: int = 0,
                classifier: bool = False) -> None:
  """A random tiny Llama or Qwen2 (causal LM, or a num_labels=1 sequence classifier) saved
  with its tokenizer files."""
  torch.manual_seed(seed)
  common = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                max_position_embeddings=256, bos_token_id=0, eos_token_id=2, pad_token_id=3)
  if family == "llama":
    cfg = transformers.LlamaConfig(**common, num_labels=1)
    cls = (transformers.LlamaForSequenceClassification if classifier
           else transformers.LlamaForCausalLM)
  else:
    cfg = transformers.Qwen2Config(**common, num_labels=1, tie_word_embeddings=False)
    cls = (transformers.Qwen2ForSequenceClassification if classifier
           else transformers.Qwen2ForCausalLM)
  cls(cfg).save_pretrained(directory)


def write_jsonl(path, records) -> str:
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)
