"""Length-bucketed decoding: the samplers decode on a KV cache grown through static length
buckets (`decode_cache_lengths`) instead of one cache of P + N slots from the first step. Every
sampler must give what it gives on one cache of P + N slots (the pre-bucket path,
cache_lengths=(P + N,)) and what the cache-free `sample_naive` gives, across bucket
boundaries, padding, EOS and groups; the compiled program must run one while_loop per bucket
on a cache of exactly that bucket's length, and compile once per shape.

Tolerances: the bucketed and the one-cache runs evaluate the same forward; a masked slot's
softmax weight is exactly 0, so the shorter cache changes only the length (hence at most the
float32 order) of the softmax's and the weighted sum's reductions: f32_tol of one forward.
Tokens are drawn from those log-probs and must agree exactly (a flip needs a near-tie within
that rounding; the assertion would report it)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from rlhf_jax.compile_count import CompileCounter
from rlhf_jax.models.layers import LayerCache
from rlhf_jax.models.transformer import init_cache
from rlhf_jax import sampling
from rlhf_jax.sampling import (SamplingConfig, _repeat_rows, bucket_lengths,
                               decode_cache_lengths, sample_naive)

def _bucketed(fn, prompts_at: int):
  """fn with the bucket schedule as its default cache_lengths: these tests decode short
  generations, for which the samplers' own default is one cache (MIN_BUCKETED_NEW_TOKENS)."""
  def call(*args, cfg, cache_lengths=None, **kwargs):
    p = args[prompts_at].shape[1]
    if cache_lengths is None:
      cache_lengths = bucket_lengths(p, cfg.max_new_tokens)
    return fn(*args, cfg=cfg, cache_lengths=cache_lengths, **kwargs)
  return call


sample = _bucketed(sampling.sample, 2)
sample_groups = _bucketed(sampling.sample_groups, 2)
sample_mixture = _bucketed(sampling.sample_mixture, 3)

CFG = helpers.nano(n_layers=2)  # two layers: every layer's cache grows
V = CFG.vocab_size
PAD, NEVER = 0, V  # an EOS id outside the vocabulary is never sampled
P, N = 7, 16
LENGTHS = bucket_lengths(P, N)  # (9, 11, 15, 23): rooms 2, 4, 8, 16 new tokens
ONE_CACHE = (P + N,)
LOGP_TOL = helpers.f32_tol(helpers.forward_terms(CFG, seq_len=P + N))

rng = np.random.default_rng(5)
A, B_ = rng.integers(1, V, 4), rng.integers(1, V, 7)
# Row 0: A left-padded by 3; row 1: A right-padded by 3; row 2: B, no padding.
PROMPTS = np.stack([np.r_[[PAD] * 3, A], np.r_[A, [PAD] * 3], B_]).astype(np.int32)
VALID = np.array([[0] * 3 + [1] * 4, [1] * 4 + [0] * 3, [1] * 7], bool)
KEY = jax.random.key(3)
KINDS = {"t1": {}, "t0.7_topk5": dict(temperature=0.7, top_k=5), "greedy": dict(greedy=True)}


def scfg(kind="t1", eos=NEVER, n=N):
  return SamplingConfig(max_new_tokens=n, eos_id=eos, pad_id=PAD, **KINDS[kind])


@pytest.fixture(scope="module")
def model():
  return helpers.make_model(CFG, seed=4, std=0.3)


def _np(out):
  return jax.tree.map(np.asarray, out)


def assert_same_samples(got, want):
  np.testing.assert_array_equal(got.tokens_BxN, want.tokens_BxN)
  np.testing.assert_array_equal(got.mask_BxN, want.mask_BxN)
  np.testing.assert_array_equal(got.finished_B, want.finished_B)
  np.testing.assert_allclose(got.logps_BxN, want.logps_BxN, **LOGP_TOL)


def test_schedule_by_hand():
  # Rooms ceil(n/8), ceil(n/4), ceil(n/2), n new tokens, deduplicated, after the prompt.
  assert bucket_lengths(64, 128) == (80, 96, 128, 192)
  assert bucket_lengths(7, 16) == (9, 11, 15, 23)
  assert bucket_lengths(5, 3) == (6, 7, 8)  # rooms 1, 1, 2, 3
  assert bucket_lengths(5, 1) == (6,)
  # The samplers' default: buckets from MIN_BUCKETED_NEW_TOKENS new tokens on.
  assert decode_cache_lengths(64, 255) == (319,)
  assert decode_cache_lengths(64, 256) == (96, 128, 192, 320)


@pytest.mark.parametrize("p", [1, 7, 64])
def test_schedule_properties(p):
  for n in range(1, 300):
    lengths = bucket_lengths(p, n)
    rooms = [length - p for length in lengths]
    assert 1 <= len(lengths) <= 4 and rooms[0] >= 1 and lengths[-1] == p + n
    assert all(a < b <= 2 * a for a, b in zip(rooms, rooms[1:]))  # a bucket at most doubles
    # Slots attended over the loop: each bucket's steps times its length.
    attended = sum((r - r_prev) * (p + r) for r_prev, r in zip([0] + rooms, rooms))
    if n % 8 == 0:  # exact rooms n/8 ... n: the docstring's P·n + (43/64)·n²
      assert attended == p * n + 43 * n * n // 64
    assert attended <= p * n + n * n


@pytest.mark.parametrize("kind", KINDS)
def test_sample_equals_one_cache_and_naive(model, kind):
  graphdef, params = model
  cfg = scfg(kind)
  got = _np(sample(graphdef, params, PROMPTS, VALID, KEY, cfg=cfg))
  assert got.mask_BxN.all()  # no EOS: every row crosses all four buckets
  assert_same_samples(got, _np(sample(graphdef, params, PROMPTS, VALID, KEY, cfg=cfg,
                                      cache_lengths=ONE_CACHE)))
  assert_same_samples(got, _np(sample_naive(graphdef, params, PROMPTS, VALID, KEY, cfg=cfg)))


def test_a_bucket_per_step_equals_one_cache(model):
  """The finest schedule: the cache grows by one slot before every step."""
  graphdef, params = model
  got = sample(graphdef, params, PROMPTS, VALID, KEY, cfg=scfg(),
               cache_lengths=tuple(range(P + 1, P + N + 1)))
  assert_same_samples(_np(got), _np(sample(graphdef, params, PROMPTS, VALID, KEY, cfg=scfg(),
                                            cache_lengths=ONE_CACHE)))


def _eos_ending_rows_in_different_buckets(tokens_BxN):
  """A token whose first occurrences end rows in the most distinct buckets: with the same
  key a run with that EOS follows the EOS-free run up to each row's first EOS."""
  bucket_of_step = np.searchsorted(np.asarray(LENGTHS) - P, np.arange(N), side="right")
  best, best_buckets = None, set()
  for token in np.unique(tokens_BxN):
    buckets = {bucket_of_step[np.flatnonzero(row == token)[0]]
               for row in tokens_BxN if token in row}
    if len(buckets) > len(best_buckets):
      best, best_buckets = int(token), buckets
  return best, best_buckets


@pytest.mark.parametrize("kind", ["t1", "greedy"])
def test_eos_in_different_buckets(model, kind):
  graphdef, params = model
  free = _np(sample(graphdef, params, PROMPTS, VALID, KEY, cfg=scfg(kind)))
  eos, buckets = _eos_ending_rows_in_different_buckets(free.tokens_BxN)
  assert len(buckets) >= 2, free.tokens_BxN
  cfg = scfg(kind, eos=eos)
  got = _np(sample(graphdef, params, PROMPTS, VALID, KEY, cfg=cfg))
  assert got.finished_B.any() and not got.mask_BxN.all()
  assert_same_samples(got, _np(sample(graphdef, params, PROMPTS, VALID, KEY, cfg=cfg,
                                      cache_lengths=ONE_CACHE)))
  assert_same_samples(got, _np(sample_naive(graphdef, params, PROMPTS, VALID, KEY, cfg=cfg)))


def test_all_rows_done_in_the_first_bucket(model):
  """Every row emits EOS at step 0: the later buckets' loops must not run a step."""
  graphdef, params = model
  first = _np(sample(graphdef, params, PROMPTS[:1], VALID[:1], KEY, cfg=scfg("greedy")))
  cfg = scfg("greedy", eos=int(first.tokens_BxN[0, 0]))
  got = _np(sample(graphdef, params, PROMPTS[:1], VALID[:1], KEY, cfg=cfg))
  np.testing.assert_array_equal(got.mask_BxN[0], np.arange(N) == 0)
  assert_same_samples(got, _np(sample(graphdef, params, PROMPTS[:1], VALID[:1], KEY, cfg=cfg,
                                      cache_lengths=ONE_CACHE)))


@pytest.mark.parametrize("kind", ["t1", "greedy"])
def test_groups_equal_one_cache_and_repeated_prompts(model, kind):
  graphdef, params = model
  g, ids = 3, np.array([5, 0, 2], np.int32)
  cfg = scfg(kind)
  got = _np(sample_groups(graphdef, params, PROMPTS, VALID, KEY, ids, cfg=cfg, group_size=g))
  assert_same_samples(got, _np(sample_groups(graphdef, params, PROMPTS, VALID, KEY, ids, cfg=cfg,
                                             group_size=g, cache_lengths=ONE_CACHE)))
  repeated_ids = (ids[:, None] * g + np.arange(g)).reshape(-1).astype(np.int32)
  want = sample(graphdef, params, np.repeat(PROMPTS, g, 0), np.repeat(VALID, g, 0), KEY,
                repeated_ids, cfg=cfg, cache_lengths=ONE_CACHE)
  assert_same_samples(got, _np(want))


@pytest.mark.parametrize("kind", ["t1", "greedy"])
def test_mixture_equals_one_cache(model, kind):
  graphdef, params = model
  _, ref_params = helpers.make_model(CFG, seed=8, std=0.3)
  coef = jnp.float32(0.3)
  got = _np(sample_mixture(graphdef, params, ref_params, PROMPTS, VALID, KEY, coef,
                           cfg=scfg(kind)))
  want = _np(sample_mixture(graphdef, params, ref_params, PROMPTS, VALID, KEY, coef,
                            cfg=scfg(kind), cache_lengths=ONE_CACHE))
  assert got.mask_BxN.all()
  # The mixture adds one log-softmax over the vocabulary to each model's forward.
  np.testing.assert_array_equal(got.tokens_BxN, want.tokens_BxN)
  np.testing.assert_array_equal(got.mask_BxN, want.mask_BxN)
  np.testing.assert_allclose(got.logps_BxN, want.logps_BxN, **helpers.f32_tol(
      helpers.forward_terms(CFG, seq_len=P + N) + V))


@pytest.mark.parametrize("sampler", ["sample", "sample_groups", "sample_mixture"])
def test_scanned_layers_decode_like_one_cache(sampler):
  """A --scan_layers model (decoding loops over its stacked layers' slices, one cache per
  layer) grows and replicates its caches the same way (tolerance as above: the scanned
  forward is the same computation)."""
  graphdef, params = helpers.make_model(helpers.nano(n_layers=2, scan_layers=True), seed=4,
                                        std=0.3)
  run = {"sample": lambda **kw: sample(graphdef, params, PROMPTS, VALID, KEY, **kw),
         "sample_groups": lambda **kw: sample_groups(graphdef, params, PROMPTS, VALID, KEY,
                                                     group_size=2, **kw),
         "sample_mixture": lambda **kw: sample_mixture(graphdef, params, params, PROMPTS, VALID,
                                                       KEY, jnp.float32(0.5), **kw)}[sampler]
  got, want = _np(run(cfg=scfg())), _np(run(cfg=scfg(), cache_lengths=ONE_CACHE))
  assert got.mask_BxN.all()
  np.testing.assert_array_equal(got.tokens_BxN, want.tokens_BxN)
  # The mixture of a model with itself adds one log-softmax over the vocabulary.
  np.testing.assert_allclose(got.logps_BxN, want.logps_BxN, **helpers.f32_tol(
      helpers.forward_terms(CFG, seq_len=P + N) + V))


def _while_loop_cache_lengths(jaxpr) -> list[set]:
  """For every while_loop carrying KV arrays (B x S x n_kv_heads x dim_per_head), in program
  order: the slot counts S it carries."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "while":
      slots = {v.aval.shape[-3] for v in eqn.params["body_jaxpr"].jaxpr.invars
               if v.aval.ndim >= 4 and v.aval.shape[-2:] == (CFG.n_kv_heads, CFG.dim_per_head)}
      if slots:
        found.append(slots)
      continue
    for value in eqn.params.values():
      sub = getattr(value, "jaxpr", value)
      if hasattr(sub, "eqns"):
        found += _while_loop_cache_lengths(sub)
  return found


@pytest.mark.parametrize("sampler", ["sample", "sample_groups", "sample_mixture"])
def test_one_loop_per_bucket_on_a_cache_of_its_length(model, sampler):
  graphdef, params = model
  cfg = scfg()
  run = {"sample": lambda: sample(graphdef, params, PROMPTS, VALID, KEY, cfg=cfg),
         "sample_groups": lambda: sample_groups(graphdef, params, PROMPTS, VALID, KEY, cfg=cfg,
                                                group_size=2),
         "sample_mixture": lambda: sample_mixture(graphdef, params, params, PROMPTS, VALID, KEY,
                                                  jnp.float32(0.5), cfg=cfg)}[sampler]
  assert _while_loop_cache_lengths(jax.make_jaxpr(run)().jaxpr) == [{s} for s in LENGTHS]


def test_compiles_once_per_shape(model):
  graphdef, params = model
  b, p, n = 2, 5, 12  # a shape no other test compiles
  cfg = scfg("t1", n=n)
  prompts = [rng.integers(1, V, (b, p)).astype(np.int32) for _ in range(3)]
  valid = np.ones((b, p), bool)
  others = [jax.tree.map(lambda x, s=s: x * (1 + 0.01 * s), params) for s in range(3)]
  keys = [jax.random.key(s) for s in range(3)]
  with CompileCounter() as counter:
    jax.block_until_ready(sample(graphdef, others[0], prompts[0], valid, keys[0], cfg=cfg))
    assert counter.count == 1, counter.names  # one program: every bucket's loop inside it
    counter.reset()
    for i in (1, 2):
      jax.block_until_ready(sample(graphdef, others[i], prompts[i], valid, keys[i], cfg=cfg))
    assert counter.count == 0, counter.names


def test_rejects_bad_cache_lengths(model):
  graphdef, params = model
  for bad in [(P, P + N), (P + 4, P + N - 1), (P + 4, P + 4, P + N), (P + 8, P + 4, P + N), ()]:
    with pytest.raises(ValueError, match="cache_lengths"):
      sample(graphdef, params, PROMPTS, VALID, KEY, cfg=scfg(), cache_lengths=bad)


def test_repeat_rows_replicates_every_layers_rows():
  """sample_groups replicates a prompt's cache rows in every layer's B x S x K x H cache."""
  cache = init_cache(CFG, 3, 5)
  per_layer = cache._replace(
      layers=tuple(LayerCache(*(jnp.asarray(rng.normal(size=c.k_BxSxKxH.shape), jnp.float32)
                                for _ in range(2))) for c in cache.layers),
      valid_BxS=jnp.asarray(rng.random((3, 5)) < 0.5))
  rows = np.repeat(np.arange(3), 2)
  got_cache = _repeat_rows(per_layer, 2)
  for got, want in zip(got_cache.layers, per_layer.layers):
    for got_x, want_x in zip(got, want):
      np.testing.assert_array_equal(got_x, np.asarray(want_x)[rows])
  np.testing.assert_array_equal(got_cache.valid_BxS, np.asarray(per_layer.valid_BxS)[rows])
