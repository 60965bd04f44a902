"""Bad-input campaign, model directories: chat templates (rendered in the sandbox), tokenizer
files, Hugging Face config.json and safetensors headers (and the shard index), PEFT
adapter_config.json, each read the way a stage reads it: load_tokenizer + render +
encode_chat, HFTokenizer.from_file + encode, load_hf_model onto a one-device mesh,
read_lora_settings applied to a model config.

Property (tally.py): accepted, or a ValueError / FileNotFoundError naming the directory or file
at fault, before anything compiles. A file that lies about its tensors (offsets past the end,
a size that does not match the shape) must be refused, not memory-mapped.
"""
import dataclasses
import json
import shutil
import struct
import tempfile

import jax
import pytest
from hypothesis import strategies as st

import inputs
import tally
from conftest import CHATML, STRICT, TINY
from rlhf_jax.data import chat
from rlhf_jax.data.hf_tokenizer import HFTokenizer
from rlhf_jax.models import hf, hf_import, hf_peft
from rlhf_jax.pipeline import real_models
from rlhf_jax.sharding import make_mesh

CONVERSATIONS = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
                 [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}, {"role": "user", "content": "Why?"},
                  {"role": "assistant", "content": "Sums."}]]
# Pieces real templates are made of, and ones that break them: unbalanced tags, undefined
# names, arithmetic errors, escapes from the sandbox, recursion, a runaway range.
SNIPPETS = ["{% for m in messages %}", "{% endfor %}", "{{ m['content'] }}", "{{ m.role }}",
            "{% if add_generation_prompt %}", "{% endif %}", "{{ bos_token }}", "{{ eos_token }}",
            "{%", "{{", "}}", "%}", "{{ 1 / 0 }}", "{{ messages[7].content }}", "{{ x.y.z }}",
            "{{ raise_exception('no system messages') }}", "{{ ''.__class__.__mro__ }}",
            "{{ messages.append(1) }}", "{% generation %}x{% endgeneration %}", "{{ 'a' + 1 }}",
            "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "{% for i in range(10**9) %}",
            "{{ messages | tojson }}", "{{ strftime_now('%Y') }}", "{% break %}", "\x00", "é"]
TEMPLATES = st.one_of(
    st.sampled_from([CHATML, STRICT, ""]),
    st.lists(st.sampled_from(SNIPPETS), max_size=6).map("".join),
    st.tuples(st.sampled_from([CHATML, STRICT]), st.integers(0, len(STRICT)),
              st.sampled_from(SNIPPETS)).map(lambda t: t[0][:t[1]] + t[2] + t[0][t[1]:]))


def _copy(good_dir, tmp_path):
  directory = tempfile.mkdtemp(dir=tmp_path)
  shutil.copytree(good_dir, directory, dirs_exist_ok=True)
  return directory


def _use_template(directory: str, cfg):
  """What the stages do with a tokenizer directory: load it with its template, render the
  conversations for the length check and encode them with assistant masks (SFT)."""
  tok, render_fn, _ = real_models.load_tokenizer(cfg, "Be brief.")
  template = chat.ChatTemplate.from_file(directory)
  for messages in CONVERSATIONS:
    render_fn(messages)
    chat.encode_chat(tok, template, messages)


@pytest.mark.parametrize("profile", tally.PROFILES)
def test_chat_templates(profile, good_dir, tmp_path):
  @tally.fuzz(profile, 60, TEMPLATES,
              st.sampled_from(["config", "jinja", "jinja bytes", "named", "odd"]),
              inputs.JSON_VALUES)
  def run(source, where, odd):
    directory = _copy(good_dir, tmp_path)
    config = json.loads(open(f"{directory}/tokenizer_config.json").read())
    if where.startswith("jinja"):  # transformers>=5 saves the template as its own file
      with open(f"{directory}/chat_template.jinja", "wb") as f:
        f.write(source.encode() + (b"\xff" if where == "jinja bytes" else b""))
    else:
      config["chat_template"] = {"config": source, "odd": odd,
                                 "named": [{"name": "default", "template": source}, odd]}[where]
    with open(f"{directory}/tokenizer_config.json", "w") as f:
      json.dump(config, f)
    cfg = real_models.HFFlags(tokenizer=directory)
    tally.check("chat template", lambda: _use_template(directory, cfg), names=[directory])


TOKENIZER_CONFIGS = inputs.mutated(st.just({
    "bos_token": "<|endoftext|>", "eos_token": {"content": "<|im_end|>", "special": True},
    "pad_token": "<|pad|>", "unk_token": None, "chat_template": CHATML}))


@pytest.mark.parametrize("profile", tally.PROFILES)
def test_tokenizer_files(profile, good_dir, tmp_path):
  @tally.fuzz(profile, 60, st.data(), st.sampled_from(["config", "map", "tokenizer.json"]))
  def run(data, which):
    directory = _copy(good_dir, tmp_path)
    if which == "tokenizer.json":
      text = open(f"{directory}/tokenizer.json", "rb").read()
      cut = data.draw(st.integers(0, len(text)))
      content = data.draw(st.one_of(
          st.just(text[:cut]), inputs.RAW_LINES,
          inputs.mutated(st.just(json.loads(text)), inputs.JSON_VALUES).map(
              lambda v: json.dumps(v).encode())))
    else:
      content = data.draw(TOKENIZER_CONFIGS.map(lambda v: json.dumps(v).encode())
                          | inputs.RAW_LINES)
    name = {"config": "tokenizer_config.json", "map": "special_tokens_map.json"}.get(
        which, which)
    with open(f"{directory}/{name}", "wb") as f:
      f.write(content)

    def load():
      tok = HFTokenizer.from_file(directory)
      tok.decode(tok.encode("Hello <|im_end|> world"))
    tally.check("tokenizer files", load, names=[directory])


# Values a config.json field may hold by mistake; sizes stay small (a 10**9-layer model is a
# slow eval_shape, not a finding).
CONFIG_VALUES = st.sampled_from([0, -1, 1, 2, 3, 7, 1.5, "8", "", None, True, False, [], {},
                                 [8], {"rope_type": "yarn"}, {"factor": 8.0}, "bfloat16",
                                 "float64", "LlamaForCausalLM", ["Qwen2ForCausalLM"],
                                 float("nan"), 300])


@pytest.mark.parametrize("profile", tally.PROFILES)
def test_config_json(profile, good_dir, tmp_path):
  valid = st.just(hf.config_to_hf(TINY))
  mesh = make_mesh(devices=jax.devices()[:1])

  @tally.fuzz(profile, 60, inputs.mutated(valid, CONFIG_VALUES).map(
      lambda c: json.dumps(c).encode()) | inputs.RAW_LINES)
  def run(content):
    directory = _copy(good_dir, tmp_path)
    with open(f"{directory}/config.json", "wb") as f:
      f.write(content)
    tally.check("config.json", lambda: hf_import.load_hf_model(directory, mesh),
                names=[directory])


def _header(path) -> tuple[dict, bytes]:
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    return json.loads(f.read(n)), f.read()


HEADER_VALUES = st.one_of(CONFIG_VALUES, st.sampled_from(
    ["F32", "BF16", "I64", "F8_E4M3", [0, 10**12], [-8, 0], [64, 32], [0, 1 << 63], [2, 4],
     [1, 2, 3], [-1, 16], [10**6, 10**6]]))


@pytest.mark.parametrize("profile", tally.PROFILES)
def test_safetensors_headers(profile, good_dir, tmp_path):
  header, body = _header(good_dir / "model.safetensors")
  header["__metadata__"] = {"format": "np"}
  mesh = make_mesh(devices=jax.devices()[:1])

  @tally.fuzz(profile, 80, st.data(), st.just(header) | inputs.mutated(st.just(header),
                                                                       HEADER_VALUES),
              st.sampled_from(["exact", "exact", "length", "truncate", "index"]))
  def run(data, new_header, damage):
    directory = _copy(good_dir, tmp_path)
    encoded = json.dumps(new_header).encode()
    length, tail = len(encoded), body
    if damage == "length":
      length = data.draw(st.sampled_from([0, 1, length - 1, length + 1, 1 << 40, (1 << 64) - 1]))
    elif damage == "truncate":
      tail = body[:data.draw(st.integers(0, max(len(body) - 1, 0)))]
    with open(f"{directory}/model.safetensors", "wb") as f:
      f.write(struct.pack("<Q", length) + encoded + tail)
    if damage == "index":  # a sharded checkpoint whose index is broken in one place
      names = [k for k in header if k != "__metadata__"]
      valid = st.just({"metadata": {}, "weight_map": {n: "model.safetensors" for n in names}})
      index = data.draw(valid | inputs.mutated(valid, HEADER_VALUES | st.sampled_from(
          ["missing.safetensors", "../config.json", "config.json"])))
      with open(f"{directory}/model.safetensors.index.json", "w") as f:
        json.dump(index, f)
    tally.check("safetensors", lambda: hf_import.load_hf_model(directory, mesh),
                names=[directory])


PEFT_CONFIG = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8.0,
               "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0, "bias": "none",
               "use_rslora": False, "use_dora": False, "modules_to_save": None,
               "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}}


@pytest.mark.parametrize("profile", tally.PROFILES)
def test_peft_adapter_config(profile, tmp_path):
  values = CONFIG_VALUES | st.sampled_from(["all-linear", "LORA", ["lm_head"], ["q_proj"]])

  @tally.fuzz(profile, 40, inputs.mutated(st.just(PEFT_CONFIG), values).map(
      lambda c: json.dumps(c).encode()) | inputs.RAW_LINES)
  def run(content):
    directory = tempfile.mkdtemp(dir=tmp_path)
    with open(f"{directory}/{hf_peft.CONFIG_FILE}", "wb") as f:
      f.write(content)
    tally.check("peft adapter_config.json", lambda: dataclasses.replace(
        TINY, **hf_peft.read_lora_settings(directory)), names=[directory])
