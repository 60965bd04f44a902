"""Pairwise preference model: the sequence layout, and the step contract on a model against a
float64 NumPy reference (the loss itself is tested in tests/losses/test_bradley_terry.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from flax import nnx
from rlhf_jax.data.tokenizer import ByteTokenizer
from rlhf_jax.models.transformer import ScalarHeadModel
from rlhf_jax.train import pairwise
from rlhf_jax.train import step as step_lib

TOK = ByteTokenizer()


def np_loss(f_ab, f_ba, y, valid):
  """float64 reference: -[y log s(f_ab) + (1-y) log(1 - s(f_ab))] - [(1-y) log s(f_ba) +
  y log(1 - s(f_ba))], summed over valid pairs, divided by 2 x valid pairs."""
  s = lambda x: 1 / (1 + np.exp(-x))
  per = (-(y * np.log(s(f_ab)) + (1 - y) * np.log(1 - s(f_ab)))
         - ((1 - y) * np.log(s(f_ba)) + y * np.log(1 - s(f_ba))))
  return (per * valid).sum() / (2 * valid.sum())


def test_pair_sequence_layout_and_too_long():
  tokens, valid = pairwise.pair_sequence("hi", "ab", "c", TOK, 10)
  assert list(tokens[valid]) == [TOK.bos_id, *b"hi", *b"ab", TOK.eos_id, *b"c", TOK.eos_id]
  assert not valid[8:].any()
  t2, _ = pairwise.encode_pairs(["hi"], ["ab"], ["c"], TOK, 10)
  assert t2.shape == (1, 2, 10) and list(t2[0, 1, :6]) == [TOK.bos_id, *b"hi", *b"c",
                                                            TOK.eos_id, *b"a"]
  with pytest.raises(ValueError, match="--seq_len=5"):
    pairwise.pair_sequence("hi", "ab", "c", TOK, 5)


def test_loss_fn_in_the_step_contract_equals_the_reference_on_a_model():
  cfg = helpers.nano(n_layers=1)
  graphdef, params = helpers.init_module(lambda r: ScalarHeadModel(cfg, rngs=r), seed=3, std=0.3)
  tokens, valid = pairwise.encode_pairs(["a", "bb", "c"], ["x", "yy", "z"], ["zz", "w", ""],
                                        TOK, 12)
  batch = {"tokens_Bx2xT": tokens, "valid_Bx2xT": valid,
           "label_B": np.array([1.0, 0.0, 1.0], np.float32),
           "example_valid_B": np.array([True, True, False])}
  loss_fn = pairwise.pairwise_loss_fn(graphdef)
  loss_sum, aux = jax.jit(loss_fn)(params, batch, jax.random.key(0))
  model = nnx.merge(graphdef, params)
  f = np.asarray(model.score(jnp.asarray(tokens.reshape(6, 12)),
                             valid_BxT=jnp.asarray(valid.reshape(6, 12))), np.float64).reshape(3, 2)
  want = np_loss(f[:, 0], f[:, 1], batch["label_B"], batch["example_valid_B"])
  assert float(aux["denominator"]) == 4
  # The scores f are float32 forwards on both sides, maybe in another reduction order: each
  # within f32_tol(forward_terms) at the scores' size; the loss (slope <= 1 in each score)
  # adds its B-term sum of two log-sigmoids (3 roundings each) and label terms (4) + a divide.
  n = helpers.forward_terms(cfg, 12, log_softmax=False) + 3 + 2 * 3 + 4 + 1
  tol = helpers.f32_tol(n, scale=np.abs(f).max())
  np.testing.assert_allclose(loss_sum / aux["denominator"], want, **tol)
  # Through the eval step (sums over batches): the same mean.
  out = step_lib.evaluate(jax.jit(step_lib.make_eval_step(loss_fn)), params, [batch])
  np.testing.assert_allclose(out["loss"], want, **tol)
  probs = pairwise.make_preference_fn(graphdef)(params, tokens, valid)
  s = lambda x: 1 / (1 + np.exp(-x))
  # The same forwards; two sigmoids (slope <= 1/4), an add, a subtract and a halving.
  np.testing.assert_allclose(probs, 0.5 * (s(f[:, 0]) + 1 - s(f[:, 1])), **tol)
