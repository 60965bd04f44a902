"""Tests for rlhf_jax.losses.sft: hand cases, float64 NumPy references, properties, grads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses import sft

from jitted import G, J


def _np_sft(logps, mask):
  logps, mask = np.asarray(logps, np.float64), np.asarray(mask, np.float64)
  return -(logps * mask).sum() / max(mask.sum(), 1.0)


def _random(seed, b=3, t=5):
  rng = np.random.default_rng(seed)
  logps = -rng.exponential(2.0, size=(b, t))
  mask = rng.random((b, t)) < 0.7
  mask[:, 0] = True
  return logps.astype(np.float32), mask


class TestSftLoss:

  def test_hand_case(self):
    # tokens kept: -1, -2, -3 (the -100 is masked) -> loss = (1 + 2 + 3) / 3 = 2.
    logps = jnp.array([[-1.0, -2.0], [-3.0, -100.0]])
    mask = jnp.array([[1, 1], [1, 0]])
    loss, m = jax.jit(sft.sft_loss)(logps, mask)
    np.testing.assert_allclose(loss, 2.0, rtol=1e-6)
    np.testing.assert_allclose(m["loss_sum"], 6.0, rtol=1e-6)
    np.testing.assert_allclose(m["count"], 3.0)

  @pytest.mark.parametrize("seed", [0, 1, 2])
  def test_matches_numpy_reference(self, seed):
    logps, mask = _random(seed)
    loss, m = jax.jit(sft.sft_loss)(logps, mask)
    np.testing.assert_allclose(loss, _np_sft(logps, mask), rtol=1e-5)
    np.testing.assert_allclose(m["loss_sum"] / m["count"], loss, rtol=1e-6)

  def test_microbatches_combine_exactly(self):
    logps, mask = _random(3, b=4)
    _, m1 = J(sft.sft_loss)(logps[:2], mask[:2])
    _, m2 = J(sft.sft_loss)(logps[2:], mask[2:])
    combined = (m1["loss_sum"] + m2["loss_sum"]) / (m1["count"] + m2["count"])
    np.testing.assert_allclose(combined, _np_sft(logps, mask), rtol=1e-5)

  def test_bool_and_float_masks_agree(self):
    logps, mask = _random(4)
    a, _ = J(sft.sft_loss)(logps, mask)
    b, _ = J(sft.sft_loss)(logps, mask.astype(np.float32))
    np.testing.assert_allclose(a, b, rtol=1e-6)

  def test_grad_is_minus_mask_over_count(self):
    logps, mask = _random(5)
    g = G(lambda x: J(sft.sft_loss)(x, mask)[0])(logps)
    np.testing.assert_allclose(g, -mask.astype(np.float32) / mask.sum(), rtol=1e-6)

  def test_extreme_and_all_masked(self):
    logps = jnp.array([[-1e4, -jnp.inf], [-1e4, -1e4]])
    mask = jnp.array([[1.0, 0.0], [0.0, 0.0]])
    loss, m = jax.jit(sft.sft_loss)(logps, mask)
    np.testing.assert_allclose(loss, 1e4, rtol=1e-6)
    g = G(lambda x: J(sft.sft_loss)(x, mask)[0])(logps)
    assert np.all(np.isfinite(g))
    loss0, m0 = J(sft.sft_loss)(logps, jnp.zeros_like(mask))
    assert float(loss0) == 0.0 and float(m0["count"]) == 0.0

  def test_shape_mismatch_raises(self):
    with pytest.raises(ValueError, match="logps_BxT.*mask_BxT"):
      jax.jit(sft.sft_loss)(jnp.zeros((2, 3)), jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="logps_BxT must have rank 2"):
      J(sft.sft_loss)(jnp.zeros(3), jnp.ones(3))


class TestPtxLoss:

  def test_hand_case(self):
    # mean token NLL = (1 + 3) / 2 = 2; times ptx_coef 0.5 -> 1.0.
    loss, m = jax.jit(lambda x, y: J(sft.ptx_loss)(x, y, ptx_coef=0.5))(
        jnp.array([[-1.0, -3.0]]), jnp.array([[1.0, 1.0]]))
    np.testing.assert_allclose(loss, 1.0, rtol=1e-6)
    np.testing.assert_allclose(m["nll_sum"], 4.0, rtol=1e-6)
    np.testing.assert_allclose(m["loss_sum"], 2.0, rtol=1e-6)

  @pytest.mark.parametrize("coef", [0.0, 1.0, 27.8])
  def test_is_coef_times_numpy_reference(self, coef):
    logps, mask = _random(7)
    loss, m = J(sft.ptx_loss)(logps, mask, ptx_coef=coef)
    np.testing.assert_allclose(loss, coef * _np_sft(logps, mask), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(m["loss_sum"] / m["count"], loss, rtol=1e-6, atol=1e-7)

  def test_grad_scales_with_coef(self):
    logps, mask = _random(8)
    g = G(lambda x: J(sft.ptx_loss)(x, mask, ptx_coef=3.0)[0])(logps)
    np.testing.assert_allclose(g, -3.0 * mask.astype(np.float32) / mask.sum(), rtol=1e-6)

  def test_all_masked_finite(self):
    loss, _ = J(sft.ptx_loss)(jnp.full((2, 2), -1e4), jnp.zeros((2, 2)), ptx_coef=1.0)
    assert float(loss) == 0.0

  def test_errors(self):
    with pytest.raises(ValueError, match="ptx_coef"):
      J(sft.ptx_loss)(jnp.zeros((1, 2)), jnp.ones((1, 2)), ptx_coef=-1.0)
    with pytest.raises(ValueError, match="mask_BxT"):
      J(sft.ptx_loss)(jnp.zeros((1, 2)), jnp.ones((2, 2)), ptx_coef=1.0)
