"""Geometric-mixture sampler (Nash-MD's opponent): the endpoints reproduce `sample` of the
policy and of the reference, and in between it equals a naive full-forward sampler of the
mixture and scores its tokens with the teacher-forced mixed log-probs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from rlhf_jax.compile_count import CompileCounter
from rlhf_jax.losses.nash_md import geometric_mixture_logprobs
from rlhf_jax.models.transformer import last_valid_index
from rlhf_jax.sampling import SamplingConfig, sample, sample_mixture

CFG = helpers.nano(n_layers=1)
V = CFG.vocab_size
PAD, NEVER = 0, V  # an EOS id outside the vocabulary is never sampled
N, P = 8, 6
# Mixed log-probs vs another float32 evaluation of them: the rounding of one forward plus the
# mixture's own log-softmax over the vocabulary (helpers.f32_tol).
MIX_TOL = helpers.f32_tol(helpers.forward_terms(CFG, seq_len=P + N) + CFG.vocab_size)
rng = np.random.default_rng(0)
A = rng.integers(1, V, 4)
PROMPTS = np.stack([np.r_[[PAD] * 2, A], rng.integers(1, V, P)]).astype(np.int32)
VALID = np.array([[0, 0, 1, 1, 1, 1], [1] * P], bool)
KEY = jax.random.key(7)


def scfg(**kw):
  kw.setdefault("eos_id", NEVER)
  return SamplingConfig(max_new_tokens=N, pad_id=PAD, **kw)


@pytest.fixture(scope="module")
def models():
  graphdef, params = helpers.make_model(CFG, seed=1, std=0.3)
  _, ref_params = helpers.make_model(CFG, seed=2, std=0.3)
  return graphdef, params, ref_params


def _np(out):
  return jax.tree.map(np.asarray, out)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_endpoints_reproduce_sample(models, temperature):
  graphdef, params, ref_params = models
  cfg = scfg(temperature=temperature)
  for coef, which in ((0.0, params), (1.0, ref_params)):
    mix = _np(sample_mixture(graphdef, params, ref_params, PROMPTS, VALID, KEY,
                             jnp.float32(coef), cfg=cfg))
    want = _np(sample(graphdef, which, PROMPTS, VALID, KEY, cfg=cfg))
    np.testing.assert_array_equal(mix.tokens_BxN, want.tokens_BxN)
    np.testing.assert_array_equal(mix.mask_BxN, want.mask_BxN)
    np.testing.assert_allclose(mix.logps_BxN, want.logps_BxN, **MIX_TOL)


def _naive_mixture(graphdef, params, ref_params, coef, key, n):
  """Per step: full forward of both models over the sequence so far, mixed log-probs of the
  last real token (NumPy, float64), the same categorical draw as the sampler: row r at step s
  draws with fold_in(fold_in(key, r), s)."""
  forward = helpers.make_forward(graphdef)
  seq = np.concatenate([PROMPTS, np.full((2, n), PAD, np.int32)], 1)
  valid = np.concatenate([VALID, np.zeros((2, n), bool)], 1)
  tokens, logps = np.zeros((2, n), int), np.zeros((2, n))
  lsm = helpers.np_log_softmax
  for s in range(n):
    last = np.asarray(last_valid_index(valid))
    rows = np.arange(2)
    lp = lsm(np.asarray(forward(params, seq, valid), np.float64)[rows, last])
    lr = lsm(np.asarray(forward(ref_params, seq, valid), np.float64)[rows, last])
    mixed = lsm((1 - coef) * lp + coef * lr)
    tok = np.asarray([jax.random.categorical(
        jax.random.fold_in(jax.random.fold_in(key, r), s), jnp.asarray(mixed[r], jnp.float32))
        for r in rows])
    tokens[:, s], logps[:, s] = tok, mixed[rows, tok]
    seq[:, P + s], valid[:, P + s] = tok, True
  return tokens, logps


def test_intermediate_coef_equals_naive_mixture_sampler(models):
  graphdef, params, ref_params = models
  out = _np(sample_mixture(graphdef, params, ref_params, PROMPTS, VALID, KEY, jnp.float32(0.4),
                           cfg=scfg()))
  tokens, logps = _naive_mixture(graphdef, params, ref_params, 0.4, KEY, N)
  np.testing.assert_array_equal(out.tokens_BxN, tokens)
  np.testing.assert_allclose(out.logps_BxN, logps, **MIX_TOL)
  # The mixture differs from both endpoints' draws.
  for which in (params, ref_params):
    assert not np.array_equal(out.tokens_BxN,
                              np.asarray(sample(graphdef, which, PROMPTS, VALID, KEY,
                                                cfg=scfg()).tokens_BxN))


def test_mixed_logps_equal_the_library_mixture_and_eos_stops(models):
  graphdef, params, ref_params = models
  # Any frequent token as EOS: rows stop, and tokens after it are padding with mask 0.
  first = _np(sample_mixture(graphdef, params, ref_params, PROMPTS, VALID, KEY,
                             jnp.float32(0.5), cfg=scfg()))
  eos = int(first.tokens_BxN[0, 2])
  out = _np(sample_mixture(graphdef, params, ref_params, PROMPTS, VALID, KEY,
                           jnp.float32(0.5), cfg=scfg(eos_id=eos)))
  assert out.finished_B[0] and out.mask_BxN[0].sum() == 3
  assert (out.tokens_BxN[0, 3:] == PAD).all() and (out.logps_BxN[0, 3:] == 0).all()
  # Teacher-forced: the library's geometric_mixture_logprobs over both full forwards.
  forward = helpers.make_forward(graphdef)
  seq = np.concatenate([PROMPTS, first.tokens_BxN], 1)
  valid = np.concatenate([VALID, first.mask_BxN], 1)
  mixed = geometric_mixture_logprobs(forward(params, seq, valid), forward(ref_params, seq, valid),
                                     mixture_coef=0.5)
  want = np.take_along_axis(np.asarray(mixed)[:, P - 1:-1], first.tokens_BxN[..., None], -1)
  np.testing.assert_allclose(first.logps_BxN, want[..., 0], **MIX_TOL)


def test_coef_is_traced_and_greedy_is_the_mixed_argmax(models):
  graphdef, params, ref_params = models
  cfg = scfg()
  sample_mixture(graphdef, params, ref_params, PROMPTS, VALID, KEY, jnp.float32(0.1), cfg=cfg)
  with CompileCounter() as cc:
    sample_mixture(graphdef, params, ref_params, PROMPTS, VALID, KEY, jnp.float32(0.9), cfg=cfg)
  assert cc.count == 0, cc.names
  greedy = _np(sample_mixture(graphdef, params, ref_params, PROMPTS, VALID, KEY,
                              jnp.float32(0.0), cfg=scfg(greedy=True)))
  np.testing.assert_array_equal(
      greedy.tokens_BxN,
      np.asarray(sample(graphdef, params, PROMPTS, VALID, KEY, cfg=scfg(greedy=True)).tokens_BxN))
