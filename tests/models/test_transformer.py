"""Transformer, KV cache, rotary scaling and scalar head against independent references."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import helpers
from rlhf_jax.models.config import RopeScaling
from rlhf_jax.models.layers import rope_inv_freq
from rlhf_jax.models.transformer import (ScalarHeadModel, init_cache,
                                         last_valid_index, positions_from_valid)

CFG = helpers.nano()
V = CFG.vocab_size


@pytest.fixture(scope="module")
def model():
  graphdef, params = helpers.make_model(CFG, seed=1)
  return graphdef, params, helpers.make_forward(graphdef)


def rand_tokens(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).integers(1, V, shape), jnp.int32)


def test_shapes_and_dtypes_f32_and_bf16():
  tokens = rand_tokens(0, (2, 5))
  outs = {}
  for dtype in ("float32", "bfloat16"):
    cfg = helpers.nano(dtype=dtype)
    graphdef, params = helpers.make_model(cfg)
    for leaf in jax.tree.leaves(params):
      assert leaf.dtype == jnp.float32
    logits, hidden = helpers.apply(graphdef, params, tokens)
    assert logits.shape == (2, 5, V) and logits.dtype == jnp.float32
    assert hidden.shape == (2, 5, cfg.d_model) and hidden.dtype == jnp.dtype(dtype)
    outs[dtype] = np.asarray(logits)
  # bf16 compute is the same function, to bf16 accuracy (and not identical).
  diff = np.abs(outs["bfloat16"] - outs["float32"])
  assert 0 < diff.max() < 0.05 * np.abs(outs["float32"]).max() + 1e-3


def test_model_output_fields(model):
  graphdef, params, _ = model
  tokens = rand_tokens(0, (1, 3))

  @jax.jit
  def run(params):
    m = nnx.merge(graphdef, params)
    return m(tokens), m(tokens, return_hidden=True)

  plain, with_hidden = run(params)
  assert plain.hidden_BxTxD is None and plain.cache is None
  assert with_hidden.hidden_BxTxD.shape == (1, 3, CFG.d_model)
  np.testing.assert_array_equal(plain.logits_BxTxV, with_hidden.logits_BxTxV)


def test_causal_masking(model):
  _, params, forward = model
  tokens = rand_tokens(1, (2, 12))
  valid = jnp.ones(tokens.shape, bool)
  base = np.asarray(forward(params, tokens, valid))
  changed = np.asarray(forward(params, tokens.at[:, 7].set((tokens[:, 7] + 5) % V), valid))
  # Same program, and a later token enters earlier rows only through masked scores whose
  # exp is exactly 0: the earlier logits are bit-identical.
  np.testing.assert_array_equal(changed[:, :7], base[:, :7])
  assert np.all(np.abs(changed[:, 7:] - base[:, 7:]).max(axis=-1) > 1e-4)
  # A past token changes every later position.
  changed = np.asarray(forward(params, tokens.at[:, 2].set((tokens[:, 2] + 5) % V), valid))
  np.testing.assert_array_equal(changed[:, :2], base[:, :2])
  assert np.all(np.abs(changed[:, 2:] - base[:, 2:]).max(axis=-1) > 1e-4)


def test_padding_left_and_right_match_unpadded(model):
  _, params, forward = model
  seq = rand_tokens(2, (1, 7))
  ref = np.asarray(forward(params, seq, jnp.ones((1, 7), bool)))[0]
  junk = rand_tokens(3, (3,))  # padding content must not matter either
  tokens = jnp.stack([jnp.concatenate([junk, seq[0]]), jnp.concatenate([seq[0], junk])])
  valid = jnp.asarray([[0] * 3 + [1] * 7, [1] * 7 + [0] * 3], bool)
  out = np.asarray(forward(params, tokens, valid))
  tol = helpers.logits_tol(CFG, 10, ref)  # other shapes: float32 rounding of the forward only
  np.testing.assert_allclose(out[0, 3:], ref, **tol)
  np.testing.assert_allclose(out[1, :7], ref, **tol)
  # Without the valid mask the padded rows are different sequences (the test can fail).
  unmasked = np.asarray(forward(params, tokens, jnp.ones_like(valid)))
  assert np.abs(unmasked[0, 3:] - ref).max() > 1e-3


def test_positions_and_last_valid_index():
  valid = jnp.asarray([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
  np.testing.assert_array_equal(positions_from_valid(valid),
                                [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2], [0, 1, 2, 3, 4]])
  np.testing.assert_array_equal(last_valid_index(valid), [4, 2, 4])


def test_kv_cache_prefill_then_decode_matches_full_forward(model):
  graphdef, params, forward = model
  b, t, p = 2, 11, 6
  tokens = rand_tokens(4, (b, t))
  valid = jnp.asarray([[0] * 3 + [1] * 8, [1] * 11], bool)  # row 0 left-padded
  full = np.asarray(forward(params, tokens, valid))
  positions = positions_from_valid(valid)

  @jax.jit
  def step(params, tok, val, pos, cache):
    out = nnx.merge(graphdef, params)(tok, valid_BxT=val, positions_BxT=pos, cache=cache)
    return out.logits_BxTxV, out.cache

  cache = init_cache(CFG, b, t)
  logits, cache = step(params, tokens[:, :p], valid[:, :p], positions[:, :p], cache)
  got = [np.asarray(logits)]
  for i in range(p, t):
    logits, cache = step(params, tokens[:, i:i + 1], valid[:, i:i + 1],
                         positions[:, i:i + 1], cache)
    got.append(np.asarray(logits))
  assert int(cache.index) == t
  got = np.concatenate(got, axis=1)
  v = np.asarray(valid)
  np.testing.assert_allclose(got[v], full[v], **helpers.logits_tol(CFG, t, full[v]))
  # The cache holds state: decoding the last token with an empty cache gives other logits.
  alone, _ = step(params, tokens[:, -1:], valid[:, -1:], positions[:, -1:], init_cache(CFG, b, t))
  assert np.abs(np.asarray(alone)[:, 0] - full[:, -1]).max() > 1e-3


def test_decode_requires_positions(model):
  graphdef, params, _ = model
  m = nnx.merge(graphdef, params)
  with pytest.raises(ValueError, match="positions_BxT"):
    jax.eval_shape(lambda: m(rand_tokens(0, (1, 2)), cache=init_cache(CFG, 1, 4)))


@pytest.mark.parametrize("overrides", [dict(), dict(qkv_bias=True, tie_embeddings=True)])
def test_forward_matches_numpy_float64_llama(overrides):
  """GQA (4 query heads on 2 kv heads) against the NumPy Llama equations."""
  cfg = helpers.nano(**overrides)
  graphdef, params = helpers.make_model(cfg, seed=5)
  tokens = rand_tokens(6, (1, 9))
  got = np.asarray(helpers.apply(graphdef, params, tokens)[0][0])
  want = helpers.np_forward(params, cfg, np.asarray(tokens[0]))
  assert np.abs(want).max() > 1.0  # non-trivial logits
  np.testing.assert_allclose(got, want, **helpers.logits_tol(cfg, 9, want))


def np_llama3_inv_freq(head_dim, theta, factor, low, high, old_ctx):
  """Meta's llama3 `apply_scaling`, written per frequency."""
  out = []
  for i in range(head_dim // 2):
    freq = 1.0 / theta ** (2 * i / head_dim)
    wavelen = 2 * math.pi / freq
    if wavelen < old_ctx / high:
      out.append(freq)
    elif wavelen > old_ctx / low:
      out.append(freq / factor)
    else:
      smooth = (old_ctx / wavelen - low) / (high - low)
      out.append((1 - smooth) * freq / factor + smooth * freq)
  return np.array(out)


def test_rope_llama3_scaling_three_bands():
  s = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                  original_max_position_embeddings=8192)
  cfg = helpers.nano(d_model=256, n_heads=2, n_kv_heads=1, head_dim=128, rope_theta=500000.0,
                     rope_scaling=s)
  want = np_llama3_inv_freq(128, 500000.0, 8.0, 1.0, 4.0, 8192)
  unscaled = np.array([1.0 / 500000.0 ** (2 * i / 128) for i in range(64)])
  bands = np.sign(np.round(unscaled / want, 6) - 1) + (unscaled / want > 7.999)
  assert set(bands.tolist()) == {0.0, 1.0, 2.0}  # kept, interpolated, divided by factor
  np.testing.assert_allclose(rope_inv_freq(cfg), want, rtol=1e-6)
  np.testing.assert_allclose(rope_inv_freq(helpers.nano(d_model=256, n_heads=2, n_kv_heads=1,
                                                        head_dim=128, rope_theta=500000.0)),
                             unscaled, rtol=1e-6)


def test_qkv_bias_and_tied_embedding_params():
  _, p = helpers.make_model(helpers.nano(qkv_bias=True))
  attn = p["blocks"][0]["attn"]
  assert attn["bq"].shape == (4, 16) and attn["bk"].shape == (2, 16)
  assert attn["bv"].shape == (2, 16) and "lm_head" in p
  graphdef, p = helpers.make_model(helpers.nano(tie_embeddings=True))
  assert "lm_head" not in p and "bq" not in p["blocks"][0]["attn"]
  logits, hidden = helpers.apply(graphdef, p, rand_tokens(0, (1, 4)))
  np.testing.assert_allclose(logits, np.asarray(hidden, np.float64) @ np.asarray(p["embed"]).T,
                             **helpers.matmul_tol(hidden, np.asarray(p["embed"]).T))


def test_hidden_times_lm_head_is_logits(model):
  graphdef, params, _ = model
  tokens = rand_tokens(7, (2, 6))
  logits, hidden = helpers.apply(graphdef, params, tokens)
  want = np.asarray(hidden, np.float64) @ np.asarray(params["lm_head"], np.float64)
  np.testing.assert_allclose(logits, want, **helpers.matmul_tol(hidden, params["lm_head"]))
  assert np.abs(np.asarray(logits)).max() > 1.0


def test_lm_head_false_has_no_head_and_refuses_logits():
  graphdef, p = helpers.make_model(CFG, lm_head=False)
  assert "lm_head" not in p
  with pytest.raises(ValueError, match="without an LM head"):
    jax.eval_shape(lambda p: nnx.merge(graphdef, p)(rand_tokens(0, (1, 3))), p)


def test_scalar_head_score_reads_last_real_token():
  graphdef, params = helpers.init_module(lambda rngs: ScalarHeadModel(CFG, rngs=rngs), seed=3)

  @jax.jit
  def run(params, tokens, valid):
    m = nnx.merge(graphdef, params)
    hidden, _ = m.backbone.hidden(tokens, valid_BxT=valid)
    return m(tokens, valid_BxT=valid), m.score(tokens, valid_BxT=valid), hidden

  seq = rand_tokens(8, (5,))
  junk = rand_tokens(9, (3,))
  tokens = jnp.stack([jnp.concatenate([junk, seq]), jnp.concatenate([seq, junk])])
  valid = jnp.asarray([[0] * 3 + [1] * 5, [1] * 5 + [0] * 3], bool)
  values, scores, hidden = run(params, tokens, valid)
  values, scores = np.asarray(values), np.asarray(scores)
  assert scores.shape == (2,) and values.shape == (2, 8)
  np.testing.assert_array_equal(scores, [values[0, 7], values[1, 4]])
  assert abs(values[1, 4] - values[1, 7]) > 1e-4  # reading the last column would differ
  # Left vs right padding: float32 rounding of the forward only.
  np.testing.assert_allclose(scores[0], scores[1], **helpers.logits_tol(CFG, 8, values))
  _, scores2, _ = run(params, jnp.where(valid, tokens, (tokens + 11) % V), valid)
  # Same program; padding content enters only through masked scores (exp exactly 0).
  np.testing.assert_array_equal(np.asarray(scores2), scores)
  # Per-token values are the head applied to the backbone's hidden states, plus the bias.
  want = np.asarray(hidden, np.float64) @ np.asarray(params["head_w"]) + float(params["head_b"])
  hidden1 = np.concatenate([np.asarray(hidden), np.ones(hidden.shape[:-1] + (1,))], -1)
  np.testing.assert_allclose(values, want, **helpers.matmul_tol(
      hidden1, np.r_[np.asarray(params["head_w"]), float(params["head_b"])]))  # [h, 1]·[w, b]
