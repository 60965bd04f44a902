"""Golden steps: the loss and grad_norm of 3 optimizer steps of SFT, DPO, PPO and GRPO on a
fixed tiny setup, pinned in tests/golden/steps.json.

What is pinned: a nano Transformer (1 layer, random NumPy weights from helpers.make_model),
hand-made token batches from np.random.default_rng, float32, one device, AdamW from
rlhf_jax.train.optim, the train step from rlhf_jax.train.step (PPO and GRPO with 2
microbatches). SFT and DPO take 3 steps on 3 fixed batches; PPO and GRPO sample one rollout
with rlhf_jax.rl.rollout (PPO: +1 per response token below V/4; GRPO: G=4, a verifier-like
0/1 reward) and take 3 steps on it. Each step records loss (at the params before the update)
and grad_norm; the rollouts' sampled tokens are pinned exactly.

Why: every other test checks one piece against its own reference; this one notices ANY change
to what training computes end to end: a loss formula or normaliser, the step (accumulation,
denominators), the optimizer or its schedule, the rollout machinery (sampling, log-probs,
values, advantages) or the data order.

When it fails:
  - the change was intended (a fixed bug, a new default): say in the commit message why the
    numbers moved, then regenerate and commit tests/golden/steps.json with the change:
        python tests/test_golden_steps.py --regenerate
  - it was not intended: it is a regression; find it (the failing algorithm and step say
    where the computation first diverged: step 0 = loss/forward, later steps = the update).
Values differing only by float32 rounding (another CPU: AMD vs Intel, AVX2 vs AVX-512 XLA
kernels) pass: see `tolerance`; XLA's SSE4.2, AVX2 and AVX-512 kernels agree to 1e-5
relative, 80x inside it. Sampling is discrete: another machine's rounding could move a
Gumbel-max draw across a token boundary. The rollouts are short (6 new tokens, 4 and 8 rows),
and the golden draws' smallest gap between the best and second-best Gumbel score is 0.019
(GRPO; PPO 0.030; per-row keys since the draws became per example), over 15x the float32
bound on the log-probs: flipping one of these draws takes a change to
the sampling inputs, not another CPU (a regeneration draws new tokens: recheck the gap).
Should the sampled tokens alone ever differ with no code change, that is such a boundary,
not a regression: pin the rollouts (a Rollout built from the golden tokens, log-probs from
rollout.policy_forward) rather than regenerating per machine.
"""
import json
import os
import pathlib
import platform
import re
import sys

if __name__ == "__main__":  # the same backend setup as a pytest session
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import conftest  # noqa: F401

import flax
import jax
import numpy as np
import optax
import pytest

import helpers
from rlhf_jax.models.transformer import ScalarHeadModel
from rlhf_jax.rl import rollout as rollout_lib
from rlhf_jax.rl.algorithms import grpo, ppo
from rlhf_jax.sampling import SamplingConfig
from rlhf_jax.train import lm, optim, preference, step
from rlhf_jax.train.state import init_train_state

GOLDEN = pathlib.Path(__file__).parent / "golden" / "steps.json"
CFG = helpers.nano(n_layers=1)
V, PAD = CFG.vocab_size, 0
EOS = 40  # sampled early in one PPO and one GRPO row: unequal lengths test the normalisers
STEPS = 3
SEQ = 12  # SFT and DPO sequence length
P, N = 4, 6  # RL prompt slots and new tokens
OPT = optim.OptimConfig(learning_rate=1e-2, total_steps=STEPS, weight_decay=0.1,
                        grad_clip_norm=1.0)
ALGOS = ("sft", "dpo", "ppo", "grpo")
SHAPES = {"sft": (SEQ, 4), "dpo": (SEQ, 8), "ppo": (P + N, 4), "grpo": (P + N, 8)}  # T, rows


def train(loss_fn, params, batches, microbatches=1):
  """STEPS compiled steps, one batch each -> {"loss": [...], "grad_norm": [...]}."""
  opt = optim.make_optimizer(OPT)
  fn = step.compile_train_step(step.make_train_step(loss_fn, opt,
                                                    num_microbatches=microbatches))
  state = init_train_state(jax.tree.map(np.array, params), opt, jax.random.key(0))
  out = {"loss": [], "grad_norm": []}
  for batch in batches:
    state, m = fn(state, batch)
    out["loss"].append(float(m["loss"]))
    out["grad_norm"].append(float(m["grad_norm"]))
  return out


def sequences(rng, b, prompt_len, lo, hi):
  """Right-padded rows of lengths prompt_len+2..SEQ, tokens in [lo, hi): tokens, valid,
  response mask. A narrow token range is a pattern one batch's update teaches the next, so
  later losses respond to the optimizer, not only to the new batch."""
  lengths = rng.integers(prompt_len + 2, SEQ + 1, b)
  valid = np.arange(SEQ)[None] < lengths[:, None]
  tokens = np.where(valid, rng.integers(lo, hi, (b, SEQ)), PAD).astype(np.int32)
  return tokens, valid, (valid & (np.arange(SEQ)[None] >= prompt_len)).astype(np.float32)


def run_sft():
  g, params = helpers.make_model(CFG, seed=0)
  rng = np.random.default_rng(0)
  batches = []
  for _ in range(STEPS):
    tokens, valid, mask = sequences(rng, 4, 3, 1, 32)
    batches.append({"tokens": tokens, "valid": valid, "loss_mask": mask})
  return train(lm.lm_loss_fn(g), params, batches)


def run_dpo():
  g, params = helpers.make_model(CFG, seed=0)
  _, ref = helpers.make_model(CFG, seed=100)  # a reference unlike the policy: loss != log 2
  rng = np.random.default_rng(1)
  ref_fn = jax.jit(preference.reference_logps_fn(g))  # precomputed, as online_dpo does
  batches = []
  for _ in range(STEPS):
    chosen, c_valid, c_mask = sequences(rng, 4, 4, 1, 64)  # chosen: low tokens,
    rejected, r_valid, r_mask = sequences(rng, 4, 4, 64, 128)  # rejected: higher ones
    rejected[:, :4] = chosen[:, :4]  # one prompt, two responses
    batch = {"chosen_tokens": chosen, "chosen_valid": c_valid, "chosen_mask": c_mask,
             "rejected_tokens": rejected, "rejected_valid": r_valid, "rejected_mask": r_mask,
             "example_valid": np.ones(4, bool)}
    batches.append({**batch, **jax.device_get(ref_fn(ref, batch))})
  return train(preference.preference_loss_fn(g, loss="dpo", beta=0.1), params, batches)


def prompts(seed, b):
  """Left-padded prompts of lengths 1..P."""
  rng = np.random.default_rng(seed)
  valid = np.arange(P)[None] >= (P - rng.integers(1, P + 1, b))[:, None]
  return np.where(valid, rng.integers(8, V, (b, P)), PAD).astype(np.int32), valid


def run_ppo():
  pg, policy = helpers.make_model(CFG, seed=0)
  _, ref = helpers.make_model(CFG, seed=100)
  vg, value = helpers.init_module(lambda rngs: ScalarHeadModel(CFG, rngs=rngs), 200, 0.2)
  scfg = SamplingConfig(max_new_tokens=N, eos_id=EOS, pad_id=PAD)
  ro = rollout_lib.make_rollout_fn(pg, scfg, value_graphdef=vg)(
      policy, ref, value, *prompts(2, 4), jax.random.key(3))
  resp = np.asarray(ro.tokens_BxT)[:, P:]
  rewards = np.sum((resp < V // 4) * np.asarray(ro.mask_BxT)[:, P:], 1).astype(np.float32)
  batch, _ = ppo.make_advantages_fn(1.0, 0.95)(ro, rewards, np.float32(0.05))
  loss_fn = ppo.ppo_loss_fn(pg, vg, clip_eps=0.2, value_clip_eps=0.2, vf_coef=0.5,
                            entropy_coef=0.01)
  out = train(loss_fn, {"policy": policy, "value": value}, [batch] * STEPS, microbatches=2)
  return {**out, "tokens": resp.tolist()}


def run_grpo():
  g, policy = helpers.make_model(CFG, seed=0)
  _, ref = helpers.make_model(CFG, seed=100)
  scfg = SamplingConfig(max_new_tokens=N, eos_id=EOS, pad_id=PAD)
  ro = rollout_lib.make_rollout_fn(g, scfg, group_size=4)(
      policy, ref, None, *prompts(3, 2), jax.random.key(4))
  resp = np.asarray(ro.tokens_BxT)[:, P:]
  rewards = (resp[:, 0] % 2 == 0).astype(np.float32)  # "verified": the answer token is even
  batch, _ = grpo.grpo_batch_fn(4, estimator="grpo")(ro, rewards)
  loss_fn = grpo.grpo_loss_fn(g, clip_eps_low=0.2, clip_eps_high=0.28, kl_coef=0.04,
                              aggregation="sequence", max_new_tokens=N)
  out = train(loss_fn, policy, [batch] * STEPS, microbatches=2)
  return {**out, "tokens": resp.tolist()}


RUNS = {"sft": run_sft, "dpo": run_dpo, "ppo": run_ppo, "grpo": run_grpo}


def tolerance(algo, s, what):
  """assert_allclose tolerances for step s's loss or grad_norm vs another float32 machine.

  helpers.f32_tol: two float32 evaluations of a chain of reductions of total length n differ
  by < n·eps relative. F = helpers.forward_terms(CFG, T) is one forward to log-probs and
  R = rows·T the per-token reductions (loss sums, DPO's sequence sums, PPO's whitening,
  weight gradients over the batch's rows). The chain behind step s's loss:
    - one forward at params_s: F; the batch's precomputed forward (DPO's reference log-probs,
      the rollout's log-probs, values and advantages), for all but SFT: F; the loss's
      reduction and the batch's preprocessing: 2R;
    - each of the s earlier updates: its gradient is that forward and a backward (the input
      gradients mirror the forward, F; the weight gradients reduce over the rows, R), and
      AdamW is elementwise (the clip's global-norm factor cancels in Adam's m / sqrt(v) up to
      eps). An update's relative error moves the loss by that fraction of the change the
      update made, which is below the loss itself: 2F + R per update.
    => n = k·F + (2 + s)·R with k = 1 + pre + 2s (pre = 1 but for SFT): k = 2, 4, 6 for
       steps 0, 1, 2 (SFT: 1, 3, 5); n <= 6100, rtol <= 7.3e-4, under the 1e-3 a real change
       moves the loss. (PPO's value forward runs beside the policy's, not after it.)
  grad_norm adds its own backward (F + R) and the sum of squares over all n_p parameters
  (n_p·eps relative, halved by the sqrt, ~5e-3): looser, a second line behind the loss.
  scale = 1: the losses are sums of unit-scale terms (log-probs, whitened or group
  advantages), so the atol only matters for a loss that cancels to near 0."""
  t, rows = SHAPES[algo]
  f, r = helpers.forward_terms(CFG, t), rows * t
  k = 1 + (algo != "sft") + 2 * s
  n = f * k + (2 + s) * r
  if what == "loss":
    return helpers.f32_tol(n, scale=1.0)
  n_p = sum(x.size for x in jax.tree.leaves(helpers.make_model(CFG)[1]))
  n_p *= 2 if algo == "ppo" else 1  # policy + value
  return helpers.f32_tol(n + f + r + n_p // 2, scale=1.0)


@pytest.fixture(scope="module")
def golden():
  return json.loads(GOLDEN.read_text())


@pytest.mark.parametrize("algo", ALGOS)
def test_golden_steps(algo, golden):
  got, want = RUNS[algo](), golden[algo]
  if "tokens" in want:  # a discrete mismatch: see the module docstring before regenerating
    np.testing.assert_array_equal(got["tokens"], want["tokens"], err_msg=f"{algo} rollout")
  for s in range(STEPS):  # the first step that moved is where the computation diverged
    for what in ("loss", "grad_norm"):
      np.testing.assert_allclose(
          got[what][s], want[what][s], **tolerance(algo, s, what),
          err_msg=f"{algo} {what} at step {s} (was generated on {golden['machine']})")


def machine():
  cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
              if l.startswith("model name")), "") if os.path.exists("/proc/cpuinfo") else ""
  return {"processor": platform.processor(), "machine": platform.machine(), "cpu": cpu,
          "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
          "numpy": np.__version__}


if __name__ == "__main__":
  if sys.argv[1:] != ["--regenerate"]:
    sys.exit("usage: python tests/test_golden_steps.py --regenerate")
  out = {"machine": machine(), **{a: RUNS[a]() for a in ALGOS}}
  text = re.sub(r"\[[^\[\]{}]*\]", lambda m: json.dumps(json.loads(m.group())),
                json.dumps(out, indent=1))  # one line per list of numbers
  GOLDEN.parent.mkdir(exist_ok=True)
  GOLDEN.write_text(text + "\n")
  print(text)
