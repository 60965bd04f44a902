"""Pairwise preference model P(y > y' | x) (Munos et al. 2024), in the train step's loss
contract (step.py), for preferences no scalar reward represents (intransitive raters).

The model is a ScalarHeadModel (train/reward.py: SFT backbone, fresh scalar head) read at the
last real token of ONE sequence holding both responses:

  [bos] prompt  response_a  [eos]  response_b  [eos]          f(x, a, b) = its scalar

EOS closes each response, so it doubles as the separator (the byte tokenizer has no other
special token, and a response never contains EOS). Every labelled pair is seen in BOTH orders:

  loss = BCE(s(f(x, a, b)), y) + BCE(s(f(x, b, a)), 1 - y),   y = 1 if the rater preferred a

so the model is antisymmetric by training, and at inference it is antisymmetric by
construction (MATH.md: P(y > y') = s(f(x,y,y') - f(x,y',y)) is the other common form):

  P(a > b | x) = ( s(f(x, a, b)) + 1 - s(f(x, b, a)) ) / 2,   P(a > b) + P(b > a) = 1 exactly.

Batch (rows are labelled pairs; order 0 is (a, b), order 1 is (b, a)):
  tokens_Bx2xT, valid_Bx2xT   the two sequences of each pair (right-padded)
  label_B                     float32, 1 if a was preferred (a soft label in [0, 1] works too)
  example_valid_B             bool, False for padding rows (weight 0)
Units of the loss: ordered comparisons (2 per valid pair).
"""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax.data.tokenizer import Tokenizer


def pair_sequence(prompt: str, response_a: str, response_b: str, tokenizer: Tokenizer,
                  seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """(tokens int32 [T], valid bool [T]): [bos] prompt a [eos] b [eos], right-padded."""
  ids = [tokenizer.bos_id, *tokenizer.encode(prompt), *tokenizer.encode(response_a),
         tokenizer.eos_id, *tokenizer.encode(response_b), tokenizer.eos_id]
  if len(ids) > seq_len:
    raise ValueError(f"a prompt with two responses is {len(ids)} tokens, more than "
                     f"--seq_len={seq_len}; raise it to at least prompt_len + 2 * max_new_tokens")
  tokens = np.full(seq_len, tokenizer.pad_id, np.int32)
  tokens[:len(ids)] = ids
  return tokens, tokens != tokenizer.pad_id


def encode_pairs(prompts, ys_a, ys_b, tokenizer: Tokenizer,
                 seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """tokens_Nx2xT, valid_Nx2xT of N pairs in both orders."""
  if not len(prompts) == len(ys_a) == len(ys_b):
    raise ValueError(f"{len(prompts)} prompts, {len(ys_a)} and {len(ys_b)} responses")
  rows = [[pair_sequence(p, a, b, tokenizer, seq_len), pair_sequence(p, b, a, tokenizer, seq_len)]
          for p, a, b in zip(prompts, ys_a, ys_b)]
  tokens = np.array([[t for t, _ in r] for r in rows], np.int32).reshape(len(rows), 2, seq_len)
  valid = np.array([[v for _, v in r] for r in rows], bool).reshape(len(rows), 2, seq_len)
  return tokens, valid


def preference_probs(logits_ab_B, logits_ba_B):
  """P(a > b) = (s(f_ab) + 1 - s(f_ba)) / 2."""
  return 0.5 * (jax.nn.sigmoid(logits_ab_B) + 1.0 - jax.nn.sigmoid(logits_ba_B))


def pairwise_bce_loss(logits_ab_B, logits_ba_B, labels_B, valid_B):
  """Both-orders binary cross-entropy (module docstring). Returns (mean loss over ordered
  comparisons, metrics as SUMS over ordered comparisons): loss_sum, count (2 x valid pairs),
  accuracy_sum (the symmetrised P(a > b) on the label's side of 1/2, ties 1/2; both orders of
  a pair share that prediction, so each pair counts twice and accuracy_sum / count is the
  per-pair accuracy), pair_count."""
  for name, x in (("logits_ba_B", logits_ba_B), ("labels_B", labels_B), ("valid_B", valid_B)):
    if x.shape != logits_ab_B.shape or logits_ab_B.ndim != 1:
      raise ValueError(f"{name}{tuple(x.shape)} must match logits_ab_B"
                       f"{tuple(logits_ab_B.shape)}, rank 1")
  w = valid_B.astype(jnp.float32)
  y = labels_B.astype(jnp.float32)
  # BCE(s(f), y) = y softplus(-f) + (1 - y) softplus(f)
  bce = lambda f, t: t * jax.nn.softplus(-f) + (1.0 - t) * jax.nn.softplus(f)
  per_pair = bce(logits_ab_B, y) + bce(logits_ba_B, 1.0 - y)
  p = preference_probs(logits_ab_B, logits_ba_B)
  hit = jnp.where(p == 0.5, 0.5, ((p > 0.5) == (y > 0.5)).astype(jnp.float32))
  sg = jax.lax.stop_gradient
  metrics = {"loss_sum": jnp.sum(per_pair * w), "count": 2.0 * jnp.sum(w),
             "accuracy_sum": sg(2.0 * jnp.sum(hit * w)), "pair_count": jnp.sum(w)}
  return metrics["loss_sum"] / jnp.maximum(metrics["count"], 1.0), metrics


def pair_logits(graphdef, params, tokens_Bx2xT, valid_Bx2xT):
  """(f(x, a, b), f(x, b, a)), float32 [B] each: one forward over the 2B sequences."""
  if tokens_Bx2xT.ndim != 3 or tokens_Bx2xT.shape[1] != 2 or valid_Bx2xT.shape != tokens_Bx2xT.shape:
    raise ValueError(f"tokens_Bx2xT{tuple(tokens_Bx2xT.shape)} and valid_Bx2xT"
                     f"{tuple(valid_Bx2xT.shape)} must both be [B, 2, T]")
  b, _, t = tokens_Bx2xT.shape
  scores = nnx.merge(graphdef, params).score(tokens_Bx2xT.reshape(2 * b, t),
                                             valid_BxT=valid_Bx2xT.reshape(2 * b, t))
  scores = scores.astype(jnp.float32).reshape(b, 2)
  return scores[:, 0], scores[:, 1]


def pairwise_loss_fn(graphdef):
  """loss_fn(params, batch, rng) -> (loss_sum, aux) on the module's batch layout; aux:
  denominator (ordered comparisons), accuracy (so the step logs the per-pair accuracy)."""
  def loss_fn(params, batch, rng):
    del rng  # deterministic forward
    f_ab, f_ba = pair_logits(graphdef, params, batch["tokens_Bx2xT"], batch["valid_Bx2xT"])
    _, m = pairwise_bce_loss(f_ab, f_ba, batch["label_B"], batch["example_valid_B"])
    return m["loss_sum"], {"denominator": m["count"], "accuracy": m["accuracy_sum"]}
  return loss_fn


def make_preference_fn(graphdef):
  """jitted (params, tokens_Bx2xT, valid_Bx2xT) -> P(a > b) [B], float32."""
  @jax.jit
  def preference(params, tokens_Bx2xT, valid_Bx2xT):
    return preference_probs(*pair_logits(graphdef, params, tokens_Bx2xT, valid_Bx2xT))
  return preference
