"""Hugging Face import/export: parity with transformers (torch CPU) and exact round trips.

Reference models are tiny random LlamaForCausalLM / Qwen2ForCausalLM /
LlamaForSequenceClassification built by transformers itself and written by save_pretrained;
every comparison is against torch's forward, never against our own model.
"""
import json
import math
import tracemalloc

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import helpers
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from rlhf_jax.models import hf
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.hf import config_from_hf
from rlhf_jax.models.hf_export import save_hf_model
from rlhf_jax.models.hf_import import load_hf_model
from rlhf_jax.models.layers import rope_inv_freq
from rlhf_jax.sampling import SamplingConfig, sample
from rlhf_jax.sharding import make_mesh

V = 300
SMALL = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=96, attn_implementation="eager")
# The same shapes as a ModelConfig, for the float32 tolerance of torch's forward vs ours.
SMALL_CFG = ModelConfig(vocab_size=V, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96)


def tol(seq_len, ref):
  """Two float32 forwards (torch's and ours) differ by their rounding (helpers.f32_tol)."""
  return helpers.logits_tol(SMALL_CFG, seq_len, ref)
# head_dim 16, theta 1e4: wavelengths 2*pi*1e4^(i/8) = 6.3, 20, 63, 199, ... With
# original_max_position_embeddings=64 the bands are < 16 (kept), 16..64 (interpolated) and
# > 64 (divided by factor): all three occur.
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64, "rope_theta": 10000.0}


def _randomize(model, seed):
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.normal_(1.0 if "norm" in name else 0.0, 0.1)
  return model.eval()


def _save(model, path, dtype=torch.float32):
  model.to(dtype).save_pretrained(path)
  return path


@pytest.fixture(scope="module")
def mesh():
  return make_mesh(2, 2, 2)  # 8 fake devices: embed/heads/mlp really sharded


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  cfg = transformers.LlamaConfig(**SMALL, rope_scaling=LLAMA3)
  model = _randomize(transformers.LlamaForCausalLM(cfg), 0)
  return model, _save(model, tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
  cfg = transformers.Qwen2Config(**SMALL, tie_word_embeddings=True)
  model = _randomize(transformers.Qwen2ForCausalLM(cfg), 1)
  return model, _save(model, tmp_path_factory.mktemp("qwen"))


def _logits(graphdef, params, tokens, valid):
  fn = jax.jit(lambda p, t, v: nnx.merge(graphdef, p)(t, valid_BxT=v).logits_BxTxV)
  return np.asarray(fn(params, tokens, valid))


def _hf_logits(model, tokens, valid):
  mask = torch.tensor(valid.astype(np.int64))
  positions = torch.clamp(mask.cumsum(-1) - 1, min=0)  # our convention, passed explicitly
  with torch.no_grad():
    return model(torch.tensor(tokens), attention_mask=mask, position_ids=positions).logits.numpy()


def _left_padded(seed, lengths, t):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, V, (len(lengths), t))
  valid = np.arange(t)[None, :] >= (t - np.array(lengths))[:, None]
  return np.where(valid, tokens, 0), valid


class TestConfig:

  def test_llama3_bands_and_inv_freq_match_transformers(self, llama):
    model, path = llama
    cfg = config_from_hf(hf.read_hf_config(path))
    assert cfg.rope_scaling is not None and cfg.rope_scaling.original_max_position_embeddings == 64
    base = 1.0 / cfg.rope_theta ** (np.arange(0, 16, 2) / 16)
    wavelen = 2 * math.pi / base
    assert (wavelen < 64 / 4).any() and (wavelen > 64 / 1).any()
    assert ((wavelen >= 16) & (wavelen <= 64)).any()
    ours = rope_inv_freq(cfg)
    np.testing.assert_allclose(ours, model.model.rotary_emb.inv_freq.numpy(), rtol=1e-6)
    assert not np.allclose(ours, base)  # scaling really applied

  def test_fields(self, qwen):
    cfg = config_from_hf(hf.read_hf_config(qwen[1]))
    assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff) == (
        V, 64, 2, 4, 2, 96)
    assert cfg.qkv_bias and cfg.tie_embeddings and cfg.rope_scaling is None
    assert cfg.norm_eps == 1e-6 and cfg.param_dtype == "float32"

  def test_legacy_keys(self):
    legacy = dict(architectures=["LlamaForCausalLM"], vocab_size=10, hidden_size=8,
                  num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                  rope_theta=500000.0, torch_dtype="bfloat16",
                  rope_scaling={"type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192})
    cfg = config_from_hf(legacy)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling.factor == 32.0
    assert cfg.param_dtype == "bfloat16" and cfg.n_kv_heads == 2

  @pytest.mark.parametrize("change, match", [
      ({"architectures": ["MistralForCausalLM"]}, "unsupported architecture"),
      ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type='yarn'"),
      ({"attention_bias": True}, "attention_bias"),
      ({"hidden_act": "gelu"}, "hidden_act"),
  ])
  def test_unsupported(self, llama, change, match):
    with pytest.raises(ValueError, match=match):
      config_from_hf({**hf.read_hf_config(llama[1]), **change})


class TestParity:

  @pytest.mark.parametrize("which", ["llama", "qwen"])
  def test_left_padded_logits(self, request, mesh, which):
    model, path = request.getfixturevalue(which)
    graphdef, params, _ = load_hf_model(path, mesh)
    tokens, valid = _left_padded(0, [12, 7, 1, 10], 12)
    ours, ref = _logits(graphdef, params, tokens, valid), _hf_logits(model, tokens, valid)
    assert np.abs(ref[valid]).max() > 0.3  # a model that says something
    np.testing.assert_allclose(ours[valid], ref[valid], **tol(12, ref[valid]))

  def test_greedy_generation_matches_generate(self, llama, mesh):
    model, path = llama
    graphdef, params, _ = load_hf_model(path, mesh)
    tokens, valid = _left_padded(1, [8, 5, 3, 8], 8)
    n = 32
    out = sample(graphdef, params, tokens, valid, jax.random.key(0),
                 cfg=SamplingConfig(max_new_tokens=n, eos_id=-1, pad_id=0, greedy=True))
    ours = np.asarray(out.tokens_BxN)
    model.generation_config.eos_token_id = None
    with torch.no_grad():
      ref = model.generate(torch.tensor(tokens), attention_mask=torch.tensor(valid.astype(int)),
                           do_sample=False, max_new_tokens=n, min_new_tokens=n,
                           pad_token_id=0).numpy()[:, tokens.shape[1]:]
    # Margins of our own logits along the generated path: compare until the first step whose
    # top-2 gap is within tolerance (either choice would be right there).
    seq = np.concatenate([tokens, ours], 1)
    seq_valid = np.concatenate([valid, np.ones_like(ours, bool)], 1)
    logits = _logits(graphdef, params, seq, seq_valid)[:, tokens.shape[1] - 1:-1]
    top2 = -np.sort(-logits, axis=-1)[..., :2]
    compared = 0
    for b in range(len(tokens)):
      # Two logits' rounding in each of the two forwards: 4 x atol.
      low = np.nonzero(top2[b, :, 0] - top2[b, :, 1] <= 4 * tol(8 + n, logits)["atol"])[0]
      upto = low[0] if len(low) else n
      np.testing.assert_array_equal(ours[b, :upto], ref[b, :upto], err_msg=f"row {b}")
      compared += upto
    assert compared >= 2 * n  # most of the 4x32 steps were decisive

  def test_reward_head(self, tmp_path, mesh):
    cfg = transformers.LlamaConfig(**SMALL, num_labels=1, pad_token_id=0)
    model = _randomize(transformers.LlamaForSequenceClassification(cfg), 2)
    path = _save(model, tmp_path / "rm")
    graphdef, params, _ = load_hf_model(path, mesh)
    assert float(params["head_b"]) == 0.0
    rng = np.random.default_rng(3)
    tokens = rng.integers(1, V, (3, 9))
    valid = np.arange(9)[None] < np.array([9, 4, 6])[:, None]  # right padding
    tokens = np.where(valid, tokens, 0)
    with torch.no_grad():
      ref = model(torch.tensor(tokens), attention_mask=torch.tensor(valid.astype(int))).logits
    score = jax.jit(lambda p, t, v: nnx.merge(graphdef, p).score(t, valid_BxT=v))
    ours = np.asarray(score(params, tokens, valid))
    np.testing.assert_allclose(ours, ref.numpy()[:, 0], **tol(9, ref.numpy()))
    assert np.ptp(ours) > 1e-2

  @pytest.mark.parametrize("which", ["llama", "qwen"])
  def test_transformers_loads_export(self, request, mesh, tmp_path, which):
    _, path = request.getfixturevalue(which)
    graphdef, params, _ = load_hf_model(path, mesh)
    base = hf.read_hf_config(path)
    save_hf_model(tmp_path, graphdef, params, hf_config_base=base)
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path,
                                                                 attn_implementation="eager")
    assert type(exported).__name__ == base["architectures"][0]
    tokens, valid = _left_padded(4, [10, 6], 10)
    want = _logits(graphdef, params, tokens, valid)[valid]
    np.testing.assert_allclose(_hf_logits(exported, tokens, valid)[valid], want, **tol(10, want))


def _same_params(a, b):
  leaves_a, leaves_b = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
  assert [p for p, _ in leaves_a] == [p for p, _ in leaves_b]
  for (path, x), (_, y) in zip(leaves_a, leaves_b):
    assert x.dtype == y.dtype and x.shape == y.shape, path
    np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8),
                                  err_msg=str(path))


def _file_tensors(path):
  """name -> torch tensor of every tensor of a model dir (safetensors' own reader)."""
  out = {}
  for file in sorted(path.glob("*.safetensors")):
    with safe_open(str(file), framework="pt") as f:
      out.update({k: f.get_tensor(k) for k in f.keys()})
  return out


class TestRoundTrip:

  @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
  def test_import_export_import_is_identity(self, tmp_path, mesh, dtype):
    cfg = transformers.Qwen2Config(**SMALL, tie_word_embeddings=False)
    src = _save(_randomize(transformers.Qwen2ForCausalLM(cfg), 5), tmp_path / "src", dtype)
    graphdef, params, _ = load_hf_model(src, mesh)
    assert str(params["embed"].dtype) == ("bfloat16" if dtype == torch.bfloat16 else "float32")
    files = save_hf_model(tmp_path / "out", graphdef, params, hf_config_base=hf.read_hf_config(src))
    _, again, _ = load_hf_model(tmp_path / "out", mesh)
    _same_params(params, again)
    original, exported = _file_tensors(src), _file_tensors(tmp_path / "out")
    assert sorted(original) == sorted(exported)
    for name in original:
      assert original[name].dtype == exported[name].dtype == dtype
      assert torch.equal(original[name], exported[name]), name
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == str(dtype).split(".")[1]
    assert tmp_path / "out" / "model.safetensors" in files

  def test_sharded_export_with_index(self, tmp_path, mesh, llama):
    graphdef, params, _ = load_hf_model(llama[1], mesh)
    save_hf_model(tmp_path, graphdef, params, max_shard_bytes=100_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    assert index["weight_map"]["lm_head.weight"] in shards
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["rope_scaling"]["rope_type"] == "llama3"
    _, again, _ = load_hf_model(tmp_path, mesh)
    _same_params(params, again)
    # Sharded input as transformers writes it too: the same tensors as the single file.
    ref = _file_tensors(llama[1])
    assert all(torch.equal(ref[k], v) for k, v in _file_tensors(tmp_path).items())

  def test_reward_head_bias_refused(self, tmp_path, mesh):
    cfg = transformers.LlamaConfig(**SMALL, num_labels=1, pad_token_id=0)
    src = _save(_randomize(transformers.LlamaForSequenceClassification(cfg), 6), tmp_path / "rm")
    graphdef, params, _ = load_hf_model(src, mesh)
    save_hf_model(tmp_path / "ok", graphdef, params)
    assert json.loads((tmp_path / "ok" / "config.json").read_text())["architectures"] == [
        "LlamaForSequenceClassification"]
    params["head_b"] = params["head_b"] + 0.5
    with pytest.raises(ValueError, match="head_b = 0.5"):
      save_hf_model(tmp_path / "bad", graphdef, params)


class TestErrors:

  def test_shape_mismatch_names_tensor_and_shapes(self, tmp_path, mesh, llama):
    config = hf.read_hf_config(llama[1])
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    (tmp_path / "model.safetensors").symlink_to(llama[1] / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight has shape "
                                         r"\(96, 64\).*implies \(128, 64\)"):
      load_hf_model(tmp_path, mesh)

  def test_missing_tensor(self, tmp_path, mesh, llama):
    tensors = load_file(str(llama[1] / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((llama[1] / "config.json").read_text())
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight missing"
                                         r".*\(32, 64\)"):
      load_hf_model(tmp_path, mesh)

  def test_kind_mismatch(self, mesh, llama):
    with pytest.raises(ValueError, match="kind='lm', not 'scalar'"):
      load_hf_model(llama[1], mesh, kind="scalar")


def test_import_peak_host_memory_is_one_tensor_not_the_checkpoint(tmp_path):
  """A 28 MB checkpoint whose largest tensor is 2 MB: the import's peak Python-heap
  allocation (numpy blocks included) stays within 3x the largest tensor. A loader that reads
  the state dict first peaks at the whole checkpoint."""
  cfg = ModelConfig(vocab_size=2048, d_model=256, n_layers=6, n_heads=4, n_kv_heads=2, d_ff=1024)
  rng = np.random.default_rng(0)
  tensors = {name: rng.standard_normal(layout.hf_shape, dtype=np.float32)
             for _, name, layout in hf.tensor_plan(cfg, "lm")}
  total, largest = sum(t.nbytes for t in tensors.values()), max(t.nbytes for t in tensors.values())
  save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  (tmp_path / "config.json").write_text(json.dumps(hf.config_to_hf(cfg)))
  expected = {name: tensors[name] for name in ("model.layers.3.mlp.up_proj.weight",)}
  del tensors
  for mesh in (make_mesh(devices=jax.devices()[:1]), make_mesh(2, 2, 2)):
    load_hf_model(tmp_path, mesh)  # warm-up: tracing and jax caches are not the import
    tracemalloc.start()
    try:
      _, params, _ = load_hf_model(tmp_path, mesh)
      peak = tracemalloc.get_traced_memory()[1]
    finally:
      tracemalloc.stop()
    assert total > 10 * largest
    assert peak < 3 * largest, (peak, largest, total)
    np.testing.assert_array_equal(np.asarray(params["blocks"][3]["mlp"]["w_up"]),
                                  expected["model.layers.3.mlp.up_proj.weight"].T)
