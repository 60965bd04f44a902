"""Plain regression tests, one per crash the bad-input campaign found: each input used to
raise something other than a clear ValueError / FileNotFoundError naming the file or flag
(the old exception in each docstring), or to be dropped or read silently."""
import json
import shutil
import struct

import jax
import pytest

from conftest import STRICT, write_tokenizer
from rlhf_jax.data import chat, file_datasets, local_files
from rlhf_jax.data.hf_tokenizer import HFTokenizer
from rlhf_jax.data.tokenizer import ByteTokenizer
from rlhf_jax.models import hf_import, hf_peft
from rlhf_jax.models.config import preset
from rlhf_jax.pipeline import config, prompt_sets, real_models, sft
from rlhf_jax.runs import dpo, dpo_files, grpo
from rlhf_jax.sharding import make_mesh

PAIR = {"prompt": "p", "chosen": "yes", "rejected": "no"}


def _lines(path, *lines: bytes) -> str:
  path.write_bytes(b"\n".join(lines) + b"\n")
  return str(path)


def _build(files, tmp_path, fmt="pairs", **kwargs):
  return file_datasets.build_file_dataset(files, format=fmt, data_dir=str(tmp_path / "built"),
                                          **kwargs)


@pytest.mark.parametrize("line, detail", [
    (b"\xff\xfe", "invalid UTF-8"),                       # was UnicodeDecodeError
    (b"[" * 5000 + b"]" * 5000, "RecursionError"),         # was RecursionError
    (b"1" * 5000, "Exceeds the limit"),                    # was a ValueError naming no file
])
def test_a_bad_jsonl_line_is_one_malformed_record(line, detail, tmp_path):
  path = _lines(tmp_path / "a.jsonl", json.dumps(PAIR).encode(), line)
  with pytest.raises(ValueError, match=rf"{path}:2: invalid_json: .*{detail}"):
    _build(path, tmp_path)
  report = _build(path, tmp_path, on_error="skip").report
  assert (report.read, report.kept, report.skipped) == (2, 1, {"invalid_json": 1})


def test_a_leading_bom_is_not_a_malformed_first_record(tmp_path):
  path = _lines(tmp_path / "a.jsonl", b"\xef\xbb\xbf" + json.dumps(PAIR).encode())
  assert _build(path, tmp_path).report.kept == 1


def test_a_lone_surrogate_escape_is_a_malformed_record(tmp_path):
  """Was a UnicodeEncodeError from the tokenizer (or the dataset writer)."""
  bad = json.dumps({**PAIR, "chosen": "\ud800"}).encode()  # json escapes it: \\ud800
  path = _lines(tmp_path / "a.jsonl", json.dumps(PAIR).encode(), bad)
  report = _build(path, tmp_path, on_error="skip", tokenizer=ByteTokenizer(), max_len=64).report
  assert report.skipped == {"bad_text": 1} and "unpaired surrogate" in report.problems[0]


@pytest.mark.parametrize("name, content, message", [
    ("a.json", b"\xff[]", "invalid UTF-8"),                   # was UnicodeDecodeError
    ("a.json", b"[" * 5000, "invalid JSON: RecursionError"),  # was RecursionError
    ("a.parquet", b"PAR1 not parquet PAR1", "not a readable Parquet file"),  # was ArrowInvalid
    ("a.parquet", b"", "not a readable Parquet file"),
])
def test_an_unreadable_file_is_named(name, content, message, tmp_path):
  (tmp_path / name).write_bytes(content)
  with pytest.raises(ValueError, match=rf"{tmp_path / name}: {message}"):
    _build(str(tmp_path / name), tmp_path)


def test_a_conversation_the_template_refuses_is_a_malformed_record(tmp_path):
  """Was jinja2's TemplateError from raise_exception, out of the dataset build."""
  write_tokenizer(tmp_path / "tok", STRICT)
  turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
  path = _lines(tmp_path / "a.jsonl", *(json.dumps({"messages": m}).encode() for m in (
      turns, [turns[0], *turns])))  # user, user, assistant: roles do not alternate
  cfg = real_models.HFFlags(tokenizer=str(tmp_path / "tok"))
  tok, render_fn, render_id = real_models.load_tokenizer(cfg)
  report = _build(path, tmp_path, fmt="sft_messages", on_error="skip", tokenizer=tok,
                  max_len=64, render_fn=render_fn, render_id=render_id).report
  assert report.skipped == {"bad_messages": 1}
  assert "must alternate" in report.problems[0] and report.problems[0].startswith(f"{path}:2")


@pytest.mark.parametrize("template, message", [
    ("{% for m in messages %}", "not valid jinja"),         # was TemplateSyntaxError
    ("{% break %}", "not valid jinja .SyntaxError"),        # was Python's SyntaxError
    (["no", "names"], "include no 'default'"),              # was TypeError
    (7, "chat_template is a int"),                          # was TypeError
])
def test_a_broken_chat_template_is_refused_not_ignored(template, message, tmp_path):
  """load_tokenizer used to treat any ValueError as "no template" and render without one."""
  write_tokenizer(tmp_path, None)
  config_file = tmp_path / "tokenizer_config.json"
  config_file.write_text(json.dumps({**json.loads(config_file.read_text()),
                                     "chat_template": template}))
  with pytest.raises(ValueError, match=message):
    real_models.load_tokenizer(real_models.HFFlags(tokenizer=str(tmp_path)))
  with pytest.raises(chat.NoChatTemplate):  # none at all is still fine
    config_file.write_text(json.dumps({"eos_token": "<|im_end|>"}))
    chat.ChatTemplate.from_file(tmp_path)


@pytest.mark.parametrize("name, content, message", [
    ("tokenizer_config.json", "[]", "expected a JSON object"),               # AttributeError
    ("tokenizer_config.json", '{"bos_token": 5}', "bos_token is 5"),          # TypeError
    ("tokenizer_config.json", "{", "invalid JSON"),                         # JSONDecodeError
    ("tokenizer.json", '{"model": 1}', "not a readable tokenizer.json"),     # Exception
])
def test_a_broken_tokenizer_file_is_named(name, content, message, tmp_path):
  write_tokenizer(tmp_path, None)
  (tmp_path / name).write_text(content)
  with pytest.raises(ValueError, match=message) as refused:
    HFTokenizer.from_file(tmp_path)
  assert str(tmp_path) in str(refused.value)


def _config(directory, **changes):
  path = directory / "config.json"
  path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.fixture
def model_dir(good_dir, tmp_path):
  shutil.copytree(good_dir, tmp_path / "m")
  return tmp_path / "m"


@pytest.mark.parametrize("changes, message", [
    ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer"),  # /0
    ({"hidden_size": None}, "hidden_size must be a positive integer"),                # KeyError
    ({"architectures": 5}, "unsupported architecture"),                               # TypeError
    ({"rope_scaling": {"rope_type": "llama3"}}, "llama3 rope scaling needs"),         # KeyError
    ({"torch_dtype": ["float32"], "dtype": None}, "torch_dtype must be a string"),    # TypeError
])
def test_a_bad_config_json_value_is_named(changes, message, model_dir):
  _config(model_dir, **changes)
  with pytest.raises(ValueError, match=rf"{model_dir}/config.json: .*{message}"):
    hf_import.load_hf_model(model_dir, make_mesh(devices=jax.devices()[:1]))


def _rewrite_header(directory, edit, length_delta=0):
  path = directory / "model.safetensors"
  data = path.read_bytes()
  (n,) = struct.unpack("<Q", data[:8])
  header = edit(json.loads(data[8:8 + n]))
  encoded = json.dumps(header).encode()
  path.write_bytes(struct.pack("<Q", len(encoded) + length_delta) + encoded + data[8 + n:])


@pytest.mark.parametrize("edit, delta, message", [
    (lambda h: h, 1 << 40, "not a complete safetensors file"),    # was MemoryError/OverflowError
    (lambda h: {**h, "model.norm.weight": {**h["model.norm.weight"],
                                           "data_offsets": [0, 1 << 40]}},
     0, "data_offsets"),                                           # was an mmap ValueError
    (lambda h: {**h, "model.norm.weight": {**h["model.norm.weight"], "shape": [4]}},
     0, "bytes for shape"),                                        # was read silently
    (lambda h: {**h, "model.norm.weight": 3}, 0, "is a int"),      # was TypeError
])
def test_a_damaged_safetensors_header_is_refused(edit, delta, message, model_dir):
  _rewrite_header(model_dir, edit, delta)
  with pytest.raises(ValueError, match=message) as refused:
    hf_import.load_hf_model(model_dir, make_mesh(devices=jax.devices()[:1]))
  assert str(model_dir / "model.safetensors") in str(refused.value)


def test_a_shard_index_naming_a_missing_file_says_so(model_dir):
  """Was a FileNotFoundError from open() with no hint; a bad weight_map was a KeyError."""
  index = model_dir / "model.safetensors.index.json"
  index.write_text(json.dumps({"weight_map": {"model.norm.weight": "model-2.safetensors"}}))
  with pytest.raises(FileNotFoundError, match="lists model-2.safetensors, which is not in"):
    hf_import.load_hf_model(model_dir, make_mesh(devices=jax.devices()[:1]))
  index.write_text(json.dumps({"metadata": {}}))
  with pytest.raises(ValueError, match="weight_map must map tensor names to file names"):
    hf_import.load_hf_model(model_dir, make_mesh(devices=jax.devices()[:1]))


@pytest.mark.parametrize("change, message", [
    ({"target_modules": None}, "target_modules=None"),   # was TypeError
    ({"r": None}, "r=None, expected a positive integer"),  # was TypeError
    ({"r": 0}, "r=0, expected a positive integer"),        # was accepted
    ({"lora_alpha": "8"}, "lora_alpha='8', expected a number"),  # was read as 8.0
])
def test_a_bad_peft_adapter_config_is_named(change, message, tmp_path):
  config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8.0, "target_modules": ["q_proj"]}
  (tmp_path / hf_peft.CONFIG_FILE).write_text(json.dumps({**config, **change}))
  with pytest.raises(ValueError, match=rf"{tmp_path / hf_peft.CONFIG_FILE}: {message}"):
    hf_peft.read_lora_settings(tmp_path)


@pytest.mark.parametrize("cls, args, message", [
    (grpo.GRPOConfig, ["--learning_rate=nan"], "--learning_rate=nan: must be a finite number"),
    (dpo.DPOConfig, ["--data_files=x.jsonl", "--beta=inf"],
     "--beta=inf: must be a finite number"),  # was accepted
    (dpo.DPOConfig, ["--data_files=x.jsonl", "--loss=kto"], "--loss=kto with --data_format=pairs"),
])
def test_flags_refused_by_name(cls, args, message):
  with pytest.raises(ValueError, match=message):
    config.parse(cls, args)


def test_mesh_sizes_name_their_flags():
  with pytest.raises(ValueError, match="--mesh_data/--mesh_fsdp/--mesh_tensor: mesh sizes"):
    make_mesh(0, 1, 1)


def _prompt_set(tmp_path, records, *flags):
  path = _lines(tmp_path / "p.jsonl", *(json.dumps(r).encode() for r in records))
  cfg = config.parse(grpo.GRPOConfig, [f"--prompt_files={path}", "--max_new_tokens=4",
                                       f"--data_dir={tmp_path / 'built'}", *flags])
  return prompt_sets.load(cfg, preset("nano", vocab_size=512))


def test_no_prompt_left_is_a_clear_error(tmp_path):
  """Every preference prompt over --max_prompt_len, skipped: was max() of an empty list."""
  pairs = [{"prompt": f"prompt number {i}", "chosen": "a", "rejected": "b"} for i in range(8)]
  with pytest.raises(ValueError, match="no train prompts left in .*raise --max_prompt_len"):
    _prompt_set(tmp_path, pairs, "--prompt_format=pairs", "--max_prompt_len=4",
                "--on_error=skip", "--test_fraction=0.5")


def test_prompts_the_template_refuses_are_raised_or_counted(tmp_path):
  """Preference prompts meet the template alone only in prompt_sets: was a TemplateError."""
  write_tokenizer(tmp_path / "tok", STRICT)
  pairs = [{"prompt": f"q{i}", "chosen": [{"role": "user", "content": f"q{i}"},
                                          {"role": "assistant", "content": "a"}],
            "rejected": [{"role": "user", "content": f"q{i}"},
                         {"role": "assistant", "content": "b"}]} for i in range(8)]
  flags = ["--prompt_format=ultrafeedback", f"--tokenizer={tmp_path / 'tok'}",
           "--system_prompt=Be brief.", "--test_fraction=0.5"]  # a system turn STRICT refuses
  with pytest.raises(ValueError, match="the chat template refuses 8 prompts of .*--on_error"):
    _prompt_set(tmp_path, pairs, *flags)


def test_sft_counts_a_prompt_formats_answer_toward_seq_len(tmp_path):
  """The build used to count the question alone, keeping an example the SFT encoder then
  refused mid-training (after compiling), naming no file."""
  path = _lines(tmp_path / "g.jsonl", json.dumps(
      {"question": "q", "answer": "x" * 40 + "\n#### 1"}).encode())
  cfg = config.parse(sft.SFTConfig, [f"--data_files={path}", "--data_format=gsm8k",
                                     "--seq_len=32", f"--data_dir={tmp_path / 'built'}"])
  with pytest.raises(ValueError, match=rf"{path}:1: too_long"):
    real_models.read_local_data(cfg, preset("nano"))


def test_a_conversation_sft_cannot_mask_is_refused_at_the_build(tmp_path):
  """STRICT's "[assistant] " cue merges with the reply "hi" in the tiny BPE (" hi" is one
  token), so no assistant mask exists: the encoder used to refuse it mid-training (after
  compiling), naming no file."""
  write_tokenizer(tmp_path / "tok", STRICT)
  path = _lines(tmp_path / "c.jsonl", *(json.dumps({"messages": [
      {"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": reply}]}).encode()
      for i, reply in enumerate(["hi", "4", "4"])))
  cfg = config.parse(sft.SFTConfig, [f"--data_files={path}", f"--tokenizer={tmp_path / 'tok'}",
                                     f"--data_dir={tmp_path / 'built'}", "--test_fraction=0.5"])
  with pytest.raises(ValueError, match=rf"{path}:1: bad_messages: .*prefix property"):
    real_models.read_local_data(cfg, preset("nano", vocab_size=512),
                                chat_template=chat.ChatTemplate.from_file(tmp_path / "tok"))


def test_a_pair_too_long_to_pack_is_refused_at_the_build(tmp_path):
  """Each side fits --seq_len but --pack puts both in one row: packing used to raise naming
  neither the record nor a flag."""
  path = _lines(tmp_path / "p.jsonl", *(json.dumps(
      {"prompt": f"p{i}", "chosen": "y" * 10, "rejected": "n" * 10}).encode() for i in range(4)))
  cfg = config.parse(dpo.DPOConfig, [f"--data_files={path}", "--seq_len=20", "--pack",
                                     "--test_fraction=0", f"--data_dir={tmp_path / 'built'}"])
  with pytest.raises(ValueError, match=rf"{path}:1: too_long: .* packed"):
    dpo_files.read_pairs(cfg, ByteTokenizer(), *real_models.load_tokenizer(cfg)[1:])


def test_kto_with_one_prompt_names_the_files(tmp_path):
  path = _lines(tmp_path / "u.jsonl", *(json.dumps(
      {"prompt": "same", "completion": f"c{i}", "label": bool(i % 2)}).encode()
      for i in range(4)))
  cfg = config.parse(dpo.DPOConfig, [f"--data_files={path}", "--data_format=unpaired",
                                     "--loss=kto", "--test_fraction=0",
                                     f"--data_dir={tmp_path / 'built'}"])
  with pytest.raises(ValueError, match=rf"--data_files={path}, train split: KTO's KL"):
    dpo_files.read_pairs(cfg, ByteTokenizer(), *real_models.load_tokenizer(cfg)[1:])


def test_a_kto_kl_pair_over_seq_len_fails_before_the_model(tmp_path):
  """Each record fits --seq_len, but a KL pair (a short prompt with a long completion of
  another record) does not: the encoder used to refuse it mid-training, naming no file."""
  records = [{"prompt": "p" * 12, "completion": "c", "label": True},
             {"prompt": "q", "completion": "d" * 12, "label": False}]
  path = _lines(tmp_path / "u.jsonl", *(json.dumps(r).encode() for r in records))
  cfg = config.parse(dpo.DPOConfig, [f"--data_files={path}", "--data_format=unpaired",
                                     "--loss=kto", "--test_fraction=0", "--seq_len=16",
                                     f"--data_dir={tmp_path / 'built'}"])
  with pytest.raises(ValueError, match=rf"--data_files={path}: a KTO KL pair .* --seq_len"):
    dpo_files.read_pairs(cfg, ByteTokenizer(), *real_models.load_tokenizer(cfg)[1:])


@pytest.mark.parametrize("content, message", [
    ("3", "expected a JSON object"),
    # was a UnicodeEncodeError where load_tokenizer hashes the template
    ('{"chat_template": "\\ud800"}', "holds an unpaired surrogate"),
])
def test_read_json_object_names_the_file(content, message, tmp_path):
  (tmp_path / "x.json").write_text(content)
  with pytest.raises(ValueError, match=rf"{tmp_path / 'x.json'}: {message}"):
    local_files.read_json_object(tmp_path / "x.json")
