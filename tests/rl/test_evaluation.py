"""Held-out evaluation (rlhf_jax.rl.evaluation): sample_heldout's fill-and-trim batching with
fixed keys (paired evaluations), verifiable_metrics on a hand-built Heldout against hand
values, and mean_se against NumPy."""
import math

import jax
import numpy as np
import pytest

import helpers
from rlhf_jax.compile_count import CompileCounter
from rlhf_jax.data.tokenizer import ByteTokenizer
from rlhf_jax.rl import evaluation, rollout as rollout_lib
from rlhf_jax.rl.rollout import Experience, Rollout, RolloutStage
from rlhf_jax.sampling import SamplingConfig
from rlhf_jax.worlds import arithmetic

CFG = helpers.nano(n_layers=1)
TOK = ByteTokenizer()
PROMPT_LEN, N, G, BS = 6, 5, 2, 2
PROMPTS = ["1+2=", "3*4=", "9-5=", "7+7=", "2*8="]  # 5: not a multiple of BS


def length_scorer(exp):
  return np.array([len(y) for y in exp.responses], np.float32)


@pytest.fixture(scope="module")
def stage_models():
  g, policy = helpers.make_model(CFG, seed=0, std=0.3)
  _, ref = helpers.make_model(CFG, seed=100, std=0.3)
  stage = RolloutStage(g, SamplingConfig(max_new_tokens=N, eos_id=TOK.eos_id,
                                         pad_id=TOK.pad_id), PROMPT_LEN, group_size=G)
  return stage, policy, ref


def heldout(stage_models, prompts, key=7, batch_size=BS):
  stage, policy, ref = stage_models
  return evaluation.sample_heldout(stage, policy, ref, None, prompts, batch_size=batch_size,
                                   key=jax.random.key(key), scorer=length_scorer)


def rows_of(h, lo, hi):
  ro = h.experience.rollout
  return [np.asarray(getattr(ro, f))[lo:hi] for f in ("tokens_BxT", "mask_BxT",
                                                         "old_logps_BxT", "ref_logps_BxT")]


def test_sample_heldout_fills_and_trims_in_prompt_order(stage_models):
  h = heldout(stage_models, PROMPTS)
  exp, rows = h.experience, len(PROMPTS) * G
  assert exp.group_size == G and exp.rows == rows
  assert exp.prompts == [p for p in PROMPTS for _ in range(G)]
  for f in ("tokens_BxT", "valid_BxT", "mask_BxT", "old_logps_BxT", "ref_logps_BxT",
            "truncated_B", "sampler_logps_BxN"):
    assert isinstance(getattr(exp.rollout, f), np.ndarray) and len(getattr(exp.rollout, f)) == rows
  assert exp.rollout.values_BxT is None and exp.rollout.bootstrap_values_B is None
  # Prompt i's rows hold prompt i's tokens.
  toks, _ = rollout_lib.encode_prompts(PROMPTS, PROMPT_LEN)
  np.testing.assert_array_equal(exp.rollout.tokens_BxT[:, :PROMPT_LEN], np.repeat(toks, G, 0))
  # Rewards and KL belong to the kept rows.
  np.testing.assert_array_equal(exp.rewards_B, length_scorer(exp))
  ro = exp.rollout  # the k1 estimate of each sequence, in float64 from the kept rows
  want_kl = np.sum((ro.old_logps_BxT.astype(np.float64) - ro.ref_logps_BxT) * ro.mask_BxT, 1)
  assert h.kl_B.shape == (rows,) and np.abs(want_kl).max() > 1e-3
  np.testing.assert_allclose(h.kl_B, want_kl, **helpers.f32_tol(
      2 * (PROMPT_LEN + N), scale=np.abs(exp.rollout.old_logps_BxT).max()))


def test_sample_heldout_keys_are_fixed_per_prompt_offset(stage_models):
  full = heldout(stage_models, PROMPTS)
  # Batches at the same offsets use the same keys: the first two batches equal those of a
  # run over the first 4 prompts, and the first batch equals a run over the first 2.
  for k in (2, 4):
    part = heldout(stage_models, PROMPTS[:k])
    for a, b in zip(rows_of(full, 0, k * G), rows_of(part, 0, k * G)):
      np.testing.assert_array_equal(a, b)
    assert full.experience.responses[:k * G] == part.experience.responses
  # The filled last batch ([p4, p0] at offset 4) is that of an explicit 6-prompt list.
  six = heldout(stage_models, PROMPTS + PROMPTS[:1])
  for a, b in zip(rows_of(full, 4 * G, 5 * G), rows_of(six, 4 * G, 5 * G)):
    np.testing.assert_array_equal(a, b)
  # Another key samples other responses (the equalities above are not vacuous).
  other = heldout(stage_models, PROMPTS, key=8)
  assert not np.array_equal(rows_of(other, 0, 10)[0], rows_of(full, 0, 10)[0])


def test_sample_heldout_again_compiles_nothing(stage_models):
  heldout(stage_models, PROMPTS)
  with CompileCounter() as cc:
    heldout(stage_models, PROMPTS, key=9)
  assert cc.count == 0, cc.names


class ChunkSpy:
  """A stage that records the prompt count of each batch it is asked to sample."""
  group_size = 1

  def __init__(self):
    self.sizes = []

  def experience(self, policy, ref, value, prompts, key, first_id=0):
    self.sizes.append(len(prompts))
    b, z = len(prompts), np.zeros((len(prompts), 2), np.float32)
    ro = Rollout(z.astype(np.int32), z > 0, z, z, None, None, None, np.zeros(b, bool), z)
    return Experience(ro, list(prompts), [""] * b, 1)


@pytest.mark.parametrize("n_prompts, batch_size", [(5, 2), (3, 4), (3, 8), (1, 4)])
def test_every_batch_has_the_compiled_size(n_prompts, batch_size):
  # Fewer prompts than half a batch too (3 at batch 8): the filling cycles over the prompts.
  spy = ChunkSpy()
  h = evaluation.sample_heldout(spy, None, None, None, [f"q{i}" for i in range(n_prompts)],
                                batch_size=batch_size, key=jax.random.key(0))
  assert spy.sizes == [batch_size] * math.ceil(n_prompts / batch_size)
  assert h.experience.prompts == [f"q{i}" for i in range(n_prompts)]


def hand_heldout():
  """3 prompts x 4 samples: prompt 0 right 3 times (first field), prompt 1 never, prompt 2
  always. Lengths, truncation and KL by hand."""
  responses = ["5", "5 12", "6", " 5",  "8", "", "x", "70",  "12", "12", "12 3", "12"]
  b, t = 12, 8
  lengths = np.array([1, 3, 1, 2, 1, 1, 1, 2, 2, 2, 4, 2])
  mask = np.concatenate([np.zeros((b, 3)), np.arange(t - 3)[None] < lengths[:, None]], 1)
  z = np.zeros((b, t), np.float32)
  trunc = np.zeros(b, bool)
  trunc[[1, 10]] = True
  ro = Rollout(z.astype(np.int32), mask > 0, mask.astype(np.float32), z, z, None, None, trunc,
               z[:, 3:])
  rewards = np.array([1, 1, 0, 1, 0, 0, 0, 0, 1, 1, 1, 1], np.float32)
  kl = np.array([0.1, 0.3, 0.2, 0.0, 0.5, 0.1, 0.2, 0.6, 0.0, 0.1, 0.4, 0.3], np.float32)
  exp = Experience(ro, [q for q in ("2+3=", "1+6=", "3*4=") for _ in range(4)], responses, 4,
                   rewards)
  return evaluation.Heldout(exp, kl), ["5", "7", "12"], kl, lengths


def test_verifiable_metrics_hand_values():
  held, answers, kl, lengths = hand_heldout()
  greedy = ["5 5", "8", "12"]  # right, wrong, right
  m = evaluation.verifiable_metrics(held, greedy, answers, arithmetic.verify, ks=(1, 2, 3))
  per_prompt = np.array([3 / 4, 0, 1])
  assert m["accuracy_greedy"] == pytest.approx(2 / 3)
  assert m["accuracy_temp1"] == pytest.approx(7 / 12)
  assert m["accuracy_temp1_se"] == pytest.approx(np.std(per_prompt, ddof=1) / math.sqrt(3))
  # pass@k = 1 - C(n - c, k) / C(n, k) with n = 4, c = 3, 0, 4.
  assert m["pass_at_1"] == pytest.approx(7 / 12)
  assert m["pass_at_2"] == pytest.approx((1 + 0 + 1) / 3)  # C(1, 2) = 0
  assert m["pass_at_3"] == pytest.approx(2 / 3)
  assert m["reward_mean"] == pytest.approx(7 / 12)
  assert m["reward_std"] == pytest.approx(math.sqrt(7 / 12 * 5 / 12))
  assert m["zero_variance_frac"] == pytest.approx(2 / 3)  # prompts 1 and 2
  assert m["length"] == pytest.approx(lengths.mean())
  assert m["truncated_frac"] == pytest.approx(2 / 12)
  k64 = kl.astype(np.float64)
  assert m["kl"] == pytest.approx(k64.mean(), rel=1e-6)
  assert m["kl_se"] == pytest.approx(k64.std(ddof=1) / math.sqrt(12), rel=1e-6)


def test_mean_se_matches_numpy():
  x = np.random.default_rng(0).normal(2.0, 3.0, 17)
  mean, se = evaluation.mean_se(x)
  assert mean == pytest.approx(x.mean(), rel=1e-12)
  assert se == pytest.approx(x.std(ddof=1) / math.sqrt(17), rel=1e-12)
  assert evaluation.mean_se([4.5]) == (4.5, 0.0)
  assert evaluation.mean_se([1, 3]) == (2.0, pytest.approx(1.0))  # std ddof 1 = sqrt 2
