"""DPO on a preference world (`python -m experiments.dpo --flagfile=experiments/configs/
dpo_gold_tiny.flags`; the flags: dpo.py's DPOConfig): DPO / cDPO / IPO / KTO on rater-labelled pairs of SFT
samples, with the ground-truth report (the world's "gold" and own metrics, such as the
sycophancy rate before and after; win rate against SFT with a bootstrap CI; CHES of every
training pair and the likelihood displacement it predicts; the matched-compute SFT baseline).
"""
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import distributed
from rlhf_jax.pipeline import chain, lm, sft, worlds
from rlhf_jax.runs.dpo import (DPOConfig, jit_pair_fn, map_pairs, precompute_reference,
                                   train_pairs, with_reference)
from rlhf_jax import evaluation, provenance, sharding
from rlhf_jax.data import pairs
from rlhf_jax.data.tokenizer import ByteTokenizer
from rlhf_jax.rl import comparisons
from rlhf_jax.train import preference
from rlhf_jax.worlds import heldout, registry
from rlhf_jax.train.logging import write_json


def rater_pairs(cfg: DPOConfig, graphdef, params, train_prompts) -> tuple[list[dict], dict]:
  """(pair records, label statistics): --num_pairs prompts drawn with replacement, each with
  --ranking_k SFT samples ranked by the world's simulated rater (gold: temperature calibrated
  on these samples to --rater_agreement); the pair is the rater's first vs last. The ground
  truth enters only through the raters and the statistics."""
  rng = np.random.default_rng(cfg.seed)
  prompts = list(rng.choice(train_prompts, cfg.num_pairs))
  samples = comparisons.sample_k(
      graphdef, params, prompts, k=cfg.ranking_k, batch_size=cfg.eval_batch_size,
      prompt_len=worlds.world_prompt_len(cfg), max_new_tokens=worlds.max_new_tokens(cfg),
      temperature=1.0, key=jax.random.key(cfg.seed))
  gold_NxK = samples.ground_truth_NxK(worlds.ground_truth(cfg))
  raters_ = worlds.make_raters(cfg, samples.prompts, samples.responses)
  ranking = raters_.rank(samples.prompts, samples.responses, rng)
  rows = np.arange(len(ranking))
  margin = gold_NxK[rows, ranking[:, 0]] - gold_NxK[rows, ranking[:, -1]]
  stats = {"rater_temperature": getattr(raters_, "temperature", None),
           "pair_gold_margin": float(margin.mean()),
           "pair_gold_agreement": float(np.mean((margin > 0) + 0.5 * (margin == 0))),
           "sample_gold": float(gold_NxK.mean())}
  return comparisons.best_worst_pairs(samples, ranking), stats


def world_eval(cfg: DPOConfig, graphdef, params, prompts, key) -> tuple[dict, np.ndarray]:
  """(summary, ground truth per sample) of GOLD_EVAL_SAMPLES temperature-1 samples per prompt; the same
  key for every policy, so rows line up prompt by prompt for the win rate."""
  ps = list(prompts) * heldout.EVAL_SAMPLES
  ys = heldout.sample_responses(graphdef, params, ps, batch_size=cfg.eval_batch_size,
                               max_new=worlds.max_new_tokens(cfg), key=key)
  return worlds.summary(cfg, ps, ys), worlds.ground_truth(cfg)(ps, ys)


def displacement(records, ches, sft_logps, policy_logps) -> tuple[list[dict], dict]:
  """Per-pair CHES and log-prob changes (policy - reference), and their summary: mean CHES,
  the share of pairs whose chosen log-prob fell, and corr(CHES, chosen change) (Razin 2024:
  high-CHES pairs are the ones whose chosen likelihood training lowers)."""
  d_chosen = policy_logps[0] - sft_logps[0]
  d_rejected = policy_logps[1] - sft_logps[1]
  lines = [{"prompt": r["prompt"], "ches": float(c), "chosen_logp_change": float(dc),
            "rejected_logp_change": float(dr), "ref_chosen_logp": float(sc),
            "ref_rejected_logp": float(sr)}
           for r, c, dc, dr, sc, sr in zip(records, ches, d_chosen, d_rejected, *sft_logps)]
  corr = (float(np.corrcoef(ches, d_chosen)[0, 1])
          if len(ches) > 1 and np.std(ches) > 0 and np.std(d_chosen) > 0 else float("nan"))
  summary = {"pairs": len(lines), "mean_ches": float(np.mean(ches)),
             "chosen_decreased_fraction": float(np.mean(d_chosen < 0)),
             "rejected_decreased_fraction": float(np.mean(d_rejected < 0)),
             "mean_chosen_logp_change": float(np.mean(d_chosen)),
             "mean_rejected_logp_change": float(np.mean(d_rejected)),
             "corr_ches_chosen_change": corr}
  return lines, summary


def run_world(cfg: DPOConfig) -> dict:
  """World mode (module docstring): SFT stage -> rater pairs -> DPO-family training -> report."""
  cfg = cfg.effective()
  wall = {}
  t0 = time.perf_counter()
  sft_dir = chain.ensure("sft", chain.upstream_config("sft", cfg.sft_flagfile, cfg))
  wall["upstream_stages_s"] = time.perf_counter() - t0
  mesh = lm.setup(cfg)
  split = worlds.split_prompts(cfg)
  test_prompts = worlds.test_prompts(cfg)
  graphdef, sft_params, shardings = lm.init_model(cfg, mesh, init_from=sft_dir)
  t0 = time.perf_counter()
  records, labels = lm.timed("sample and rank pairs", rater_pairs, cfg, graphdef, sft_params,
                             split["train"])
  encode = pairs.make_encoder(ByteTokenizer(), cfg.seq_len, "pairs")
  keys = list(encode(records[0]))
  # The report's log-probs are sums over response tokens (docs/math.md, conventions), whatever the loss uses.
  logps_fn = jit_pair_fn(preference.reference_logps_fn(graphdef), shardings, mesh, keys)
  ches_fn = jit_pair_fn(lambda p, b: {"ches": preference.ches_fn(graphdef)(p, b)}, shardings,
                        mesh, keys)
  ches = map_pairs(ches_fn, sft_params, records, cfg, encode, mesh)["ches"]
  sft_logps = precompute_reference(logps_fn, sft_params, records, cfg, encode, mesh)

  # Training may put each pair in one shared-prompt row (--response_len); the diagnostics
  # above read the two-row layout.
  train_encode = pairs.make_encoder(ByteTokenizer(), cfg.seq_len, "pairs",
                                    response_len=cfg.response_len)
  if cfg.loss == "kto":
    train_src, train_encode = pairs.kto_examples(records), pairs.kto_encoder(train_encode)
  else:
    train_src = records
  ref_params = None
  needs_ref = preference.needs_reference(cfg.loss)  # SimPO is reference-free
  if needs_ref and cfg.precompute_ref:
    train_src = with_reference(cfg, graphdef, sft_params, shardings, mesh, train_src,
                               train_encode)
  elif needs_ref:
    ref_params = sft_params  # training gets a copy: its buffers are donated
  if cfg.loss == "kto":
    loss_fn = preference.kto_loss_fn(graphdef, beta=cfg.beta, average_logps=cfg.average_logps,
                                     desirable_weight=cfg.kto_desirable_weight,
                                     undesirable_weight=cfg.kto_undesirable_weight,
                                     ref_params=ref_params)
  else:
    loss_fn = preference.preference_loss_fn(
        graphdef, loss=cfg.loss, beta=cfg.beta, label_smoothing=cfg.label_smoothing,
        ipo_tau=cfg.ipo_tau, simpo_gamma=cfg.simpo_gamma, average_logps=cfg.average_logps,
        ref_params=ref_params)
  wall["pairs_s"] = time.perf_counter() - t0
  batch_shardings = {k: sharding.batch_sharding(mesh) for k in train_encode(train_src[0])}
  copy = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings)
  final, summary = train_pairs(cfg, mesh, loss_fn, copy(sft_params), shardings, batch_shardings,
                          train_src, train_encode, None)
  wall["train_s"] = summary["wall_s"]

  t0 = time.perf_counter()
  policy_logps = precompute_reference(logps_fn, final.params, records, cfg, encode, mesh)
  lines, ches_summary = displacement(records, ches, sft_logps, policy_logps)
  if distributed.is_writer():
    with open(os.path.join(cfg.workdir, "ches.jsonl"), "w") as f:
      f.writelines(json.dumps(line) + "\n" for line in lines)
  key = jax.random.key(cfg.seed + 1)
  sft_row, sft_gold = world_eval(cfg, graphdef, sft_params, test_prompts, key)
  table = {"sft": sft_row}
  policies = {"policy": final.params}
  if cfg.matched_sft:
    policies["sft_matched"] = sft.continued_sft(
        chain.upstream_config("sft", cfg.sft_flagfile, cfg), os.path.join(cfg.workdir, "matched_sft"), cfg.steps, mesh,
        graphdef, sft_params, shardings)
  rng = np.random.default_rng(cfg.seed)
  for name, params in policies.items():
    row, g = world_eval(cfg, graphdef, params, test_prompts, key)
    table[name] = {**row, **evaluation.win_rate(g, sft_gold, rng)}
  wall["report_s"] = time.perf_counter() - t0
  result = {"loss": cfg.loss, "table": table, "ches": ches_summary, "labels": labels,
            "train": summary["train"], "wall": wall, "sft_workdir": sft_dir,
            "data": {"pairs": len(records), "train_examples": len(train_src),
                     "test_prompts": len(test_prompts)},
            "provenance": provenance.provenance()}
  write_json(os.path.join(cfg.workdir, "result.json"), result, indent=1)
  print(format_world(result, cfg.world))
  return result


def format_world(result: dict, world: str) -> str:
  extra = registry.get(world).columns
  lines = [f"held-out (test prompts x {heldout.EVAL_SAMPLES} samples)   gold             "
           "win rate vs SFT [95% CI]   words" + "".join(f"  {k:>15}" for k in extra)]
  for name, m in result["table"].items():
    win = (f"{m['win_rate']:.3f} [{m['win_rate_lo']:.3f}, {m['win_rate_hi']:.3f}]"
           if "win_rate" in m else " " * 21)
    label = result["loss"] if name == "policy" else name
    lines.append(f"  {label:<12} {m['gold']:+.3f} +- {m['gold_se']:.3f}   {win}     "
                 f"{m['words']:5.1f}" + "".join(f"  {m[k]:15.3f}" for k in extra))
  c = result["ches"]
  lines.append(f"CHES over {c['pairs']} training pairs: mean {c['mean_ches']:.1f}; chosen "
               f"log-prob fell on {c['chosen_decreased_fraction']:.0%} of pairs (mean change "
               f"{c['mean_chosen_logp_change']:+.2f}); corr(CHES, chosen change) "
               f"{c['corr_ches_chosen_change']:+.3f}")
  return "\n".join(lines)
