"""Intransitive world: the game's ground truth (equilibrium by LP, closed form and the tabular
Nash-MD solver; exploitability), style classification, raters, corpora and refusals."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses import nash_md
from rlhf_jax.worlds import intransitive as w

CFG = w.IntransitiveConfig()
P = w.preference_matrix(CFG)
EXAMPLES = ("certainly. the cat is calm.", "oh, the cat? so calm!", "ah, the cat, calm as snow.")


class TestGame:

  def test_matrix_is_the_stated_cycle(self):
    np.testing.assert_allclose(P, [[0.5, 0.8, 0.3], [0.2, 0.5, 0.65], [0.7, 0.35, 0.5]])
    P4 = w.extended_matrix(CFG)
    np.testing.assert_allclose(P4 + P4.T, 1.0)
    np.testing.assert_allclose(P4[w.MALFORMED, :3], CFG.malformed_win)

  def test_lp_equals_closed_form_equals_the_issue_value(self):
    want = np.array([0.15, 0.2, 0.3]) / 0.65
    np.testing.assert_allclose(w.nash_equilibrium(P), want, atol=1e-9)
    np.testing.assert_allclose(w.cyclic_equilibrium(P), want, atol=1e-12)
    # The malformed outcome is dominated: the 4-outcome game has the same equilibrium.
    np.testing.assert_allclose(w.nash_equilibrium(w.extended_matrix(CFG)), np.r_[want, 0.0],
                               atol=1e-9)

  def test_tabular_nash_md_reaches_the_lp_equilibrium_from_the_sft_mixture(self):
    # Small regularisation, many steps: Nash-MD's limit is the regularised equilibrium
    # pi_tau ∝ mu exp(P pi_tau / tau), which tends to the Nash equilibrium as tau -> 0.
    mu = jnp.asarray(CFG.mu, jnp.float32)
    run = jax.jit(nash_md.nash_md_tabular, static_argnames=("nash_tau", "eta", "steps"))
    got = np.asarray(run(mu, jnp.asarray(P, jnp.float32), mu, nash_tau=0.003, eta=0.3,
                         steps=30000))
    nash = w.nash_equilibrium(P)
    assert np.max(np.abs(got - nash)) < 0.015
    assert w.exploitability(got, P) < 5e-3
    assert np.abs(np.asarray(CFG.mu) - nash).sum() / 2 > 0.35  # SFT starts far away

  @pytest.mark.parametrize("tau", [0.05, 0.1, 0.3])
  def test_regularised_equilibrium_is_the_tabular_nash_md_limit(self, tau):
    # Two independent routes to pi_tau ∝ mu exp(P pi_tau / tau) on the 4-outcome game from a
    # SFT-like reference: the damped fixed point, and exact Nash-MD steps (lax.scan) with a
    # small step (its limit is within O(eta) of pi_tau).
    P4, mu = w.extended_matrix(CFG), np.array([0.15, 0.62, 0.14, 0.09])
    got = w.regularised_equilibrium(P4, mu, tau)
    z = np.log(mu) + P4 @ got / tau  # the fixed-point equation itself, in float64
    np.testing.assert_allclose(got, np.exp(z) / np.exp(z).sum(), atol=1e-10)
    run = jax.jit(nash_md.nash_md_tabular, static_argnames=("nash_tau", "eta", "steps"))
    tab = np.asarray(run(jnp.asarray(mu, jnp.float32), jnp.asarray(P4, jnp.float32),
                         jnp.asarray(mu, jnp.float32), nash_tau=tau, eta=0.02, steps=20000))
    np.testing.assert_allclose(got, tab, atol=5e-3)

  def test_regularised_equilibrium_tends_to_nash_and_refuses_bad_input(self):
    mu = np.array([0.15, 0.62, 0.14, 0.09])
    P4, nash = w.extended_matrix(CFG), np.r_[w.nash_equilibrium(P), 0.0]
    tv = [np.abs(w.regularised_equilibrium(P4, mu, t) - nash).sum() / 2
          for t in (0.3, 0.1, 0.03, 0.01)]
    assert all(a > b for a, b in zip(tv, tv[1:])) and tv[-1] < 0.05
    with pytest.raises(ValueError, match="tau must be > 0"):
      w.regularised_equilibrium(P4, mu, 0.0)
    with pytest.raises(ValueError, match="strictly positive"):
      w.regularised_equilibrium(P4, np.array([0.5, 0.5, 0.0, 0.0]), 0.1)

  def test_exploitability_known_values(self):
    nash = w.nash_equilibrium(P)
    assert w.exploitability(nash, P) == pytest.approx(0.0, abs=1e-9)
    # Pure styles: poetic beats formal 0.7, formal beats casual 0.8, casual beats poetic 0.65.
    for s, want in enumerate((0.2, 0.3, 0.15)):
      assert w.exploitability(np.eye(3)[s], P) == pytest.approx(want)
    assert w.exploitability(CFG.mu, P) == pytest.approx(0.68 - 0.5)
    # It agrees with the library's exploitability.
    for pi in np.random.default_rng(0).dirichlet(np.ones(3), 10):
      assert w.exploitability(pi, P) == pytest.approx(
          float(nash_md.exploitability(jnp.asarray(pi), jnp.asarray(P))), abs=1e-6)

  def test_bradley_terry_fit_is_not_flat_and_ranks_formal_first(self):
    r = w.bradley_terry_fit(P)
    assert np.argmax(r) == 0 and r.max() - r.min() > 0.3
    # On pairs drawn from the SFT mixture (mostly casual), formal leads by a wide margin:
    # PPO against such a reward should collapse onto formal.
    mu = np.asarray(CFG.mu)
    r_mu = w.bradley_terry_fit(P, np.outer(mu, mu))
    assert np.argmax(r_mu) == 0 and r_mu[0] - np.sort(r_mu)[-2] > 0.5
    # No scalar fits: the fitted model misses some pair by a lot.
    fitted = 1 / (1 + np.exp(-(r[:, None] - r[None, :])))
    assert np.max(np.abs(fitted - P)) > 0.15


class TestTexts:

  def test_style_of_examples_and_malformed(self):
    assert [w.style_of(y) for y in EXAMPLES] == [0, 1, 2]
    for bad in ("certainly. the cat? so calm!", "oh, the thing? so calm!", "ah, the cat, calm",
                "", "certainly. the cat is calm. x", "oh, the cat? so snow!"):
      assert w.style_of(bad) is None, bad
    np.testing.assert_array_equal(w.outcomes([*EXAMPLES, "x"]), [0, 1, 2, 3])
    assert w.style_of(" oh, the cat? so calm!\n") == 1  # surrounding whitespace is ignored

  def test_corpora_styles_lengths_and_splits(self):
    small = w.IntransitiveConfig(num_pretrain_texts=3000, num_sft=3000)
    recs = w.records(small)
    split = w.split_prompts(small)
    assert not set(split["train"]) & set(split["test"])
    assert all(r["prompt"] in split["train"] for r in recs["sft"]["train"])
    assert {r["prompt"] for r in recs["sft"]["test"]} <= set(split["test"])
    ys = [r["response"] for r in recs["sft"]["train"]]
    assert max(len(y.encode()) for y in ys) < w.DEFAULT_MAX_NEW_TOKENS
    dist = w.style_distribution(ys)
    np.testing.assert_allclose(dist[:3] / dist[:3].sum(), small.mu, atol=0.03)
    assert dist[3] == pytest.approx(small.p_malformed_sft, abs=0.015)
    texts = [r["text"] for r in recs["pretrain"]["train"]]
    assert max(len(t.encode()) for t in texts) <= w.MAX_PRETRAIN_BYTES
    responses = [next(t[len(p) + 1:] for p in split["train"] if t.startswith(p + " "))
                 for t in texts]
    dist = w.style_distribution(responses)
    np.testing.assert_allclose(dist[:3] / dist[:3].sum(), 1 / 3, atol=0.03)  # uniform styles
    assert dist[3] == pytest.approx(small.p_malformed_pretrain, abs=0.02)
    # Same seed, same corpus; another seed, another split.
    assert w.records(small) == recs
    assert w.split_prompts(w.IntransitiveConfig(seed=1)) != split


class TestRaters:

  def test_empirical_frequencies_match_the_matrix(self):
    rng = np.random.default_rng(0)
    n = 20000
    for i in range(3):
      for j in range(3):
        freq = w.rater_labels(CFG, [""] * n, [EXAMPLES[i]] * n, [EXAMPLES[j]] * n, rng).mean()
        assert freq == pytest.approx(P[i, j], abs=0.015), (i, j)
    freq = w.rater_labels(CFG, [""] * n, ["nonsense"] * n, [EXAMPLES[0]] * n, rng).mean()
    assert freq == pytest.approx(CFG.malformed_win, abs=0.01)

  def test_rankings_are_pairs_only(self):
    rng = np.random.default_rng(1)
    n = 10000
    ranks = w.rater_rankings(CFG, [""] * n, [[EXAMPLES[0], EXAMPLES[1]]] * n, rng)
    assert ranks.shape == (n, 2) and set(map(tuple, ranks)) == {(0, 1), (1, 0)}
    assert (ranks[:, 0] == 0).mean() == pytest.approx(0.8, abs=0.015)
    with pytest.raises(ValueError, match="K = 2"):
      w.rater_rankings(CFG, ["", ""], [list(EXAMPLES)] * 2, rng)

  def test_truth_better_ground_truth_and_metrics(self):
    a, b = [EXAMPLES[0], EXAMPLES[1], "bad"], [EXAMPLES[1], EXAMPLES[1], EXAMPLES[2]]
    np.testing.assert_array_equal(w.truth_better([""] * 3, a, b), [1.0, 0.5, 0.0])
    # P(y > y'), y' ~ mu = (0.15, 0.7, 0.15): formal 0.075 + 0.56 + 0.045 = 0.68.
    np.testing.assert_allclose(w.ground_truth([""] * 4, [*EXAMPLES, "bad"]),
                               [0.68, 0.4775, 0.425, CFG.malformed_win])
    m = w.metrics([""] * 4, [EXAMPLES[0]] * 3 + ["bad"])
    assert m["share_formal"] == 0.75 and m["share_malformed"] == 0.25
    # 3/4 formal, 1/4 malformed: poetic scores 0.75 * 0.7 + 0.25 * 0.95 = 0.7625.
    assert m["exploitability"] == pytest.approx(0.2625)
    nash = w.nash_equilibrium(P)
    assert m["nash_distance"] == pytest.approx(0.5 * (abs(0.75 - nash[0]) + nash[1] + nash[2] + 0.25))

  def test_bad_configs_are_refused(self):
    with pytest.raises(ValueError, match="mu"):
      w.IntransitiveConfig(mu=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="preference"):
      w.IntransitiveConfig(preference=(0.8, 1.0, 0.7))
    with pytest.raises(ValueError, match="not a strict 3-cycle"):
      w.cyclic_equilibrium(w.preference_matrix(w.IntransitiveConfig(preference=(0.8, 0.3, 0.7))))
