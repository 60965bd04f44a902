"""Pairwise preference model P(y > y' | x) (Munos et al. 2024), in the train step's loss
contract (step.py), for preferences no scalar reward represents (intransitive raters).

The model is a ScalarHeadModel (train/reward.py: SFT backbone, fresh scalar head) read at the
last real token of ONE sequence holding both responses:

  [bos] prompt  response_a  [eos]  response_b  [eos]          f(x, a, b) = its scalar

EOS closes each response, so it doubles as the separator (the byte tokenizer has no other
special token, and a response never contains EOS). Every labelled pair is seen in BOTH orders,
and the loss is losses.bradley_terry.preference_model_loss:

  loss = BCE(s(f(x, a, b)), y) + BCE(s(f(x, b, a)), 1 - y),   y = 1 if the rater preferred a

so the model is antisymmetric by training, and at inference it is antisymmetric by
construction (losses.bradley_terry.preference_probability):

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
from rlhf_jax.losses import bradley_terry


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
    _, m = bradley_terry.preference_model_loss(f_ab, f_ba, batch["label_B"],
                                               batch["example_valid_B"])
    return m["loss_sum"], {"denominator": m["count"], "accuracy": m["accuracy_sum"]}
  return loss_fn


def make_preference_fn(graphdef):
  """jitted (params, tokens_Bx2xT, valid_Bx2xT) -> P(a > b) [B], float32."""
  @jax.jit
  def preference(params, tokens_Bx2xT, valid_Bx2xT):
    return bradley_terry.preference_probability(
        *pair_logits(graphdef, params, tokens_Bx2xT, valid_Bx2xT))
  return preference
