"""Shared-prompt rows (data/shared_prefix.py): the prompt computed once, exact against the rows
the responses have alone.

The reference is the unshared computation the project already checks against the float64
Llama (tests/models): two rows per DPO pair, K rows per ranking. Shared and unshared differ only
in float32 summation order (masked scores add exact zeros; the matmuls see other row lengths),
so they must agree to helpers.f32_tol of the forward.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from rlhf_jax.data import pairs, shared_prefix
from rlhf_jax.data.tokenizer import ByteTokenizer
from rlhf_jax.models.transformer import ScalarHeadModel
from rlhf_jax.runs.dpo import DPOConfig
from rlhf_jax.train import preference, reward

TOK = ByteTokenizer()
SEQ, RESP = 56, 24
RECORDS = [  # prompts and responses of different lengths, so rows pad differently
    {"prompt": "What is 2+2?", "prompt_kind": "text", "chosen": " 4", "rejected": " five!"},
    {"prompt": "Say hi", "prompt_kind": "text", "chosen": " hi there", "rejected": " no"},
    {"prompt": "A much longer prompt, to shift", "prompt_kind": "text", "chosen": " ok",
     "rejected": " a longer reply"},
]


def _batch(response_len):
  encode = pairs.make_encoder(TOK, SEQ, "pairs", response_len=response_len)
  rows = [encode(r) for r in RECORDS]
  return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}


def test_the_row_layout_by_hand():
  row = shared_prefix.shared_row([9, 5, 6], [[7, 8, 1], [3, 1]], row_len=10, response_len=4,
                                 pad_id=0)
  np.testing.assert_array_equal(row["tokens"], [9, 5, 6, 7, 8, 1, 3, 1, 0, 0])
  np.testing.assert_array_equal(row["positions"][:8], [0, 1, 2, 3, 4, 5, 3, 4])
  np.testing.assert_array_equal(row["segment_ids"], [1, 1, 1, 2, 2, 2, 3, 3, 0, 0])
  np.testing.assert_array_equal(row["prefix_ids"], [1] * 8 + [0, 0])
  # Response 1's tokens are predicted by the prompt's last state (2), then by its own (3, 4);
  # response 2's first token by the prompt's last state too, not by response 1's last (5).
  np.testing.assert_array_equal(row["from"], [[2, 3, 4, 0], [2, 6, 0, 0]])
  np.testing.assert_array_equal(row["targets"], [[7, 8, 1, 0], [3, 1, 0, 0]])
  np.testing.assert_array_equal(row["target_mask"], [[1, 1, 1, 0], [1, 1, 0, 0]])
  np.testing.assert_array_equal(row["ends"], [5, 7])


def test_pair_logps_equal_the_two_row_computation():
  graphdef, params = helpers.make_model(helpers.nano(), seed=2)
  tol = helpers.f32_tol(helpers.forward_terms(helpers.nano(), SEQ), scale=50.0)
  for average in (False, True):
    want = preference.pair_logps(graphdef, params, _batch(0), average=average)
    got = jax.jit(lambda p, b: preference.pair_logps(graphdef, p, b, average=average))(
        params, _batch(RESP))
    for g, w in zip(got, want):
      assert np.all(np.asarray(w) < 0)
      np.testing.assert_allclose(g, w, **tol)
  # The reference precompute pass: one value per pair, as from the two-row layout.
  ref = preference.reference_logps_fn(graphdef)
  want, got = ref(params, _batch(0)), jax.jit(ref)(params, _batch(RESP))
  for key in want:
    assert got[key].shape == (len(RECORDS),)
    np.testing.assert_allclose(got[key], want[key], **tol)


def test_dpo_and_kto_losses_and_gradients_equal_the_two_row_computation():
  cfg = helpers.nano()
  graphdef, params = helpers.make_model(cfg, seed=4)
  _, ref = helpers.make_model(cfg, seed=5)
  fns = {"dpo": preference.preference_loss_fn(graphdef, loss="dpo", beta=0.5, ref_params=ref),
         "kto": preference.kto_loss_fn(graphdef, beta=0.5, ref_params=ref)}
  tol = helpers.f32_tol(3 * helpers.forward_terms(cfg, SEQ))
  for name, fn in fns.items():
    grad = jax.jit(jax.grad(lambda p, b: fn(p, b, None)[0]))
    value = jax.jit(lambda p, b: fn(p, b, None)[0])
    batches = [_batch(0), _batch(RESP)]
    if name == "kto":
      batches = [b | {"desirable": jnp.asarray([True, False, True])} for b in batches]
    np.testing.assert_allclose(value(params, batches[1]), value(params, batches[0]), **tol)
    for g, w in zip(jax.tree.leaves(grad(params, batches[1])),
                    jax.tree.leaves(grad(params, batches[0]))):
      np.testing.assert_allclose(g, w, rtol=tol["rtol"],
                                 atol=tol["rtol"] * float(np.abs(w).max()))


def test_reward_scores_of_a_ranking_equal_its_k_rows():
  cfg = helpers.nano()
  graphdef, params = helpers.init_module(lambda r: ScalarHeadModel(cfg, rngs=r), seed=6)
  head, responses = [TOK.bos_id, *TOK.encode("rank these")], [
      TOK.encode(s) + [TOK.eos_id] for s in (" first", " second one", " 3")]
  rows = np.full((3, SEQ), TOK.pad_id, np.int32)
  valid = np.zeros((3, SEQ), bool)
  for j, r in enumerate(responses):
    rows[j, :len(head) + len(r)], valid[j, :len(head) + len(r)] = head + r, True
  want = reward.ranking_scores(graphdef, params, {"tokens_BxKxT": jnp.asarray(rows[None]),
                                                  "valid_BxKxT": jnp.asarray(valid[None])})
  shared = shared_prefix.shared_row(head, responses, row_len=SEQ, response_len=RESP,
                                    pad_id=TOK.pad_id)
  got = reward.ranking_scores(graphdef, params, {k: jnp.asarray(v[None])
                                                 for k, v in shared.items()})
  np.testing.assert_allclose(got, want, **helpers.f32_tol(
      helpers.forward_terms(cfg, SEQ, log_softmax=False), scale=float(np.abs(want).max())))


def test_a_forward_without_its_positions_is_refused():
  graphdef, params = helpers.make_model(helpers.nano())
  b = _batch(RESP)
  with pytest.raises(ValueError, match="positions_BxT"):
    jax.eval_shape(lambda p: __import__("flax").nnx.merge(graphdef, p)(
        b["tokens"], valid_BxT=b["valid"], segment_ids_BxT=b["segment_ids"],
        prefix_ids_BxT=b["prefix_ids"]), params)


def test_bad_lengths_are_refused_with_the_flag_to_fix():
  long = {**RECORDS[0], "chosen": " " + "x" * 30}
  with pytest.raises(ValueError, match="--response_len"):
    pairs.make_encoder(TOK, SEQ, "pairs", response_len=RESP)(long)
  with pytest.raises(ValueError, match="--response_len"):
    pairs.make_encoder(TOK, SEQ, "pairs", response_len=SEQ)
  with pytest.raises(ValueError, match="--pack"):
    DPOConfig(response_len=16, pack=True, data_files="x.jsonl")
