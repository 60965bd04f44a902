"""Log-prob utilities against NumPy float64 references and hand-checkable cases."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import f32_tol, np_log_softmax
from rlhf_jax import logprobs


def rand_logits(seed, shape, scale=3.0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale


def np_entropy(logits):
  lp = np_log_softmax(logits)
  p = np.exp(lp)
  return -np.sum(np.where(p > 0, p * lp, 0.0), axis=-1)


class TestTokenLogps:

  def test_matches_numpy_log_softmax_gather(self):
    logits = rand_logits(0, (3, 5, 11))
    targets = np.random.default_rng(1).integers(0, 11, (3, 5))
    got = jax.jit(logprobs.token_logps)(logits, targets)
    want = np.take_along_axis(np_log_softmax(logits), targets[..., None], -1)[..., 0]
    assert got.shape == (3, 5) and got.dtype == jnp.float32
    # One float32 log-softmax over 11 logits; atol at the logits' size (helpers.f32_tol).
    np.testing.assert_allclose(got, want, **f32_tol(11, scale=np.abs(logits).max()))

  def test_extreme_logits_are_finite_and_exact(self):
    logits = np.array([[[1e4, -1e4, 0.0, 1e4 - 2.0]]], np.float32)
    got = np.asarray(logprobs.token_logps(np.repeat(logits, 4, 1), np.array([[0, 1, 2, 3]])))
    assert np.all(np.isfinite(got))
    want = np_log_softmax(logits[0, 0])
    # logit - logsumexp: the logsumexp ~ 1e4 is rounded once at its own size, so the result
    # is exact up to eps·1e4 ~ 1.2e-3 absolute (an unstable exp(1e4) would give inf/NaN).
    tol = f32_tol(1, scale=1e4)
    np.testing.assert_allclose(got[0], want, **tol)
    np.testing.assert_allclose(got[0, 0], -np.log1p(np.exp(-2.0)), **tol)

  @pytest.mark.parametrize("temperature", [0.5, 2.0])
  def test_temperature(self, temperature):
    logits = rand_logits(2, (2, 4, 7))
    targets = np.random.default_rng(3).integers(0, 7, (2, 4))
    got = logprobs.token_logps(logits, targets, temperature=temperature)
    want = np.take_along_axis(np_log_softmax(logits / temperature), targets[..., None], -1)[..., 0]
    # 7-term log-softmax after the division by the temperature (one more rounding).
    np.testing.assert_allclose(got, want, **f32_tol(7 + 1, scale=np.abs(logits).max() / temperature))
    untempered = logprobs.token_logps(logits, targets)
    assert np.abs(np.asarray(got) - np.asarray(untempered)).max() > 1e-2

  def test_bf16_logits_are_upcast(self):
    logits = rand_logits(4, (1, 3, 5))
    got = logprobs.token_logps(jnp.asarray(logits, jnp.bfloat16), np.array([[0, 1, 2]]))
    assert got.dtype == jnp.float32


class TestShiftedLogps:

  def test_hand_example_alignment(self):
    # Vocab 3; at position t the logits predict token t+1.
    logits = np.log(np.array([[[0.5, 0.25, 0.25],    # predicts tokens[1] = 1 -> 0.25
                               [0.1, 0.1, 0.8],      # predicts tokens[2] = 2 -> 0.8
                               [1 / 3, 1 / 3, 1 / 3]]],  # predicts nothing (last)
                             np.float32))
    tokens = np.array([[0, 1, 2]])
    got = np.asarray(logprobs.shifted_logps(logits, tokens))
    np.testing.assert_allclose(got, [[0.0, np.log(0.25), np.log(0.8)]], rtol=1e-6)
    got_t = np.asarray(logprobs.shifted_logps(logits, tokens, temperature=2.0))
    p = np.array([0.1, 0.1, 0.8]) ** 0.5
    np.testing.assert_allclose(got_t[0, 2], np.log(p[2] / p.sum()), rtol=1e-6)

  def test_matches_token_logps_of_next_tokens(self):
    logits = rand_logits(5, (2, 6, 9))
    tokens = np.random.default_rng(6).integers(0, 9, (2, 6))
    got = np.asarray(logprobs.shifted_logps(logits, tokens))
    lp = np_log_softmax(logits)
    for t in range(1, 6):
      np.testing.assert_allclose(got[:, t], lp[np.arange(2), t - 1, tokens[:, t]],
                                 **f32_tol(9, scale=np.abs(logits).max()))
    np.testing.assert_array_equal(got[:, 0], 0.0)


class TestEntropy:

  def test_matches_numpy(self):
    logits = rand_logits(7, (2, 3, 13))
    # A 13-term log-softmax, then the 13-term sum -sum p·log p.
    np.testing.assert_allclose(jax.jit(logprobs.entropy)(logits), np_entropy(logits),
                               **f32_tol(2 * 13, scale=np.abs(logits).max()))

  def test_uniform_and_one_hot(self):
    np.testing.assert_allclose(logprobs.entropy(np.zeros((1, 1, 8), np.float32)), [[np.log(8)]],
                               rtol=1e-6)
    peaked = np.array([[[1e4, 0.0, 0.0]]], np.float32)
    # exp(-1e4) underflows to 0 in float32, so p = (1, 0, 0) and log p_0 = 0: exactly 0.
    np.testing.assert_array_equal(logprobs.entropy(peaked), [[0.0]])

  def test_truncated_logits_with_minus_inf(self):
    # The support of a top-k distribution: entropy over the kept tokens, not NaN.
    logits = np.array([[[0.0, 1.0, -np.inf, -np.inf]]], np.float32)
    got = np.asarray(logprobs.entropy(logits))
    np.testing.assert_allclose(got, np_entropy(logits[..., :2]), rtol=1e-6)

  def test_logps_from_hidden_states_run_the_head_on_predicting_positions_only(self):
    rng = np.random.default_rng(9)
    hidden = rng.standard_normal((2, 5, 6)).astype(np.float32)
    w = rng.standard_normal((6, 7)).astype(np.float32)
    tokens = rng.integers(0, 7, (2, 5))
    seen = []

    def head(h):
      seen.append(h.shape)
      return h @ w
    got = np.asarray(logprobs.shifted_logps_of(head, hidden, tokens, temperature=2.0))
    assert seen == [(2, 4, 6)]  # the last position predicts nothing scored
    ref = np_log_softmax(hidden[:, :-1].astype(np.float64) @ w / 2.0)
    want = np.take_along_axis(ref, tokens[:, 1:, None], axis=-1)[..., 0]
    np.testing.assert_array_equal(got[:, 0], 0.0)
    # Each logit is a 6-term dot product; the log-softmax sums 7 terms.
    np.testing.assert_allclose(got[:, 1:], want, **f32_tol(6 + 7, scale=np.abs(ref).max()))


class TestMaskedReductions:

  def test_masked_sum_and_mean(self):
    x = np.array([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 9.0, 9.0, 9.0]], np.float32)
    mask = np.array([[1, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]])
    np.testing.assert_allclose(logprobs.masked_sum(x, mask), [4.0, 8.0, 0.0])
    np.testing.assert_allclose(logprobs.masked_mean(x, mask), [2.0, 8.0, 0.0])
    bool_mask = mask.astype(bool)
    np.testing.assert_allclose(logprobs.masked_mean(x, bool_mask), [2.0, 8.0, 0.0])

  def test_all_masked_row_is_zero_not_nan(self):
    out = jax.jit(logprobs.masked_mean)(np.full((1, 3), 5.0, np.float32),
                                        np.zeros((1, 3)))
    np.testing.assert_array_equal(out, [0.0])

  def test_sequence_logps_sum_and_average(self):
    logps = np.array([[-1.0, -2.0, -3.0], [-0.5, -0.5, -4.0]], np.float32)
    mask = np.array([[0, 1, 1], [1, 1, 0]])
    np.testing.assert_allclose(logprobs.sequence_logps(logps, mask), [-5.0, -1.0])
    np.testing.assert_allclose(logprobs.sequence_logps(logps, mask, average=True), [-2.5, -0.5])

  def test_sequence_logps_all_masked_grad_extreme_and_shape_error(self):
    f = jax.jit(logprobs.sequence_logps, static_argnames="average")
    logps = jnp.array([[-1.0, -2.0, -9.0], [-4.0, -5.0, -6.0]])
    mask = jnp.array([[1, 1, 0], [0, 0, 0]])  # row 1 all masked: 0 both ways
    np.testing.assert_allclose(f(logps, mask, average=True), [-1.5, 0.0])
    g = jax.grad(lambda x: f(x, mask).sum())(logps)
    np.testing.assert_array_equal(g, mask.astype(np.float32))
    np.testing.assert_allclose(f(jnp.array([[-1e4, -jnp.inf]]), jnp.array([[1.0, 0.0]])), [-1e4])
    with pytest.raises(ValueError, match="logps_BxT.*mask_BxT"):
      f(jnp.zeros((2, 3)), jnp.zeros((2, 2)))
