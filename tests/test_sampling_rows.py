"""Per-example randomness: a temperature sample depends on (key, its row id) and its prompt
only, not on its batch-mates, its position in the batch, the batch size or padding; sample j of
a group of prompt n draws as row id n * G + j."""
import jax
import numpy as np

import helpers
from rlhf_jax.sampling import SamplingConfig, sample, sample_groups

CFG = helpers.nano(n_layers=1)
V = CFG.vocab_size
PAD, NEVER = 0, V  # an EOS id outside the vocabulary: every row samples N tokens
N, P = 8, 6
CFG_T = SamplingConfig(max_new_tokens=N, pad_id=PAD, eos_id=NEVER, temperature=1.3)
KEY = jax.random.key(7)
rng = np.random.default_rng(1)
PROMPTS = rng.integers(1, V, (5, P)).astype(np.int32)
VALID = np.ones((5, P), bool)


def _tokens(graphdef, params, rows, ids, fn=sample, **kw):
  out = fn(graphdef, params, PROMPTS[rows], VALID[rows], KEY, np.asarray(ids, np.int32),
           cfg=CFG_T, **kw)
  return np.asarray(out.tokens_BxN)


def test_a_row_draws_the_same_wherever_it_sits():
  graphdef, params = helpers.make_model(CFG, seed=3, std=0.3)
  alone = _tokens(graphdef, params, [2], [17])[0]
  # Other batch-mates, another position, another batch size: the same draws.
  np.testing.assert_array_equal(_tokens(graphdef, params, [0, 2], [4, 17])[1], alone)
  np.testing.assert_array_equal(_tokens(graphdef, params, [2, 1, 3, 4], [17, 0, 1, 2])[0],
                                alone)
  # The id decides: the same prompt as another row id draws otherwise (so the equalities
  # above are not vacuous: with 264 tokens and temperature 1.3, 8 equal draws by chance are
  # out of reach).
  assert not np.array_equal(_tokens(graphdef, params, [2], [18])[0], alone)


def test_group_sample_j_of_prompt_n_draws_as_row_n_times_g_plus_j():
  graphdef, params = helpers.make_model(CFG, seed=3, std=0.3)
  g = 3
  groups = _tokens(graphdef, params, [1, 4], [5, 2], fn=sample_groups, group_size=g)
  for i, (row, n) in enumerate(((1, 5), (4, 2))):
    for j in range(g):
      np.testing.assert_array_equal(groups[i * g + j],
                                    _tokens(graphdef, params, [row], [n * g + j])[0])
