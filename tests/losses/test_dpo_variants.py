"""Tests for rlhf_jax.losses.dpo_variants (SLiC-HF hinge, robust DPO, SimPO) and their wiring
through train/preference.py and the DPO experiment's flags."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from jitted import G, J, fd_grad
from rlhf_jax.data import pairs
from rlhf_jax.data.tokenizer import ByteTokenizer
from rlhf_jax.logprobs import sequence_logps, shifted_logps
from rlhf_jax.losses import dpo, dpo_variants as dv
from rlhf_jax.pipeline import config
from rlhf_jax.runs.dpo import DPOConfig
from rlhf_jax.train import preference

EPS64 = float(np.finfo(np.float64).eps)
FD_H = 1e-6  # fd_grad's step


def _nll_sigmoid(z):  # -log s(z)
  return np.logaddexp(0.0, -z)


def _np_hinge(pw, pl, rw, rl, beta):
  return np.mean(np.maximum(0.0, 1.0 - beta * ((pw - rw) - (pl - rl))))


def _np_robust(pw, pl, rw, rl, beta, eps):
  z = beta * ((pw - rw) - (pl - rl))
  return np.mean(((1 - eps) * _nll_sigmoid(z) - eps * _nll_sigmoid(-z)) / (1 - 2 * eps))


def _np_simpo(aw, al, beta, gamma):
  return np.mean(_nll_sigmoid(beta * aw - beta * al - gamma))


def _pairs(seed, b=8, scale=20.0):
  rng = np.random.default_rng(seed)
  return [(-rng.exponential(scale, size=b)).astype(np.float32) for _ in range(4)]


def _zscale(beta, *logps):
  """Size of the terms of beta·((pw - rw) - (pl - rl)), as in test_dpo.py: the losses' slope
  in it is <= 1 (robust DPO: 1 / (1 - 2 eps)), so its roundings move them by as much."""
  return beta * float(np.max(sum(np.abs(np.asarray(x, np.float64)) for x in logps)))


def _fd_tol(term_size):
  """float64 jax.grad vs a float64 central difference of a mean of per-pair terms of size
  `term_size`: its error is ~h^2·|f'''| (|f'''| <= beta^3 / 10 <= 1 here) + a few eps64 of
  the terms' size / h."""
  return dict(rtol=1e-6, atol=FD_H ** 2 + 4 * EPS64 * term_size / FD_H)


class TestHingeLoss:

  def test_hand_case(self):
    # rho_w = -1 - (-2) = 1, rho_l = -3 - (-2) = -1, h = 2; second pair h = 6 - 0 = 6.
    # beta = 0.25: beta h = 0.5 -> relu(0.5) = 0.5; beta h = 1.5 -> 0. Mean 0.25. Rewards
    # beta rho: 0.25 + 1.5, -0.25 + 0 (binary fractions: exact).
    loss, m = J(dv.hinge_loss)(jnp.array([-1.0, 0.0]), jnp.array([-3.0, -6.0]),
                               jnp.array([-2.0, -6.0]), jnp.array([-2.0, -6.0]), beta=0.25)
    np.testing.assert_array_equal(loss, 0.25)
    assert {k: float(v) for k, v in m.items()} == {
        "loss_sum": 0.5, "count": 2, "rewards/chosen_sum": 1.75, "rewards/rejected_sum": -0.25,
        "rewards/margins_sum": 2, "rewards/accuracies_sum": 2, "logps/chosen_sum": -1,
        "logps/rejected_sum": -9}

  def test_numpy_reference_both_branches(self):
    pw, pl, rw, rl = _pairs(1)
    beta, b = 0.1, len(pw)
    z = beta * ((pw - rw) - (pl - rl)).astype(np.float64)
    assert np.any(z >= 1) and np.any(z < 1)  # some pairs past the margin, some not
    loss, m = J(dv.hinge_loss)(pw, pl, rw, rl, beta=beta)
    # Per pair h (3 subtractions) and beta·h (1), at _zscale; 1 - beta h (1) at 1 + _zscale;
    # relu exact; the B-term mean of non-negative terms.
    tol = helpers.f32_tol(3 + 1 + 1 + b + 1, scale=1 + _zscale(beta, pw, pl, rw, rl))
    np.testing.assert_allclose(loss, _np_hinge(*map(np.float64, (pw, pl, rw, rl)), beta), **tol)
    np.testing.assert_allclose(m["loss_sum"] / m["count"], loss, **helpers.f32_tol(b + 2))
    # SLiC-HF's max(0, delta - log pi_w + log pi_l) with delta = 1/beta, the reference's
    # log-probs 0: hinge = beta · that (same roundings as above, the reference terms absent).
    slic = beta * np.mean(np.maximum(0.0, 1 / beta - np.float64(pw) + np.float64(pl)))
    zero = np.zeros_like(pw)
    np.testing.assert_allclose(J(dv.hinge_loss)(pw, pl, zero, zero, beta=beta)[0], slic, **tol)

  def test_zero_past_the_margin_linear_below(self):
    # beta h >= 1 (1 included: relu(0) = 0 with derivative 0): loss and gradient exactly 0.
    beta, zero = 0.5, jnp.zeros(3)
    f = lambda a, c: J(dv.hinge_loss)(a, c, zero, zero, beta=beta)[0]
    past = jnp.array([2.0, 3.0, 6.0])  # beta h = 1, 1.5, 3
    assert float(f(past, zero)) == 0.0
    np.testing.assert_array_equal(G(f, argnums=(0, 1))(past, zero), 0.0)
    # Below: beta h = 0.75, -2, -15 -> mean(1 - beta h) = (0.25 + 3 + 16) / 3 (one divide);
    # the gradient -beta / B on y_w, +beta / B on y_l (the cotangent 1/B times beta: 2).
    below = jnp.array([1.5, -4.0, -30.0])
    np.testing.assert_allclose(f(below, zero), 19.25 / 3, **helpers.f32_tol(1))
    gw, gl = G(f, argnums=(0, 1))(below, zero)
    np.testing.assert_allclose(gw, np.full(3, -beta / 3), **helpers.f32_tol(2))
    np.testing.assert_allclose(gl, np.full(3, beta / 3), **helpers.f32_tol(2))

  def test_grad_matches_finite_differences(self):
    with jax.enable_x64(True):
      pw, pl, rw, rl = map(np.float64, _pairs(3, scale=5.0))
      beta = 0.5
      bh = beta * ((pw - rw) - (pl - rl))
      assert np.any(bh >= 1) and np.any(bh < 1)
      assert np.min(np.abs(1 - bh)) > 1e-3  # no pair within an fd step of the kink
      g = jax.jit(jax.grad(lambda a, c: dv.hinge_loss(a, c, rw, rl, beta=beta)[0],
                           argnums=(0, 1)))(pw, pl)
      tol = _fd_tol(1 + np.abs(bh).max())
      np.testing.assert_allclose(g[0], fd_grad(lambda a: _np_hinge(a, pl, rw, rl, beta), pw),
                                 **tol)
      np.testing.assert_allclose(g[1], fd_grad(lambda c: _np_hinge(pw, c, rw, rl, beta), pl),
                                 **tol)


class TestRobustDpoLoss:

  def test_hand_case(self):
    # h = 2, beta = 0.5 -> z = 1. l(1) = log(1 + e^-1) = 0.3132617, l(-1) = l(1) + 1.
    # eps = 0.25: (0.75·0.3132617 - 0.25·1.3132617) / 0.5 = (0.2349463 - 0.3283154) / 0.5
    #           = -0.1867383  (= l(1) - eps/(1 - 2 eps)·z = 0.3132617 - 0.5).
    loss, m = J(dv.robust_dpo_loss)(jnp.array([-1.0]), jnp.array([-3.0]), jnp.array([-2.0]),
                                    jnp.array([-2.0]), beta=0.5, label_smoothing=0.25)
    np.testing.assert_allclose(loss, -0.1867383, atol=1e-6)  # the constant to 7 decimals
    np.testing.assert_array_equal([m["rewards/chosen_sum"], m["rewards/rejected_sum"],
                                   m["rewards/margins_sum"], m["rewards/accuracies_sum"]],
                                  [0.5, -0.5, 1.0, 1.0])

  @pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
  def test_numpy_reference_and_step0(self, eps):
    pw, pl, rw, rl = _pairs(4)
    beta, b = 0.1, len(pw)
    loss, m = J(dv.robust_dpo_loss)(pw, pl, rw, rl, beta=beta, label_smoothing=eps)
    # Per pair: z (3 subtractions + 1 product, at _zscale), two log-sigmoids (3 each), the
    # mix (3) and the divide (1), all scaled by 1/(1 - 2 eps); then the B-term mean, whose
    # terms may have either sign (robust DPO goes negative): atol at the terms' size.
    zs = _zscale(beta, pw, pl, rw, rl) / (1 - 2 * eps)
    np.testing.assert_allclose(loss, _np_robust(*map(np.float64, (pw, pl, rw, rl)), beta, eps),
                               **helpers.f32_tol(4 + 2 * 3 + 3 + 1 + b + 1, scale=1 + zs))
    np.testing.assert_allclose(m["loss_sum"] / m["count"], loss,
                               **helpers.f32_tol(b + 2, scale=1 + zs))
    # policy == reference: z = 0, ((1 - eps) - eps) log 2 / (1 - 2 eps) = log 2: as above.
    np.testing.assert_allclose(J(dv.robust_dpo_loss)(pw, pl, pw, pl, beta=beta,
                                                     label_smoothing=eps)[0],
                               np.log(2.0), **helpers.f32_tol(2 * 3 + 3 + 1 + b + 1))

  def test_eps_zero_is_dpo(self):
    pw, pl, rw, rl = _pairs(5)
    a, ma = J(dv.robust_dpo_loss)(pw, pl, rw, rl, beta=0.2, label_smoothing=0.0)
    d, md = J(dpo.dpo_loss)(pw, pl, rw, rl, beta=0.2)
    # The same z; the same log-sigmoid (the other one weighs 0); XLA may fuse the mix and the
    # divide by 1 differently (2), and the B-term mean of positive terms.
    b = len(pw)
    np.testing.assert_allclose(a, d, **helpers.f32_tol(2 + b + 1))
    for k in md:
      # The same per-pair values, B-term sums maybe in another order, at B·_zscale.
      np.testing.assert_allclose(ma[k], md[k], **helpers.f32_tol(
          2 * (b + 5), scale=b * (1 + _zscale(0.2, pw, pl, rw, rl))))

  @pytest.mark.parametrize("eps", [0.1, 0.3, 0.45])
  def test_unbiased_under_label_flips(self, eps):
    # Labels flipped with probability eps: E L = (1 - eps) L(w, l) + eps L(l, w) = DPO's loss
    # on the clean labels. cDPO's smoothed loss is not: it is the check's counterexample.
    with jax.enable_x64(True):
      pw, pl, rw, rl = map(np.float64, _pairs(6))
      beta = 0.1
      rob = lambda *a: dv.robust_dpo_loss(*a, beta=beta, label_smoothing=eps)[0]
      cdpo = lambda *a: dpo.dpo_loss(*a, beta=beta, label_smoothing=eps)[0]
      clean = dpo.dpo_loss(pw, pl, rw, rl, beta=beta)[0]
      expect = (1 - eps) * rob(pw, pl, rw, rl) + eps * rob(pl, pw, rl, rw)
      # float64: a few dozen roundings at the terms' size (_zscale / (1 - 2 eps)).
      scale = 1 + _zscale(beta, pw, pl, rw, rl) / (1 - 2 * eps)
      np.testing.assert_allclose(expect, clean, rtol=1e-13, atol=1e-13 * scale)
      # cDPO's is biased by 2 eps (1 - eps) mean(z) (l(-z) - l(z) = z), clearly nonzero here.
      z = beta * ((pw - rw) - (pl - rl))
      assert abs(np.mean(z)) > 0.1
      smoothed = (1 - eps) * cdpo(pw, pl, rw, rl) + eps * cdpo(pl, pw, rl, rw)
      np.testing.assert_allclose(smoothed - clean, 2 * eps * (1 - eps) * np.mean(z),
                                 rtol=1e-12, atol=1e-13 * scale)
      # Closed form: DPO minus eps / (1 - 2 eps) times the margin z.
      np.testing.assert_allclose(rob(pw, pl, rw, rl),
                                 clean - eps / (1 - 2 * eps) * np.mean(z),
                                 rtol=1e-13, atol=1e-13 * scale)

  def test_gradient_never_vanishes(self):
    # z = beta h = 50: DPO's gradient s(-z) ~ 2e-22 is gone, robust DPO's is
    # -beta / B · ((1 - eps) s(-z) + eps s(z)) / (1 - 2 eps) -> -beta eps / ((1 - 2 eps) B).
    beta, eps, zero = 1.0, 0.2, jnp.zeros(2)
    pw = jnp.array([50.0, 50.0])
    g = G(lambda a: J(dv.robust_dpo_loss)(a, zero, zero, zero, beta=beta,
                                          label_smoothing=eps)[0])(pw)
    # A sigmoid (4), the mix (3), the divide and the 1/B cotangent (2).
    np.testing.assert_allclose(g, -beta * eps / (1 - 2 * eps) / 2, **helpers.f32_tol(4 + 3 + 2))

  def test_grad_matches_finite_differences(self):
    with jax.enable_x64(True):
      pw, pl, rw, rl = map(np.float64, _pairs(7, scale=5.0))
      g = jax.jit(jax.grad(lambda a: dv.robust_dpo_loss(a, pl, rw, rl, beta=0.5,
                                                        label_smoothing=0.2)[0]))(pw)
      fd = fd_grad(lambda a: _np_robust(a, pl, rw, rl, 0.5, 0.2), pw)
      np.testing.assert_allclose(g, fd, **_fd_tol(1 + _zscale(0.5, pw, pl, rw, rl) / 0.6))


class TestSimpoLoss:

  def test_hand_case(self):
    # avg logp_w = -1, avg logp_l = -2, beta = 2, gamma = 1: z = -2 + 4 - 1 = 1;
    # loss = log(1 + e^-1) = 0.31326; rewards beta·avg = -2, -4; margin 2 (gamma not in it).
    loss, m = J(dv.simpo_loss)(jnp.array([-1.0]), jnp.array([-2.0]), beta=2.0, gamma=1.0)
    np.testing.assert_allclose(loss, 0.31326, atol=1e-5)  # the constant to 5 decimals
    np.testing.assert_array_equal([m["rewards/chosen_sum"], m["rewards/rejected_sum"],
                                   m["rewards/margins_sum"], m["rewards/accuracies_sum"],
                                   m["logps/chosen_sum"], m["logps/rejected_sum"]],
                                  [-2.0, -4.0, 2.0, 1.0, -1.0, -2.0])

  @pytest.mark.parametrize("gamma", [0.0, 0.5, 1.6])
  def test_numpy_reference_and_zero_margin(self, gamma):
    aw, al, _, _ = _pairs(8, scale=2.0)
    beta, b = 2.0, len(aw)
    loss, m = J(dv.simpo_loss)(aw, al, beta=beta, gamma=gamma)
    # Per pair: two products, a difference and - gamma (4) at beta·(|aw| + |al|) + gamma,
    # the log-sigmoid (3); the B-term mean of positive terms.
    zs = _zscale(beta, aw, al) + gamma
    np.testing.assert_allclose(loss, _np_simpo(np.float64(aw), np.float64(al), beta, gamma),
                               **helpers.f32_tol(4 + 3 + b + 1, scale=zs))
    np.testing.assert_allclose(m["loss_sum"] / m["count"], loss, **helpers.f32_tol(b + 2))
    # Equal averages: z = -gamma, loss log(1 + e^gamma): the products cancel exactly.
    np.testing.assert_allclose(J(dv.simpo_loss)(aw, aw, beta=beta, gamma=gamma)[0],
                               np.log1p(np.exp(gamma)), **helpers.f32_tol(1 + 3 + b + 1))

  def test_is_dpo_with_a_shifted_zero_reference(self):
    # beta·avg_w - beta·avg_l - gamma = beta·((avg_w - gamma/beta) - avg_l): dpo_loss with
    # reference log-probs (gamma/beta, 0); gamma = 0 is dpo_loss on a zero reference.
    aw, al, _, _ = _pairs(9, scale=2.0)
    beta, gamma, b = 2.5, 1.0, len(aw)
    s, ms = J(dv.simpo_loss)(aw, al, beta=beta, gamma=gamma)
    d, md = J(dpo.dpo_loss)(aw, al, np.full_like(aw, gamma / beta), np.zeros_like(al), beta=beta)
    # The two arguments z: 4 roundings each, + 1 for gamma/beta = 0.4, at beta·(|aw| + |al|)
    # + gamma; log-sigmoids (3 each); B-term means of positive terms.
    tol = helpers.f32_tol(2 * 5 + 2 * 3 + b + 1, scale=_zscale(beta, aw, al) + gamma)
    np.testing.assert_allclose(s, d, **tol)
    # Two B-term sums of the same negative values.
    np.testing.assert_allclose(ms["logps/chosen_sum"], md["logps/chosen_sum"],
                               **helpers.f32_tol(2 * b))
    s0, _ = J(dv.simpo_loss)(aw, al, beta=beta, gamma=0.0)
    zero = np.zeros_like(aw)
    np.testing.assert_allclose(s0, J(dpo.dpo_loss)(aw, al, zero, zero, beta=beta)[0], **tol)

  def test_shift_invariance(self):
    # Only avg_w - avg_l enters: adding c to both leaves the loss unchanged, for any gamma.
    aw, al, _, _ = _pairs(10, scale=2.0)
    beta, gamma, c, b = 2.0, 0.5, -0.75, len(aw)
    a, _ = J(dv.simpo_loss)(aw, al, beta=beta, gamma=gamma)
    s, _ = J(dv.simpo_loss)(aw + np.float32(c), al + np.float32(c), beta=beta, gamma=gamma)
    # The shifts (2 roundings) and the two evaluations' z (4 each), at beta·(|aw| + |al| +
    # 2|c|) + gamma; log-sigmoids (3 each); B-term means.
    np.testing.assert_allclose(a, s, **helpers.f32_tol(2 + 2 * 4 + 2 * 3 + b + 1,
                                                      scale=_zscale(beta, aw, al)
                                                      + 2 * beta * abs(c) + gamma))

  def test_grad_matches_finite_differences(self):
    with jax.enable_x64(True):
      aw, al, _, _ = map(np.float64, _pairs(11, scale=2.0))
      g = jax.jit(jax.grad(lambda a, c: dv.simpo_loss(a, c, beta=2.0, gamma=0.5)[0],
                           argnums=(0, 1)))(aw, al)
      tol = _fd_tol(1 + _zscale(2.0, aw, al) + 0.5)
      np.testing.assert_allclose(g[0], fd_grad(lambda a: _np_simpo(a, al, 2.0, 0.5), aw), **tol)
      np.testing.assert_allclose(g[1], fd_grad(lambda c: _np_simpo(aw, c, 2.0, 0.5), al), **tol)
      # Closed form: d/d avg_w = -beta s(-z) / B = -d/d avg_l.
      z = 2.0 * aw - 2.0 * al - 0.5
      np.testing.assert_allclose(g[0], -2.0 / (1 + np.exp(z)) / len(aw), rtol=1e-12)
      np.testing.assert_allclose(g[1], -g[0], rtol=1e-15)


class TestExtremesAndErrors:

  def test_extreme_logps_finite(self):
    # beta h = -1e4 and +1e4 (hinge: one pair on each side of the margin; log-sigmoids of
    # +-1e4; SimPO: z = -+2e4 - 0.5).
    big = jnp.array([-1e4, 0.0])
    other, zero = -big - 1e4, jnp.zeros(2)
    calls = [lambda x: J(dv.hinge_loss)(x, other, zero, zero, beta=1.0),
             lambda x: J(dv.robust_dpo_loss)(x, other, zero, zero, beta=1.0,
                                             label_smoothing=0.3),
             lambda x: J(dv.simpo_loss)(x, other, beta=2.0, gamma=0.5)]
    for f in calls:
      loss, m = f(big)
      g = G(lambda x, f=f: f(x)[0])(big)
      assert np.isfinite(loss) and all(np.isfinite(v) for v in m.values())
      assert np.all(np.isfinite(g)) and np.any(g != 0), g

  def test_errors(self):
    z = jnp.zeros(3)
    for fn, kw in ((dv.hinge_loss, {}), (dv.robust_dpo_loss, dict(label_smoothing=0.1))):
      with pytest.raises(ValueError, match="beta must be > 0"):
        J(fn)(z, z, z, z, beta=0.0, **kw)
      with pytest.raises(ValueError, match="ref_rejected_logps_B"):
        J(fn)(z, z, z, jnp.zeros(4), beta=0.1, **kw)
      with pytest.raises(ValueError, match="policy_chosen_logps_B must have rank 1"):
        J(fn)(jnp.zeros((3, 1)), z, z, z, beta=0.1, **kw)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\)"):
      J(dv.robust_dpo_loss)(z, z, z, z, beta=0.1, label_smoothing=0.5)
    with pytest.raises(ValueError, match="beta must be > 0"):
      J(dv.simpo_loss)(z, z, beta=-1.0, gamma=0.5)
    with pytest.raises(ValueError, match="gamma must be >= 0"):
      J(dv.simpo_loss)(z, z, beta=2.0, gamma=-0.1)
    with pytest.raises(ValueError, match="policy_rejected_avg_logps_B"):
      J(dv.simpo_loss)(z, jnp.zeros(4), beta=2.0, gamma=0.5)
    with pytest.raises(ValueError, match="policy_chosen_avg_logps_B must have rank 1"):
      J(dv.simpo_loss)(jnp.zeros((3, 2)), jnp.zeros((3, 2)), beta=2.0, gamma=0.5)


# ----------------------------------------------------------------------------------------
# Through train/preference.py (a nano model, pairs.py batches; cf. tests/train/test_preference).

RECORDS = [{"prompt": f"{a}+{b}=", "prompt_kind": "text", "chosen": str(a + b),
            "rejected": str(a + b + d)} for a, b, d in
           [(12, 30, 1), (7, 5, -20), (40, 41, 100), (3, 99, -1)]]
SEQ = 16
FLAGS_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "configs")


@pytest.fixture(scope="module")
def model():
  return helpers.make_model()


def _batch():
  rows = [pairs.pair_example(r, ByteTokenizer(), SEQ) for r in RECORDS]
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _loss(graphdef, params, batch, **kw):
  loss_sum, aux = jax.jit(preference.preference_loss_fn(graphdef, **kw))(
      params, batch, jax.random.key(0))
  return float(loss_sum / aux["denominator"]), {k: float(v) for k, v in aux.items()}


def test_needs_reference():
  assert [preference.needs_reference(x) for x in preference.LOSSES] == [
      x != "simpo" for x in preference.LOSSES]
  with pytest.raises(ValueError, match="loss must be one of"):
    preference.needs_reference("orpo")


def test_simpo_trains_without_a_reference_and_dpo_refuses(model):
  graphdef, params = model
  batch = _batch()
  assert not any(k in batch for k in pairs.REF_KEYS)
  value, aux = _loss(graphdef, params, batch, loss="simpo", beta=2.0, simpo_gamma=0.5)
  # Independently: each side's own forward, its length-averaged log-probs, SimPO in NumPy.
  avg = []
  for side in ("chosen", "rejected"):
    tokens = batch[f"{side}_tokens"]
    logits, _ = helpers.apply(graphdef, params, tokens, batch[f"{side}_valid"])
    avg.append(np.asarray(sequence_logps(shifted_logps(logits, tokens),
                                         batch[f"{side}_mask"], average=True), np.float64))
  # Two float32 forwards (2B rows vs B rows), the token mean (SEQ + 1), then as
  # TestSimpoLoss.test_numpy_reference_and_zero_margin, at beta·(|avg_w| + |avg_l|) + gamma.
  n = helpers.forward_terms(helpers.nano(), SEQ) + SEQ + 1 + 4 + 3 + len(RECORDS) + 1
  np.testing.assert_allclose(value, _np_simpo(*avg, 2.0, 0.5),
                             **helpers.f32_tol(n, scale=_zscale(2.0, *avg) + 0.5))
  assert aux["denominator"] == len(RECORDS)
  # average_logps does not change SimPO, and reference values in the batch are not read.
  garbage = {k: np.full(len(RECORDS), -1e3, np.float32) for k in pairs.REF_KEYS}
  for kw, b in ((dict(average_logps=False), {**batch, **garbage}),
                (dict(average_logps=True, ref_params=params), batch)):
    # The same computation (a few roundings may move with fusion).
    other = _loss(graphdef, params, b, loss="simpo", beta=2.0, simpo_gamma=0.5, **kw)[0]
    np.testing.assert_allclose(other, value, **helpers.f32_tol(4))
  for loss in ("dpo", "hinge", "robust_dpo"):
    with pytest.raises(ValueError, match="no reference log-probs"):
      _loss(graphdef, params, batch, loss=loss)


@pytest.mark.parametrize("loss, expected", [("hinge", 1.0), ("robust_dpo", np.log(2.0))])
def test_policy_equal_to_reference(model, loss, expected):
  graphdef, params = model
  value, aux = _loss(graphdef, params, _batch(), loss=loss, label_smoothing=0.3,
                     ref_params=params)
  # h = 0 exactly (the same forward); hinge: relu(1) summed and divided, exact; robust DPO:
  # as TestRobustDpoLoss.test_numpy_reference_and_step0.
  np.testing.assert_allclose(value, expected, **helpers.f32_tol(2 * 3 + 3 + 1 + 4 + 1))
  assert aux["rewards/margins"] == 0.0 and aux["rewards/accuracies"] == 0.0


def test_flags():
  parse = lambda *a: config.parse(DPOConfig, [f"--flagfile={FLAGS_DIR}/dpo_tiny.flags", *a])
  assert parse("--loss=simpo").simpo_gamma == 0.5
  assert parse("--loss=cdpo", "--label_smoothing=0.5").label_smoothing == 0.5  # cDPO takes 0.5
  with pytest.raises(ValueError, match=r"--label_smoothing=0.5 with --loss=robust_dpo: .* < 0.5"):
    parse("--loss=robust_dpo", "--label_smoothing=0.5")
  with pytest.raises(ValueError, match="--simpo_gamma must be >= 0"):
    parse("--loss=simpo", "--simpo_gamma=-1")
