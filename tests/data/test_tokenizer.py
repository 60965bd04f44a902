"""ByteTokenizer: round trips, specials, invalid UTF-8."""
from rlhf_jax.data.tokenizer import ByteTokenizer


def test_ids_and_vocab():
  tok = ByteTokenizer()
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (256, 257, 258, 259)
  members = ("encode", "decode", "pad_id", "bos_id", "eos_id", "vocab_size")
  assert all(hasattr(tok, m) for m in members)  # The Tokenizer protocol.


def test_encode_is_utf8_bytes_without_specials():
  tok = ByteTokenizer()
  assert tok.encode("37+48=") == [51, 55, 43, 52, 56, 61]
  assert tok.encode("é") == [0xC3, 0xA9]
  assert tok.encode("") == []


def test_round_trip_including_non_ascii():
  tok = ByteTokenizer()
  for text in ["12+7=19 45+38=83", "naïve café — 日本語 🙂", "line\nbreak\ttab", ""]:
    assert tok.decode(tok.encode(text)) == text


def test_decode_drops_specials():
  tok = ByteTokenizer()
  ids = [tok.bos_id, *tok.encode("85"), tok.eos_id, tok.pad_id, tok.pad_id]
  assert tok.decode(ids) == "85"


def test_decode_replaces_invalid_utf8():
  tok = ByteTokenizer()
  half_of_e_acute = [0xC3]
  assert tok.decode(tok.encode("a") + half_of_e_acute + tok.encode("b")) == "a\ufffdb"
