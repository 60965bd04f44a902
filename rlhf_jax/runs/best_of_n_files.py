"""Best-of-n sampling on real prompts: a Hugging Face policy's samples ranked by a reward model
from another; the gold world otherwise (best_of_n.py).

    python -m experiments.best_of_n --init_hf=out/sft --reward_hf=out/rm \\
        --prompt_files=data/hh/test.jsonl --prompt_format=hh_rlhf --max_prompt_len=256 \\
        --max_new_tokens=128 --seq_len=400 --n_max=16 --ns=1,2,4,8,16

File mode (--prompt_files set):
  samples   --n_max temperature samples (--sample_temperature) from --init_hf for each
            held-out prompt (--eval_files or --test_fraction of the files, up to
            --eval_prompts of them), rendered with the chat template (pipeline/prompt_sets.py)
  reward    each sample's raw score by --reward_hf, a *ForSequenceClassification reward model
            (experiments.reward --export_hf writes one), the sample decoded and re-encoded
            with the tokenizer in --seq_len (rl/comparisons.py)
  selection for each n in --ns, best_of_n.py's disjoint groups of n: the mean reward of the
            groups' best samples is an unbiased estimate of the best-of-n policy's reward,
            +- its standard error over prompts
  KL        kl_bound = log n - (n-1)/n (Beirami et al. 2024) and kl_exact over each prompt's
            empirical samples, as the world mode computes them
Nothing trains, so there is no export. Outputs in --workdir: result.json ({"per_n": [{"n",
"reward", "reward_se", "kl_bound", "kl_exact", "words"}, ...], ...}), samples.json (prompts,
responses, finished, rewards), metrics.jsonl and tb/ (one "eval" record per n, step = n),
config.json and best_of_n_reward.png (reward against n).
"""
import os
import time

import jax
import numpy as np

from rlhf_jax import provenance
from rlhf_jax.losses import diagnostics
from rlhf_jax.pipeline import lm, prompt_sets, real_models, reward_files
from rlhf_jax.rl import comparisons, scorers
from rlhf_jax.runs import best_of_n, plots

PER_N_KEYS = ("reward", "reward_se", "kl_bound", "kl_exact", "words")


def per_n_row(n: int, reward_NxK: np.ndarray, words_NxK: np.ndarray) -> dict:
  """The best-of-n row of n: the reward of each group's best sample, its words, the KLs."""
  picks = best_of_n.best_in_groups(reward_NxK, n)
  take = lambda m: np.take_along_axis(m, picks, axis=1)
  r, r_se = best_of_n.mean_se(take(reward_NxK))
  return {"n": n, "reward": r, "reward_se": r_se,
          "kl_bound": float(diagnostics.best_of_n_kl_bound(n)),
          "kl_exact": best_of_n.exact_kl(reward_NxK, n), "words": float(take(words_NxK).mean())}


def run(cfg: best_of_n.BestOfNConfig) -> dict:
  """File mode when --prompt_files is set, else the gold world (best_of_n.run)."""
  if not cfg.file_mode:
    return best_of_n.run(cfg)
  cfg = cfg.effective()
  mcfg = real_models.model_config(cfg, lm.model_config)
  mesh = lm.setup(cfg, sharded_eval=False)
  tok, data = prompt_sets.load(cfg, mcfg)
  prompts = data.test[:cfg.eval_prompts]
  if cfg.init_hf:
    g, params, _ = real_models.load(cfg.init_hf, mesh, cfg)
  else:
    g, params, _ = lm.init_model(cfg, mesh)
  rm_g, rm_params, _ = reward_files.init_scalar_model(cfg.reward_hf, cfg, mcfg, mesh, cfg.seed)
  wall = {}
  t0 = time.perf_counter()
  samples = comparisons.sample_k(
      g, params, prompts, k=cfg.n_max, batch_size=cfg.eval_batch_size,
      prompt_len=data.prompt_len, max_new_tokens=cfg.max_new_tokens,
      temperature=cfg.sample_temperature, key=jax.random.key(cfg.seed + best_of_n.SAMPLE_STREAM),
      tokenizer=tok)
  wall["sampling_s"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  reward_NxK = scorers.RewardModelScorer(rm_g, [rm_params]).score_samples(
      samples, seq_len=cfg.seq_len, batch_size=cfg.eval_batch_size, tokenizer=tok)
  wall["scoring_s"] = time.perf_counter() - t0
  words = np.array([[len(y.split()) for y in ys] for ys in samples.responses], np.float64)
  result = {"per_n": [per_n_row(n, reward_NxK, words) for n in cfg.n_values],
            "prompts": len(prompts), "n_max": cfg.n_max, "wall": wall,
            "data": {"train": len(data.train), "test": len(data.test),
                     "skipped": data.report.skipped, "too_long": data.too_long},
            "provenance": provenance.provenance()}
  write_outputs(cfg, result, samples, reward_NxK)
  print(f"best-of-n: {len(prompts)} held-out prompts x {cfg.n_max} samples of {cfg.init_hf}, "
        f"reward = {cfg.reward_hf}\n     n   reward           KL bound  KL exact  words")
  for r in result["per_n"]:
    print(f"  {r['n']:4d}   {r['reward']:+.3f} +- {r['reward_se']:.3f}   {r['kl_bound']:7.3f}   "
          f"{r['kl_exact']:7.3f}   {r['words']:5.1f}")
  return result


def write_outputs(cfg, result: dict, samples: comparisons.Samples, reward_NxK) -> None:
  best_of_n.write_records(cfg, result, samples, "reward", reward_NxK, PER_N_KEYS)
  plots.curve_with_se(result["per_n"], "n", "reward",
                      os.path.join(cfg.workdir, "best_of_n_reward.png"),
                      title=f"best-of-n (n = {cfg.ns})", xlabel="n",
                      ylabel="reward of the best of n (--reward_hf)")
