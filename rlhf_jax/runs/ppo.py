"""PPO from a learned reward (InstructGPT stage 3) on a preference world: THE MAIN JOB (gold).

    python -m experiments.ppo --flagfile=experiments/configs/ppo_tiny.flags

In an empty workdir this builds what it lacks, each stage cached under --stage_root by a key
of its own and its upstream flags and the code version (rlhf_jax/pipeline/chain.py):
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

from rlhf_jax import provenance, sharding
from rlhf_jax.runs import plots
from rlhf_jax.pipeline import chain, config, lm, prompt_sets, real_models
from rlhf_jax.pipeline import reward as reward_stage, sft, worlds
from rlhf_jax.data import builders, pipeline
from rlhf_jax.data.tokenizer import ByteTokenizer
from rlhf_jax.rl import loop as rl_loop, scorers
from rlhf_jax.rl.algorithms import ppo
from rlhf_jax.rl.evaluation import mean_se, sample_heldout
from rlhf_jax.rl.rollout import RolloutStage
from rlhf_jax.sampling import SamplingConfig
from rlhf_jax.train import checkpoint, reward
from rlhf_jax.worlds import heldout, registry
from rlhf_jax.train.logging import write_json


@dataclasses.dataclass(frozen=True)
class PPOConfig(lm.LMConfig, lm.SycophancyFlags, real_models.HFFlags,
                prompt_sets.PromptFileFlags, real_models.RewardModelFlags,
                prompt_sets.RolloutFlags):
  reward_flagfile: str = config.flag("experiments/configs/reward_gold_tiny.flags",
                                  "Flagfile of the reward-model stage (it names the SFT stage).")
  stage_root: str = config.flag("workdirs/stages", "Where cached upstream stages live.")
  ppo_epochs: int = config.flag(2, "Passes over each rollout.")
  num_minibatches: int = config.flag(2, "Optimizer updates per pass over a rollout.")
  kl_coef: float = config.flag(0.05, "Initial (or fixed) per-token KL penalty coefficient (>= 0).")
  adaptive_kl: bool = config.flag(False, "Adapt kl_coef towards --kl_target (Ziegler 2019).")
  kl_target: float = config.flag(4.0, "Target KL to SFT per sequence (nats) of the adaptive "
                              "controller.")
  kl_horizon: int = config.flag(2000, "Adaptive controller horizon (sequences).")
  clip_eps: float = config.flag(0.2, "Policy ratio clip range.")
  value_clip_eps: float = config.flag(0.2, "Value clip range around the rollout's values.")
  vf_coef: float = config.flag(0.5, "Value-loss weight.")
  entropy_coef: float = config.flag(0.0, "Entropy bonus weight.")
  gae_gamma: float = config.flag(1.0, "GAE discount.")
  gae_lambda: float = config.flag(0.95, "GAE lambda.")
  temperature: float = config.flag(1.0, "Sampling temperature of rollouts (and of the "
                                "training forward, so the first ratio is exactly 1).")
  truncation_penalty: float = config.flag(0.0, "Subtracted from the reward of responses cut at "
                                       "max_new_tokens without EOS (>= 0).")
  ptx_coef: float = config.flag(0.0, "PPO-ptx: weight of the pretraining NLL (0: off).")
  aggregate: str = config.flag("mean", "Ensemble aggregation of reward-model scores.",
                            choices=reward.AGGREGATES)
  uwo_coef: float = config.flag(0.5, "Variance penalty of --aggregate=uwo.")
  matched_sft: bool = config.flag(False, "Also continue SFT for as many optimizer steps as PPO "
                               "takes (the matched-compute baseline) and report it.")

  def __post_init__(self):
    super().__post_init__()
    if self.file_mode:
      self._check_file_mode()
    elif self.init_hf or self.export_hf or self.reward_hf:
      raise ValueError("--init_hf, --reward_hf and --export_hf need --prompt_files (the "
                       "world's PPO starts from its own SFT and reward stages)")
    if self.world not in registry.PREFERENCE_WORLDS and not self.file_mode:
      raise ValueError(f"experiments.ppo needs a preference world "
                       f"(--world={'|'.join(registry.PREFERENCE_WORLDS)}), got {self.world!r}")
    for name in ("ppo_epochs", "num_minibatches", "kl_horizon"):
      if getattr(self, name) < 1:
        raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
    for name in ("kl_coef", "truncation_penalty", "ptx_coef", "uwo_coef", "entropy_coef"):
      if getattr(self, name) < 0:
        raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
    if self.kl_target <= 0 or self.clip_eps <= 0 or self.temperature <= 0:
      raise ValueError("--kl_target, --clip_eps and --temperature must be > 0")
    longest = registry.get(self.world).max_pretrain_bytes
    if self.ptx_coef and self.seq_len < longest + 2:
      raise ValueError(f"--ptx_coef > 0 trains on pretraining texts of up to {longest} bytes: "
                       f"--seq_len={self.seq_len} must be >= {longest + 2}")
    if self.batch_size % (self.num_minibatches * self.num_microbatches):
      raise ValueError(f"--batch_size={self.batch_size} (prompts per rollout) must be "
                       f"divisible by --num_minibatches * --num_microbatches = "
                       f"{self.num_minibatches * self.num_microbatches}")

  def _check_file_mode(self):
    self.check_prompt_files()
    self.check_reward_model_flags()
    for name in ("ptx_coef", "matched_sft"):
      if getattr(self, name):
        raise ValueError(f"--{name} trains on the world's data; it is not available with "
                         "--prompt_files")
    if self.aggregate != "mean":
      raise ValueError("--aggregate combines an ensemble; --reward_hf is one reward model")
    if self.max_new_tokens < 1:
      raise ValueError("--prompt_files needs --max_new_tokens (response tokens per sample)")

  def effective(self) -> "PPOConfig":
    if not self.smoke:
      return self
    return dataclasses.replace(super().effective(), steps=3, eval_every=3, save_every=2,
                               batch_size=16, eval_batch_size=16)

  @property
  def updates(self) -> int:
    return self.steps * self.ppo_epochs * self.num_minibatches


def preference_eval(cfg: PPOConfig, stage: RolloutStage, scorer, prompts, ref_params,
                    value_params):
  """evaluate(policy_params) -> the held-out row of a preference world: GOLD_EVAL_SAMPLES
  temperature samples per test prompt (fixed keys), the world's summary (gold, words, its
  own columns), the proxy reward and the KL to SFT per sequence, each +- its standard error."""
  key = jax.random.key(cfg.seed + 1)

  def evaluate(policy_params) -> dict:
    ps = list(prompts) * heldout.EVAL_SAMPLES
    held = sample_heldout(stage, policy_params, ref_params, value_params, ps,
                          batch_size=cfg.batch_size, key=key, scorer=scorer)
    out = worlds.summary(cfg, held.experience.prompts, held.experience.responses)
    proxy, proxy_se = mean_se(held.experience.rewards_B)
    kl, kl_se = mean_se(held.kl_B)
    out.update(proxy=proxy, proxy_se=proxy_se, kl=kl, kl_se=kl_se)
    return out
  return evaluate


def run(cfg: PPOConfig) -> dict:
  cfg = cfg.effective()
  rcfg = chain.upstream_config("reward", cfg.reward_flagfile, cfg)
  reward_stage.check_ensemble(cfg, rcfg)
  wall = {}
  t0 = time.perf_counter()
  rm_dir = chain.ensure("reward", rcfg)
  wall["upstream_stages_s"] = time.perf_counter() - t0
  scfg = chain.upstream_config("sft", rcfg.sft_flagfile, rcfg)
  # The SFT and base models the reward stage was built from, as it recorded them (looking
  # them up again would rebuild them if the code changed while this run was going).
  sft_dir = reward_stage.read_manifest(rm_dir)["sft_workdir"]
  with open(os.path.join(sft_dir, "result.json")) as f:
    base_dir = json.load(f)["pretrain_workdir"]
  mesh = lm.setup(cfg, sharded_eval=False)
  data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
  if (cfg.batch_size // cfg.num_minibatches // cfg.num_microbatches) % data_parallel:
    raise ValueError(f"a PPO microbatch (--batch_size / --num_minibatches / "
                     f"--num_microbatches) must be divisible by the data-parallel size "
                     f"{data_parallel}")

  g, sft_params, pol_shardings = lm.init_model(cfg, mesh, init_from=sft_dir)
  _, base_params, _ = lm.init_model(cfg, mesh, init_from=base_dir)
  rms = reward_stage.load_reward_models(rcfg, mesh, rm_dir, sft_params)
  _, _, value_shardings = reward_stage.init_reward_model(rcfg, mesh, sft_params, cfg.seed)
  copy = lambda tree: jax.tree.map(jnp.copy, tree)  # the train state is donated
  params = {"policy": copy(sft_params), "value": copy(rms.params[0])}
  shardings = {"policy": pol_shardings, "value": value_shardings}

  tok = ByteTokenizer()
  sampling = SamplingConfig(max_new_tokens=worlds.max_new_tokens(cfg), eos_id=tok.eos_id,
                            pad_id=tok.pad_id, temperature=cfg.temperature)
  stage = RolloutStage(g, sampling, worlds.world_prompt_len(cfg), value_graphdef=rms.graphdef)
  scorer = scorers.Penalised(reward_stage.scorer(rms, cfg),
                             truncation_penalty=cfg.truncation_penalty)
  ptx_iter = None
  if cfg.ptx_coef:
    corpus = builders.load_split(lm.build_world(cfg)["pretrain"], "train")
    ptx_rows = cfg.batch_size // cfg.num_minibatches
    ptx_iter = pipeline.make_train_iterator(
        corpus, batch_size=ptx_rows, seq_len=cfg.seq_len, seed=cfg.seed, tokenizer=tok,
        kind="lm", rows=sharding.process_rows(mesh, ptx_rows))
  algorithm = ppo.PPO(stage, scorer, worlds.split_prompts(cfg)["train"], sft_params,
                      cfg.batch_size, cfg.seed, cfg.kl_coef, cfg.gae_gamma, cfg.gae_lambda,
                      ppo.AdaptiveKL(cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl else None,
                      ptx_iter)
  loss_fn = ppo.with_ptx(ppo.ppo_loss_fn(g, rms.graphdef, clip_eps=cfg.clip_eps,
                                         value_clip_eps=cfg.value_clip_eps, vf_coef=cfg.vf_coef,
                                         entropy_coef=cfg.entropy_coef,
                                         temperature=cfg.temperature), g, cfg.ptx_coef)
  loop_cfg = rl_loop.LoopConfig(cfg.workdir, cfg.steps, epochs=cfg.ppo_epochs,
                                num_minibatches=cfg.num_minibatches, log_every=cfg.log_every,
                                eval_every=cfg.eval_every, save_every=cfg.save_every,
                                keep_checkpoints=cfg.keep_checkpoints,
                                **rl_loop.LoopConfig.faults(cfg))
  state, train_step = rl_loop.make_trainer(
      loss_fn, params, shardings, algorithm.batch_keys(), mesh,
      optim_cfg=lm.optim_config(cfg, loop_cfg.updates), num_microbatches=cfg.num_microbatches,
      seed=cfg.seed)
  heldout = preference_eval(cfg, stage, scorer, worlds.test_prompts(cfg), sft_params,
                            rms.params[0])
  t_loop = time.perf_counter()
  state, curve = rl_loop.run(
      loop_cfg, algorithm, state=state, train_step=train_step, mesh=mesh,
      evaluate=lambda p: heldout(p["policy"]), config=config.to_dict(cfg),
      describe=lambda exp: {f"rollout_{k}": v for k, v in
                            worlds.summary(cfg, exp.prompts, exp.responses).items()})
  wall["ppo_s"] = time.perf_counter() - t_loop

  table = {"base": heldout(base_params), "sft": curve[0], "ppo": curve[-1]}
  if cfg.matched_sft:
    table["sft_matched"] = heldout(sft.continued_sft(
        scfg, os.path.join(cfg.workdir, "matched_sft"), cfg.updates, mesh, g, sft_params,
        pol_shardings))
  checkpoint.save_params(os.path.join(cfg.workdir, lm.PARAMS_DIR), state.params["policy"])
  result = {"table": table, "curve": curve, "final_kl_coef": algorithm.kl_coef, "wall": wall,
            "reward_workdir": rm_dir, "updates": cfg.updates, "provenance": provenance.provenance()}
  write_json(os.path.join(cfg.workdir, "result.json"), result, indent=1)
  plots.reward_vs_kl(curve, os.path.join(cfg.workdir, "ppo_curve.png"),
                     title=f"PPO, kl_coef {cfg.kl_coef}{' (adaptive)' if cfg.adaptive_kl else ''}")
  print(format_table(table, cfg.world))
  return result


def format_table(table: dict, world: str) -> str:
  extra = registry.get(world).columns
  lines = ["held-out (test prompts x 4 samples)   gold           proxy          "
           "KL to SFT       words" + "".join(f"  {k:>15}" for k in extra)]
  for name, m in table.items():
    lines.append(f"  {name:<12} {m['gold']:+.3f} +- {m['gold_se']:.3f}   "
                 f"{m['proxy']:+.3f} +- {m['proxy_se']:.3f}   {m['kl']:6.2f} +- {m['kl_se']:.2f}"
                 f"   {m['words']:5.1f}" + "".join(f"  {m[k]:15.3f}" for k in extra))
  return "\n".join(lines)

