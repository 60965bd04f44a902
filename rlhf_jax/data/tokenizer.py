"""Tokenizers: the `Tokenizer` protocol and a byte-level tokenizer for the embedded worlds.

The embedded worlds are tiny, so a byte vocabulary (no training, no files, any UTF-8 text)
is enough; a Hugging Face tokenizer plugs in later by wrapping it to this protocol. The
pipelines only ever see these five members, so nothing else may be assumed about a tokenizer.
"""
from typing import Protocol, Sequence


class Tokenizer(Protocol):
  """What the data pipelines need from a tokenizer.

  encode never adds special tokens (the pipelines place bos/eos themselves, so every
  tokenizer frames examples the same way); decode drops them.
  """
  pad_id: int
  bos_id: int
  eos_id: int
  vocab_size: int

  def encode(self, text: str) -> list[int]:
    ...

  def decode(self, ids: Sequence[int]) -> str:
    ...


class ByteTokenizer:
  """UTF-8 bytes are ids 0..255; pad=256, bos=257, eos=258; vocab_size=259.

  Models round the embedding table up (e.g. to a multiple of 128) themselves, so
  vocab_size here is the exact number of ids this tokenizer can emit.
  """
  pad_id = 256
  bos_id = 257
  eos_id = 258
  vocab_size = 259

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids: Sequence[int]) -> str:
    """Drops special (and out-of-range) ids; invalid UTF-8, e.g. a sampled half of a
    multi-byte character, becomes U+FFFD instead of raising mid-evaluation."""
    data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
    return data.decode("utf-8", errors="replace")
