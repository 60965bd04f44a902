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
(experiments/ppo.py). --steps, --eval_every, --save_every and --log_every are not used: the
unit is a round; every round logs the labeler's agreement with gold on its pairs, the gold
and proxy reward of its samples and the DPO metrics (split train), then a held-out
evaluation (split eval: gold mean +- SE and words of GOLD_EVAL_SAMPLES temperature-1 samples
per test prompt), and saves a checkpoint; a restarted run resumes at the next round.
The end table compares SFT, online DPO and (--matched_sft) SFT continued for as many
optimizer steps, with win rates vs SFT on paired samples; result.json, online_dpo_gold.png.
"""
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import cli, comparisons, lm, plots, reward as reward_exp, sft, worlds
from rlhf_jax import sharding
from rlhf_jax.compile_count import CompileCounter
from rlhf_jax.train import checkpoint, optim, preference, reward
from rlhf_jax.train import state as state_lib, step as step_lib
from rlhf_jax.train.logging import format_progress, write_config
from rlhf_jax.worlds import gold, raters

LABELERS = ("reward_model", "raters")
PAIR_KEYS = ("chosen_tokens", "chosen_valid", "chosen_mask", "rejected_tokens",
             "rejected_valid", "rejected_mask", "example_valid")


@dataclasses.dataclass(frozen=True)
class OnlineDPOConfig(lm.LMConfig):
  workdir: str = cli.flag("workdirs/online_dpo", "Run directory: checkpoints, metrics.jsonl, "
                          "tb/, result.json, online_dpo_gold.png.")
  reward_flagfile: str = cli.flag("experiments/configs/reward_gold_tiny.flags",
                                  "Flagfile of the reward-model stage (it names the SFT stage).")
  stage_root: str = cli.flag("workdirs/stages", "Where cached upstream stages live.")
  rounds: int = cli.flag(6, "Sample -> label -> train rounds.")
  prompts_per_round: int = cli.flag(64, "Train prompts sampled per round (one pair each).")
  steps_per_round: int = cli.flag(8, "Optimizer steps of --batch_size pairs per round.")
  loss: str = cli.flag("dpo", "Pairwise objective.", choices=preference.PAIR_LOSSES)
  beta: float = cli.flag(0.1, "DPO/cDPO KL coefficient beta (> 0).")
  label_smoothing: float = cli.flag(0.1, "cDPO label-flip probability eps in [0, 0.5].")
  ipo_tau: float = cli.flag(0.1, "IPO regularisation tau (> 0).")
  labeler: str = cli.flag("reward_model", "Who labels each round's pairs.", choices=LABELERS)
  aggregate: str = cli.flag("mean", "Ensemble aggregation of reward-model scores.",
                            choices=reward.AGGREGATES)
  uwo_coef: float = cli.flag(0.5, "Variance penalty of --aggregate=uwo.")
  sample_temperature: float = cli.flag(1.0, "Temperature of the policy samples of a round.")
  matched_sft: bool = cli.flag(False, "Also continue SFT for as many optimizer steps as "
                               "online DPO takes (the matched-compute baseline) and report it.")

  def __post_init__(self):
    super().__post_init__()
    if self.world != "gold":
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


@dataclasses.dataclass
class Sampler:
  """K samples per prompt of any policy, always in batches of --eval_batch_size prompt rows
  of the same prompt_len: training samples and every held-out evaluation share one compiled
  sampler per temperature."""
  graphdef: object
  batch_size: int
  prompt_len: int
  max_new: int

  def __call__(self, params, prompts, *, k: int, temperature: float, key):
    return comparisons.sample_k(self.graphdef, params, prompts, k=k,
                                batch_size=self.batch_size, prompt_len=self.prompt_len,
                                max_new_tokens=self.max_new, temperature=temperature, key=key)


@dataclasses.dataclass
class Evaluator:
  """Held-out gold of GOLD_EVAL_SAMPLES temperature-1 samples per test prompt. The key is
  fixed, so two policies answer the same prompts in the same order (paired win rates)."""
  sampler: Sampler
  prompts: list[str]
  key: jax.Array

  def __call__(self, params) -> tuple[dict, list[float]]:
    s = self.sampler(params, self.prompts, k=worlds.GOLD_EVAL_SAMPLES, temperature=1.0,
                     key=self.key)
    ps = [p for p in s.prompts for _ in range(s.k)]
    ys = [y for row in s.responses for y in row]
    return worlds.summary("gold", ps, ys), s.ground_truth_NxK("gold").ravel().tolist()


def choose(cfg: OnlineDPOConfig, proxy_Nx2: np.ndarray, gold_Nx2: np.ndarray,
           rater_temperature: float, rng: np.random.Generator) -> np.ndarray:
  """Index (0 or 1) of the chosen response of each pair, by --labeler."""
  if cfg.labeler == "reward_model":
    return (proxy_Nx2[:, 1] > proxy_Nx2[:, 0]).astype(int)
  prefers_first = raters.pairwise_labels(gold_Nx2[:, 0], gold_Nx2[:, 1], rater_temperature, rng)
  return np.where(prefers_first, 0, 1)


def label_agreement(gold_Nx2: np.ndarray, chosen_N: np.ndarray) -> float:
  """Share of pairs whose chosen response has the higher gold reward (gold ties left out)."""
  rows = np.arange(len(chosen_N))
  diff = gold_Nx2[rows, chosen_N] - gold_Nx2[rows, 1 - chosen_N]
  return float(np.mean(diff[diff != 0] > 0)) if np.any(diff != 0) else float("nan")


def pair_batch(samples: comparisons.Samples, chosen_N: np.ndarray, seq_len: int) -> dict:
  rows = np.arange(len(chosen_N))
  pick = lambda side: [samples.responses[n][side[n]] for n in rows]
  return comparisons.sampled_pairs(samples.prompts, pick(chosen_N), pick(1 - chosen_N),
                                   samples.finished[rows, chosen_N],
                                   samples.finished[rows, 1 - chosen_N], seq_len)


def reference_logps(ref_fn, ref_params, batch: dict, batch_size: int, mesh) -> dict:
  """The frozen reference's log-probs of every pair of a round, in --batch_size chunks (the
  last one filled with copies of the first rows, whose outputs are dropped)."""
  n = len(batch["example_valid"])
  padded = {k: np.concatenate([v, np.repeat(v[:1], -n % batch_size, 0)])
            for k, v in batch.items()}
  outs = [jax.device_get(ref_fn(ref_params, sharding.shard_batch(
      {k: v[i:i + batch_size] for k, v in padded.items()}, mesh)))
      for i in range(0, n + (-n % batch_size), batch_size)]
  return {k: np.concatenate([o[k] for o in outs])[:n] for k in outs[0]}


def step_batches(batch: dict, steps: int, batch_size: int, rng: np.random.Generator):
  """`steps` batches of `batch_size` pairs: fresh shuffles of the round's pairs, back to back
  (every pair is seen equally often, up to one pass), so each step has the same shape."""
  n = len(batch["example_valid"])
  order = np.concatenate([rng.permutation(n) for _ in range(-(-steps * batch_size // n))])
  for j in range(steps):
    idx = order[j * batch_size:(j + 1) * batch_size]
    yield {k: v[idx] for k, v in batch.items()}


def run(cfg: OnlineDPOConfig) -> dict:
  cfg = cfg.effective()
  rcfg = reward_exp.reward_config(cfg)
  reward_exp.check_ensemble(cfg, rcfg)
  prompt_len = worlds.prompt_len(gold.all_prompts())
  max_new = worlds.max_new_tokens(cfg)
  check_lengths(cfg, prompt_len, max_new)
  wall = {}
  t0 = time.perf_counter()
  rm_dir = reward_exp.ensure_reward(cfg, rcfg)
  wall["upstream_stages_s"] = time.perf_counter() - t0
  with open(os.path.join(rm_dir, reward_exp.MANIFEST)) as f:
    manifest = json.load(f)
  # The SFT stage the reward models were trained on, from their manifest: recomputing its
  # key here would rebuild it if any code changed while the reward stage was being built.
  sft_dir, rater_temperature = manifest["sft_workdir"], manifest["rater_temperature"]
  scfg = reward_exp.sft_config(rcfg)
  mesh = lm.setup(cfg)
  world = cfg.world_config()
  split = gold.split_prompts(world)
  test_prompts = split["test"][:min(cfg.eval_prompts, world.num_test)]

  g, sft_params, shardings = lm.init_model(cfg, mesh, init_from=sft_dir)
  rms = reward_exp.load_reward_models(rcfg, mesh, rm_dir, sft_params)

  # Reference log-probs are precomputed once per round (not in-step with ref_params): each
  # pair is visited steps_per_round * batch_size / prompts_per_round times, so the reference
  # forward is paid once per pair instead of once per visit, and the step holds one model.
  ref_fn = jax.jit(preference.reference_logps_fn(g),
                   in_shardings=(shardings, {k: sharding.batch_sharding(mesh)
                                             for k in PAIR_KEYS}),
                   out_shardings=sharding.batch_sharding(mesh))
  loss_fn = preference.preference_loss_fn(g, loss=cfg.loss, beta=cfg.beta,
                                          label_smoothing=cfg.label_smoothing,
                                          ipo_tau=cfg.ipo_tau)
  ocfg = optim.OptimConfig(learning_rate=cfg.learning_rate, total_steps=cfg.total_steps,
                           warmup_steps=min(cfg.warmup_steps, cfg.total_steps - 1),
                           weight_decay=cfg.weight_decay, grad_clip_norm=cfg.grad_clip_norm)
  optimizer = optim.make_optimizer(ocfg)
  # The train state is donated: it gets a copy, sft_params stay the frozen reference.
  state = state_lib.init_train_state(jax.tree.map(jnp.copy, sft_params), optimizer,
                                     jax.random.key(cfg.seed), param_shardings=shardings)
  batch_shardings = {k: sharding.batch_sharding(mesh)
                     for k in (*PAIR_KEYS, "ref_chosen_logps", "ref_rejected_logps")}
  train_step = step_lib.compile_train_step(
      step_lib.make_train_step(loss_fn, optimizer, num_microbatches=cfg.num_microbatches,
                               lr_schedule=optim.make_schedule(ocfg)),
      state_lib.state_shardings(optimizer, sft_params, shardings), batch_shardings)
  sampler = Sampler(g, cfg.eval_batch_size, prompt_len, max_new)
  evaluator = Evaluator(sampler, test_prompts, jax.random.key(cfg.seed + 1))

  write_config(cfg.workdir, cli.to_dict(cfg))
  manager, logger, state, data = lm.resume_run(cfg, state, save_every=1)
  if data is not None:
    print(f"resumed from round {data['round']}")
  else:
    summary, sft_gold = lm.timed("eval SFT", evaluator, sft_params)
    data = {"round": 0, "curve": [{"round": 0, **summary}],
            "gold": {"sft": sft_gold, "policy": sft_gold}}
    logger.log(0, summary, split="eval")

  t_loop, start = time.perf_counter(), data["round"]
  with CompileCounter() as counter:
    for r in range(start + 1, cfg.rounds + 1):
      counter.reset()  # compiles per round are logged: after the first there should be none
      state, values = train_round(cfg, r, state, sampler, rms, rater_temperature, ref_fn,
                                  sft_params, train_step, split["train"], mesh)
      summary, policy_gold = evaluator(state.params)
      values["compiles"] = float(counter.count)
      logger.log(r, values)
      logger.log(r, summary, split="eval")
      data = {"round": r, "curve": [*data["curve"], {"round": r, **summary}],
              "gold": {"sft": data["gold"]["sft"], "policy": policy_gold}}
      checkpoint.save(manager, r, state, data, force=True)
      rate = (r - start) * cfg.steps_per_round / (time.perf_counter() - t_loop)
      print(f"round {r}/{cfg.rounds} | "
            + format_progress(r * cfg.steps_per_round, cfg.total_steps, values["loss"], rate,
                              None)
            + f" | agree {values['label_agreement']:.2f} | sample gold "
            f"{values['sample_gold']:.2f} | held-out gold {summary['gold']:.3f}"
            f" +- {summary['gold_se']:.3f} | compiles {counter.count}")
  manager.wait_until_finished()
  logger.close()
  wall["online_dpo_s"] = time.perf_counter() - t_loop

  result = report(cfg, data, wall, rm_dir, scfg, mesh, g, sft_params, shardings, evaluator)
  checkpoint.save_params(os.path.join(cfg.workdir, lm.PARAMS_DIR), state.params)
  manager.close()
  return result


def train_round(cfg: OnlineDPOConfig, r: int, state, sampler: Sampler, rms, rater_temperature,
                ref_fn, ref_params, train_step, train_prompts, mesh):
  """One round: sample pairs from the current policy, label them, take the DPO steps.
  Every draw depends on (seed, round) only, so a resumed run repeats it exactly."""
  rng = np.random.default_rng((cfg.seed, r))
  prompts = list(rng.choice(train_prompts, cfg.prompts_per_round))
  samples = sampler(state.params, prompts, k=2, temperature=cfg.sample_temperature,
                    key=jax.random.fold_in(jax.random.key(cfg.seed), r))
  gold_Nx2, proxy_Nx2 = samples.ground_truth_NxK("gold"), reward_exp.proxy_scores(rms, samples, cfg)
  chosen = choose(cfg, proxy_Nx2, gold_Nx2, rater_temperature, rng)
  batch = pair_batch(samples, chosen, cfg.seq_len)
  batch.update(reference_logps(ref_fn, ref_params, batch, cfg.batch_size, mesh))
  metrics = []
  for b in step_batches(batch, cfg.steps_per_round, cfg.batch_size, rng):
    state, m = train_step(state, sharding.shard_batch(b, mesh))
    metrics.append(m)
  metrics = jax.device_get(metrics)
  values = {k: float(np.mean([m[k] for m in metrics])) for k in metrics[0]}
  values["learning_rate"] = float(metrics[-1]["learning_rate"])
  values.update(label_agreement=label_agreement(gold_Nx2, chosen),
                sample_gold=float(gold_Nx2.mean()), sample_proxy=float(proxy_Nx2.mean()),
                sample_words=float(np.mean([len(y.split()) for ys in samples.responses
                                            for y in ys])))
  return state, values


def report(cfg: OnlineDPOConfig, data: dict, wall: dict, rm_dir: str, scfg, mesh, g,
           sft_params, shardings, evaluator: Evaluator) -> dict:
  """The end table (win rates on paired held-out samples), result.json and the figure."""
  rng = np.random.default_rng(cfg.seed)
  curve, golds = data["curve"], data["gold"]
  table = {"sft": curve[0],
           "online_dpo": {**curve[-1], **worlds.win_rate(golds["policy"], golds["sft"], rng)}}
  if cfg.matched_sft:
    matched = sft.continued_sft(scfg, os.path.join(cfg.workdir, "matched_sft"),
                                cfg.total_steps, mesh, g, sft_params, shardings)
    summary, matched_gold = evaluator(matched)
    table["sft_matched"] = {**summary, **worlds.win_rate(matched_gold, golds["sft"], rng)}
    table["online_dpo"]["vs_matched"] = worlds.win_rate(golds["policy"], matched_gold, rng)
  result = {"table": table, "curve": curve, "labeler": cfg.labeler, "loss": cfg.loss,
            "optimizer_steps": cfg.total_steps, "wall": wall, "reward_workdir": rm_dir}
  with open(os.path.join(cfg.workdir, "result.json"), "w") as f:
    json.dump(result, f, indent=1)
  baselines = {"SFT": curve[0]["gold"]}
  if "sft_matched" in table:
    baselines["SFT, matched compute"] = table["sft_matched"]["gold"]
  plots.curve_with_se(curve, "round", "gold", os.path.join(cfg.workdir, "online_dpo_gold.png"),
                      title=f"online {cfg.loss}, labeler {cfg.labeler}", xlabel="round",
                      ylabel="held-out gold reward", baselines=baselines)
  print(format_table(table))
  return result


def format_table(table: dict) -> str:
  lines = [f"held-out (test prompts x {worlds.GOLD_EVAL_SAMPLES} samples)   gold"
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


if __name__ == "__main__":
  cli.main(OnlineDPOConfig, run)
