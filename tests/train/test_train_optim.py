"""Optimizer: schedule vs closed form, clipping, weight-decay mask."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax.train import optim


def closed_form_lr(t, peak, warmup, total, end_ratio):
  end = peak * end_ratio
  if t < warmup:
    return peak * t / warmup
  if t >= total:
    return end
  return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))


@pytest.mark.parametrize("warmup", [0, 10])
def test_schedule_matches_closed_form(warmup):
  cfg = optim.OptimConfig(learning_rate=3e-4, warmup_steps=warmup, total_steps=100,
                          end_lr_ratio=0.1)
  schedule = optim.make_schedule(cfg)
  for t in [0, 1, 5, 9, 10, 11, 40, 55, 99, 100, 150]:
    want = closed_form_lr(t, 3e-4, warmup, 100, 0.1)
    np.testing.assert_allclose(float(schedule(t)), want, rtol=1e-5, atol=1e-12, err_msg=f"t={t}")
  # Hand-checkable points: half-way through warmup, peak, cosine midpoint, end.
  if warmup:
    np.testing.assert_allclose(float(schedule(5)), 1.5e-4, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(warmup)), 3e-4, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(warmup + (100 - warmup) // 2)), 1.65e-4, rtol=1e-5)
  np.testing.assert_allclose(float(schedule(100)), 3e-5, rtol=1e-6)


def test_config_validation():
  with pytest.raises(ValueError, match="warmup_steps"):
    optim.OptimConfig(learning_rate=1e-3, warmup_steps=10, total_steps=10)
  with pytest.raises(ValueError, match="grad_clip_norm"):
    optim.OptimConfig(learning_rate=1e-3, total_steps=10, grad_clip_norm=0.0)


def test_clipping_caps_global_norm():
  """Adam's first moment after one update is (1 - b1) * (the grad it saw): with clipping
  that grad must have global norm exactly grad_clip_norm, and without it the raw norm."""
  params = {"w": jnp.ones((3, 4)), "b": jnp.ones((4,))}
  grads = {"w": jnp.full((3, 4), 10.0), "b": jnp.full((4,), -10.0)}
  raw_norm = float(optax.global_norm(grads))

  def seen_norm(clip, grads):
    tx = optim.make_optimizer(optim.OptimConfig(learning_rate=1.0, total_steps=10, b1=0.9,
                                                grad_clip_norm=clip))
    _, state = tx.update(grads, tx.init(params), params)
    return float(optax.global_norm(optax.tree_utils.tree_get(state, "mu"))) / (1 - 0.9)

  np.testing.assert_allclose(seen_norm(0.5, grads), 0.5, rtol=1e-5)
  np.testing.assert_allclose(seen_norm(None, grads), raw_norm, rtol=1e-5)
  small = jax.tree.map(lambda g: g * 1e-3, grads)  # norm below the cap: left alone
  np.testing.assert_allclose(seen_norm(0.5, small), raw_norm * 1e-3, rtol=1e-5)


def test_weight_decay_mask_skips_1d_params():
  """Zero grads: the only movement is decay, which must hit matrices and not vectors."""
  cfg = optim.OptimConfig(learning_rate=0.1, total_steps=10, weight_decay=0.5)
  tx = optim.make_optimizer(cfg)
  params = {"kernel": jnp.ones((3, 3)), "bias": jnp.ones((3,)), "scale": jnp.ones((3,))}
  assert optim.decay_mask(params) == {"kernel": True, "bias": False, "scale": False}
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  lr0 = float(optim.make_schedule(cfg)(0))
  np.testing.assert_allclose(updates["kernel"], -lr0 * 0.5 * np.ones((3, 3)), rtol=1e-6)
  np.testing.assert_array_equal(updates["bias"], np.zeros(3))
  np.testing.assert_array_equal(updates["scale"], np.zeros(3))
