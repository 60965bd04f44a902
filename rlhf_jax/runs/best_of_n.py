"""Best-of-n sampling against a learned reward on the gold world: the no-training baseline
of the overoptimisation picture (Gao et al. 2023).

    python -m experiments.best_of_n --flagfile=experiments/configs/best_of_n_tiny.flags

Builds (or reuses, cached under --stage_root exactly as rlhf_jax/runs/ppo.py does) pretrain ->
SFT -> reward model(s), then:

  samples   --n_max temperature samples from the SFT policy for each held-out test prompt
            (up to --eval_prompts of them)
  proxy     each sample's reward-model score, normalised by the stage's statistics on SFT
            samples (reward_models.json); with an ensemble, aggregated by --aggregate
            (mean, wco = min, uwo = mean - uwo_coef * variance; Coste 2024), exactly as the
            PPO reward is (rlhf_jax.train.reward.aggregate_scores)
  selection for each n in --ns, a prompt's n_max samples are split into n_max / n disjoint
            groups of n; each group's highest-proxy sample is one genuine best-of-n draw from
            the SFT policy, so the mean over groups is an unbiased estimate of the best-of-n
            policy's gold (and proxy) reward. Standard errors are over prompts (each prompt's
            groups averaged first: groups of one prompt share that prompt's difficulty).
  KL        kl_bound = log n - (n-1)/n, the analytic bound on KL(best-of-n || SFT) (Beirami
            et al. 2024); kl_exact = the exact KL of best-of-n over the empirical
            distribution of each prompt's n_max samples (uniform over them, ranked by proxy;
            rlhf_jax.losses.diagnostics.best_of_n_exact), averaged over prompts. The bound
            holds for any distribution, so kl_exact <= kl_bound.

Matched compute: best-of-n trains nothing; its cost is n samples (and n reward-model
forwards) per prompt at inference instead of an RL stage, which is why it is the baseline an
RLHF policy at the same KL should beat.

Outputs in --workdir: result.json ({"per_n": [{"n", "gold", "gold_se", "proxy", "proxy_se",
"kl_bound", "kl_exact", "words"}, ...], ...}), samples.json (prompts, responses and proxy
scores, for analysis without resampling), metrics.jsonl and tb/ (one "eval" record per n,
step = n), config.json and best_of_n.png (proxy and gold against kl_exact). Nothing is
trained, so there are no checkpoints: running again recomputes everything (minutes on CPU),
with the same seed the same numbers, overwriting the files (metrics.jsonl is appended to;
its readers keep the last record per step). On real prompts with Hugging Face checkpoints
(--prompt_files): best_of_n_files.py.
"""
import dataclasses
import functools
import json
import os
import time

import jax
import numpy as np

from rlhf_jax import plan_models, provenance
from rlhf_jax.runs import plots
from rlhf_jax.pipeline import chain, config, lm, prompt_sets, real_models
from rlhf_jax.pipeline import reward as reward_stage, worlds
from rlhf_jax.losses import diagnostics
from rlhf_jax.rl import comparisons
from rlhf_jax.train import reward
from rlhf_jax.train.logging import MetricsLogger, write_config, write_json
from rlhf_jax.worlds import gold, registry

PER_N_KEYS = ("gold", "gold_se", "proxy", "proxy_se", "kl_bound", "kl_exact", "words")
# The sampling stream of best-of-n: not the reward stage's (seed, seed + 10_000), so the
# held-out samples here are not the ones the reward models were evaluated on.
SAMPLE_STREAM = 20_000


@dataclasses.dataclass(frozen=True)
class BestOfNConfig(lm.LMConfig, real_models.HFFlags, prompt_sets.PromptFileFlags,
                    real_models.RewardModelFlags):
  reward_flagfile: str = config.flag("experiments/configs/reward_gold_tiny.flags",
                                  "Flagfile of the reward-model stage (it names the SFT stage).")
  stage_root: str = config.flag("workdirs/stages", "Where cached upstream stages live.")
  n_max: int = config.flag(64, "SFT samples per held-out prompt; every n in --ns divides it.")
  ns: str = config.flag("1,2,4,8,16,32,64", "Comma-separated n of best-of-n to report.")
  aggregate: str = config.flag("mean", "Ensemble aggregation of reward-model scores.",
                            choices=reward.AGGREGATES)
  uwo_coef: float = config.flag(0.5, "Variance penalty of --aggregate=uwo.")
  sample_temperature: float = config.flag(1.0, "Temperature of the SFT samples.")

  def __post_init__(self):
    super().__post_init__()
    if self.dry_run:
      raise ValueError(f"--dry_run plans the stages {', '.join(plan_models.STAGES)} "
                       "(rlhf_jax/plan_models.py); experiments.best_of_n has no plan: run it "
                       "without --dry_run")
    if self.file_mode:
      self._check_file_mode()
    elif self.init_hf or self.reward_hf:
      raise ValueError("--init_hf and --reward_hf need --prompt_files (the world's best-of-n "
                       "samples its own SFT stage, scored by its own reward stage)")
    elif self.world != "gold":
      raise ValueError("experiments.best_of_n runs on --world=gold (the reward models are "
                       "trained on its rater labels, and gold reward is its own)")
    if self.export_hf or self.lora_rank:
      raise ValueError("--export_hf and --lora_rank: best-of-n trains nothing, there is no "
                       "model to adapt or export (the policy is --init_hf with n samples and "
                       "the reward model)")
    if self.n_max < 1:
      raise ValueError(f"--n_max must be >= 1, got {self.n_max}")
    for n in self.n_values:
      if n < 1 or self.n_max % n:
        raise ValueError(f"--ns: every n must be >= 1 and divide --n_max={self.n_max} (the "
                         f"n_max samples of a prompt split into disjoint groups of n), got {n}")
    if self.uwo_coef < 0:
      raise ValueError(f"--uwo_coef must be >= 0, got {self.uwo_coef}")
    if self.sample_temperature <= 0:
      raise ValueError(f"--sample_temperature must be > 0, got {self.sample_temperature}")

  def _check_file_mode(self):
    """What --prompt_files cannot run, refused from the flags alone (before any model)."""
    self.check_prompt_files()
    self.check_reward_model_flags()
    if self.aggregate != "mean":
      raise ValueError("--aggregate combines an ensemble; --reward_hf is one reward model")
    if self.value_hf:
      raise ValueError("--value_hf: best-of-n has no value model")
    if self.max_new_tokens < 1:
      raise ValueError("--prompt_files needs --max_new_tokens (response tokens per sample)")
    if self.seq_len < self.max_prompt_len + self.max_new_tokens + 1:
      raise ValueError(f"--seq_len={self.seq_len} must hold what the reward model scores: "
                       f"bos + prompt (--max_prompt_len={self.max_prompt_len}) + "
                       f"--max_new_tokens={self.max_new_tokens} + eos; raise --seq_len")

  def effective(self) -> "BestOfNConfig":
    cfg = super().effective()
    return dataclasses.replace(cfg, n_max=4, ns="1,2,4") if cfg.smoke else cfg

  @property
  def n_values(self) -> tuple[int, ...]:
    try:
      return tuple(sorted({int(n) for n in self.ns.split(",")}))
    except ValueError:
      raise ValueError(f"--ns must be comma-separated integers, got {self.ns!r}") from None


def best_in_groups(proxy_NxK: np.ndarray, n: int) -> np.ndarray:
  """Column indices N x (K/n) of the highest-proxy sample in each disjoint group of n
  consecutive samples. Among equal scores the later sample wins: the tie rule of
  best_of_n_exact, so the picks and kl_exact describe one selection rule."""
  num, k = proxy_NxK.shape
  groups = proxy_NxK.reshape(num, k // n, n)
  last_max = n - 1 - np.argmax(groups[..., ::-1], axis=-1)
  return last_max + np.arange(0, k, n)[None, :]


def mean_se(values_NxG: np.ndarray) -> tuple[float, float]:
  """Mean and its standard error over prompts (rows), each prompt's groups averaged first."""
  per_prompt = values_NxG.mean(axis=1)
  se = per_prompt.std(ddof=1) / np.sqrt(len(per_prompt)) if len(per_prompt) > 1 else 0.0
  return float(per_prompt.mean()), float(se)


def exact_kl(proxy_NxK: np.ndarray, n: int) -> float:
  """Mean over prompts of KL(best-of-n || uniform over the prompt's samples)."""
  p_NxK = np.full(proxy_NxK.shape, 1.0 / proxy_NxK.shape[1], np.float32)
  kl_N, _ = jax.vmap(functools.partial(diagnostics.best_of_n_exact, n=n))(
      p_NxK, proxy_NxK.astype(np.float32))
  return float(np.mean(kl_N))


def per_n_row(n: int, proxy_NxK, gold_NxK, words_NxK) -> dict:
  picks = best_in_groups(proxy_NxK, n)
  take = lambda m: np.take_along_axis(m, picks, axis=1)
  g, g_se = mean_se(take(gold_NxK))
  p, p_se = mean_se(take(proxy_NxK))
  return {"n": n, "gold": g, "gold_se": g_se, "proxy": p, "proxy_se": p_se,
          "kl_bound": float(diagnostics.best_of_n_kl_bound(n)),
          "kl_exact": exact_kl(proxy_NxK, n), "words": float(take(words_NxK).mean())}


def run(cfg: BestOfNConfig) -> dict:
  cfg = cfg.effective()
  rcfg = chain.upstream_config("reward", cfg.reward_flagfile, cfg)
  reward_stage.check_ensemble(cfg, rcfg)
  prompt_len = registry.prompt_len(gold.all_prompts())
  max_new = worlds.max_new_tokens(cfg)
  if cfg.seq_len < prompt_len + max_new:
    raise ValueError(f"--seq_len={cfg.seq_len} cannot hold a prompt and its response: the "
                     f"reward models score {prompt_len} + {max_new} tokens")
  wall = {}
  t0 = time.perf_counter()
  rm_dir = chain.ensure("reward", rcfg)
  # The SFT the reward models were trained on, as the stage recorded it: looking it up again
  # by key would rebuild it if the code changed while the reward stage was being built.
  sft_dir = reward_stage.read_manifest(rm_dir)["sft_workdir"]
  wall["upstream_stages_s"] = time.perf_counter() - t0
  mesh = lm.setup(cfg, sharded_eval=False)
  world = cfg.world_config()
  test_prompts = gold.split_prompts(world)["test"][:min(cfg.eval_prompts, world.num_test)]
  g, sft_params, _ = lm.init_model(cfg, mesh, init_from=sft_dir)
  rms = reward_stage.load_reward_models(rcfg, mesh, rm_dir, sft_params)

  t0 = time.perf_counter()
  samples = comparisons.sample_k(
      g, sft_params, test_prompts, k=cfg.n_max, batch_size=cfg.eval_batch_size,
      prompt_len=prompt_len, max_new_tokens=max_new, temperature=cfg.sample_temperature,
      key=jax.random.key(cfg.seed + SAMPLE_STREAM))
  wall["sampling_s"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  proxy = reward_stage.proxy_scores(rms, samples, cfg)
  wall["scoring_s"] = time.perf_counter() - t0
  gold_NxK = samples.ground_truth_NxK(gold.ground_truth)
  words = np.array([[gold.facets(p, y)["words"] for y in ys]
                    for p, ys in zip(samples.prompts, samples.responses)], np.float64)
  per_n = [per_n_row(n, proxy, gold_NxK, words) for n in cfg.n_values]

  result = {"per_n": per_n, "prompts": len(test_prompts), "n_max": cfg.n_max,
            "aggregate": cfg.aggregate, "reward_members": len(rms.params),
            "reward_workdir": rm_dir, "sft_workdir": sft_dir, "wall": wall,
            "provenance": provenance.provenance()}
  write_outputs(cfg, result, samples, proxy)
  print(format_table(result))
  return result


def write_records(cfg, result: dict, samples: comparisons.Samples, scores_name: str,
                  scores_NxK: np.ndarray, keys=PER_N_KEYS) -> None:
  """config.json, one metrics record (its `keys`) per n, result.json and samples.json (with
  each sample's score under scores_name) in --workdir: what both best-of-n modes write."""
  write_config(cfg.workdir, config.to_dict(cfg))
  logger = MetricsLogger(cfg.workdir)
  for row in result["per_n"]:
    logger.log(row["n"], {k: row[k] for k in keys}, split="eval")
  logger.close()
  write_json(os.path.join(cfg.workdir, "result.json"), result, indent=1)
  with open(os.path.join(cfg.workdir, "samples.json"), "w") as f:
    json.dump({"prompts": samples.prompts, "responses": samples.responses,
               "finished": samples.finished.tolist(), scores_name: scores_NxK.tolist()}, f)


def write_outputs(cfg: BestOfNConfig, result: dict, samples: comparisons.Samples,
                  proxy_NxK: np.ndarray) -> None:
  write_records(cfg, result, samples, "proxy", proxy_NxK)
  curve = [dict(row, kl=row["kl_exact"]) for row in result["per_n"]]
  plots.reward_vs_kl(curve, os.path.join(cfg.workdir, "best_of_n.png"),
                     title=f"best-of-n (n = {cfg.ns}), aggregate {cfg.aggregate}")


def format_table(result: dict) -> str:
  lines = [f"best-of-n: {result['prompts']} held-out prompts x {result['n_max']} SFT samples, "
           f"proxy = {result['aggregate']} of {result['reward_members']} reward model(s)",
           "     n   gold             proxy            KL bound  KL exact  words"]
  for r in result["per_n"]:
    lines.append(f"  {r['n']:4d}   {r['gold']:+.3f} +- {r['gold_se']:.3f}   "
                 f"{r['proxy']:+.3f} +- {r['proxy_se']:.3f}   {r['kl_bound']:7.3f}   "
                 f"{r['kl_exact']:7.3f}   {r['words']:5.1f}")
  return "\n".join(lines)

