"""The DPO-family loss_fn in the step contract, on a nano model and pairs.py batches."""
import math

import jax
import numpy as np
import optax
import pytest

from helpers import make_model
from rlhf_jax.data import pairs
from rlhf_jax.data.tokenizer import ByteTokenizer
from rlhf_jax.train import preference, step
from rlhf_jax.train.state import init_train_state

RECORDS = [{"prompt": f"{a}+{b}=", "prompt_kind": "text", "chosen": str(a + b),
            "rejected": str(a + b + d)} for a, b, d in
           [(12, 30, 1), (7, 5, -2), (40, 41, 10), (3, 99, -1)]]
SEQ = 16


@pytest.fixture(scope="module")
def model():
  return make_model()


def _batch(records=RECORDS):
  rows = [pairs.pair_example(r, ByteTokenizer(), SEQ) for r in records]
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _loss(graphdef, params, batch, **kw):
  fn = jax.jit(preference.preference_loss_fn(graphdef, **kw))
  loss_sum, aux = fn(params, batch, jax.random.key(0))
  return float(loss_sum / aux["denominator"]), {k: float(v) for k, v in aux.items()}


def test_pair_example_masks_response_and_eos():
  ex = pairs.pair_example(RECORDS[0], ByteTokenizer(), SEQ)
  tok = ByteTokenizer()
  head = 1 + len("12+30=")
  assert ex["chosen_tokens"][0] == tok.bos_id
  assert ex["chosen_tokens"][head + 2] == tok.eos_id  # "42" then eos
  np.testing.assert_array_equal(np.nonzero(ex["chosen_mask"])[0], [head, head + 1, head + 2])
  assert ex["rejected_valid"].sum() == head + 3
  with pytest.raises(ValueError, match="longer than seq_len"):
    pairs.pair_example(RECORDS[0], tok, 8)


@pytest.mark.parametrize("loss, expected", [("dpo", math.log(2)), ("cdpo", math.log(2)),
                                            ("ipo", (1 / (2 * 0.1)) ** 2)])
def test_policy_equal_to_reference(model, loss, expected):
  graphdef, params = model
  value, aux = _loss(graphdef, params, _batch(), loss=loss, label_smoothing=0.2, ref_params=params)
  assert value == pytest.approx(expected, rel=1e-5)
  assert aux["rewards/accuracies"] == 0.0 and aux["rewards/margins"] == 0.0
  assert aux["denominator"] == len(RECORDS)
  assert aux["logps/chosen"] < 0 and aux["logps/rejected"] < 0


def test_precomputed_reference_equals_in_step(model):
  graphdef, params = model
  _, ref = make_model(seed=1)
  batch = _batch()
  ref_logps = jax.jit(preference.reference_logps_fn(graphdef))(ref, batch)
  in_step = _loss(graphdef, params, batch, ref_params=ref)
  pre = _loss(graphdef, params, {**batch, **ref_logps})
  assert pre[0] == pytest.approx(in_step[0], rel=1e-6)
  for k in in_step[1]:
    assert pre[1][k] == pytest.approx(in_step[1][k], rel=1e-5, abs=1e-6)
  assert in_step[0] != pytest.approx(math.log(2))  # the reference really differs


def test_padding_rows_weigh_nothing(model):
  graphdef, params = model
  _, ref = make_model(seed=1)
  batch = _batch()
  padded = _batch(RECORDS + RECORDS[:2])
  padded["example_valid"][len(RECORDS):] = False
  a = _loss(graphdef, params, batch, ref_params=ref)
  b = _loss(graphdef, params, padded, ref_params=ref)
  assert b[0] == pytest.approx(a[0], rel=1e-6) and b[1]["denominator"] == len(RECORDS)


def test_two_microbatches_equal_one(model):
  graphdef, params = model
  _, ref = make_model(seed=1)
  batch = _batch()
  batch.update(jax.jit(preference.reference_logps_fn(graphdef))(ref, batch))
  loss_fn = preference.preference_loss_fn(graphdef, beta=0.5)
  out = []
  for m in (1, 2):
    fn = step.make_train_step(loss_fn, optax.sgd(1.0), num_microbatches=m)
    state = init_train_state(params, optax.sgd(1.0), jax.random.key(0))
    out.append(jax.jit(fn)(state, batch))
  (s1, m1), (s2, m2) = out
  assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), rel=1e-6)
  assert float(m1["grad_norm"]) > 0
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_kto_on_pairs_is_refused():
  with pytest.raises(ValueError, match="KTO needs desirable/undesirable labels"):
    preference.check_loss("kto")
  with pytest.raises(ValueError, match="loss must be one of"):
    preference.check_loss("orpo")
