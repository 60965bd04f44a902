"""A pairwise preference model P(y > y' | x) (Munos et al. 2024) from rater comparisons:
`experiments.reward --reward_model=pairwise` runs this (the config is RewardConfig).

    python -m experiments.reward --flagfile=experiments/configs/reward_pairwise_intransitive_tiny.flags

Builds (or reuses) the SFT stage and its pretraining stage, then:
1. samples 2 responses for each of --num_rankings training prompts (drawn with replacement
   from the train split) and for held-out prompts (each test prompt repeated until there are
   at least HELDOUT_PAIRS pairs): both responses of a pair from one policy, the first half
   of the pairs from the SFT policy and the second half from the pretrained base
   (InstructGPT also pooled comparisons of several policies). Why: the SFT style mixture is
   skewed (mostly casual), so SFT pairs almost never compare formal with poetic (~5%), and a
   model trained on them alone learned P(poetic > formal) = 0.41 against the true 0.70 (a
   BT-like order, whose game is solved by pure formal); the base writes the three styles
   about equally. Responses are compared with surrounding whitespace stripped (the base puts
   a space after the prompt, SFT does not; the world ignores it too);
2. labels each pair with one draw of the world's raters (P(a > b) = rlhf_jax.worlds.raters.Raters.preference);
3. trains one ScalarHeadModel from the SFT backbone on [bos] x a [eos] b [eos], both orders
   of each pair, with the logistic loss (rlhf_jax/train/pairwise.py);
4. reports held-out accuracy on fresh rater labels and on the majority ("truth") preference,
   next to the raters' own ceilings, and, on the intransitive world, the learned 3 x 3 style
   matrix (the model's mean P(i > j) over canonical responses of each style on held-out
   prompts) against the true one, and the learned game's Nash equilibrium.

Outputs in --workdir: params/, checkpoints/, metrics.jsonl, tb/, config.json, result.json and
reward_models.json ({"reward_model": "pairwise", "sft_workdir", "seq_len"}), which
`load_preference_model` reads for experiments.nash_md.
"""
import dataclasses
import json
import os
import random

import jax
import numpy as np

from rlhf_jax import sharding
from rlhf_jax.data import pairs
from rlhf_jax.data.tokenizer import ByteTokenizer
from rlhf_jax.pipeline import lm, reward as reward_stage, worlds
from rlhf_jax.rl import comparisons
from rlhf_jax.train import checkpoint, pairwise as pairwise_train
from rlhf_jax.train import step as step_lib
from rlhf_jax.worlds import intransitive, registry
from rlhf_jax.train.logging import write_json

HELDOUT_PAIRS = 256  # held-out pairs (test prompts repeated), for a tight accuracy estimate
_BATCH_KEYS = ("tokens_Bx2xT", "valid_Bx2xT", "label_B", "example_valid_B")


def _strip(ys) -> list[str]:
  return [y.strip() for y in ys]


def pair_examples(prompts, ys_a, ys_b, labels, seq_len: int) -> list[dict]:
  """One example per labelled pair in train/pairwise.py's layout (both orders)."""
  tokens, valid = pairwise_train.encode_pairs(prompts, _strip(ys_a), _strip(ys_b), ByteTokenizer(),
                                        seq_len)
  return [{"tokens_Bx2xT": t, "valid_Bx2xT": v, "label_B": np.float32(y),
           "example_valid_B": np.True_} for t, v, y in zip(tokens, valid, labels)]


def _eval_batches(examples: list[dict], batch_size: int):
  """Fixed-shape batches; the last is padded with example_valid False rows (weight 0)."""
  filler = dict(examples[0], example_valid_B=np.False_)
  for i in range(0, len(examples), batch_size):
    chunk = examples[i:i + batch_size]
    chunk += [filler] * (batch_size - len(chunk))
    yield {k: np.stack([r[k] for r in chunk]) for k in _BATCH_KEYS}


@dataclasses.dataclass(frozen=True)
class PreferenceModel:
  """A trained pairwise preference model, as Nash-MD uses it."""
  graphdef: object
  params: object
  seq_len: int

  def __call__(self, prompts, ys_a, ys_b, batch_size: int) -> np.ndarray:
    """P(a > b | x) [N], float64, in fixed-shape batches (one compile)."""
    return predict(self.graphdef, self.params, prompts, ys_a, ys_b, seq_len=self.seq_len,
                   batch_size=batch_size)


def predict(graphdef, params, prompts, ys_a, ys_b, *, seq_len: int, batch_size: int):
  """P(a > b | x) [N] (responses stripped, as in training), fixed-shape batches."""
  tokens, valid = pairwise_train.encode_pairs(prompts, _strip(ys_a), _strip(ys_b), ByteTokenizer(),
                                        seq_len)
  fn = _preference_fn(graphdef)
  out = []
  for i in range(0, len(tokens), batch_size):
    t, v = tokens[i:i + batch_size], valid[i:i + batch_size]
    pad = batch_size - len(t)
    if pad:
      t, v = np.concatenate([t, np.repeat(t[:1], pad, 0)]), np.concatenate([v, np.repeat(v[:1], pad, 0)])
    out.append(sharding.to_host(fn(params, t, v)).astype(np.float64)[:batch_size - pad])
  return np.concatenate(out) if out else np.zeros(0)


_FNS = {}


def _preference_fn(graphdef):
  if graphdef not in _FNS:
    _FNS[graphdef] = pairwise_train.make_preference_fn(graphdef)
  return _FNS[graphdef]


def style_matrix(graphdef, params, prompts, *, seq_len: int, batch_size: int,
                 per_prompt: int = 4) -> np.ndarray:
  """The learned 3 x 3 matrix of the intransitive world: mean P(i > j) over `per_prompt`
  canonical responses of style i and of style j on each prompt (fixed seed)."""
  rng = random.Random(0)
  n = len(intransitive.STYLES)
  rows = []
  for p in prompts:
    for _ in range(per_prompt):
      topic = intransitive._topic(p)
      ys = [intransitive.styled_response(rng, s, topic) for s in range(n)]
      rows += [(p, ys[i], ys[j], i, j) for i in range(n) for j in range(n)]
  probs = predict(graphdef, params, [r[0] for r in rows], [r[1] for r in rows],
                  [r[2] for r in rows], seq_len=seq_len, batch_size=batch_size)
  out = np.zeros((n, n))
  counts = np.zeros((n, n))
  for (_, _, _, i, j), q in zip(rows, probs):
    out[i, j] += q
    counts[i, j] += 1
  return out / counts


def run(cfg, sft_dir: str) -> dict:
  """cfg: reward.RewardConfig with --reward_model=pairwise; the SFT stage in sft_dir."""
  cfg = cfg.effective()  # RewardConfig has refused --ranking_k != 2 for a pairwise model
  (mesh, graphdef, policy_params, prompt_len, train_prompts, test_prompts,
   rng) = reward_stage.start(cfg, sft_dir)
  heldout = test_prompts * -(-HELDOUT_PAIRS // len(test_prompts)) if not cfg.smoke else test_prompts
  with open(os.path.join(sft_dir, "result.json")) as f:
    _, base_params, _ = lm.init_model(cfg, mesh, init_from=json.load(f)["pretrain_workdir"])

  def sample(prompts, key) -> comparisons.Samples:
    """Pairs of the SFT policy (first half of the prompts) and of the base (second half)."""
    half = len(prompts) // 2
    parts = [comparisons.sample_k(
        graphdef, params, ps, k=2, batch_size=cfg.eval_batch_size, prompt_len=prompt_len,
        max_new_tokens=worlds.max_new_tokens(cfg), temperature=cfg.sample_temperature,
        key=jax.random.fold_in(key, i))
        for i, (params, ps) in enumerate(((policy_params, prompts[:len(prompts) - half]),
                                          (base_params, prompts[len(prompts) - half:]))) if ps]
    return comparisons.Samples([p for s in parts for p in s.prompts],
                               [ys for s in parts for ys in s.responses],
                               np.concatenate([s.finished for s in parts]))

  train_s = lm.timed("sample comparison pairs", sample, train_prompts, jax.random.key(cfg.seed))
  test_s = sample(heldout, jax.random.key(cfg.seed + 10_000))
  raters_ = worlds.make_raters(cfg, train_s.prompts, train_s.responses)

  def labelled(s: comparisons.Samples):
    a, b = [ys[0] for ys in s.responses], [ys[1] for ys in s.responses]
    p = raters_.preference(s.prompts, a, b)
    return a, b, p, (rng.random(len(p)) < p).astype(np.float32)

  ta, tb, _, t_labels = labelled(train_s)
  ha, hb, h_p, h_labels = labelled(test_s)
  examples = pair_examples(train_s.prompts, ta, tb, t_labels, cfg.seq_len)
  test_examples = pair_examples(test_s.prompts, ha, hb, h_labels, cfg.seq_len)

  rm_graphdef, params, shardings = reward_stage.init_reward_model(cfg, mesh, policy_params, cfg.seed)
  loss_fn = pairwise_train.pairwise_loss_fn(rm_graphdef)
  eval_step = step_lib.compile_eval_step(step_lib.make_eval_step(loss_fn))
  eval_fn = lambda p: step_lib.evaluate(eval_step, p, _eval_batches(test_examples, cfg.batch_size))
  it = pairs.make_pair_train_iterator(examples, batch_size=cfg.batch_size, seed=cfg.seed,
                                      encode=lambda r: r,
                                      rows=sharding.process_rows(mesh, cfg.batch_size))
  batch_shardings = {k: sharding.batch_sharding(mesh) for k in _BATCH_KEYS}
  final, summary = lm.run_training(cfg, mesh, loss_fn, params, shardings, batch_shardings, it,
                                   eval_fn=eval_fn,
                                   tokens_per_batch=cfg.batch_size * 2 * cfg.seq_len)

  probs = predict(rm_graphdef, final.params, test_s.prompts, ha, hb, seq_len=cfg.seq_len,
                  batch_size=cfg.eval_batch_size)
  truth = worlds.world(cfg).truth_better(worlds.world_config(cfg), test_s.prompts, ha, hb)
  result = evaluate(probs, h_labels, h_p, truth)
  result.update(sft_workdir=sft_dir, train_pairs=cfg.num_rankings, test_pairs=len(probs),
                final_eval=summary["eval"], wall_s=summary["wall_s"])
  if isinstance(worlds.world(cfg), registry.IntransitiveWorld):  # a 3-style game to report
    learned = style_matrix(rm_graphdef, final.params, test_prompts, seq_len=cfg.seq_len,
                           batch_size=cfg.eval_batch_size)
    true = intransitive.preference_matrix(cfg.world_config())
    result.update(learned_matrix=learned.tolist(), true_matrix=true.tolist(),
                  matrix_max_error=float(np.max(np.abs(learned - true))),
                  learned_nash=intransitive.nash_equilibrium(learned).tolist(),
                  true_nash=intransitive.nash_equilibrium(true).tolist())
  manifest = {"reward_model": "pairwise", "sft_workdir": sft_dir, "seq_len": cfg.seq_len,
              "params": lm.PARAMS_DIR}
  write_json(os.path.join(cfg.workdir, reward_stage.MANIFEST), manifest, indent=1)
  write_json(os.path.join(cfg.workdir, "result.json"), result, indent=1)
  print(format_result(result))
  return result


def evaluate(probs, rater_labels, rater_p, truth) -> dict:
  """Held-out accuracy of P(a > b) on one fresh rater label per pair and on the majority
  preference (tied pairs left out), next to the raters' ceilings: a rater agrees with another
  rater E[p^2 + (1-p)^2] and with the majority E[max(p, 1-p)] (over decided pairs)."""
  probs, rater_p, truth = (np.asarray(x, np.float64) for x in (probs, rater_p, truth))
  hit = lambda labels: np.where(probs == 0.5, 0.5, (probs > 0.5) == (labels > 0.5))
  decided = truth != 0.5
  return {"accuracy_rater": float(hit(np.asarray(rater_labels)).mean()),
          "accuracy_gold": float(hit(truth)[decided].mean()) if decided.any() else float("nan"),
          "rater_vs_rater": float(np.mean(rater_p**2 + (1 - rater_p) ** 2)),
          "rater_vs_gold": (float(np.maximum(rater_p, 1 - rater_p)[decided].mean())
                            if decided.any() else float("nan")),
          "decided_pairs": int(decided.sum()),
          "mean_abs_error": float(np.mean(np.abs(probs - rater_p)))}


def format_result(result: dict) -> str:
  lines = ["held-out pairwise accuracy     rater labels   majority labels",
           f"  pairwise model         {result['accuracy_rater']:.3f}          "
           f"{result['accuracy_gold']:.3f}",
           f"  raters' ceiling        {result['rater_vs_rater']:.3f}          "
           f"{result['rater_vs_gold']:.3f}",
           f"  mean |P_model - P_raters| {result['mean_abs_error']:.3f} "
           f"({result['test_pairs']} pairs, {result['decided_pairs']} decided)"]
  if "learned_matrix" in result:
    lines.append("learned P(row > column) [true]:")
    for i, (row, true) in enumerate(zip(result["learned_matrix"], result["true_matrix"])):
      lines.append("  " + "  ".join(f"{q:.2f} [{t:.2f}]" for q, t in zip(row, true)))
    lines.append(f"learned game's Nash {np.round(result['learned_nash'], 3).tolist()} "
                 f"(true {np.round(result['true_nash'], 3).tolist()})")
  return "\n".join(lines)


def load_preference_model(cfg, mesh, workdir: str, policy_params) -> PreferenceModel:
  """The pairwise model of a reward stage (reward_models.json says "pairwise"), restored
  into this run's model shape (another preset fails naming the tensor)."""
  manifest = reward_stage.read_manifest(workdir)
  if manifest.get("reward_model") != "pairwise":
    raise ValueError(f"{workdir} holds a {manifest.get('reward_model', 'bt')} reward model, not "
                     "a pairwise preference model (--reward_model=pairwise)")
  graphdef, params, shardings = reward_stage.init_reward_model(cfg, mesh, policy_params, cfg.seed)
  params = checkpoint.load_params(os.path.join(workdir, manifest["params"]),
                                  lm.abstract_params((graphdef, params, shardings)))
  return PreferenceModel(graphdef, params, manifest["seq_len"])
