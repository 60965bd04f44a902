"""Online (iterative) DPO on the gold world: DPO on pairs of the CURRENT policy's samples.

    python -m experiments.online_dpo --flagfile=experiments/configs/online_dpo_tiny.flags

Offline DPO trains on pairs sampled once from the SFT policy; as the policy moves away, those
pairs stop describing what it generates. Here every round (Xu 2023, Guo 2024):
  1. samples 2 responses for each of --prompts_per_round train prompts from the current policy
     (--sample_temperature);
  2. labels which one is better:
       reward_model  the reward stage's model (or its ensemble, aggregated by --aggregate),
                     trained on SFT samples only: the cheap labeler, but off-distribution later
       raters        simulated raters on the hidden gold reward, Bradley-Terry at the rater
                     temperature of the reward stage's manifest: a human in the loop
  3. takes --steps_per_round DPO (--loss dpo|cdpo|ipo) optimizer steps of --batch_size pairs
     on them against the frozen SFT reference; one optimizer and LR schedule over all
     --rounds * --steps_per_round steps, the train step compiled once.

Upstream stages (pretrain -> SFT -> reward model) are built or reused exactly as for PPO
(rlhf_jax/runs/ppo.py). --steps, --eval_every, --save_every and --log_every are not used: the
unit is a round; every round logs the labeler's agreement with gold on its pairs, the gold
and proxy reward of its samples and the DPO metrics (split train), then a held-out
evaluation (split eval: gold mean +- SE and words of GOLD_EVAL_SAMPLES temperature-1 samples
per test prompt), and saves a checkpoint; a restarted run resumes at the next round.
The end table compares SFT, online DPO and (--matched_sft) SFT continued for as many
optimizer steps, with win rates vs SFT on paired samples; result.json, online_dpo_gold.png.
On real prompts with Hugging Face checkpoints (--prompt_files): online_dpo_files.py.
"""
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.runs import plots
from rlhf_jax.pipeline import chain, config, lm, prompt_sets, real_models
from rlhf_jax.pipeline import reward as reward_stage, sft, worlds
from rlhf_jax import evaluation, plan_models, provenance, sharding
from rlhf_jax.rl import comparisons, loop as rl_loop
from rlhf_jax.rl.algorithms import online_dpo
from rlhf_jax.train import checkpoint, preference, reward
from rlhf_jax.worlds import gold, heldout, raters, registry
from rlhf_jax.train.logging import write_json

LABELERS = ("reward_model", "raters")


@dataclasses.dataclass(frozen=True)
class OnlineDPOConfig(lm.LMConfig, real_models.HFFlags, prompt_sets.PromptFileFlags,
                      real_models.RewardModelFlags):
  workdir: str = config.flag("workdirs/online_dpo", "Run directory: checkpoints, metrics.jsonl, "
                          "tb/, result.json, online_dpo_gold.png.")
  reward_flagfile: str = config.flag("experiments/configs/reward_gold_tiny.flags",
                                  "Flagfile of the reward-model stage (it names the SFT stage).")
  stage_root: str = config.flag("workdirs/stages", "Where cached upstream stages live.")
  rounds: int = config.flag(6, "Sample -> label -> train rounds.")
  prompts_per_round: int = config.flag(64, "Train prompts sampled per round (one pair each).")
  steps_per_round: int = config.flag(8, "Optimizer steps of --batch_size pairs per round.")
  loss: str = config.flag("dpo", "Pairwise objective.", choices=preference.PAIR_LOSSES)
  beta: float = config.flag(0.1, "DPO/cDPO KL coefficient beta (> 0).")
  label_smoothing: float = config.flag(0.1, "cDPO label-flip probability eps in [0, 0.5].")
  ipo_tau: float = config.flag(0.1, "IPO regularisation tau (> 0).")
  labeler: str = config.flag("reward_model", "Who labels each round's pairs.", choices=LABELERS)
  aggregate: str = config.flag("mean", "Ensemble aggregation of reward-model scores.",
                            choices=reward.AGGREGATES)
  uwo_coef: float = config.flag(0.5, "Variance penalty of --aggregate=uwo.")
  sample_temperature: float = config.flag(1.0, "Temperature of the policy samples of a round.")
  matched_sft: bool = config.flag(False, "Also continue SFT for as many optimizer steps as "
                               "online DPO takes (the matched-compute baseline) and report it.")

  def __post_init__(self):
    super().__post_init__()
    if self.dry_run:
      raise ValueError(f"--dry_run plans the stages {', '.join(plan_models.STAGES)} "
                       "(rlhf_jax/plan_models.py); experiments.online_dpo has no plan: run it "
                       "without --dry_run")
    if self.file_mode:
      self._check_file_mode()
    elif self.init_hf or self.export_hf or self.reward_hf:
      raise ValueError("--init_hf, --reward_hf and --export_hf need --prompt_files (the "
                       "world's online DPO starts from its own SFT and reward stages)")
    elif self.world != "gold":
      raise ValueError("experiments.online_dpo runs on --world=gold (pairs are labelled "
                       "through its gold reward or reward models trained on it)")
    for name in ("rounds", "prompts_per_round", "steps_per_round"):
      if getattr(self, name) < 1:
        raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
    for name in ("beta", "ipo_tau", "sample_temperature"):
      if getattr(self, name) <= 0:
        raise ValueError(f"--{name} must be > 0, got {getattr(self, name)}")
    if not 0.0 <= self.label_smoothing <= 0.5:
      raise ValueError(f"--label_smoothing must be in [0, 0.5], got {self.label_smoothing}")
    if self.uwo_coef < 0:
      raise ValueError(f"--uwo_coef must be >= 0, got {self.uwo_coef}")

  def _check_file_mode(self):
    """What --prompt_files cannot run, refused from the flags alone (before any model)."""
    self.check_prompt_files()
    self.check_reward_model_flags()
    if self.labeler != "reward_model":
      raise ValueError(f"--labeler={self.labeler} labels with the gold world's simulated "
                       "raters; with --prompt_files the --reward_hf model labels: pass "
                       "--labeler=reward_model")
    if self.matched_sft:
      raise ValueError("--matched_sft continues the world's SFT stage; it is not available "
                       "with --prompt_files: pass --nomatched_sft")
    if self.aggregate != "mean":
      raise ValueError("--aggregate combines an ensemble; --reward_hf is one reward model")
    if self.value_hf:
      raise ValueError("--value_hf: online DPO has no value model")
    if self.max_new_tokens < 1:
      raise ValueError("--prompt_files needs --max_new_tokens (response tokens per sample)")
    if self.seq_len < self.max_prompt_len + self.max_new_tokens + 1:
      raise ValueError(f"--seq_len={self.seq_len} must hold a pair's sequence: bos + prompt "
                       f"(--max_prompt_len={self.max_prompt_len}) + --max_new_tokens="
                       f"{self.max_new_tokens} + eos; raise --seq_len")

  def effective(self) -> "OnlineDPOConfig":
    if not self.smoke:
      return self
    return dataclasses.replace(super().effective(), rounds=2, prompts_per_round=8,
                               steps_per_round=2)

  @property
  def total_steps(self) -> int:
    return self.rounds * self.steps_per_round


def check_lengths(cfg: OnlineDPOConfig, prompt_len: int, max_new: int) -> None:
  """bos + prompt + a full response (+ eos) must fit in --seq_len; checked before sampling."""
  if cfg.seq_len < prompt_len + max_new + 1:
    raise ValueError(f"--seq_len={cfg.seq_len} is shorter than prompt ({prompt_len} with bos) "
                     f"+ --max_new_tokens ({max_new}) + eos; raise --seq_len")


def labeler(cfg: OnlineDPOConfig, rms, rater_temperature: float):
  """label(samples, rng) -> (chosen_N, stats): --labeler picks each pair's better response;
  stats: its agreement with gold, the gold and proxy reward and length of the samples."""
  def label(samples, rng):
    gold_Nx2 = samples.ground_truth_NxK(gold.ground_truth)
    proxy_Nx2 = reward_stage.proxy_scores(rms, samples, cfg)
    if cfg.labeler == "reward_model":
      chosen = (proxy_Nx2[:, 1] > proxy_Nx2[:, 0]).astype(int)
    else:
      first = raters.pairwise_labels(gold_Nx2[:, 0], gold_Nx2[:, 1], rater_temperature, rng)
      chosen = np.where(first, 0, 1)
    return chosen, {"label_agreement": label_agreement(gold_Nx2, chosen),
                    "sample_gold": float(gold_Nx2.mean()),
                    "sample_proxy": float(proxy_Nx2.mean()),
                    "sample_words": float(np.mean([len(y.split()) for ys in samples.responses
                                                   for y in ys]))}
  return label


def label_agreement(gold_Nx2: np.ndarray, chosen_N: np.ndarray) -> float:
  """Share of pairs whose chosen response has the higher gold reward (gold ties left out)."""
  rows = np.arange(len(chosen_N))
  diff = gold_Nx2[rows, chosen_N] - gold_Nx2[rows, 1 - chosen_N]
  return float(np.mean(diff[diff != 0] > 0)) if np.any(diff != 0) else float("nan")


def gold_eval(cfg: OnlineDPOConfig, sample, prompts):
  """evaluate(params) -> (held-out summary, gold of every sample): GOLD_EVAL_SAMPLES
  temperature-1 samples per test prompt with a fixed key, so two policies answer the same
  prompts in the same order (paired win rates)."""
  key = jax.random.key(cfg.seed + 1)

  def evaluate(params):
    s = sample(params, prompts, k=heldout.EVAL_SAMPLES, temperature=1.0, key=key)
    ps = [p for p in s.prompts for _ in range(s.k)]
    ys = [y for row in s.responses for y in row]
    return worlds.summary(cfg, ps, ys), s.ground_truth_NxK(gold.ground_truth).ravel().tolist()
  return evaluate


def dpo_parts(cfg: OnlineDPOConfig, g, shardings, mesh):
  """(ref_fn, loss_fn) of both modes: the jitted reference log-prob pass over a pair batch and
  the --loss objective."""
  ref_fn = jax.jit(preference.reference_logps_fn(g),
                   in_shardings=(shardings, {k: sharding.batch_sharding(mesh)
                                             for k in online_dpo.PAIR_KEYS}),
                   out_shardings=sharding.batch_sharding(mesh))
  loss_fn = preference.preference_loss_fn(g, loss=cfg.loss, beta=cfg.beta,
                                          label_smoothing=cfg.label_smoothing,
                                          ipo_tau=cfg.ipo_tau)
  return ref_fn, loss_fn


def run(cfg: OnlineDPOConfig) -> dict:
  cfg = cfg.effective()
  rcfg = chain.upstream_config("reward", cfg.reward_flagfile, cfg)
  reward_stage.check_ensemble(cfg, rcfg)
  prompt_len = registry.prompt_len(gold.all_prompts())
  max_new = worlds.max_new_tokens(cfg)
  check_lengths(cfg, prompt_len, max_new)
  wall = {}
  t0 = time.perf_counter()
  rm_dir = chain.ensure("reward", rcfg)
  wall["upstream_stages_s"] = time.perf_counter() - t0
  manifest = reward_stage.read_manifest(rm_dir)
  # The SFT stage the reward models were trained on, from their manifest: recomputing its
  # key here would rebuild it if any code changed while the reward stage was being built.
  sft_dir, rater_temperature = manifest["sft_workdir"], manifest["rater_temperature"]
  mesh = lm.setup(cfg, sharded_eval=False)
  world = cfg.world_config()
  split = gold.split_prompts(world)
  g, sft_params, shardings = lm.init_model(cfg, mesh, init_from=sft_dir)
  rms = reward_stage.load_reward_models(rcfg, mesh, rm_dir, sft_params)

  def sample(params, prompts, *, k, temperature, key):  # one compiled sampler per temperature
    return comparisons.sample_k(g, params, prompts, k=k, batch_size=cfg.eval_batch_size,
                                prompt_len=prompt_len, max_new_tokens=max_new,
                                temperature=temperature, key=key)
  ref_fn, loss_fn = dpo_parts(cfg, g, shardings, mesh)
  algorithm = online_dpo.OnlineDPO(
      lambda p, prompts, key: sample(p, prompts, k=2, temperature=cfg.sample_temperature,
                                     key=key),
      labeler(cfg, rms, rater_temperature), ref_fn, sft_params, split["train"],
      cfg.prompts_per_round, cfg.steps_per_round, cfg.batch_size, cfg.seq_len, cfg.seed, mesh)
  loop_cfg = rl_loop.LoopConfig(cfg.workdir, cfg.rounds, keep_checkpoints=cfg.keep_checkpoints,
                                **rl_loop.LoopConfig.faults(cfg))
  state, train_step = rl_loop.make_trainer(
      loss_fn, jax.tree.map(jnp.copy, sft_params), shardings, online_dpo.BATCH_KEYS, mesh,
      optim_cfg=lm.optim_config(cfg, cfg.total_steps), num_microbatches=cfg.num_microbatches,
      seed=cfg.seed)
  evaluate = gold_eval(cfg, sample, split["test"][:min(cfg.eval_prompts, world.num_test)])
  sft_summary, sft_gold = lm.timed("eval SFT", evaluate, sft_params)
  last = {}

  def evaluate_summary(params):
    last["summary"], last["gold"] = evaluate(params)
    return last["summary"]

  t_loop = time.perf_counter()
  state, curve = rl_loop.run(loop_cfg, algorithm, state=state, train_step=train_step, mesh=mesh,
                             evaluate=evaluate_summary, config=config.to_dict(cfg),
                             initial_point=sft_summary)
  wall["online_dpo_s"] = time.perf_counter() - t_loop
  if "gold" not in last:  # a finished run resumed: no round ran, evaluate the final policy
    evaluate_summary(state.params)
  rng = np.random.default_rng(cfg.seed)
  table = {"sft": curve[0],
           "online_dpo": {**curve[-1], **evaluation.win_rate(last["gold"], sft_gold, rng)}}
  if cfg.matched_sft:
    matched = sft.continued_sft(chain.upstream_config("sft", rcfg.sft_flagfile, rcfg),
                                os.path.join(cfg.workdir, "matched_sft"), cfg.total_steps, mesh,
                                g, sft_params, shardings)
    summary, matched_gold = evaluate(matched)
    table["sft_matched"] = {**summary, **evaluation.win_rate(matched_gold, sft_gold, rng)}
    table["online_dpo"]["vs_matched"] = evaluation.win_rate(last["gold"], matched_gold, rng)
  checkpoint.save_params(os.path.join(cfg.workdir, lm.PARAMS_DIR), state.params)
  result = {"table": table, "curve": curve, "labeler": cfg.labeler, "loss": cfg.loss,
            "optimizer_steps": cfg.total_steps, "wall": wall, "reward_workdir": rm_dir,
            "provenance": provenance.provenance()}
  write_json(os.path.join(cfg.workdir, "result.json"), result, indent=1)
  baselines = {"SFT": curve[0]["gold"]}
  if "sft_matched" in table:
    baselines["SFT, matched compute"] = table["sft_matched"]["gold"]
  plots.curve_with_se(curve, "iteration", "gold",
                      os.path.join(cfg.workdir, "online_dpo_gold.png"),
                      title=f"online {cfg.loss}, labeler {cfg.labeler}", xlabel="round",
                      ylabel="held-out gold reward", baselines=baselines)
  print(format_table(table))
  return result


def format_table(table: dict) -> str:
  lines = [f"held-out (test prompts x {heldout.EVAL_SAMPLES} samples)   gold"
           "            words   win rate vs SFT [95% CI]"]
  for name, m in table.items():
    win = (f"{m['win_rate']:.3f} [{m['win_rate_lo']:.3f}, {m['win_rate_hi']:.3f}]"
           if "win_rate" in m else "-")
    lines.append(f"  {name:<12} {m['gold']:+.3f} +- {m['gold_se']:.3f}   {m['words']:5.1f}"
                 f"   {win}")
  if "vs_matched" in table["online_dpo"]:
    w = table["online_dpo"]["vs_matched"]
    lines.append(f"  online_dpo vs sft_matched: win rate {w['win_rate']:.3f} "
                 f"[{w['win_rate_lo']:.3f}, {w['win_rate_hi']:.3f}]")
  return "\n".join(lines)

