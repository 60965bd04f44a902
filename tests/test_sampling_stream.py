"""sample_stream (continuous batching) against `sample` of every prompt in one batch.

Prompt q decoded in any row, after any other prompts, must draw what `sample` draws for it
with the same key and row id: the same key schedule, cache layout and attention. Tokens, masks
and finished flags are compared exactly; log-probs to helpers.f32_tol of the forward (the
per-row cache write and batch-mates change no reduction, but XLA may block a batch of other
rows differently).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from rlhf_jax.compile_count import CompileCounter
from rlhf_jax.sampling import SamplingConfig, sample
from rlhf_jax.sampling_stream import sample_stream

CFG = helpers.nano()
N_PROMPTS, P, NEW = 7, 6, 9


@pytest.fixture(scope="module")
def setup():
  graphdef, params = helpers.make_model(CFG, seed=11, std=0.5)
  rng = np.random.default_rng(3)
  tokens = rng.integers(3, CFG.vocab_size, (N_PROMPTS, P)).astype(np.int32)
  valid = np.ones((N_PROMPTS, P), bool)
  for q in range(N_PROMPTS):  # left padding of 0..3 tokens
    valid[q, :q % 4] = False
  return graphdef, params, jnp.asarray(tokens), jnp.asarray(valid)


def _eos_that_ends_rows_early(setup, cfg, key, ids):
  """An EOS id that `sample` emits mid-way: its token at step 2 of prompt 0 (the draws up to
  a row's first EOS do not depend on which id is EOS)."""
  graphdef, params, tokens, valid = setup
  out = sample(graphdef, params, tokens, valid, key, ids, cfg=cfg)
  return int(out.tokens_BxN[0, 2])


@pytest.mark.parametrize("greedy", [False, True])
def test_every_prompt_gets_its_own_samples_whatever_the_rows(setup, greedy):
  graphdef, params, tokens, valid = setup
  base = SamplingConfig(max_new_tokens=NEW, eos_id=-1, pad_id=0, greedy=greedy,
                        temperature=1.0)
  ids = jnp.arange(100, 100 + N_PROMPTS, dtype=jnp.int32)
  eos = _eos_that_ends_rows_early(setup, base, jax.random.key(1), ids)
  cfg = SamplingConfig(max_new_tokens=NEW, eos_id=eos, pad_id=0, greedy=greedy)
  want = sample(graphdef, params, tokens, valid, jax.random.key(1), ids, cfg=cfg)
  lengths = np.asarray(want.mask_BxN).sum(1)
  assert lengths.min() < NEW and np.asarray(want.finished_B).any()  # rows end early
  for rows in (1, 3, N_PROMPTS):
    got = sample_stream(graphdef, params, tokens, valid, jax.random.key(1), ids, cfg=cfg,
                        rows=rows)
    np.testing.assert_array_equal(got.tokens_BxN, want.tokens_BxN)
    np.testing.assert_array_equal(got.mask_BxN, want.mask_BxN)
    np.testing.assert_array_equal(got.finished_B, want.finished_B)
    np.testing.assert_allclose(got.logps_BxN, want.logps_BxN,
                               **helpers.f32_tol(helpers.forward_terms(CFG, P + NEW)))


def test_one_compile_for_every_call_of_a_shape(setup):
  graphdef, params, tokens, valid = setup
  cfg = SamplingConfig(max_new_tokens=NEW, eos_id=5, pad_id=0)
  other, key = jnp.asarray(np.asarray(tokens)[::-1]), jax.random.key(7)  # made before counting
  sample_stream(graphdef, params, tokens, valid, jax.random.key(0), cfg=cfg, rows=3)
  with CompileCounter() as counter:
    sample_stream(graphdef, params, other, valid, key, cfg=cfg, rows=3)
  assert counter.count == 0


def test_per_row_cache_writes_one_token_per_row():
  from rlhf_jax.models.layers import write_slots
  cache = jnp.zeros((2, 4, 1, 1))
  new = jnp.ones((2, 1, 1, 1)) * jnp.asarray([1.0, 2.0])[:, None, None, None]
  out = write_slots(cache, new, jnp.asarray([0, 3]))
  np.testing.assert_array_equal(out[:, :, 0, 0], [[1, 0, 0, 0], [0, 0, 0, 2]])
  with pytest.raises(ValueError, match="one token per row"):
    write_slots(cache, jnp.ones((2, 2, 1, 1)), jnp.asarray([0, 1]))
