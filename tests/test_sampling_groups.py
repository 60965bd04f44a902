"""Group sampling (prefix sharing): `sample_groups` processes each prompt once and replicates
its KV cache G times; it must equal `sample` on the prompts repeated G times, and the prefill
must really run on B rows, not B * G."""
import jax
import numpy as np
import pytest

import helpers
from rlhf_jax.compile_count import CompileCounter
from rlhf_jax.sampling import SamplingConfig, sample, sample_groups

CFG = helpers.nano(n_layers=2)
V = CFG.vocab_size
PAD = 0
NEVER = V  # an EOS id outside the vocabulary
N, G = 6, 4
LOGP_TOL = helpers.f32_tol(helpers.forward_terms(CFG, seq_len=6 + N))

rng = np.random.default_rng(3)
A, B_ = rng.integers(8, V, 4), rng.integers(8, V, 6)
# Row 0: A left-padded by 2; row 1: B, no padding; row 2: A right-padded (padding invariance).
PROMPTS = np.stack([np.r_[[PAD] * 2, A], B_, np.r_[A, [PAD] * 2]]).astype(np.int32)
VALID = np.array([[0, 0, 1, 1, 1, 1], [1] * 6, [1, 1, 1, 1, 0, 0]], bool)


@pytest.fixture(scope="module")
def model():
  """(graphdef, params, eos): eos is the token greedy decoding of row 1 emits second, so
  some rows stop early and some run to max_new_tokens."""
  graphdef, params = helpers.make_model(CFG, seed=5, std=0.3)
  out = sample(graphdef, params, PROMPTS, VALID, jax.random.key(0),
               cfg=SamplingConfig(max_new_tokens=N, eos_id=NEVER, pad_id=PAD, greedy=True))
  return graphdef, params, int(out.tokens_BxN[1, 1])


def _cfg(kind: str, eos: int) -> SamplingConfig:
  kw = {"t1": {}, "t0.7_topk": dict(temperature=0.7, top_k=20), "greedy": dict(greedy=True)}
  return SamplingConfig(max_new_tokens=N, eos_id=eos, pad_id=PAD, **kw[kind])


def _dot_shapes(jaxpr) -> set:
  """Output shapes of every dot_general in a jaxpr, nested jaxprs (jit, while) included."""
  out = set()
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      out |= {tuple(v.aval.shape) for v in eqn.outvars}
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
          out |= _dot_shapes(sub.jaxpr)
        elif hasattr(sub, "eqns"):
          out |= _dot_shapes(sub)
  return out


@pytest.mark.parametrize("kind", ["t1", "t0.7_topk", "greedy"])
def test_groups_equal_sampling_the_repeated_prompts(model, kind):
  graphdef, params, eos = model
  cfg = _cfg(kind, eos)
  key = jax.random.key(9)
  got = jax.tree.map(np.asarray, sample_groups(graphdef, params, PROMPTS, VALID, key, cfg=cfg,
                                               group_size=G))
  want = jax.tree.map(np.asarray, sample(graphdef, params, np.repeat(PROMPTS, G, 0),
                                         np.repeat(VALID, G, 0), key, cfg=cfg))
  assert got.tokens_BxN.shape == (3 * G, N)
  np.testing.assert_array_equal(got.tokens_BxN, want.tokens_BxN)
  np.testing.assert_array_equal(got.mask_BxN, want.mask_BxN)
  np.testing.assert_array_equal(got.finished_B, want.finished_B)
  # Same model on other batch shapes (B vs B*G rows), so XLA may reduce in another order:
  # float32 rounding of one forward, bounded in helpers.f32_tol.
  np.testing.assert_allclose(got.logps_BxN, want.logps_BxN, **LOGP_TOL)
  if not cfg.greedy:
    # The group's samples differ (otherwise the test would not see a row mix-up).
    assert len({tuple(r) for r in got.tokens_BxN[:G]}) > 1
  else:
    assert got.finished_B.any() and not got.finished_B.all()  # EOS handling is exercised


def test_group_size_one_is_sample(model):
  graphdef, params, eos = model
  cfg = _cfg("t1", eos)
  key = jax.random.key(1)
  got = sample_groups(graphdef, params, PROMPTS, VALID, key, cfg=cfg, group_size=1)
  want = sample(graphdef, params, PROMPTS, VALID, key, cfg=cfg)
  np.testing.assert_array_equal(np.asarray(got.tokens_BxN), np.asarray(want.tokens_BxN))


def test_prefill_runs_once_per_prompt(model):
  """The prompt forward of sample_groups sees B rows: its dense matmuls flatten B x P
  activations (18 rows here), never B*G x P (72), while sampling the repeated prompts does."""
  graphdef, params, eos = model
  cfg = _cfg("t1", eos)
  key = jax.random.key(0)
  p = PROMPTS.shape[1]

  def shapes(fn, prompts, valid, **kw):
    jaxpr = jax.make_jaxpr(lambda pa, t, v: fn(graphdef, pa, t, v, key, cfg=cfg, **kw))(
        params, prompts, valid)
    return _dot_shapes(jaxpr.jaxpr)

  grouped = shapes(sample_groups, PROMPTS, VALID, group_size=G)
  repeated = shapes(sample, np.repeat(PROMPTS, G, 0), np.repeat(VALID, G, 0))
  assert any(s[0] == 3 * p for s in grouped)
  assert not any(s[0] == 3 * G * p for s in grouped)
  assert any(s[0] == 3 * G * p for s in repeated)


def test_compiles_once_per_shape_and_refuses_bad_group_size(model):
  graphdef, params, eos = model
  cfg = _cfg("t1", eos)
  keys = [jax.random.key(i) for i in range(3)]
  sample_groups(graphdef, params, PROMPTS, VALID, keys[0], cfg=cfg, group_size=3)
  with CompileCounter() as cc:
    for k in keys[1:]:
      sample_groups(graphdef, params, PROMPTS, VALID, k, cfg=cfg, group_size=3)
  assert cc.count == 0, cc.names
  with pytest.raises(ValueError, match="group_size"):
    sample_groups(graphdef, params, PROMPTS, VALID, keys[0], cfg=cfg, group_size=0)
