"""PPO from a learned reward (InstructGPT stage 3) on a preference world: THE MAIN JOB (gold).

    python -m experiments.ppo --flagfile=experiments/configs/ppo_tiny.flags

In an empty workdir this builds what it lacks, each stage cached under --stage_root by a key
of its own and its upstream flags and the code version (experiments/stages.py):
pretrain -> SFT -> reward model(s) -> PPO. Then:

  policy    starts from SFT; the reference (KL anchor) is the frozen SFT model
  value     starts from reward model 0 (Ouyang 2022 sec 3.5), trained jointly with the policy
  reward    r(x, y) = the reward model's score, normalised by its mean and std on SFT samples
            (reward.json of the stage); with an ensemble, aggregated by --aggregate
            (mean, wco = min, uwo = mean - uwo_coef * variance; Coste 2024)
  per token r_t = -kl_coef (log pi_old - log pi_sft) + [t = last] r(x, y)   (Ziegler 2019)
  kl_coef   fixed, or adapted to --kl_target (Ziegler 2019's proportional controller)
  ptx       --ptx_coef > 0 adds the pretraining-corpus NLL (PPO-ptx, Ouyang 2022 eq. 2)

Flags reused from the LM stages: --steps = PPO iterations (one rollout of --batch_size
prompts, then --ppo_epochs passes over it in --num_minibatches minibatches);
--eval_every / --save_every count iterations. Training never sees the gold reward r*;
every evaluation reports it: the held-out table for the base, SFT and PPO policies (gold,
proxy, KL to SFT per sequence +- standard error, words) and ppo_curve.png, proxy and gold
reward against KL over training. On the sycophancy and intransitive worlds the table adds
the world's own columns (the sycophancy rate; exploitability and distance to the Nash
equilibrium), the numbers those worlds exist to measure.
"""
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import cli, lm, plots, reward as reward_exp, sft, worlds
from rlhf_jax import sharding
from rlhf_jax.compile_count import CompileCounter
from rlhf_jax.data import builders, pipeline
from rlhf_jax.data.tokenizer import ByteTokenizer
from rlhf_jax.losses import ppo as ppo_losses
from rlhf_jax.losses.sft import ptx_loss
from rlhf_jax.logprobs import shifted_logps
from rlhf_jax.sampling import SamplingConfig
from rlhf_jax.train import checkpoint, optim, ppo, reward
from rlhf_jax.train import state as state_lib, step as step_lib
from rlhf_jax.train.logging import format_progress, write_config


@dataclasses.dataclass(frozen=True)
class PPOConfig(lm.LMConfig):
  reward_flagfile: str = cli.flag("experiments/configs/reward_gold_tiny.flags",
                                  "Flagfile of the reward-model stage (it names the SFT stage).")
  stage_root: str = cli.flag("workdirs/stages", "Where cached upstream stages live.")
  ppo_epochs: int = cli.flag(2, "Passes over each rollout.")
  num_minibatches: int = cli.flag(2, "Optimizer updates per pass over a rollout.")
  kl_coef: float = cli.flag(0.05, "Initial (or fixed) per-token KL penalty coefficient (>= 0).")
  adaptive_kl: bool = cli.flag(False, "Adapt kl_coef towards --kl_target (Ziegler 2019).")
  kl_target: float = cli.flag(4.0, "Target KL to SFT per sequence (nats) of the adaptive "
                              "controller.")
  kl_horizon: int = cli.flag(2000, "Adaptive controller horizon (sequences).")
  clip_eps: float = cli.flag(0.2, "Policy ratio clip range.")
  value_clip_eps: float = cli.flag(0.2, "Value clip range around the rollout's values.")
  vf_coef: float = cli.flag(0.5, "Value-loss weight.")
  entropy_coef: float = cli.flag(0.0, "Entropy bonus weight.")
  gae_gamma: float = cli.flag(1.0, "GAE discount.")
  gae_lambda: float = cli.flag(0.95, "GAE lambda.")
  temperature: float = cli.flag(1.0, "Sampling temperature of rollouts (and of the "
                                "training forward, so the first ratio is exactly 1).")
  truncation_penalty: float = cli.flag(0.0, "Subtracted from the reward of responses cut at "
                                       "max_new_tokens without EOS (>= 0).")
  ptx_coef: float = cli.flag(0.0, "PPO-ptx: weight of the pretraining NLL (0: off).")
  aggregate: str = cli.flag("mean", "Ensemble aggregation of reward-model scores.",
                            choices=reward.AGGREGATES)
  uwo_coef: float = cli.flag(0.5, "Variance penalty of --aggregate=uwo.")
  matched_sft: bool = cli.flag(False, "Also continue SFT for as many optimizer steps as PPO "
                               "takes (the matched-compute baseline) and report it.")

  def __post_init__(self):
    super().__post_init__()
    if self.world not in worlds.PREFERENCE_WORLDS:
      raise ValueError(f"experiments.ppo needs a preference world "
                       f"(--world={'|'.join(worlds.PREFERENCE_WORLDS)}), got {self.world!r}")
    for name in ("ppo_epochs", "num_minibatches", "kl_horizon"):
      if getattr(self, name) < 1:
        raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
    for name in ("kl_coef", "truncation_penalty", "ptx_coef", "uwo_coef", "entropy_coef"):
      if getattr(self, name) < 0:
        raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
    if self.kl_target <= 0 or self.clip_eps <= 0 or self.temperature <= 0:
      raise ValueError("--kl_target, --clip_eps and --temperature must be > 0")
    longest = worlds.module(self.world).MAX_PRETRAIN_BYTES
    if self.ptx_coef and self.seq_len < longest + 2:
      raise ValueError(f"--ptx_coef > 0 trains on pretraining texts of up to {longest} bytes: "
                       f"--seq_len={self.seq_len} must be >= {longest + 2}")
    if self.batch_size % (self.num_minibatches * self.num_microbatches):
      raise ValueError(f"--batch_size={self.batch_size} (prompts per rollout) must be "
                       f"divisible by --num_minibatches * --num_microbatches = "
                       f"{self.num_minibatches * self.num_microbatches}")

  def effective(self) -> "PPOConfig":
    if not self.smoke:
      return self
    return dataclasses.replace(super().effective(), steps=3, eval_every=3, save_every=2,
                               batch_size=16, eval_batch_size=16)

  @property
  def updates(self) -> int:
    return self.steps * self.ppo_epochs * self.num_minibatches


def prompt_batch(prompts, prompt_len: int) -> tuple[np.ndarray, np.ndarray]:
  tok = ByteTokenizer()
  rows = [pipeline.prompt_example(p, "", tok, prompt_len) for p in prompts]
  return (np.stack([r["prompt_tokens"] for r in rows]),
          np.stack([r["prompt_valid"] for r in rows]))


def responses_of(rollout: ppo.Rollout, prompt_len: int) -> list[str]:
  tok = ByteTokenizer()
  tokens, mask = jax.device_get((rollout.tokens_BxT[:, prompt_len:],
                                 rollout.mask_BxT[:, prompt_len:]))
  return [tok.decode([t for t in row[m > 0] if t != tok.eos_id]) for row, m in zip(tokens, mask)]


def make_reward_fn(rms: reward_exp.RewardModels, cfg: PPOConfig):
  """(tokens_BxT, valid_BxT) -> normalised (aggregated) proxy rewards_B."""
  def reward_fn(tokens, valid):
    return reward.ensemble_scores(rms.graphdef, rms.params, tokens, valid,
                                  aggregate=cfg.aggregate, uwo_coef=cfg.uwo_coef,
                                  norm_stats=(rms.norm_mean, rms.norm_std))
  return reward_fn


def with_ptx(loss_fn, graphdef, ptx_coef: float):
  """PPO-ptx: loss_sum + ptx_coef * mean pretraining NLL * (this microbatch's PPO token
  count), so after the step divides by the PPO token count the objective is
  PPO mean + ptx_coef * NLL mean (exact with one microbatch; with several, each microbatch's
  NLL mean is weighted by its share of response tokens)."""
  if ptx_coef == 0:
    return loss_fn

  def loss(params, batch, rng):
    loss_sum, aux = loss_fn(params, batch, rng)
    logits = nnx.merge(graphdef, params["policy"])(batch["ptx_tokens"],
                                                   valid_BxT=batch["ptx_valid"]).logits_BxTxV
    term, _ = ptx_loss(shifted_logps(logits.astype(jnp.float32), batch["ptx_tokens"]),
                       batch["ptx_loss_mask"], ptx_coef=ptx_coef)  # ptx_coef * mean NLL
    return loss_sum + term * aux["denominator"], {**aux, "ptx": term * aux["denominator"]}
  return loss


@dataclasses.dataclass
class Evaluator:
  """Held-out evaluation of any policy: GOLD_EVAL_SAMPLES samples per test prompt through
  the (compiled) rollout, in batches of the rollout's own shape, so it compiles nothing new."""
  world: str
  rollout_fn: object
  reward_fn: object
  prompts: list[str]
  prompt_len: int
  batch_size: int
  ref_params: object
  value_params: object
  key: jax.Array

  def __call__(self, policy_params) -> dict:
    ps = self.prompts * worlds.GOLD_EVAL_SAMPLES
    ps += ps[:(-len(ps)) % self.batch_size]  # fill the last batch; extra rows are dropped
    ys, kls, proxy = [], [], []
    for i in range(0, len(ps), self.batch_size):
      toks, valid = prompt_batch(ps[i:i + self.batch_size], self.prompt_len)
      ro = self.rollout_fn(policy_params, self.ref_params, self.value_params, toks, valid,
                           jax.random.fold_in(self.key, i))
      ys += responses_of(ro, self.prompt_len)
      kls.append(np.asarray(jnp.sum((ro.old_logps_BxT - ro.ref_logps_BxT) * ro.mask_BxT, 1)))
      proxy.append(np.asarray(self.reward_fn(ro.tokens_BxT, ro.valid_BxT)))
    n = len(self.prompts) * worlds.GOLD_EVAL_SAMPLES
    kl, proxy, ps, ys = np.concatenate(kls)[:n], np.concatenate(proxy)[:n], ps[:n], ys[:n]
    out = worlds.summary(self.world, ps, ys)
    out.update(proxy=float(proxy.mean()), proxy_se=float(proxy.std(ddof=1) / np.sqrt(n)),
               kl=float(kl.mean()), kl_se=float(kl.std(ddof=1) / np.sqrt(n)))
    return out


def run(cfg: PPOConfig) -> dict:
  cfg = cfg.effective()
  rcfg = reward_exp.reward_config(cfg)
  reward_exp.check_ensemble(cfg, rcfg)
  wall = {}
  t0 = time.perf_counter()
  rm_dir = reward_exp.ensure_reward(cfg, rcfg)
  wall["upstream_stages_s"] = time.perf_counter() - t0
  scfg = reward_exp.sft_config(rcfg)
  # The SFT and base models the reward stage was built from, as it recorded them (looking
  # them up again would rebuild them if the code changed while this run was going).
  sft_dir = reward_exp.read_manifest(rm_dir)["sft_workdir"]
  with open(os.path.join(sft_dir, "result.json")) as f:
    base_dir = json.load(f)["pretrain_workdir"]
  mesh = lm.setup(cfg)
  data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
  if (cfg.batch_size // cfg.num_minibatches // cfg.num_microbatches) % data_parallel:
    raise ValueError(f"a PPO microbatch (--batch_size / --num_minibatches / "
                     f"--num_microbatches) must be divisible by the data-parallel size "
                     f"{data_parallel}")
  split = worlds.split_prompts(cfg)
  test_prompts = worlds.test_prompts(cfg)
  prompt_len = worlds.world_prompt_len(cfg)
  max_new = worlds.max_new_tokens(cfg)

  g, sft_params, pol_shardings = lm.init_model(cfg, mesh, init_from=sft_dir)
  _, base_params, _ = lm.init_model(cfg, mesh, init_from=base_dir)
  rms = reward_exp.load_reward_models(rcfg, mesh, rm_dir, sft_params)
  _, _, value_shardings = reward_exp.init_reward_model(rcfg, mesh, sft_params, cfg.seed)
  copy = lambda tree: jax.tree.map(jnp.copy, tree)  # the train state is donated
  params = {"policy": copy(sft_params), "value": copy(rms.params[0])}
  shardings = {"policy": pol_shardings, "value": value_shardings}

  tok = ByteTokenizer()
  scfg_sample = SamplingConfig(max_new_tokens=max_new, eos_id=tok.eos_id, pad_id=tok.pad_id,
                               temperature=cfg.temperature)
  rollout_fn = ppo.make_rollout_fn(g, rms.graphdef, scfg_sample)
  advantages_fn = ppo.make_advantages_fn(cfg.kl_coef, cfg.gae_gamma, cfg.gae_lambda,
                                         cfg.truncation_penalty)
  reward_fn = make_reward_fn(rms, cfg)
  loss_fn = with_ptx(ppo.ppo_loss_fn(g, rms.graphdef, clip_eps=cfg.clip_eps,
                                     value_clip_eps=cfg.value_clip_eps, vf_coef=cfg.vf_coef,
                                     entropy_coef=cfg.entropy_coef,
                                     temperature=cfg.temperature), g, cfg.ptx_coef)
  ocfg = optim.OptimConfig(learning_rate=cfg.learning_rate, total_steps=cfg.updates,
                           warmup_steps=min(cfg.warmup_steps, cfg.updates - 1),
                           weight_decay=cfg.weight_decay, grad_clip_norm=cfg.grad_clip_norm)
  optimizer = optim.make_optimizer(ocfg)
  state = state_lib.init_train_state(params, optimizer, jax.random.key(cfg.seed),
                                     param_shardings=shardings)
  batch_keys = ["tokens", "valid", "mask", "old_logps", "old_values", "advantages", "returns"]
  if cfg.ptx_coef:
    batch_keys += ["ptx_tokens", "ptx_valid", "ptx_loss_mask"]
  batch_shardings = {k: sharding.batch_sharding(mesh) for k in batch_keys}
  train_step = step_lib.compile_train_step(
      step_lib.make_train_step(loss_fn, optimizer, num_microbatches=cfg.num_microbatches,
                               lr_schedule=optim.make_schedule(ocfg)),
      state_lib.state_shardings(optimizer, params, shardings), batch_shardings)
  evaluator = Evaluator(cfg.world, rollout_fn, reward_fn, test_prompts, prompt_len, cfg.batch_size,
                        sft_params, rms.params[0], jax.random.key(cfg.seed + 1))
  ptx_iter = None
  if cfg.ptx_coef:
    corpus = builders.load_split(lm.build_world(cfg)["pretrain"], "train")
    ptx_iter = pipeline.make_train_iterator(
        corpus, batch_size=cfg.batch_size // cfg.num_minibatches, seq_len=cfg.seq_len,
        seed=cfg.seed, tokenizer=tok, kind="lm")

  write_config(cfg.workdir, cli.to_dict(cfg))
  manager, logger, state, data = lm.resume_run(cfg, state, save_every=cfg.save_every)
  kl_coef, curve, start = cfg.kl_coef, [], 0
  if data is not None:
    kl_coef, curve, start = data["kl_coef"], data["curve"], int(manager.latest_step())
    if ptx_iter is not None:
      ptx_iter.set_state(data["ptx"])
    print(f"resumed from iteration {start}")
  if start == 0:
    curve.append({"iteration": 0, **lm.timed("eval SFT", evaluator, sft_params)})
    logger.log(0, curve[-1], split="eval")

  t_loop = time.perf_counter()
  with CompileCounter() as counter:
    for it in range(start, cfg.steps):
      counter.reset()  # compiles per iteration are logged: after the first there should be none
      it_rng = np.random.default_rng((cfg.seed, it))  # resume-exact prompt draws and shuffles
      prompts = list(it_rng.choice(split["train"], cfg.batch_size))
      toks, valid = prompt_batch(prompts, prompt_len)
      ro = rollout_fn(state.params["policy"], sft_params, state.params["value"], toks, valid,
                      jax.random.fold_in(jax.random.key(cfg.seed), it))
      rewards = reward_fn(ro.tokens_BxT, ro.valid_BxT)
      batch, stats = advantages_fn(ro, rewards, kl_coef=kl_coef)
      batch = {k: batch[k] for k in batch_keys if not k.startswith("ptx")}
      state, metrics = train_on_rollout(cfg, mesh, train_step, state, batch, it_rng, ptx_iter)
      values = {**{k: float(v) for k, v in jax.device_get(stats).items()},
                **{k: float(v) for k, v in jax.device_get(metrics).items()}}
      ys = responses_of(ro, prompt_len)
      values.update({f"rollout_{k}": v for k, v in worlds.summary(cfg.world, prompts, ys).items()})
      values["compiles"] = float(counter.count)
      if cfg.adaptive_kl:
        kl_coef = float(ppo_losses.adaptive_kl_update_horizon(
            kl_coef, values["kl"], kl_target=cfg.kl_target, n_steps=cfg.batch_size,
            horizon=cfg.kl_horizon))
      done = it + 1
      logger.log(done, values)
      if done % cfg.log_every == 0 or done == cfg.steps:
        rate = (done - start) / max(time.perf_counter() - t_loop, 1e-9)
        print(format_progress(done, cfg.steps, values["loss"], rate, None)
              + f" | score {values['score']:+.2f} | gold {values['rollout_gold']:.2f}"
              f" | kl {values['kl']:.2f} | kl_coef {kl_coef:.3f}")
      if done % cfg.eval_every == 0 or done == cfg.steps:
        curve.append({"iteration": done, **evaluator(state.params["policy"])})
        logger.log(done, curve[-1], split="eval")
      if manager.should_save(done) or done == cfg.steps:
        data = {"kl_coef": kl_coef, "curve": curve}
        if ptx_iter is not None:
          data["ptx"] = ptx_iter.get_state()
        checkpoint.save(manager, done, state, data, force=done == cfg.steps)
  manager.wait_until_finished()
  logger.close()
  wall["ppo_s"] = time.perf_counter() - t_loop

  table = {"base": evaluator(base_params), "sft": curve[0], "ppo": curve[-1]}
  if cfg.matched_sft:
    table["sft_matched"] = evaluator(sft.continued_sft(
        scfg, os.path.join(cfg.workdir, "matched_sft"), cfg.updates, mesh, g, sft_params,
        pol_shardings))
  checkpoint.save_params(os.path.join(cfg.workdir, lm.PARAMS_DIR), state.params["policy"])
  manager.close()
  result = {"table": table, "curve": curve, "final_kl_coef": kl_coef, "wall": wall,
            "reward_workdir": rm_dir, "updates": cfg.updates}
  with open(os.path.join(cfg.workdir, "result.json"), "w") as f:
    json.dump(result, f, indent=1)
  plots.reward_vs_kl(curve, os.path.join(cfg.workdir, "ppo_curve.png"),
                     title=f"PPO, kl_coef {cfg.kl_coef}{' (adaptive)' if cfg.adaptive_kl else ''}")
  print(format_table(table, cfg.world))
  return result


def train_on_rollout(cfg: PPOConfig, mesh, train_step, state, batch, rng, ptx_iter):
  """--ppo_epochs passes over the rollout, each in --num_minibatches shuffled minibatches
  (plus a pretraining batch per update for PPO-ptx). Returns (state, last step's metrics)."""
  mb = cfg.batch_size // cfg.num_minibatches
  for _ in range(cfg.ppo_epochs):
    perm = rng.permutation(cfg.batch_size)
    for j in range(cfg.num_minibatches):
      idx = jnp.asarray(perm[j * mb:(j + 1) * mb])
      minibatch = {k: v[idx] for k, v in batch.items()}
      if ptx_iter is not None:
        lm_batch = next(ptx_iter)
        minibatch.update(ptx_tokens=lm_batch["tokens"], ptx_valid=lm_batch["valid"],
                         ptx_loss_mask=lm_batch["loss_mask"])
      state, metrics = train_step(state, sharding.shard_batch(minibatch, mesh))
  return state, metrics


def format_table(table: dict, world: str) -> str:
  extra = worlds.WORLD_COLUMNS[world]
  lines = ["held-out (test prompts x 4 samples)   gold           proxy          "
           "KL to SFT       words" + "".join(f"  {k:>15}" for k in extra)]
  for name, m in table.items():
    lines.append(f"  {name:<12} {m['gold']:+.3f} +- {m['gold_se']:.3f}   "
                 f"{m['proxy']:+.3f} +- {m['proxy_se']:.3f}   {m['kl']:6.2f} +- {m['kl_se']:.2f}"
                 f"   {m['words']:5.1f}" + "".join(f"  {m[k]:15.3f}" for k in extra))
  return "\n".join(lines)


if __name__ == "__main__":
  cli.main(PPOConfig, run)
