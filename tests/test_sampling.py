"""KV-cache sampler: agreement with the training forward, the naive sampler and an argmax loop;
padding and batch invariance; truncation; EOS; determinism; compile once per shape."""
import jax
import numpy as np
import pytest

import helpers
from rlhf_jax.compile_count import CompileCounter
from rlhf_jax.logprobs import shifted_logps
from rlhf_jax.sampling import SamplingConfig, process_logits, sample, sample_naive

CFG = helpers.nano(n_layers=1)  # the KV cache across layers is tested in models/
V = CFG.vocab_size
PAD, NEVER = 0, V  # an EOS id outside the vocabulary is never sampled
N = 8  # max new tokens
P = 7  # prompt length
# Sampler log-probs vs another float32 forward of the same model (training forward, naive
# sampler, other batch): they differ only by float32 rounding of one forward (helpers.f32_tol).
LOGP_TOL = helpers.f32_tol(helpers.forward_terms(CFG, seq_len=P + N))

rng = np.random.default_rng(0)
A = rng.integers(1, V, 4)  # a 4-token prompt
B_ = rng.integers(1, V, 7)  # a 7-token prompt
# Row 0: A left-padded by 3; row 1: A right-padded by 3; row 2: B, no padding.
PROMPTS = np.stack([np.r_[[PAD] * 3, A], np.r_[A, [PAD] * 3], B_]).astype(np.int32)
VALID = np.array([[0] * 3 + [1] * 4, [1] * 4 + [0] * 3, [1] * 7], bool)


def scfg(**kwargs):
  kwargs.setdefault("eos_id", NEVER)
  return SamplingConfig(max_new_tokens=N, pad_id=PAD, **kwargs)


T1, GREEDY = scfg(), scfg(greedy=True)
KEY = jax.random.key(42)


@pytest.fixture(scope="module")
def model():
  graphdef, params = helpers.make_model(CFG, seed=11, std=0.3)
  return graphdef, params, helpers.make_forward(graphdef)


@pytest.fixture(scope="module")
def runs(model):
  """Each (sampler, config) compiled and run once for the module."""
  graphdef, params, _ = model
  cache = {}

  def get(cfg, fn=sample, key=KEY):
    k = (fn.__name__, cfg, str(jax.random.key_data(key)))
    if k not in cache:
      cache[k] = jax.tree.map(np.asarray, fn(graphdef, params, PROMPTS, VALID, key, cfg=cfg))
    return cache[k]
  return get


def teacher_forced_logits(model, out):
  """Logits that predicted each generated token: forward over prompt + generated, then read
  each step at the previous real token."""
  _, params, forward = model
  tokens = np.concatenate([PROMPTS, out.tokens_BxN], axis=1)
  valid = np.concatenate([VALID, out.mask_BxN], axis=1)
  logits = np.asarray(forward(params, tokens, valid))
  prev = np.zeros((3, N), int)
  for b in range(3):
    for s in range(N):
      prev[b, s] = np.flatnonzero(valid[b, :P + s])[-1]
  return np.take_along_axis(logits, prev[..., None], axis=1), tokens, valid, logits


def test_temperature_one_logps_equal_training_forward(model, runs):
  out = runs(T1)
  assert out.mask_BxN.all() and not out.finished_B.any()
  step_logits, tokens, valid, logits = teacher_forced_logits(model, out)
  # Left-padded (and unpadded) rows: prompt + generated is one contiguous sequence, scored by
  # the training-side shifted_logps.
  train_logps = np.asarray(shifted_logps(logits, tokens))[:, P:]
  np.testing.assert_allclose(out.logps_BxN[[0, 2]], train_logps[[0, 2]], **LOGP_TOL)
  # The right-padded row has a gap; read each step at the previous real token instead.
  want = np.take_along_axis(helpers.np_log_softmax(step_logits), out.tokens_BxN[..., None], -1)
  np.testing.assert_allclose(out.logps_BxN, want[..., 0], **LOGP_TOL)
  assert out.logps_BxN.min() < -0.5  # real sampling, not a degenerate distribution


@pytest.mark.parametrize("cfg", [T1, GREEDY], ids=["t1", "greedy"])
def test_cached_sampler_equals_naive(runs, cfg):
  fast, naive = runs(cfg), runs(cfg, fn=sample_naive)
  np.testing.assert_array_equal(fast.tokens_BxN, naive.tokens_BxN)
  np.testing.assert_array_equal(fast.mask_BxN, naive.mask_BxN)
  np.testing.assert_array_equal(fast.finished_B, naive.finished_B)
  np.testing.assert_allclose(fast.logps_BxN, naive.logps_BxN, **LOGP_TOL)


def test_greedy_matches_independent_argmax_loop(model, runs):
  _, params, forward = model
  out = runs(GREEDY)
  buf = np.concatenate([PROMPTS, np.full((3, N), PAD, np.int32)], axis=1)
  valid = np.concatenate([VALID, np.zeros((3, N), bool)], axis=1)
  want, margins, logps = np.zeros((3, N), int), np.zeros((3, N)), np.zeros((3, N))
  for s in range(N):
    logits = np.asarray(forward(params, buf, valid), np.float64)
    for b in range(3):
      row = logits[b, np.flatnonzero(valid[b])[-1]]
      top2 = np.sort(row)[-2:]
      want[b, s], margins[b, s] = np.argmax(row), top2[1] - top2[0]
      logps[b, s] = helpers.np_log_softmax(row)[want[b, s]]
    buf[:, P + s], valid[:, P + s] = want[:, s], True
  compared = 0
  for b in range(3):
    for s in range(N):
      # A near-tie, within two logits' float32 rounding (f32_tol at the logits' size), may
      # legitimately resolve either way; the rest of the row then diverges.
      if margins[b, s] <= 2 * LOGP_TOL["rtol"] * np.abs(logits).max():
        break
      assert out.tokens_BxN[b, s] == want[b, s], (b, s)
      np.testing.assert_allclose(out.logps_BxN[b, s], logps[b, s], **LOGP_TOL)
      compared += 1
  assert compared >= 2 * N


def test_greedy_does_not_depend_on_padding_or_batch_mates(model, runs):
  graphdef, params, _ = model
  alone = jax.tree.map(np.asarray, sample(graphdef, params, A[None].astype(np.int32),
                                          np.ones((1, 4), bool), KEY, cfg=GREEDY))
  batch = runs(GREEDY)
  for row in (0, 1):  # left-padded by 3, right-padded by 3, both next to a different prompt
    np.testing.assert_array_equal(batch.tokens_BxN[row], alone.tokens_BxN[0])
    np.testing.assert_allclose(batch.logps_BxN[row], alone.logps_BxN[0], **LOGP_TOL)
  assert not np.array_equal(batch.tokens_BxN[2], alone.tokens_BxN[0])


def test_top_k_tokens_lie_in_top_k_and_logps_are_renormalised(model, runs):
  k = 5
  out = runs(scfg(top_k=k))
  step_logits, *_ = teacher_forced_logits(model, out)
  step_logits = step_logits.astype(np.float64)
  kth = np.sort(step_logits, axis=-1)[..., -k][..., None]
  chosen = np.take_along_axis(step_logits, out.tokens_BxN[..., None], -1)
  assert np.all(chosen >= kth - 1e-5)
  truncated = np.where(step_logits >= kth, step_logits, -np.inf)
  want = np.take_along_axis(helpers.np_log_softmax(truncated), out.tokens_BxN[..., None], -1)
  np.testing.assert_allclose(out.logps_BxN, want[..., 0], **LOGP_TOL)
  assert len(np.unique(out.tokens_BxN)) > 3


def np_nucleus(logits, p):
  """Boolean mask of the smallest top set whose probability mass reaches p."""
  probs = np.exp(helpers.np_log_softmax(logits))
  keep = np.zeros(logits.shape, bool)
  for idx in np.ndindex(logits.shape[:-1]):
    order = np.argsort(-probs[idx], kind="stable")
    mass_before = np.cumsum(probs[idx][order]) - probs[idx][order]
    keep[idx][order[mass_before < p]] = True
  return keep


def test_top_p_tokens_lie_in_nucleus(model, runs):
  out = runs(scfg(top_p=0.6))
  step_logits, *_ = teacher_forced_logits(model, out)
  step_logits = step_logits.astype(np.float64)
  nucleus = np_nucleus(step_logits, 0.6)
  assert np.all(np.take_along_axis(nucleus, out.tokens_BxN[..., None], -1))
  assert nucleus.sum(-1).max() < V // 2  # the nucleus really truncates
  want = helpers.np_log_softmax(np.where(nucleus, step_logits, -np.inf))
  np.testing.assert_allclose(out.logps_BxN,
                             np.take_along_axis(want, out.tokens_BxN[..., None], -1)[..., 0],
                             **LOGP_TOL)


def np_process_logits(logits, temperature, top_k, top_p):
  x = np.asarray(logits, np.float64) / temperature
  if top_k:
    kth = np.sort(x, axis=-1)[:, -top_k][:, None]
    x = np.where(x >= kth, x, -np.inf)
  if top_p < 1.0:
    x = np.where(np_nucleus(x, top_p), x, -np.inf)
  return helpers.np_log_softmax(x)


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.6), (1.5, 5, 0.5), (0.5, 20, 0.9)])
def test_process_logits_matches_numpy(temperature, top_k, top_p):
  logits = np.random.default_rng(3).normal(size=(4, 20)).astype(np.float32) * 2
  cfg = scfg(temperature=temperature, top_k=top_k, top_p=top_p)
  got = np.asarray(process_logits(logits, cfg))
  want = np_process_logits(logits, temperature, top_k, top_p)
  np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
  # One float32 log-softmax over the 20 scaled logits: f32_tol of 20 terms + the division,
  # atol at the size of the scaled logits (a log-prob near 0 is a difference of such terms).
  tol = helpers.f32_tol(20 + 2, scale=np.abs(logits).max() / temperature)
  np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], **tol)
  if top_k:
    assert np.all(np.isfinite(got).sum(-1) <= top_k)


@pytest.mark.parametrize("greedy", [False, True], ids=["t1", "greedy"])
def test_eos_stops_each_row(runs, greedy):
  base = runs(GREEDY if greedy else T1)
  # Pick as EOS a token that some row emits early and some row never emits: with the same key
  # the rows follow the EOS-free run up to their first EOS.
  eos = None
  for s in range(1, N - 2):
    for b in range(3):
      cand = base.tokens_BxN[b, s]
      rows_with = [r for r in range(3) if cand in base.tokens_BxN[r]]
      if len(rows_with) < 3:
        eos = int(cand)
        break
    if eos is not None:
      break
  assert eos is not None, base.tokens_BxN
  cfg = scfg(eos_id=eos, greedy=greedy)
  out = runs(cfg)
  for b in range(3):
    hits = np.flatnonzero(base.tokens_BxN[b] == eos)
    if len(hits):
      s = hits[0]
      np.testing.assert_array_equal(out.tokens_BxN[b, :s + 1], base.tokens_BxN[b, :s + 1])
      np.testing.assert_array_equal(out.tokens_BxN[b, s + 1:], PAD)
      np.testing.assert_array_equal(out.mask_BxN[b], np.arange(N) <= s)
      np.testing.assert_array_equal(out.logps_BxN[b, s + 1:], 0.0)
      np.testing.assert_allclose(out.logps_BxN[b, :s + 1], base.logps_BxN[b, :s + 1], **LOGP_TOL)
      assert out.finished_B[b]
    else:
      np.testing.assert_array_equal(out.tokens_BxN[b], base.tokens_BxN[b])
      assert out.mask_BxN[b].all() and not out.finished_B[b]
  assert out.finished_B.any() and not out.finished_B.all()
  if greedy:
    naive = runs(cfg, fn=sample_naive)
    np.testing.assert_array_equal(naive.tokens_BxN, out.tokens_BxN)
    np.testing.assert_array_equal(naive.mask_BxN, out.mask_BxN)
    np.testing.assert_array_equal(naive.finished_B, out.finished_B)


def test_deterministic_per_key(model, runs):
  graphdef, params, _ = model
  first = runs(T1)
  again = sample(graphdef, params, PROMPTS, VALID, KEY, cfg=T1)
  np.testing.assert_array_equal(again.tokens_BxN, first.tokens_BxN)
  np.testing.assert_array_equal(again.logps_BxN, first.logps_BxN)
  other = runs(T1, key=jax.random.key(7))
  assert not np.array_equal(other.tokens_BxN, first.tokens_BxN)


def test_compiles_once_per_shape(model, runs):
  graphdef, params, _ = model
  runs(T1)  # compiled
  params2 = jax.tree.map(lambda x: x * 1.01, params)
  key2 = jax.random.key(3)
  prompts2 = (PROMPTS + 1) % V
  one_row, one_valid = PROMPTS[:1], VALID[:1]
  with CompileCounter() as cc:
    out = sample(graphdef, params2, prompts2, VALID, key2, cfg=T1)
    jax.block_until_ready(out)
    assert cc.count == 0, cc.names
    jax.block_until_ready(sample(graphdef, params2, one_row, one_valid, key2, cfg=T1))
    assert cc.count >= 1  # a new batch size is a new executable (the counter works)
    cc.reset()
    jax.block_until_ready(sample(graphdef, params, one_row, one_valid, KEY, cfg=T1))
    assert cc.count == 0, cc.names


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(temperature=-1.0), "temperature must be > 0"),
    (dict(top_k=-1), "top_k must be >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
])
def test_sampling_config_validation(kwargs, match):
  base = dict(max_new_tokens=4, eos_id=1, pad_id=0)
  with pytest.raises(ValueError, match=match):
    SamplingConfig(**{**base, **kwargs})


def test_greedy_allows_zero_temperature():
  assert SamplingConfig(max_new_tokens=1, eos_id=1, pad_id=0, greedy=True, temperature=0.0).greedy
