"""A Hugging Face `tokenizers` tokenizer behind rlhf_jax's Tokenizer protocol.

HFTokenizer.from_file reads a tokenizer.json (or a model directory holding one) and the
special tokens from tokenizer_config.json, falling back to special_tokens_map.json. Keyword
arguments override any of them.

Special-token policy (documented, not guessed silently):
  - eos and bos must be known (from the files or the keyword arguments), else ValueError.
    Models without a BOS token (e.g. Qwen2's ChatML) must name one explicitly, e.g.
    bos_token="<|im_start|>" or the eos token, since rlhf_jax's pipelines place bos themselves.
  - a missing pad token falls back to eos (with a warning), the usual choice for Llama
    checkpoints; padded positions are masked everywhere, so the id only has to exist.
encode never adds special tokens (the pipelines frame examples themselves), but special
tokens written in the text (e.g. by a chat template) are recognised; decode drops them.
"""
import pathlib
import warnings
from typing import Sequence

import tokenizers

from rlhf_jax.data.local_files import read_json_object

_ROLES = ("bos", "eos", "pad", "unk")


def _content(token, file, key: str) -> str | None:
  """tokenizer_config stores a special token as a string or an AddedToken dict."""
  value = token.get("content") if isinstance(token, dict) else token
  if value is not None and not isinstance(value, str):
    raise ValueError(f"{file}: {key} is {token!r:.60}, expected a string or "
                     "{\"content\": string}")
  return value


def read_special_tokens(directory) -> dict[str, str]:
  """{"bos_token": "<s>", ...} from tokenizer_config.json, then special_tokens_map.json."""
  found: dict[str, str] = {}
  for name in ("special_tokens_map.json", "tokenizer_config.json"):  # later files win
    file = pathlib.Path(directory) / name
    if file.exists():
      config = read_json_object(file)
      for role in _ROLES:
        value = _content(config.get(f"{role}_token"), file, f"{role}_token")
        if value is not None:
          found[f"{role}_token"] = value
  return found


class HFTokenizer:
  """rlhf_jax Tokenizer over a `tokenizers.Tokenizer` (see the module docstring)."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, *, bos_token: str | None,
               eos_token: str | None, pad_token: str | None = None, unk_token: str | None = None):
    self.tokenizer = tokenizer
    self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    if eos_token is None or bos_token is None:
      missing = [n for n, t in (("eos_token", eos_token), ("bos_token", bos_token)) if t is None]
      raise ValueError(f"tokenizer has no {' or '.join(missing)} (neither tokenizer_config.json "
                       "nor special_tokens_map.json names one); pass it explicitly, e.g. "
                       "HFTokenizer.from_file(path, bos_token=...)")
    if pad_token is None:
      warnings.warn(f"tokenizer has no pad token; using eos {eos_token!r} as pad (padded "
                    "positions are masked, so only the id's existence matters)", stacklevel=2)
      pad_token = eos_token
    self.special_tokens = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token}
    if unk_token is not None:
      self.special_tokens["unk_token"] = unk_token
    self.bos_id, self.eos_id, self.pad_id = (self._id(bos_token, "bos"), self._id(eos_token, "eos"),
                                             self._id(pad_token, "pad"))

  def _id(self, token: str, role: str) -> int:
    i = self.tokenizer.token_to_id(token)
    if i is None:
      raise ValueError(f"{role} token {token!r} is not in the tokenizer's vocabulary; name one "
                       f"of its tokens as {role}_token in tokenizer_config.json")
    return i

  @classmethod
  def from_file(cls, path, **special_tokens) -> "HFTokenizer":
    """path: a directory with tokenizer.json (+ tokenizer_config.json), or tokenizer.json
    itself. special_tokens: bos_token=/eos_token=/pad_token=/unk_token= overrides."""
    path = pathlib.Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.exists():
      raise FileNotFoundError(f"{file} not found (only the fast-tokenizer tokenizer.json format "
                              "is supported; convert sentencepiece models with transformers)")
    bad = set(special_tokens) - {f"{r}_token" for r in _ROLES}
    if bad:
      raise TypeError(f"unknown special tokens {sorted(bad)}")
    tokens = {**read_special_tokens(file.parent), **special_tokens}
    try:
      tokenizer = tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception on a bad file
      raise ValueError(f"{file}: not a readable tokenizer.json ({e}); save it with a current "
                       "tokenizers/transformers") from None
    try:
      return cls(tokenizer, bos_token=tokens.get("bos_token"),
                 eos_token=tokens.get("eos_token"), pad_token=tokens.get("pad_token"),
                 unk_token=tokens.get("unk_token"))
    except ValueError as e:  # a special token missing or unknown: name the directory
      raise ValueError(f"{file.parent}: {e}") from None

  def encode(self, text: str) -> list[int]:
    return self.tokenizer.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    """Drops special and out-of-range ids (a sampled id beyond the tokenizer's vocabulary,
    from an embedding table rounded up, decodes to nothing rather than raising)."""
    ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
    return self.tokenizer.decode(ids, skip_special_tokens=True)
