"""The KL-regularised optimum and what DPO's implicit reward recovers from it.

On a finite response set: pi* = pi_ref exp(r/beta) / Z maximises E_pi[r] - beta KL(pi || pi_ref)
(Peters & Schaal; Rafailov 2023 eq. 4), beta log(pi*/pi_ref) = r - beta log Z (eq. 5), and the
DPO loss at pi* equals the Bradley-Terry loss under r, so pi* minimises the population DPO loss
on BT-labelled comparisons.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from rlhf_jax.losses import bradley_terry as bt
from rlhf_jax.losses import dpo

import helpers
from jitted import G, J

N = 6


def _world(seed):
  rng = np.random.default_rng(seed)
  return rng.dirichlet(np.ones(N)), rng.normal(size=N) * 2.0  # pi_ref, r (float64)


def _pi_star(p_ref, r, beta):
  w = np.log(p_ref) + r / beta
  w -= w.max()
  return np.exp(w) / np.exp(w).sum()


def _objective(pi, p_ref, r, beta):
  return pi @ r - beta * np.sum(pi * np.log(pi / p_ref))


ALL_PAIRS = np.array([(i, j) for i in range(N) for j in range(N) if i != j])


def _pair_sizes(log_pi, log_ref):
  """Per ordered pair, |log pi_w| + |log pi_l| + |log ref_w| + |log ref_l|: the size of the
  terms of h = (log pi_w - log ref_w) - (log pi_l - log ref_l), at which its float32 casts and
  subtractions round (h cancels: log pi* reaches -25 while h = (r_w - r_l) / beta)."""
  a = np.abs(log_pi) + np.abs(log_ref)
  return a[ALL_PAIRS[:, 0]] + a[ALL_PAIRS[:, 1]]


class TestKlRegularisedOptimum:

  @pytest.mark.parametrize("seed,beta", [(0, 0.5), (1, 1.0), (2, 3.0)])
  def test_closed_form_matches_numeric_optimiser(self, seed, beta):
    p_ref, r = _world(seed)

    def neg_obj(logits):
      pi = np.exp(logits - logits.max())
      pi /= pi.sum()
      return -_objective(pi, p_ref, r, beta)

    res = optimize.minimize(neg_obj, np.zeros(N), method="BFGS", options={"gtol": 1e-10})
    pi_num = np.exp(res.x - res.x.max())
    pi_num /= pi_num.sum()
    pi_star = _pi_star(p_ref, r, beta)
    # float64 optimiser: BFGS stops (often on precision loss) where its gradient res.jac stalls.
    # Near the optimum d obj / d logit_i = -beta (pi_i - pi*_i) to first order, so pi_num is
    # within (max|jac| + the forward-difference gradient's own error, ~2 sqrt(eps64)·|f|) / beta
    # of pi*; x2. Absolute: the objective barely sees components like pi* ~ 1e-7.
    eps64 = np.finfo(np.float64).eps
    fd_err = 2 * np.sqrt(eps64) * max(1.0, abs(res.fun))
    np.testing.assert_allclose(pi_num, pi_star, rtol=0,
                               atol=2 * (np.abs(res.jac).max() + fd_err) / beta)
    # The optimal value is beta log Z, Z = sum pi_ref exp(r / beta). float64 throughout:
    # ~2N + 10 roundings of eps64 at the terms' size (|r| + beta |log(pi / p)| <= ~30), ~1e-13
    # relative at most; rtol 1e-10 bounds that with room.
    np.testing.assert_allclose(_objective(pi_star, p_ref, r, beta),
                               beta * np.log(np.sum(p_ref * np.exp(r / beta))), rtol=1e-10)
    assert _objective(pi_star, p_ref, r, beta) >= _objective(p_ref, p_ref, r, beta)

  @pytest.mark.parametrize("beta", [0.1, 1.0])
  def test_implicit_reward_recovers_r_up_to_a_per_prompt_constant(self, beta):
    # Three prompts, each with its own pi_ref and r: beta log(pi*/pi_ref) - r = -beta log Z(x).
    for seed in range(3):
      p_ref, r = _world(10 + seed)
      pi_star = _pi_star(p_ref, r, beta)
      _, m = J(dpo.dpo_loss)(jnp.log(pi_star[ALL_PAIRS[:, 0]]), jnp.log(pi_star[ALL_PAIRS[:, 1]]),
                          jnp.log(p_ref[ALL_PAIRS[:, 0]]), jnp.log(p_ref[ALL_PAIRS[:, 1]]),
                          beta=beta)
      implicit = beta * np.log(pi_star / p_ref)
      shift = implicit - r
      # float64 (numpy): logs, a divide, a product and a subtraction at the size |r| + |shift|,
      # a few eps64 ~ 1e-15 of it; 1e-9 relative bounds that with room.
      np.testing.assert_allclose(shift, -beta * np.log(np.sum(p_ref * np.exp(r / beta))),
                                 atol=1e-9 * max(1.0, abs(shift[0])))
      # Reward margins summed over all ordered pairs are zero (antisymmetric), accuracies
      # count exactly the pairs where r_i > r_j.
      assert float(m["rewards/accuracies_sum"]) == float(np.sum(r[ALL_PAIRS[:, 0]] > r[ALL_PAIRS[:, 1]]))

  @pytest.mark.parametrize("beta", [0.5, 2.0])
  def test_dpo_loss_at_optimum_equals_bt_loss_under_r(self, beta):
    p_ref, r = _world(3)
    pi_star = _pi_star(p_ref, r, beta)
    w, l = ALL_PAIRS[:, 0], ALL_PAIRS[:, 1]
    f = lambda x: jnp.asarray(x, jnp.float32)
    loss_dpo, m = jax.jit(lambda *a: J(dpo.dpo_loss)(*a, beta=beta))(
        f(np.log(pi_star[w])), f(np.log(pi_star[l])), f(np.log(p_ref[w])), f(np.log(p_ref[l])))
    loss_bt, _ = J(bt.bt_loss)(f(r[w]), f(r[l]))
    # Two float32 evaluations of the same P-pair mean of softplus(-(r_w - r_l)). Per pair, DPO:
    # the casts and 3 subtractions of h (7 roundings at the pair's log-prob sizes, x beta),
    # beta·h and the log-sigmoid (4); BT: the casts and the subtraction (3 at |r_w| + |r_l|) and
    # the softplus (4); the slopes are <= 1: atol at those sizes. The two P-term means of
    # positive terms: rtol 2(P + 1)·eps.
    pp = len(w)
    sizes = beta * _pair_sizes(np.log(pi_star), np.log(p_ref)) + np.abs(r[w]) + np.abs(r[l])
    per_pair = helpers.f32_tol(7 + 4 + 3 + 4, scale=sizes.max())
    np.testing.assert_allclose(loss_dpo, loss_bt,
                               rtol=per_pair["rtol"] + helpers.f32_tol(2 * (pp + 1))["rtol"],
                               atol=per_pair["atol"])
    # The float32 log-ratios rho_i are shared by the pairs (i, j) and (j, i), so the exact sum of
    # the margins beta rho_w - beta rho_l of the float32 inputs is 0; beta·rho and the
    # subtraction (3 roundings at beta(|rho_w| + |rho_l|) per term) and the P-term sum remain.
    rho = np.log(pi_star) - np.log(p_ref)
    np.testing.assert_allclose(m["rewards/margins_sum"], 0.0, **helpers.f32_tol(
        pp + 3, scale=np.sum(beta * (np.abs(rho[w]) + np.abs(rho[l])))))

  def test_optimum_minimises_population_dpo_loss_on_bt_labels(self):
    # Comparisons (i, j) drawn uniformly, labelled by BT under r: y_i wins with s(r_i - r_j).
    # Population DPO loss over a tabular policy logits_N is minimised at log pi* (+ const).
    beta = 0.7
    p_ref, r = _world(4)
    w, l = ALL_PAIRS[:, 0], ALL_PAIRS[:, 1]
    weight = jnp.asarray(1 / (1 + np.exp(-(r[w] - r[l]))), jnp.float32)  # P(i beats j)
    ref = jnp.asarray(np.log(p_ref), jnp.float32)

    def per_pair(lp_w, lp_l, ref_w, ref_l):
      return J(dpo.dpo_loss)(lp_w[None], lp_l[None], ref_w[None], ref_l[None], beta=beta)[0]

    @jax.jit
    def population_loss(logits_N):
      lp = jax.nn.log_softmax(logits_N)
      return jnp.mean(weight * jax.vmap(per_pair)(lp[w], lp[l], ref[w], ref[l]))

    log_pi = np.log(_pi_star(p_ref, r, beta))
    at_opt = jnp.asarray(log_pi, jnp.float32)
    g = G(population_loss)(at_opt)
    # The exact gradient is 0 there. float32: per pair the log-softmax (2N) and h's casts and 3
    # subtractions (at the pair's log-prob sizes), beta·h and the sigmoid (5), the weight's cast,
    # its product and beta / P (3); each logit's gradient sums 2(N - 1) pair terms of size
    # <= beta / P, and the log-softmax backward N more: atol at 2(N - 1)·beta/P·(1 + beta·the pair sizes).
    pp = len(w)
    sizes = beta * _pair_sizes(log_pi, np.log(p_ref))
    np.testing.assert_allclose(g, 0.0, **helpers.f32_tol(
        2 * N + 4 + 5 + 3 + 2 * (N - 1) + N, scale=2 * (N - 1) * beta / pp * (1 + sizes.max())))
    assert float(jnp.linalg.norm(G(population_loss)(ref))) > 1e-2
    rng = np.random.default_rng(5)
    for _ in range(5):
      other = at_opt + jnp.asarray(rng.normal(size=N) * 0.3, jnp.float32)
      assert float(population_loss(other)) > float(population_loss(at_opt))
    # Shifting all logits by a constant leaves the policy and loss unchanged. float32: + 5
    # rounds each logit once at |logit| + 5, which reaches h through two log-softmax entries
    # (x beta, slope <= 1): 2 x 2 roundings. Each of the two evaluations, per pair: the
    # log-softmax (2N), h and the log-sigmoid (11), the weight (2), at the pair's sizes; then
    # the P-term mean of positive terms (rtol).
    shift_err = helpers.f32_tol(4, scale=beta * (np.abs(log_pi).max() + 5))
    per_pair = helpers.f32_tol(2 * (2 * N + 11 + 2), scale=sizes.max())
    np.testing.assert_allclose(population_loss(at_opt + 5.0), population_loss(at_opt),
                               rtol=helpers.f32_tol(2 * (pp + 1))["rtol"] + per_pair["rtol"],
                               atol=shift_err["atol"] + per_pair["atol"])
