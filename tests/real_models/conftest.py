"""The session's tiny Hugging Face checkpoints (real_formats.py builds them)."""
import pytest

from real_formats import write_model, write_tokenizer


@pytest.fixture(scope="session")
def hf_root(tmp_path_factory):
  """{"tokenizer", "llama", "qwen2"}: directories of a tokenizer and two tiny checkpoints that
  carry it."""
  root = tmp_path_factory.mktemp("hf")
  tok = write_tokenizer(root / "tokenizer")
  dirs = {"tokenizer": root / "tokenizer", "root": root}
  for family in ("llama", "qwen2"):
    write_model(root / family, family, tok.get_vocab_size())
    write_tokenizer(root / family)
    dirs[family] = root / family
  return dirs
