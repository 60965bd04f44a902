"""DPO-family losses in the train step's loss contract (step.py), on batches of pairs.py.

    loss_fn(params, batch, rng) -> (sum of pair losses, {"denominator": pairs, metric sums})

One policy forward covers both sides: chosen and rejected rows are concatenated along the
batch (2B rows), which halves the number of kernel launches and keeps the two sides on the
same devices. Sequence log-probs are sums over the response tokens (MATH.md), or means with
average=True (TRL's IPO).

Reference log-probs come from one of two places:
  - precomputed (default for training): `reference_logps_fn` runs the frozen reference once
    over the dataset; the values ride in the batch as ref_chosen_logps / ref_rejected_logps.
    The step then holds ONE model: no reference params, no reference forward.
  - in-step: `ref_params` closed over by the loss_fn (jit treats them as constants of the
    step: fine for a fixed reference), used when the batch carries no reference values.
Both give identical losses (a test checks it).

Rows with example_valid False (padding of the last eval batch) weigh 0: each pair's loss and
metrics are computed per row (vmap over the (B,) loss) and summed with that weight.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax.logprobs import sequence_logps, shifted_logps
from rlhf_jax.losses import dpo

LOSSES = ("dpo", "cdpo", "ipo", "kto")
PAIR_LOSSES = ("dpo", "cdpo", "ipo")
KTO_REFUSAL = "KTO needs desirable/undesirable labels; this dataset format has pairs"


def pair_logps(graphdef, params, batch, *, average: bool = False):
  """(chosen_B, rejected_B) sequence log-probs of the batch's pairs under params, in f32."""
  tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]])
  valid = jnp.concatenate([batch["chosen_valid"], batch["rejected_valid"]])
  mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
  logits_BxTxV = nnx.merge(graphdef, params)(tokens, valid_BxT=valid).logits_BxTxV
  seq_2B = sequence_logps(shifted_logps(logits_BxTxV, tokens), mask, average=average)
  b = batch["chosen_tokens"].shape[0]
  return seq_2B[:b], seq_2B[b:]


def reference_logps_fn(graphdef, *, average: bool = False):
  """(params, batch) -> {"ref_chosen_logps", "ref_rejected_logps"}: the precompute pass
  (jit it once with the params' and batch's shardings)."""
  def fn(params, batch):
    chosen, rejected = pair_logps(graphdef, params, batch, average=average)
    return {"ref_chosen_logps": chosen, "ref_rejected_logps": rejected}
  return fn


def check_loss(loss: str) -> None:
  """Validates the --loss name; KTO is refused because pairs carry no per-example labels."""
  if loss not in LOSSES:
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
  if loss == "kto":
    raise ValueError(KTO_REFUSAL)


def _pair_objective(loss: str, *, beta: float, label_smoothing: float, ipo_tau: float):
  """(pc, pr, rc, rr) -> (loss, metric sums) for one family member; cdpo is dpo with eps."""
  check_loss(loss)
  if loss == "ipo":
    return lambda *a: dpo.ipo_loss(*a, ipo_tau=ipo_tau)
  eps = label_smoothing if loss == "cdpo" else 0.0
  return lambda *a: dpo.dpo_loss(*a, beta=beta, label_smoothing=eps)


def preference_loss_fn(graphdef, *, loss: str = "dpo", beta: float = 0.1,
                       label_smoothing: float = 0.0, ipo_tau: float = 0.1,
                       average_logps: bool = False, ref_params=None):
  """The loss_fn for step.make_train_step / make_eval_step (see the module docstring).

  Metrics (sums; the step divides by the pair count): rewards/chosen, rewards/rejected,
  rewards/margins, rewards/accuracies (implicit-reward preference accuracy), logps/chosen,
  logps/rejected (policy sequence log-probs)."""
  objective = _pair_objective(loss, beta=beta, label_smoothing=label_smoothing,
                              ipo_tau=ipo_tau)

  def per_pair(pc, pr, rc, rr):
    _, sums = objective(pc[None], pr[None], rc[None], rr[None])
    return sums

  def loss_fn(params, batch, rng):
    del rng  # deterministic forward
    policy_chosen, policy_rejected = pair_logps(graphdef, params, batch, average=average_logps)
    if "ref_chosen_logps" in batch:
      ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    elif ref_params is not None:
      ref_chosen, ref_rejected = pair_logps(graphdef, ref_params, batch, average=average_logps)
    else:
      raise ValueError("no reference log-probs: the batch has no ref_chosen_logps/"
                       "ref_rejected_logps and no ref_params were given")
    ref_chosen, ref_rejected = jax.lax.stop_gradient((ref_chosen.astype(jnp.float32),
                                                      ref_rejected.astype(jnp.float32)))
    sums = jax.vmap(per_pair)(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    weight_B = batch["example_valid"].astype(jnp.float32)
    total = {k: jnp.sum(weight_B * v) for k, v in sums.items()}
    aux = {k.removesuffix("_sum"): v for k, v in total.items()
           if k not in ("loss_sum", "count")}
    aux["denominator"] = total["count"]
    return total["loss_sum"], aux

  return loss_fn
