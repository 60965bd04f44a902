"""Scorers (rlhf_jax.rl.scorers): the verifier on a hand table, the length / truncation
penalties against a hand computation, and the reward-model scorer against
rlhf_jax.train.reward.ensemble_scores and a NumPy float64 aggregation of the member scores."""
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from rlhf_jax.models.transformer import ScalarHeadModel
from rlhf_jax.rl import rollout as rollout_lib, scorers
from rlhf_jax.train import reward
from rlhf_jax.worlds import arithmetic

CFG = helpers.nano(n_layers=1)
B, P, N = 5, 3, 4


def hand_rollout(seed=0):
  """B rows: left-padded prompts of lengths 1..P, right-padded responses of lengths 1..N;
  the rows whose response fills all N slots are the truncated ones."""
  rng = np.random.default_rng(seed)
  p_len = np.array([3, 1, 2, 3, 2])
  r_len = np.array([4, 1, 3, 4, 2])
  prompt = np.arange(P)[None] >= (P - p_len)[:, None]
  resp = np.arange(N)[None] < r_len[:, None]
  valid = np.concatenate([prompt, resp], 1)
  mask = np.concatenate([np.zeros_like(prompt), resp], 1).astype(np.float32)
  tokens = np.where(valid, rng.integers(1, 250, (B, P + N)), 0).astype(np.int32)
  z = np.zeros((B, P + N), np.float32)
  return rollout_lib.Rollout(tokens, valid, mask, z, z, None, None, r_len == N,
                             np.zeros((B, N), np.float32))


def text_experience(prompts, responses):
  return rollout_lib.Experience(None, list(prompts), list(responses), 1)


def test_verifier_hand_table():
  answers = {"2+3=": "5", "7*6=": "42"}
  table = [("2+3=", "5", 1.0), ("2+3=", " 5 ", 1.0),  # surrounding whitespace is stripped
           ("2+3=", "6", 0.0), ("2+3=", "55", 0.0), ("2+3=", "5 1", 0.0),  # near misses
           ("2+3=", "", 0.0), ("7*6=", "42", 1.0), ("7*6=", "5", 0.0),  # another prompt's answer
           ("7*6=", "4 2", 0.0)]
  exp = text_experience([p for p, _, _ in table], [y for _, y, _ in table])
  got = scorers.VerifierScorer(arithmetic.verify, answers)(exp)
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, [r for _, _, r in table])
  with pytest.raises(KeyError):  # a prompt without an answer is an error, not a 0
    scorers.VerifierScorer(arithmetic.verify, answers)(text_experience(["1+1="], ["2"]))


@pytest.mark.parametrize("penalty, coef", [(0.5, 0.0), (0.0, 0.25), (0.7, 0.1), (0.0, 0.0)])
def test_penalised_matches_hand_computation(penalty, coef):
  ro = hand_rollout()
  base = np.array([1.0, -0.5, 2.0, 0.25, 0.0], np.float32)
  exp = rollout_lib.Experience(ro, [""] * B, [""] * B, 1)
  got = np.asarray(scorers.Penalised(lambda e: base, truncation_penalty=penalty,
                                     length_coef=coef)(exp))
  # Rows 0 and 3 are truncated (4 of 4 tokens); lengths 4, 1, 3, 4, 2.
  want = (base.astype(np.float64) - penalty * np.array([1, 0, 0, 1, 0])
          - coef * np.array([4, 1, 3, 4, 2]))
  # Two subtractions and an N-term length sum, at the size of the largest term.
  np.testing.assert_allclose(got, want, **helpers.f32_tol(N + 2, scale=4.0))
  if penalty == coef == 0.0:
    np.testing.assert_array_equal(got, base)


@pytest.mark.parametrize("kw", [dict(truncation_penalty=-0.1), dict(length_coef=-1e-3),
                                dict(truncation_penalty=-1.0, length_coef=-1.0)])
def test_penalised_refuses_negative_coefficients(kw):
  with pytest.raises(ValueError, match="must be >= 0"):
    scorers.Penalised(lambda e: np.zeros(B, np.float32), **kw)


@pytest.fixture(scope="module")
def members():
  g, p0 = helpers.init_module(lambda rngs: ScalarHeadModel(CFG, rngs=rngs), seed=0)
  others = [helpers.init_module(lambda rngs: ScalarHeadModel(CFG, rngs=rngs), seed=s)[1]
            for s in (1, 2)]
  return g, [p0] + others


def np_aggregate(r_ExB, aggregate, uwo_coef=0.0, stats=None):
  r = np.asarray(r_ExB, np.float64)
  if stats is not None:
    mean, std = (np.asarray(s, np.float64) for s in stats)
    r = (r - mean[:, None]) / (std[:, None] + 1e-6)
  return {"mean": r.mean(0), "wco": r.min(0), "uwo": r.mean(0) - uwo_coef * r.var(0)}[aggregate]


@pytest.mark.parametrize("n_members, aggregate, uwo_coef, normalised", [
    (1, "mean", 0.0, False), (1, "mean", 0.0, True), (3, "mean", 0.0, False),
    (3, "wco", 0.0, True), (3, "uwo", 1.5, False), (3, "uwo", 1.5, True)])
def test_reward_model_scorer_equals_ensemble_scores(members, n_members, aggregate, uwo_coef,
                                                    normalised):
  g, params = members[0], members[1][:n_members]
  ro = hand_rollout(1)
  stats = None
  if normalised:
    stats = (np.linspace(-0.3, 0.4, n_members).astype(np.float32),
             np.linspace(0.5, 2.0, n_members).astype(np.float32))
  scorer = scorers.RewardModelScorer(g, params, aggregate, uwo_coef,
                                     *(stats if stats else (None, None)))
  got = np.asarray(scorer(rollout_lib.Experience(ro, [""] * B, [""] * B, 1)))
  direct = reward.ensemble_scores(g, params, jnp.asarray(ro.tokens_BxT),
                                  jnp.asarray(ro.valid_BxT), aggregate=aggregate,
                                  uwo_coef=uwo_coef, norm_stats=stats)
  np.testing.assert_array_equal(got, np.asarray(direct))
  # Independently: each member's score at the row's last real token (the last response
  # token: prompt and response are both attended), then the aggregation in float64.
  score = reward.score_fn(g)
  r_ExB = np.stack([np.asarray(score(p, ro.tokens_BxT, ro.valid_BxT)) for p in params])
  want = np_aggregate(r_ExB, aggregate, uwo_coef, stats)
  # (r - mean) / (std + eps) and an E-member mean / variance: a few roundings per member
  # at the size of the normalised scores.
  scale = np.abs(want).max() + np.abs(r_ExB).max() / (0.5 if normalised else 1.0)
  np.testing.assert_allclose(got, want, **helpers.f32_tol(4 * n_members + 4, scale=scale))
  # The scores depend on the prompt: scoring the response alone differs.
  resp_only = score(params[0], ro.tokens_BxT, np.asarray(ro.mask_BxT) > 0)
  assert np.abs(np.asarray(resp_only) - r_ExB[0]).max() > 1e-3
