"""HFTokenizer: a tokenizer the test trains itself, checked against transformers' AutoTokenizer
loading the same files."""
import json
import warnings

import pytest
import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

from rlhf_jax.data.hf_tokenizer import HFTokenizer

CORPUS = ["The quick brown fox jumps over the lazy dog.", "Two plus two is four.",
          "Reward models score responses; policies maximise the reward.",
          "Café au lait, naïve façade — unicode too!", "12 + 30 = 42"] * 3
SPECIALS = ["<s>", "</s>", "<pad>", "<unk>"]
TEXTS = ["The lazy fox scores four.", "naïve café: 7 + 5 = 12", "  spaces\tand\nnewlines ",
         "zebra quokka", ""]


def train(specials=SPECIALS, vocab_size=120):
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=specials,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return tok


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok")
  train().save(str(path / "tokenizer.json"))
  (path / "tokenizer_config.json").write_text(json.dumps({
      "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
      "eos_token": {"__type": "AddedToken", "content": "</s>", "special": True},
      "pad_token": "<pad>",
      "unk_token": "<unk>"}))
  return path


def test_specials_and_vocab_match_transformers(tok_dir):
  ours, ref = HFTokenizer.from_file(tok_dir), transformers.AutoTokenizer.from_pretrained(tok_dir)
  assert (ours.bos_id, ours.eos_id, ours.pad_id) == (ref.bos_token_id, ref.eos_token_id,
                                                     ref.pad_token_id)
  assert (ours.bos_id, ours.eos_id, ours.pad_id) == (0, 1, 2)  # trainer order of SPECIALS
  assert ours.vocab_size == len(ref) > 256


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tok_dir, text):
  ours, ref = HFTokenizer.from_file(tok_dir), transformers.AutoTokenizer.from_pretrained(tok_dir)
  ids = ours.encode(text)
  assert ids == ref(text, add_special_tokens=False)["input_ids"]
  assert ours.bos_id not in ids and ours.eos_id not in ids
  assert ours.decode(ids) == text
  framed = [ours.bos_id, *ids, ours.eos_id, ours.pad_id, ours.vocab_size + 5]
  assert ours.decode(framed) == ref.decode(framed[:-1], skip_special_tokens=True) == text


def test_special_text_is_recognised(tok_dir):
  ours = HFTokenizer.from_file(tok_dir)
  ids = ours.encode("<s>fox</s>")
  assert ids[0] == ours.bos_id and ids[-1] == ours.eos_id and ours.decode(ids) == "fox"


def test_tokenizer_json_file_and_overrides(tok_dir):
  ours = HFTokenizer.from_file(tok_dir / "tokenizer.json", pad_token="<unk>")
  assert ours.pad_id == 3 and ours.eos_id == 1


def test_missing_pad_falls_back_to_eos(tmp_path):
  train().save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "special_tokens_map.json").write_text(json.dumps(
      {"bos_token": "<s>", "eos_token": "</s>"}))
  with pytest.warns(UserWarning, match="no pad token; using eos '</s>'"):
    ours = HFTokenizer.from_file(tmp_path)
  assert ours.pad_id == ours.eos_id == 1 and ours.bos_id == 0


def test_missing_bos_or_unknown_token_is_an_error(tmp_path):
  train().save(str(tmp_path / "tokenizer.json"))
  with pytest.raises(ValueError, match="no eos_token or bos_token"):
    HFTokenizer.from_file(tmp_path)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    with pytest.raises(ValueError, match="eos token '<eos>' is not in the tokenizer's vocabulary"):
      HFTokenizer.from_file(tmp_path, bos_token="<s>", eos_token="<eos>")
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    HFTokenizer.from_file(tmp_path / "missing")
