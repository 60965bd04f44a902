"""Sequence packing: the packer's layout, and the packed forward and loss against each
example alone in a padded row (the exact computation packing must reproduce)."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import helpers
from rlhf_jax.data import packing, pipeline
from rlhf_jax.data.tokenizer import ByteTokenizer
from rlhf_jax.train.lm import lm_loss_fn

TOK = ByteTokenizer()
TEXTS = [("12+7=", "19"), ("a longer prompt here ", "and its answer"), ("x", "y"),
         ("what is 3 times 4? ", "12"), ("hello ", "world, again and again")]


def _examples(seq_len=48):
  return [pipeline.sft_example(p, r, TOK, seq_len) for p, r in TEXTS]


def test_layout_keeps_order_segments_and_targets():
  examples = _examples()
  packed = packing.pack_examples(examples, 48, TOK.pad_id)
  lengths = [int(e["valid"].sum()) for e in examples]
  assert packed.examples == len(examples) and packed.real_tokens == sum(lengths)
  # Greedy in order: 48-token rows take examples while they fit.
  rows, used = [[]], 0
  for n in lengths:
    if used + n > 48:
      rows.append([])
      used = 0
    rows[-1].append(n)
    used += n
  assert [np.bincount(r["segment_ids"])[1:].tolist() for r in packed.rows] == rows
  flat = lambda key: np.concatenate([r[key][r["valid"]] for r in packed.rows])  # noqa: E731
  np.testing.assert_array_equal(flat("tokens"), np.concatenate(
      [e["tokens"][:n] for e, n in zip(examples, lengths)]))
  np.testing.assert_array_equal(flat("loss_mask"), np.concatenate(
      [e["loss_mask"][:n] for e, n in zip(examples, lengths)]))
  assert packed.fill == pytest.approx(sum(lengths) / (48 * len(packed.rows)))


def test_an_example_longer_than_the_row_is_refused_by_the_encoder():
  with pytest.raises(ValueError, match="longer than seq_len"):
    pipeline.sft_example("p" * 60, "r", TOK, 48)


def test_packed_logits_and_loss_equal_each_example_alone():
  cfg = helpers.nano()
  graphdef, params = helpers.make_model(cfg)
  examples = _examples()
  packed = packing.pack_examples(examples, 48, TOK.pad_id)
  row = packed.rows[0]
  model = nnx.merge(graphdef, params)
  packed_logits = np.asarray(model(row["tokens"][None], valid_BxT=row["valid"][None],
                                   segment_ids_BxT=row["segment_ids"][None]).logits_BxTxV[0])
  start = 0
  for seg in range(1, int(row["segment_ids"].max()) + 1):
    n = int((row["segment_ids"] == seg).sum())
    ex = examples[seg - 1]
    alone = np.asarray(model(ex["tokens"][None], valid_BxT=ex["valid"][None]).logits_BxTxV[0])
    # Two float32 forwards of at most 48 positions: one example's rounding, another order.
    np.testing.assert_allclose(packed_logits[start:start + n], alone[:n],
                               **helpers.logits_tol(cfg, 48, alone[:n]))
    start += n
  # The loss sums: every packed row's equals the sum over its examples alone.
  loss_fn = lm_loss_fn(graphdef)
  batch = {k: np.stack([r[k] for r in packed.rows]) for k in packing.PACKED_KEYS}
  padded = {k: np.stack([e[k] for e in examples]) for k in ("tokens", "loss_mask", "valid")}
  packed_sum, packed_aux = loss_fn(params, batch, None)
  padded_sum, padded_aux = loss_fn(params, padded, None)
  assert float(packed_aux["denominator"]) == float(padded_aux["denominator"])
  np.testing.assert_allclose(float(packed_sum), float(padded_sum),
                             **helpers.f32_tol(helpers.forward_terms(cfg, 48) + 5 * 48))


def test_attention_stays_inside_each_document():
  graphdef, params = helpers.make_model()
  row = packing.pack_examples(_examples(), 48, TOK.pad_id).rows[0]
  model = nnx.merge(graphdef, params)
  run = lambda tokens: np.asarray(model(tokens[None], valid_BxT=row["valid"][None],  # noqa
                                        segment_ids_BxT=row["segment_ids"][None]).logits_BxTxV)
  changed = row["tokens"].copy()
  first = row["segment_ids"] == 1
  changed[first] = (changed[first] + 1) % 200 + 1  # another first document
  later = row["segment_ids"] > 1
  assert later.any()
  np.testing.assert_array_equal(run(row["tokens"])[0][later], run(changed)[0][later])


def test_packed_pairs_give_each_pairs_log_probs_and_loss():
  """A batch of packed pairs and the same pairs unpacked: the same sequence log-probs per
  pair (in slot order) and the same DPO loss sum over the real pairs."""
  from rlhf_jax.data import pairs
  from rlhf_jax.train import preference
  cfg = helpers.nano()
  graphdef, params = helpers.make_model(cfg)
  records = [{"prompt": p, "prompt_kind": "text", "chosen": r, "rejected": r[::-1] + "?"}
             for p, r in TEXTS]
  encoded = [pairs.pair_example(r, TOK, 48) for r in records]
  packed = packing.pack_pairs(encoded, 96, TOK.pad_id)
  assert packed.examples == len(records)
  batch = {k: np.stack([r[k] for r in packed.rows]) for k in packing.PAIR_KEYS}
  flat = {k: np.stack([e[k] for e in encoded]) for k in encoded[0]}
  pc, pr = preference.pair_logps(graphdef, params, batch)
  uc, ur = preference.pair_logps(graphdef, params, flat)
  real = batch["pair_valid"].reshape(-1)
  tol = helpers.f32_tol(helpers.forward_terms(cfg, 96) + 48, scale=float(np.abs(uc).max()))
  np.testing.assert_allclose(np.asarray(pc)[real], np.asarray(uc), **tol)
  np.testing.assert_allclose(np.asarray(pr)[real], np.asarray(ur), **tol)
  # With reference log-probs 0.5 nats below the policy's: the loss sums agree.
  for b, (c, r) in ((batch, (pc, pr)), (flat, (uc, ur))):
    shape = b["pair_valid"].shape if b is batch else c.shape
    b["ref_chosen_logps"] = (np.asarray(c) - 0.5).reshape(shape)
    b["ref_rejected_logps"] = (np.asarray(r) + 0.5).reshape(shape)
  loss_fn = preference.preference_loss_fn(graphdef, beta=0.5)
  packed_sum, packed_aux = loss_fn(params, batch, None)
  flat_sum, flat_aux = loss_fn(params, flat, None)
  assert float(packed_aux["denominator"]) == len(records)
  np.testing.assert_allclose(float(packed_sum), float(flat_sum), **helpers.f32_tol(
      len(records) * 4, scale=1.0))


def test_packed_rankings_score_like_each_ranking_alone():
  """Rankings of 2 and 3 responses packed into rows: every response's reward (read at its
  segment's last token) and the ranking loss equal the unpacked batch's."""
  from rlhf_jax.models.transformer import ScalarHeadModel
  from rlhf_jax.train import reward
  cfg = helpers.nano()
  graphdef, params = helpers.init_module(lambda r: ScalarHeadModel(cfg, rngs=r))
  rankings = []
  for i, (p, r) in enumerate(TEXTS):
    k = 2 + i % 2
    seqs = [pipeline.sft_example(p, r + "!" * j, TOK, 48) for j in range(k)]
    pad = pipeline.sft_example("", "", TOK, 48) | {"valid": np.zeros(48, bool)}
    seqs += [pad] * (3 - k)
    rankings.append({"tokens_BxKxT": np.stack([s["tokens"] for s in seqs]),
                     "valid_BxKxT": np.stack([s["valid"] for s in seqs]),
                     "response_valid_BxK": np.arange(3) < k})
  packed = packing.pack_rankings(rankings, 128, TOK.pad_id)
  batch = {k: np.stack([r[k] for r in packed.rows]) for k in packing.RANKING_KEYS}
  flat = {k: jnp.asarray(np.stack([r[k] for r in rankings])) for k in rankings[0]}
  scores = np.asarray(reward.ranking_scores(graphdef, params, batch))
  want = np.asarray(reward.ranking_scores(graphdef, params, flat))
  slots = np.asarray(reward.response_valid(batch)).any(1)  # slots holding a ranking
  got = scores[slots]
  mask = np.asarray(flat["response_valid_BxK"])
  tol = helpers.f32_tol(helpers.forward_terms(cfg, 128, log_softmax=False) + cfg.d_model,
                        scale=float(np.abs(want).max()))
  np.testing.assert_allclose(got[mask], want[mask], **tol)
  loss_fn = reward.ranking_loss_fn(graphdef)
  packed_sum, packed_aux = loss_fn(params, batch, None)
  flat_sum, flat_aux = loss_fn(params, flat, None)
  assert float(packed_aux["denominator"]) == float(flat_aux["denominator"]) == len(TEXTS)
  np.testing.assert_allclose(float(packed_sum), float(flat_sum), **helpers.f32_tol(
      helpers.forward_terms(cfg, 128) + 6 * len(TEXTS), scale=1.0))
