"""The campaign's session pieces: the per-target table printed at the end of every run that
fuzzed something, and tiny Hugging Face tokenizer and model directories (written here, without
torch, so the campaign's imports stay fast)."""
import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import tally
from rlhf_jax.models import hf
from rlhf_jax.models.config import ModelConfig

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# Llama-2 style: refuses conversations whose roles do not alternate, the way real templates
# do (raise_exception), so the readers meet a template that rejects a record.
STRICT = ("{{ bos_token }}{% for m in messages %}"
          "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/...') }}"
          "{% endif %}{{ '[' + m['role'] + '] ' + m['content'] + eos_token }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}")
TEMPLATES = {"chatml": CHATML, "strict": STRICT}
TINY = ModelConfig(vocab_size=300, d_model=8, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=16,
                   max_seq_len=32)


def pytest_terminal_summary(terminalreporter):
  lines = tally.summary()
  if lines:
    terminalreporter.write_sep("=", "bad-input campaign: inputs per target")
    for line in lines:
      terminalreporter.write_line(line)


def write_tokenizer(directory, template: str | None) -> None:
  """A byte-level BPE (300 ids) with ChatML-style special tokens and the given template."""
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(["Human: hello there Assistant: hi, how can I help? #### 42"] * 20,
                          trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  directory.mkdir(parents=True, exist_ok=True)
  tok.save(str(directory / "tokenizer.json"))
  config = {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|pad|>"}
  if template is not None:
    config["chat_template"] = template
  (directory / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="session")
def tokenizer_dirs(tmp_path_factory) -> dict[str, str]:
  """{"": byte tokenizer (no directory), "plain": no chat template, "chatml", "strict"}."""
  root = tmp_path_factory.mktemp("tokenizers")
  dirs = {"": ""}
  for name, template in {"plain": None, **TEMPLATES}.items():
    write_tokenizer(root / name, template)
    dirs[name] = str(root / name)
  return dirs


@pytest.fixture(scope="session")
def good_dir(tmp_path_factory, tokenizer_dirs):
  """A valid tiny Llama directory: config.json, model.safetensors (zeros) and the tokenizer."""
  directory = tmp_path_factory.mktemp("model")
  (directory / "config.json").write_text(json.dumps(hf.config_to_hf(TINY)))
  save_file({name: np.zeros(layout.hf_shape, np.float32)
             for _, name, layout in hf.tensor_plan(TINY, "lm") if name},
            str(directory / "model.safetensors"))
  shutil.copytree(tokenizer_dirs["chatml"], directory, dirs_exist_ok=True)
  return directory
