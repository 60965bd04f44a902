"""LoRA on the model: rank 0 is the plain model, the adapted forward against a float64 NumPy
reference of the merged weights, merge, the base view, adding adapters on a mesh, and PEFT
interop against the peft library itself on a tiny Llama written by transformers."""
import dataclasses
import json

import jax
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import PartitionSpec as P

import helpers
from rlhf_jax import memory, sharding
from rlhf_jax.models import hf_peft, lora
from rlhf_jax.models.config import LORA_TARGETS, ModelConfig
from rlhf_jax.models.hf_export import save_hf_model
from rlhf_jax.models.hf_import import load_hf_model
from rlhf_jax.models.layers import LoRAParam
from rlhf_jax.models.transformer import ScalarHeadModel, Transformer

CFG = helpers.nano(lora_rank=4, lora_alpha=8.0)  # scale 2
# PEFT name -> (module, weight): written here from the Llama names, not taken from lora.WEIGHTS
WEIGHT = {"q_proj": ("attn", "wq"), "k_proj": ("attn", "wk"), "v_proj": ("attn", "wv"),
          "o_proj": ("attn", "wo"), "gate_proj": ("mlp", "w_gate"),
          "up_proj": ("mlp", "w_up"), "down_proj": ("mlp", "w_down")}


def abstract(cfg, model=Transformer):
  return nnx.split(nnx.eval_shape(lambda: model(cfg, rngs=nnx.Rngs(0))))


def tokens(seed, b, t, vocab=CFG.vocab_size):
  return np.random.default_rng(seed).integers(1, vocab, (b, t)).astype(np.int32)


def np_merged(params, cfg):
  """The plain model's params in float64 with W + (alpha / r) A @ B on every adapter."""
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  r = cfg.lora_rank
  for block in p["blocks"].values():
    for module in ("attn", "mlp"):
      for target, ab in block[module].pop("lora", {}).items():
        w = block[module][WEIGHT[target][1]]
        delta = ab["a"].reshape(-1, r) @ ab["b"].reshape(r, -1)
        block[module][WEIGHT[target][1]] = w + cfg.lora_alpha / r * delta.reshape(w.shape)
  return p


def lora_terms(cfg, seq_len):
  """forward_terms plus the adapters' rank-r reductions on the chain: one on q/k/v's, o's,
  gate/up's and down's path in each layer."""
  return helpers.forward_terms(cfg, seq_len, log_softmax=False) + 4 * cfg.lora_rank * cfg.n_layers


class TestModel:

  def test_rank0_is_the_plain_model(self):
    plain = abstract(helpers.nano())[1].to_pure_dict()
    rank0 = abstract(helpers.nano(lora_rank=0, lora_targets=("q_proj",)))[1].to_pure_dict()
    shapes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)  # noqa: E731
    assert shapes(rank0) == shapes(plain)
    assert not nnx.state(nnx.eval_shape(lambda: Transformer(helpers.nano(), rngs=nnx.Rngs(0))),
                         LoRAParam)
    assert memory.sharded_numel(helpers.nano(), {}) == helpers.nano().num_params()

  def test_adapters_typed_split_and_counted(self):
    model = nnx.eval_shape(lambda: Transformer(CFG, rngs=nnx.Rngs(0)))
    params = nnx.state(model).to_pure_dict()
    adapters, base = lora.split(params)
    typed = nnx.state(model, LoRAParam).to_pure_dict()  # nnx's type filter agrees
    assert jax.tree.structure(typed) == jax.tree.structure(adapters)
    assert jax.tree.structure(base) == jax.tree.structure(abstract(helpers.nano())[1]
                                                          .to_pure_dict())
    assert jax.tree.structure(lora.join(adapters, base)) == jax.tree.structure(params)
    q = adapters["blocks"][1]["attn"]["lora"]["q_proj"]
    assert q["a"].shape == (64, 4) and q["b"].shape == (4, 4, 16)  # in + (r,), (r,) + out
    assert adapters["blocks"][0]["attn"]["lora"]["o_proj"]["a"].shape == (4, 16, 4)
    # r * (in + out) per projection: q 64+64, k and v 64+32, o 64+64, gate/up 64+192, down
    assert sum(x.size for x in jax.tree.leaves(adapters)) == 2 * 4 * (
        128 + 96 + 96 + 128 + 256 + 256 + 256) == CFG.num_lora_params()

  def test_targets_and_validation(self):
    cfg = helpers.nano(lora_rank=2, lora_targets=["q_proj", "down_proj"])
    assert cfg.lora_targets == ("q_proj", "down_proj")  # a list becomes a tuple (hashable)
    adapters, _ = lora.split(abstract(cfg)[1].to_pure_dict())
    assert set(adapters["blocks"][0]["attn"]["lora"]) == {"q_proj"}
    assert set(adapters["blocks"][0]["mlp"]["lora"]) == {"down_proj"}
    assert "lora" not in abstract(helpers.nano(lora_rank=2, lora_targets=("q_proj",)))[1][
        "blocks"][0]["mlp"]
    with pytest.raises(ValueError, match="lora_targets"):
      helpers.nano(lora_rank=2, lora_targets=("qkv",))
    with pytest.raises(ValueError, match="lora_rank"):
      helpers.nano(lora_rank=-1)

  def test_init_b_zero_is_exactly_the_base(self):
    graphdef, params = helpers.make_model(CFG)
    init = nnx.split(Transformer(CFG, rngs=nnx.Rngs(3)))[1].to_pure_dict()
    fresh, base = lora.split(init)[0], lora.split(params)[1]
    for target, ab in fresh["blocks"][0]["attn"]["lora"].items():
      bound = 1 / np.sqrt(np.prod(ab["a"].shape[:-1]))  # PEFT: U(-1/sqrt(in), 1/sqrt(in))
      assert 0.8 * bound < np.abs(ab["a"]).max() <= bound and not np.any(ab["b"]), target
    x = tokens(0, 2, 8)
    adapted = helpers.apply(graphdef, lora.join(fresh, base), x)[0]
    plain = helpers.apply(abstract(helpers.nano())[0], base, x)[0]
    np.testing.assert_array_equal(adapted, plain)

  def test_adapted_forward_matches_float64_merged_reference(self):
    graphdef, params = helpers.make_model(CFG, seed=1)  # B random: the adapters act
    x = tokens(1, 2, 8)
    ours = np.asarray(helpers.apply(graphdef, params, x)[0])
    merged64 = np_merged(params, CFG)
    ref = np.stack([helpers.np_forward(merged64, CFG, row) for row in x])
    base_only = np.stack([helpers.np_forward(np_merged(lora.base_view(params), CFG), CFG, row)
                          for row in x])
    assert np.abs(ref - base_only).max() > 0.1 * np.abs(ref).max()  # the adapters matter
    np.testing.assert_allclose(ours, ref, **helpers.f32_tol(lora_terms(CFG, 8),
                                                            np.abs(ref).max()))

  def test_merge_matches_unmerged(self):
    graphdef, params = helpers.make_model(CFG, seed=2)
    merged = lora.merge(params, CFG)
    plain_graphdef, plain = abstract(lora.plain_config(CFG))
    assert jax.tree.structure(merged) == jax.tree.structure(plain.to_pure_dict())
    want = np_merged(params, CFG)
    terms = np_merged(jax.tree.map(np.abs, params), CFG)  # |W| + s |A| @ |B|: sizes of terms
    for (path, w), ref, size in zip(jax.tree.leaves_with_path(merged), jax.tree.leaves(want),
                                    jax.tree.leaves(terms)):
      np.testing.assert_allclose(w, ref, **helpers.f32_tol(CFG.lora_rank + 1, size.max()),
                                 err_msg=str(path))
    x = tokens(2, 2, 8)
    unmerged = np.asarray(helpers.apply(graphdef, params, x)[0])
    np.testing.assert_allclose(helpers.apply(plain_graphdef, merged, x)[0], unmerged,
                               **helpers.f32_tol(lora_terms(CFG, 8) + CFG.lora_rank,
                                                 np.abs(unmerged).max()))

  def test_base_view_is_the_plain_model(self):
    graphdef, params = helpers.make_model(CFG, seed=3)
    view = lora.base_view(params)
    x = tokens(3, 2, 8)
    plain = helpers.apply(abstract(helpers.nano())[0], lora.split(params)[1], x)[0]
    np.testing.assert_array_equal(helpers.apply(graphdef, view, x)[0], plain)
    assert not np.array_equal(helpers.apply(graphdef, params, x)[0], plain)
    q, q_view = (p["blocks"][0]["attn"]["lora"]["q_proj"] for p in (params, view))
    assert q_view["a"] is q["a"] and view["embed"] is params["embed"]  # no copy of weights
    assert np.any(q["b"]) and not np.any(q_view["b"])

  def test_scalar_head_model(self):
    graphdef, params = helpers.init_module(lambda r: ScalarHeadModel(CFG, rngs=r), seed=4)
    assert "lora" in params["backbone"]["blocks"][0]["mlp"]
    merged = lora.merge(params, CFG)
    assert "lora" not in merged["backbone"]["blocks"][0]["mlp"]
    plain_graphdef = abstract(lora.plain_config(CFG), ScalarHeadModel)[0]
    x = tokens(4, 2, 8)

    def score(graphdef, params):
      return np.asarray(jax.jit(lambda p: nnx.merge(graphdef, p)(x))(params))

    ours = score(graphdef, params)
    np.testing.assert_allclose(score(plain_graphdef, merged), ours, **helpers.f32_tol(
        lora_terms(CFG, 8) + CFG.lora_rank, np.abs(ours).max()))


def test_add_adapters_on_an_fsdp_mesh():
  mesh = sharding.make_mesh(2, 2, 1, devices=jax.devices()[:4])
  plain = helpers.nano()
  _, base, _ = sharding.init_sharded(lambda r: Transformer(plain, rngs=r), jax.random.key(0),
                                     mesh)
  graphdef, params, shardings = lora.add_adapters(plain, base, jax.random.key(1), mesh,
                                                  rank=4, alpha=8.0)
  adapters, kept = lora.split(params)
  assert all(a is b for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(base)))
  q = adapters["blocks"][0]["attn"]["lora"]["q_proj"]
  assert q["a"].sharding.spec == P("fsdp", None)  # A's d_model rows split like wq's
  assert q["b"].sharding == shardings["blocks"][0]["attn"]["lora"]["q_proj"]["b"]
  down = adapters["blocks"][0]["mlp"]["lora"]["down_proj"]["b"]
  assert down.sharding.spec == P(None, "fsdp") and not np.any(down)
  x = tokens(5, 4, 8)
  np.testing.assert_array_equal(helpers.apply(graphdef, params, x)[0],
                                helpers.apply(abstract(plain)[0], base, x)[0])
  assert lora.config_of(graphdef, params).lora_rank == 4


# ----------------------------------------------------------------------------------------
# PEFT interop: the peft library's own forward is the reference.

V, R = 300, 4
SMALL = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=96, attn_implementation="eager")
SMALL_CFG = ModelConfig(vocab_size=V, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96,
                        lora_rank=R)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL))
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.normal_(1.0 if "norm" in name else 0.0, 0.1)
  path = tmp_path_factory.mktemp("llama")
  model.save_pretrained(path)
  return path


def hf_model(path):
  return transformers.AutoModelForCausalLM.from_pretrained(
      path, attn_implementation="eager").eval()


def left_padded(seed):
  rng = np.random.default_rng(seed)
  lengths, t = np.array([10, 6, 1]), 10
  valid = np.arange(t)[None, :] >= (t - lengths)[:, None]
  return np.where(valid, rng.integers(1, V, (3, t)), 0), valid


def hf_logits(model, x, valid):
  mask = torch.tensor(valid.astype(np.int64))
  with torch.no_grad():
    return model(torch.tensor(x), attention_mask=mask,
                 position_ids=torch.clamp(mask.cumsum(-1) - 1, min=0)).logits.numpy()


def compare(ours, ref, valid):
  ours, ref = ours[valid], ref[valid]
  np.testing.assert_allclose(ours, ref, **helpers.f32_tol(lora_terms(SMALL_CFG, 10) + R,
                                                          np.abs(ref).max()))


def random_adapters(params, seed):
  """params with every adapter replaced by N(0, 0.1) values (B nonzero: the adapters act)."""
  adapters, base = lora.split(params)
  noisy = helpers.randomize(adapters, seed, std=0.1)
  placed = jax.tree.map(lambda x, like: jax.device_put(x, like.sharding), noisy, adapters)
  return lora.join(placed, base)


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh(2, 2, 2)


def test_peft_loads_our_export_merged_and_unmerged(llama_dir, mesh, tmp_path):
  graphdef, base, _ = load_hf_model(llama_dir, mesh)
  cfg = lora.config_of(graphdef, base)
  targets = ("q_proj", "k_proj", "o_proj", "up_proj", "down_proj")
  graphdef, params, _ = lora.add_adapters(cfg, base, jax.random.key(0), mesh, rank=R,
                                          alpha=16.0, targets=targets)
  params = random_adapters(params, 1)
  lcfg = lora.config_of(graphdef, params)
  files = hf_peft.save_peft_adapters(tmp_path / "adapter", params, lcfg,
                                     base_model_dir=str(llama_dir))
  assert [f.name for f in files] == ["adapter_model.safetensors", "adapter_config.json"]
  reloaded = peft.PeftModel.from_pretrained(hf_model(llama_dir), tmp_path / "adapter").eval()
  assert reloaded.peft_config["default"].r == R
  assert set(reloaded.peft_config["default"].target_modules) == set(targets)
  x, valid = left_padded(0)
  ours = np.asarray(helpers.apply(graphdef, params, x, valid)[0])
  base_logits = hf_logits(hf_model(llama_dir), x, valid)
  assert np.abs(ours - base_logits)[valid].max() > 0.1  # the adapters change the output
  compare(ours, hf_logits(reloaded, x, valid), valid)
  compare(ours, hf_logits(reloaded.merge_and_unload(), x, valid), valid)
  # Our merge, exported as a plain checkpoint, is what transformers loads as the same model.
  save_hf_model(tmp_path / "merged", lora.plain_config(lcfg), lora.merge(params, lcfg))
  compare(ours, hf_logits(hf_model(tmp_path / "merged"), x, valid), valid)
  with pytest.raises(ValueError, match="LoRA adapters"):  # not silently the base alone
    save_hf_model(tmp_path / "unmerged", lora.plain_config(lcfg), params)
  # Our loader round-trips our export bit for bit.
  _, again, _ = hf_peft.load_peft_adapters(tmp_path / "adapter", cfg, base, mesh)
  for a, b in zip(jax.tree.leaves(lora.split(params)[0]), jax.tree.leaves(lora.split(again)[0])):
    np.testing.assert_array_equal(a, b)
    assert a.sharding == b.sharding


def test_we_load_adapters_peft_wrote(llama_dir, mesh, tmp_path):
  config = peft.LoraConfig(r=R, lora_alpha=4.0, target_modules=["v_proj", "o_proj",
                                                                  "gate_proj"],
                           init_lora_weights=False, task_type="CAUSAL_LM")  # B random too
  torch.manual_seed(1)
  model = peft.get_peft_model(hf_model(llama_dir), config).eval()
  model.save_pretrained(tmp_path)
  graphdef, base, _ = load_hf_model(llama_dir, mesh)
  graphdef, params, _ = hf_peft.load_peft_adapters(tmp_path, lora.config_of(graphdef, base),
                                                   base, mesh)
  cfg = lora.config_of(graphdef, params)
  assert (cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets) == (R, 4.0, ("v_proj", "o_proj",
                                                                         "gate_proj"))
  x, valid = left_padded(1)
  compare(np.asarray(helpers.apply(graphdef, params, x, valid)[0]), hf_logits(model, x, valid),
          valid)


@pytest.mark.parametrize("change, match", [
    ({"use_rslora": True}, "use_rslora"), ({"use_dora": True}, "use_dora"),
    ({"target_modules": ["q_proj", "lm_head"]}, "target_modules"),
    ({"target_modules": ".*proj"}, "target_modules"), ({"peft_type": "IA3"}, "peft_type"),
    ({"modules_to_save": ["score"]}, "modules_to_save")])
def test_unsupported_peft_settings_are_refused(tmp_path, change, match):
  cfg = dataclasses.replace(CFG, lora_targets=LORA_TARGETS[:2])
  hf_peft.save_peft_adapters(tmp_path, helpers.make_model(cfg)[1], cfg)
  assert hf_peft.read_lora_settings(tmp_path) == {"lora_rank": 4, "lora_alpha": 8.0,
                                                  "lora_targets": ("q_proj", "k_proj")}
  config = json.loads((tmp_path / "adapter_config.json").read_text())
  (tmp_path / "adapter_config.json").write_text(json.dumps({**config, **change}))
  with pytest.raises(ValueError, match=match):
    hf_peft.read_lora_settings(tmp_path)
