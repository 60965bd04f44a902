"""ModelConfig: presets, validation, and num_params against real parameter counts."""
import math

import jax
import numpy as np
import pytest
from flax import nnx

from rlhf_jax.models.config import PRESETS, ModelConfig, RopeScaling, preset
from rlhf_jax.models.transformer import ScalarHeadModel, Transformer


def abstract_params(cfg, **kwargs):
  """Parameter shapes of an abstract (never allocated) model, as a pure dict."""
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), **kwargs))
  return nnx.state(abstract, nnx.Param).to_pure_dict()


def leaf_count(cfg, **kwargs):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(cfg, **kwargs)))


@pytest.mark.parametrize("name", ["nano", "125m", "1b", "8b"])
def test_num_params_matches_param_leaves(name):
  cfg = preset(name)
  params = abstract_params(cfg)
  assert cfg.num_params() == sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  lm_head = math.prod(params["lm_head"].shape) if "lm_head" in params else 0
  assert ("lm_head" in params) == (not cfg.tie_embeddings)
  assert cfg.num_params(with_lm_head=False) == cfg.num_params() - lm_head


def test_num_params_without_lm_head():
  cfg = preset("nano")
  assert cfg.num_params(with_lm_head=False) == leaf_count(cfg, lm_head=False)


@pytest.mark.parametrize("overrides", [dict(qkv_bias=True), dict(tie_embeddings=True),
                                       dict(head_dim=24)])
def test_num_params_variants(overrides):
  cfg = preset("nano", **overrides)
  assert cfg.num_params() == leaf_count(cfg)


def test_num_params_of_published_llama_sizes():
  # Published parameter counts of Llama 3.1 8B and Llama 3.2 1B (tied embeddings).
  assert preset("8b").num_params() == 8_030_261_248
  assert preset("1b").num_params() == 1_235_814_400


def test_scalar_head_param_count():
  scalar = nnx.eval_shape(lambda: ScalarHeadModel(preset("nano"), rngs=nnx.Rngs(0)))
  n = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(scalar, nnx.Param)))
  assert n == preset("nano").num_params(with_lm_head=False) + preset("nano").d_model + 1


def test_large_presets_shapes():
  cfg = preset("8b")
  assert (cfg.n_heads // cfg.n_kv_heads, cfg.dim_per_head) == (4, 128)
  assert preset("1b").tie_embeddings and preset("1b").rope_scaling.factor == 32.0
  assert isinstance(preset("8b").rope_scaling, RopeScaling)
  for name, cfg in PRESETS.items():
    assert cfg.n_heads % cfg.n_kv_heads == 0, name


def test_preset_overrides_and_unknown_name():
  cfg = preset("nano", n_layers=1, dtype="bfloat16")
  assert cfg.n_layers == 1 and cfg.compute_dtype == np.dtype("bfloat16")
  assert PRESETS["nano"].n_layers == 2  # the table is not mutated
  with pytest.raises(ValueError, match="unknown model preset 'huge'"):
    preset("huge")


def test_validation_n_heads_multiple_of_kv_heads():
  with pytest.raises(ValueError, match=r"n_heads=6 must be a multiple of n_kv_heads=4"):
    preset("nano", n_heads=6, n_kv_heads=4, head_dim=16)


@pytest.mark.parametrize("field", ["dtype", "param_dtype"])
def test_validation_dtype(field):
  with pytest.raises(ValueError, match=rf"{field} must be 'float32' or 'bfloat16', got 'float16'"):
    preset("nano", **{field: "float16"})


def test_validation_head_dim():
  with pytest.raises(ValueError, match="d_model=64 is not divisible by n_heads=6"):
    ModelConfig(vocab_size=8, d_model=64, n_layers=1, n_heads=6, n_kv_heads=3, d_ff=8)
  cfg = ModelConfig(vocab_size=8, d_model=64, n_layers=1, n_heads=6, n_kv_heads=3, d_ff=8,
                    head_dim=8)
  assert cfg.dim_per_head == 8
