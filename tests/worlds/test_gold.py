"""Gold-preference world: hand-checked gold reward, facet shapes, splits, simulated raters."""
import itertools

import numpy as np
import pytest

from rlhf_jax.worlds import gold as g
from rlhf_jax.worlds import raters

DEFAULT = g.GoldConfig()


@pytest.fixture(scope="module")
def default_records():
  return g.records(DEFAULT)


@pytest.fixture(scope="module")
def sft_rewards(default_records):
  sft = default_records["sft"]["train"]
  return g.gold_rewards([r["prompt"] for r in sft], [r["response"] for r in sft])


def test_worked_example_from_the_docstring():
  f = g.facets("describe the cat.", "the cat is soft. the cat is soft.")
  # 8 words; trigrams: the-cat-is, cat-is-soft, is-soft-the, soft-the-cat, the-cat-is,
  # cat-is-soft -> 6 total, 4 unique, d = 1/3; 8 words below the 16-word peak ->
  # length 1 - ((8 - 16)/16)^2 = 3/4.
  assert f == pytest.approx({"relevance": 1.0, "period": 1.0, "off_vocabulary": 0.0,
                             "length": 3 / 4, "repetition": 1 / 9, "words": 8.0})
  # 1.0 + 0.5 + 1.5 * 3/4 - 3.0 * 1/9 = 1.5 + 1.125 - 0.3333 = 2.2917
  assert g.gold_reward("describe the cat.", "the cat is soft. the cat is soft.") == pytest.approx(
      1.5 + 1.125 - 1 / 3)


@pytest.mark.parametrize("prompt,response,expected", [
    # Empty: no topic, no period, off_vocabulary 1 by definition -> -1.0.
    ("describe the cat.", "", -1.0),
    # Off topic, no period, 4 distinct words: length 1 - (12/16)^2 = 7/16; 1.5 * 7/16.
    ("describe the cat.", "the dog is soft", 1.5 * 7 / 16),
    # 5 words, "um" off-vocabulary (1/5): length 1 - (11/16)^2 = 135/256;
    # 1 + 0.5 - 0.2 + 1.5 * 135/256 = 1.3 + 0.791016 = 2.091016.
    ("what is the owl like?", "um the owl is big.", 1.3 + 1.5 * 135 / 256),
    # "category" is not the word "cat" (relevance 0) and is off-vocabulary (1/4 of 4 words):
    # 0.5 - 0.25 + 1.5 * 7/16 = 0.90625.
    ("describe the cat.", "the category is big.", 0.25 + 1.5 * 7 / 16),
])
def test_hand_checked_rewards(prompt, response, expected):
  assert g.gold_reward(prompt, response) == pytest.approx(expected)


def test_length_facet_rises_then_falls():
  # Slow rise (width 16 below the peak), fast fall (width 8 above it).
  assert [g.length_score(n) for n in (0, 8, 16, 20, 24, 28)] == pytest.approx(
      [0.0, 0.75, 1.0, 0.75, 0.0, -1.25])
  # Texts of distinct in-lexicon words (no repeated trigram): only length changes with n.
  filler = sorted(g.LEXICON - {"the", "cat"})
  rewards = [g.gold_reward("describe the cat.", " ".join(["the", "cat"] + filler[:n - 2]) + ".")
             for n in range(4, 61, 4)]
  peak = int(np.argmax(rewards))
  assert 4 + 4 * peak == g.LENGTH_PEAK
  assert np.all(np.diff(rewards[:peak + 1]) > 0) and np.all(np.diff(rewards[peak:]) < 0)


def test_repetition_penalty_is_mild_then_severe():
  penalties = [-g.WEIGHTS["repetition"] * g.facets("describe the cat.", "the cat is soft. " * k)
               ["repetition"] for k in range(1, 11)]
  assert penalties[0] == 0.0 and np.all(np.diff(penalties) > 0)
  assert penalties[1] < 0.35 < 2.0 < penalties[-1]


def test_relevance_and_topic():
  assert g.topic_of("what is the owl like?") == "owl"
  assert g.topic_of("hello there") is None
  assert g.facets("describe the owl.", "it is very dark. the owl sleeps.")["relevance"] == 1.0
  assert g.facets("describe the owl.", "the fox sleeps.")["relevance"] == 0.0
  assert g.facets("hello there", "the fox sleeps.")["relevance"] == 0.0


def test_batch_matches_single_and_validates():
  prompts, responses = ["describe the cat.", "describe the sea."], ["the cat is soft.", "um"]
  batch = g.gold_rewards(prompts, responses)
  assert batch.dtype == np.float64 and batch.shape == (2,)
  assert batch.tolist() == [g.gold_reward(p, r) for p, r in zip(prompts, responses)]
  assert g.gold_rewards([], []).shape == (0,)
  with pytest.raises(ValueError, match="prompts"):
    g.gold_rewards(prompts, responses[:1])


def test_split_is_disjoint_complete_and_deterministic():
  split = g.split_prompts(DEFAULT)
  train, test = set(split["train"]), set(split["test"])
  assert not train & test and train | test == set(g.all_prompts())
  assert split == g.split_prompts(g.GoldConfig())
  assert split != g.split_prompts(g.GoldConfig(seed=1))
  assert abs(len(test) / len(g.all_prompts()) - DEFAULT.test_fraction) < 0.08


def test_records_shape_splits_and_determinism(default_records):
  assert {k: sorted(v) for k, v in default_records.items()} == {
      "pretrain": ["train"], "sft": ["test", "train"]}
  assert len(default_records["pretrain"]["train"]) == DEFAULT.num_pretrain_texts
  assert all(set(r) == {"text"} for r in default_records["pretrain"]["train"])
  split = g.split_prompts(DEFAULT)
  sft, test = default_records["sft"]["train"], default_records["sft"]["test"]
  assert len(sft) == DEFAULT.num_sft and {r["prompt"] for r in sft} <= set(split["train"])
  test_prompts = [r["prompt"] for r in test]
  assert len(set(test_prompts)) == len(test_prompts) and set(test_prompts) <= set(split["test"])
  assert all(set(r) == {"prompt", "response"} for r in sft + test)
  assert g.records(DEFAULT) == default_records
  assert g.records(g.GoldConfig(seed=1))["sft"]["train"] != sft


def test_sft_responses_vary_and_sit_below_the_length_peak(default_records, sft_rewards):
  sft = default_records["sft"]["train"]
  lengths = np.array([len(g.words(r["response"])) for r in sft])
  assert len({r["response"] for r in sft}) > 0.9 * len(sft)
  assert lengths.min() <= 5 and np.percentile(lengths, 95) < g.LENGTH_PEAK
  assert sft_rewards.std() > 0.3 and sft_rewards.min() < 1.0 and sft_rewards.max() > 2.5
  # Within SFT, longer looks better: what a proxy learns from SFT comparisons.
  assert np.corrcoef(lengths, sft_rewards)[0, 1] > 0.3
  # Beyond it, it is not: a looped 48-word answer loses to the median SFT answer.
  looped = "the cat is soft. " * 12
  assert len(g.words(looped)) > lengths.max()
  assert g.gold_reward("describe the cat.", looped) < np.median(sft_rewards)


def test_config_validation():
  with pytest.raises(ValueError, match="test_fraction"):
    g.GoldConfig(test_fraction=1.0)
  with pytest.raises(ValueError, match="p_repeat"):
    g.GoldConfig(p_repeat=1.5)


# ---------------------------------------------------------------- raters


def test_plackett_luce_frequencies_match_closed_form():
  rewards, temperature, n = np.array([1.0, 0.3, -0.5]), 0.7, 20_000
  rankings = raters.sample_rankings(np.tile(rewards, (n, 1)), temperature,
                                    np.random.default_rng(0))
  perms = list(itertools.permutations(range(3)))
  probs = np.array([raters.ranking_probability(rewards, p, temperature) for p in perms])
  assert probs.sum() == pytest.approx(1.0)
  counts = np.array([np.all(rankings == p, axis=1).sum() for p in perms])
  chi2 = np.sum((counts - n * probs) ** 2 / (n * probs))
  assert chi2 < 20.5  # 99.9% quantile of chi-square with 5 degrees of freedom


def test_two_completions_reduce_to_bradley_terry():
  # Bradley-Terry hand check: r_w = 2.0, r_l = 0.5 -> sigmoid(1.5) = 0.8176 (4 decimals).
  # float64 arithmetic: abs=1e-4 is the rounding of the printed constant.
  assert raters.ranking_probability([2.0, 0.5], [0, 1], 1.0) == pytest.approx(0.8176, abs=1e-4)
  assert raters.preference_probability(1.5, 1.0) == pytest.approx(0.8176, abs=1e-4)
  n, temperature = 20_000, 0.5
  labels = raters.pairwise_labels(np.full(n, 0.4), np.zeros(n), temperature,
                                  np.random.default_rng(1))
  p = 1 / (1 + np.exp(-0.4 / temperature))
  assert abs(labels.mean() - p) < 3 * np.sqrt(p * (1 - p) / n)


def test_temperature_for_agreement_hits_instructgpt(sft_rewards):
  rng = np.random.default_rng(2)
  a, b = rng.choice(sft_rewards, size=(2, 20_000))  # pairs of SFT samples
  temperature = raters.temperature_for_agreement(a - b)
  assert raters.agreement(a - b, temperature) == pytest.approx(0.726, abs=1e-8)
  assert raters.agreement(a - b, 2 * temperature) < 0.726 < raters.agreement(a - b, temperature / 2)
  first = raters.pairwise_labels(a, b, temperature, rng)
  second = raters.pairwise_labels(a, b, temperature, rng)
  realised, se = np.mean(first == second), np.sqrt(0.726 * 0.274 / len(a))
  assert abs(realised - 0.726) < 3 * se


def test_invalid_arguments_raise():
  rng = np.random.default_rng(0)
  for target in (0.5, 1.0, 0.3):
    with pytest.raises(ValueError, match="target"):
      raters.temperature_for_agreement([1.0, -2.0], target=target)
  with pytest.raises(ValueError, match="unreachable"):
    raters.temperature_for_agreement([0.0, 0.0, 1.0], target=0.9)  # ceiling 2/3 + 1/6
  for temperature in (0.0, -1.0):
    with pytest.raises(ValueError, match="temperature"):
      raters.sample_rankings([1.0, 0.0], temperature, rng)
    with pytest.raises(ValueError, match="temperature"):
      raters.agreement([1.0], temperature)
  with pytest.raises(ValueError, match="K >= 2"):
    raters.sample_rankings([[1.0]], 1.0, rng)


def test_build_datasets_materialises_the_records(tmp_path):
  from rlhf_jax.data import builders
  tiny = g.GoldConfig(num_pretrain_texts=20, num_sft=10, num_test=5)
  built = g.build_datasets(tiny, str(tmp_path))
  test = builders.load_split(built["sft"], "test")
  assert sorted(r["prompt"].decode() for r in test) == sorted(
      r["prompt"] for r in g.heldout_records(tiny))
  assert len(builders.load_split(built["pretrain"], "train")) == 20


def test_pretraining_corpus_is_noisier_and_fits_a_128_token_row(default_records):
  pretrain = [r["text"] for r in default_records["pretrain"]["train"]]
  assert len(pretrain) == DEFAULT.num_pretrain_texts
  assert max(len(t.encode()) for t in pretrain) <= g.MAX_PRETRAIN_BYTES == 128 - 2
  sft = default_records["sft"]["train"]
  # Doubled noise rates: more fillers ("um", ...) and missing periods than the SFT set.
  rate = lambda texts, pred: np.mean([pred(t) for t in texts])
  has_filler = lambda t: any(w in g.FILLERS for w in g.words(t))
  assert rate(pretrain, has_filler) > 1.5 * rate([r["response"] for r in sft], has_filler)
  no_period = lambda t: not t.strip().endswith(".")
  assert rate(pretrain, no_period) > 1.5 * rate([r["response"] for r in sft], no_period)
