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
    np.testing.assert_allclose(pi_num, pi_star, atol=1e-5)
    # The optimal value is beta log Z, Z = sum pi_ref exp(r / beta).
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
    np.testing.assert_allclose(loss_dpo, loss_bt, rtol=1e-4)
    np.testing.assert_allclose(m["rewards/margins_sum"], 0.0, atol=1e-3)

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

    at_opt = jnp.asarray(np.log(_pi_star(p_ref, r, beta)), jnp.float32)
    g = G(population_loss)(at_opt)
    np.testing.assert_allclose(g, 0.0, atol=1e-6)
    assert float(jnp.linalg.norm(G(population_loss)(ref))) > 1e-2
    rng = np.random.default_rng(5)
    for _ in range(5):
      other = at_opt + jnp.asarray(rng.normal(size=N) * 0.3, jnp.float32)
      assert float(population_loss(other)) > float(population_loss(at_opt))
    # Shifting all logits by a constant leaves the policy and loss unchanged.
    np.testing.assert_allclose(population_loss(at_opt + 5.0), population_loss(at_opt), rtol=1e-5)
