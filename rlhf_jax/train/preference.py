"""DPO-family losses in the train step's loss contract (step.py), on batches of pairs.py.

    loss_fn(params, batch, rng) -> (sum of pair losses, {"denominator": pairs, metric sums})

One policy forward covers both sides: chosen and rejected rows are concatenated along the
batch (2B rows), which halves the number of kernel launches and keeps the two sides on the
same devices. Sequence log-probs are sums over the response tokens (docs/math.md,
conventions), or means with average=True (TRL's IPO; always for SimPO).

Reference log-probs come from one of two places:
  - precomputed (default for training): `reference_logps_fn` runs the frozen reference once
    over the dataset; the values ride in the batch as ref_chosen_logps / ref_rejected_logps.
    The step then holds ONE model: no reference params, no reference forward.
  - in-step: `ref_params` closed over by the loss_fn (jit treats them as constants of the
    step: fine for a fixed reference), used when the batch carries no reference values.
Both give identical losses (a test checks it). SimPO needs neither (`needs_reference`): its
loss_fn reads no reference values and ignores ref_params, so callers skip the precompute.

Rows with example_valid False (padding of the last eval batch) weigh 0: each pair's loss and
metrics are computed per row (vmap over the (B,) loss) and summed with that weight.

KTO (`kto_loss_fn`) trains on unpaired labelled examples and rides in the same pair layout,
so the encoders, iterators and reference precompute above serve it unchanged: row b's
"chosen" side is the labelled example (x_b, y_b) (batch["desirable"] its label) and its
"rejected" side is the MISMATCHED (x_b, y'_b), y' a response to another prompt, whose
log-ratio estimates KL(pi || pi_ref) for KTO's reference point z_0 (Ethayarajh 2024; TRL
pairs each prompt with another example's completion the same way).
"""
import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax.data import shared_prefix as shared_prefix_data
from rlhf_jax.logprobs import sequence_logps, shifted_logps_of
from rlhf_jax.losses import diagnostics, dpo, dpo_variants
from rlhf_jax.train import shared_prefix

LOSSES = ("dpo", "cdpo", "ipo", "kto", "hinge", "robust_dpo", "simpo")
PAIR_LOSSES = ("dpo", "cdpo", "ipo")  # the online DPO's choices
REFERENCE_FREE = ("simpo",)
KTO_REFUSAL = "KTO needs desirable/undesirable labels; this dataset format has pairs"


def pair_logps(graphdef, params, batch, *, average: bool = False):
  """(chosen_B, rejected_B) sequence log-probs of the batch's pairs under params, in f32; of
  a packed batch (data/packing.py: pack_pairs; rows of several pairs, R x P slots), the
  R * P slots' (empty ones included: pair_weights gives them weight 0); of a shared-prompt
  batch (data/shared_prefix.py: one row per pair), each row's two responses."""
  if shared_prefix_data.is_shared(batch):  # one row per pair: the prompt computed once
    both = shared_prefix.response_logps(graphdef, params, batch, average=average)
    return both[:, 0], both[:, 1]
  if "segment_ids" in batch:
    return _packed_pair_logps(graphdef, params, batch, average)
  tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]])
  valid = jnp.concatenate([batch["chosen_valid"], batch["rejected_valid"]])
  mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
  model = nnx.merge(graphdef, params)
  hidden, _ = model.hidden(tokens, valid_BxT=valid)
  seq_2B = sequence_logps(shifted_logps_of(model.logits, hidden, tokens), mask, average=average)
  b = batch["chosen_tokens"].shape[0]
  return seq_2B[:b], seq_2B[b:]


def _packed_pair_logps(graphdef, params, batch, average: bool):
  tokens, mask = batch["tokens"], batch["loss_mask"]
  model = nnx.merge(graphdef, params)
  hidden, _ = model.hidden(tokens, valid_BxT=batch["valid"], segment_ids_BxT=batch["segment_ids"])
  logps = jnp.where(mask > 0, shifted_logps_of(model.logits, hidden, tokens), 0.0)
  segments = 2 * batch["chosen_segment"].shape[1] + 1
  onehot = (batch["segment_ids"][:, :, None] == jnp.arange(segments)).astype(jnp.float32)
  sums = jnp.einsum("bt,bts->bs", logps, onehot)  # per segment: its response's log-prob
  if average:
    sums = sums / jnp.maximum(jnp.einsum("bt,bts->bs", mask, onehot), 1.0)
  pick = lambda key: jnp.take_along_axis(sums, batch[key], axis=1).reshape(-1)  # noqa: E731
  return pick("chosen_segment"), pick("rejected_segment")


def pair_weights(batch):
  """1 for each real pair of the batch, 0 for padding: example_valid, or a packed batch's
  pair_valid slots (flattened like pair_logps)."""
  if "pair_valid" in batch:
    return batch["pair_valid"].reshape(-1).astype(jnp.float32)
  return batch["example_valid"].astype(jnp.float32)


def reference_logps_fn(graphdef, *, average: bool = False):
  """(params, batch) -> {"ref_chosen_logps", "ref_rejected_logps"}: the precompute pass
  (jit it once with the params' and batch's shardings)."""
  def fn(params, batch):
    chosen, rejected = pair_logps(graphdef, params, batch, average=average)
    if "pair_valid" in batch:  # packed rows: one value per pair slot, R x P
      chosen, rejected = (x.reshape(batch["pair_valid"].shape) for x in (chosen, rejected))
    return {"ref_chosen_logps": chosen, "ref_rejected_logps": rejected}
  return fn


def check_loss(loss: str, *, unpaired_labels: bool = False) -> None:
  """Validates the --loss name; KTO is refused unless the data carries per-example
  desirable/undesirable labels (pairs alone do not)."""
  if loss not in LOSSES:
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
  if loss == "kto" and not unpaired_labels:
    raise ValueError(KTO_REFUSAL)


def needs_reference(loss: str) -> bool:
  """Whether --loss reads reference log-probs: False for SimPO (reference-free), whose callers
  skip the reference precompute and the reference params."""
  if loss not in LOSSES:
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
  return loss not in REFERENCE_FREE


def _pair_objective(loss: str, *, beta: float, label_smoothing: float, ipo_tau: float,
                    simpo_gamma: float):
  """(pc, pr[, rc, rr]) -> (loss, metric sums) for one family member; cdpo is dpo with eps,
  robust_dpo takes eps = label_smoothing too; simpo takes no reference log-probs."""
  check_loss(loss)
  if loss == "ipo":
    return lambda *a: dpo.ipo_loss(*a, ipo_tau=ipo_tau)
  if loss == "hinge":
    return lambda *a: dpo_variants.hinge_loss(*a, beta=beta)
  if loss == "robust_dpo":
    return lambda *a: dpo_variants.robust_dpo_loss(*a, beta=beta, label_smoothing=label_smoothing)
  if loss == "simpo":
    return lambda *a: dpo_variants.simpo_loss(*a, beta=beta, gamma=simpo_gamma)
  eps = label_smoothing if loss == "cdpo" else 0.0
  return lambda *a: dpo.dpo_loss(*a, beta=beta, label_smoothing=eps)


def _reference_logps(graphdef, ref_params, batch, average: bool):
  """The reference's (chosen_B, rejected_B) log-probs: precomputed in the batch, else a
  forward of the closed-over ref_params; f32, no gradient."""
  if "ref_chosen_logps" in batch:
    ref = batch["ref_chosen_logps"].reshape(-1), batch["ref_rejected_logps"].reshape(-1)
  elif ref_params is not None:
    ref = pair_logps(graphdef, ref_params, batch, average=average)
  else:
    raise ValueError("no reference log-probs: the batch has no ref_chosen_logps/"
                     "ref_rejected_logps and no ref_params were given")
  return jax.lax.stop_gradient(tuple(x.astype(jnp.float32) for x in ref))


def preference_loss_fn(graphdef, *, loss: str = "dpo", beta: float = 0.1,
                       label_smoothing: float = 0.0, ipo_tau: float = 0.1,
                       simpo_gamma: float = 0.5, average_logps: bool = False, ref_params=None):
  """The loss_fn for step.make_train_step / make_eval_step (see the module docstring).

  loss="simpo" always uses length-averaged policy log-probs (SimPO's reward is defined on
  them), whatever average_logps says, and reads no reference: the batch's ref_* values and
  ref_params, if given, are ignored. Every other loss needs either.

  Metrics (sums; the step divides by the pair count): rewards/chosen, rewards/rejected,
  rewards/margins, rewards/accuracies (implicit-reward preference accuracy), logps/chosen,
  logps/rejected (policy sequence log-probs; SimPO: their per-token means)."""
  objective = _pair_objective(loss, beta=beta, label_smoothing=label_smoothing,
                              ipo_tau=ipo_tau, simpo_gamma=simpo_gamma)
  with_ref = needs_reference(loss)
  average = average_logps or not with_ref

  def per_pair(*logps):
    _, sums = objective(*(x[None] for x in logps))
    return sums

  def loss_fn(params, batch, rng):
    del rng  # deterministic forward
    logps = pair_logps(graphdef, params, batch, average=average)
    if with_ref:
      logps += _reference_logps(graphdef, ref_params, batch, average)
    sums = jax.vmap(per_pair)(*logps)
    weight_B = pair_weights(batch)
    total = {k: jnp.sum(weight_B * v) for k, v in sums.items()}
    aux = {k.removesuffix("_sum"): v for k, v in total.items()
           if k not in ("loss_sum", "count")}
    aux["denominator"] = total["count"]
    return total["loss_sum"], aux

  return loss_fn


def kto_loss_fn(graphdef, *, beta: float = 0.1, desirable_weight: float = 1.0,
                undesirable_weight: float = 1.0, average_logps: bool = False, ref_params=None):
  """KTO's loss_fn (rlhf_jax.losses.dpo.kto_loss) on the pair layout of the module docstring:
  chosen_* = the labelled example, rejected_* = its mismatched KL pair, desirable bool B.

  z_0 is the clamped mean of the valid rows' KL log-ratios over this microbatch (padding rows
  are filled with that mean, so they move neither z_0 nor anything else). Metrics are sums
  over examples, so the step reports them per example: loss, kl (mean mismatched log-ratio),
  chosen_fraction (share of desirable rows), rewards/chosen and logps/chosen (summed over
  desirable rows; their class mean is the value / chosen_fraction), rewards/rejected and
  logps/rejected likewise over undesirable rows."""
  def per_row(p, r, d, kl_M):
    _, sums = dpo.kto_loss(p[None], r[None], d[None], kl_M, beta=beta,
                           desirable_weight=desirable_weight,
                           undesirable_weight=undesirable_weight)
    return sums

  def loss_fn(params, batch, rng):
    del rng  # deterministic forward
    policy, policy_kl = pair_logps(graphdef, params, batch, average=average_logps)
    ref, ref_kl = _reference_logps(graphdef, ref_params, batch, average_logps)
    weight_B = batch["example_valid"].astype(jnp.float32)
    count = jnp.sum(weight_B)
    kl_B = jax.lax.stop_gradient(policy_kl) - ref_kl
    kl_mean = jnp.sum(weight_B * kl_B) / jnp.maximum(count, 1.0)
    kl_M = jnp.where(batch["example_valid"], kl_B, kl_mean)
    sums = jax.vmap(per_row, in_axes=(0, 0, 0, None))(policy, ref, batch["desirable"], kl_M)
    good_B = batch["desirable"].astype(jnp.float32) * weight_B
    bad_B = (1.0 - batch["desirable"].astype(jnp.float32)) * weight_B
    logps = jax.lax.stop_gradient(policy)
    aux = {"rewards/chosen": jnp.sum(weight_B * sums["rewards/chosen_sum"]),
           "rewards/rejected": jnp.sum(weight_B * sums["rewards/rejected_sum"]),
           "logps/chosen": jnp.sum(good_B * logps), "logps/rejected": jnp.sum(bad_B * logps),
           "chosen_fraction": jnp.sum(good_B), "kl": jnp.sum(weight_B * kl_B),
           "denominator": count}
    return jnp.sum(weight_B * sums["loss_sum"]), aux

  return loss_fn


def ches_fn(graphdef):
  """(params, pair batch) -> CHES_B of every pair (rlhf_jax.losses.diagnostics.ches_score)
  from the last-layer hidden states: the state at position t predicts token t + 1, so the
  response tokens' mask shifted left by one selects the states that predict them."""
  def fn(params, batch):
    model = nnx.merge(graphdef, params)
    hidden, shifted = [], []
    for side in ("chosen", "rejected"):
      h, _ = model.hidden(batch[f"{side}_tokens"], valid_BxT=batch[f"{side}_valid"])
      mask = batch[f"{side}_mask"]
      hidden.append(h.astype(jnp.float32))
      shifted.append(jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1))
    return diagnostics.ches_score(hidden[0], shifted[0], hidden[1], shifted[1])
  return fn
