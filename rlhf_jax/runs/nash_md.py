"""Nash-MD-PG (Munos et al. 2024) on the intransitive world: the policy is trained towards
the MIXED Nash equilibrium of a cyclic preference that no scalar reward represents (how near
it gets is measured: exploitability and distance to the equilibrium over training).

    python -m experiments.nash_md --flagfile=experiments/configs/nash_md_tiny.flags

In an empty workdir this builds what it lacks, each stage cached under --stage_root
(rlhf_jax/pipeline/chain.py): pretrain -> SFT -> pairwise preference model
(experiments.reward --reward_model=pairwise, named by --reward_flagfile). Then, per
iteration, for --batch_size train prompts:

  y  ~ pi_theta                 (temperature sampling)
  y' ~ pi_mix ∝ pi_theta^(1-a) mu^a, token by token, a = --mixture_coef (eta * tau),
                                mu = the frozen SFT policy (rlhf_jax.sampling.sample_mixture)
  p  = P(y > y' | x)            --judge=model: the pairwise preference model;
                                --judge=raters: the simulated raters' exact probability.
                                With --group_size G > 1 each prompt gets G responses and G
                                opponents, and p_i is the mean of P(y_i > y'_j) over the
                                group's G opponents (the same expectation, G times fewer
                                opponents' noise)
  loss = -(p - 1/2 - b) log pi(y) + nash_tau (sg(kl) log pi(y) + kl)
         kl = sum_t kl_estimator(log pi, log mu), b = leave-one-out mean of p - 1/2 within
         the prompt's group (over the batch at G = 1) (--baseline), one pass over the
         rollout in --num_minibatches updates

Every --eval_every iterations (and before training) the policy answers every held-out
prompt --eval_samples times: the style distribution, its exploitability and its TV distance
to the Nash equilibrium (rlhf_jax/worlds/intransitive.py) and to the tau-regularised
equilibrium Nash-MD converges to from the SFT's style distribution, the ground truth ("gold":
P(y beats a draw from the SFT mixture)) and the KL to SFT per sequence. Outputs in --workdir:
config.json, metrics.jsonl, tb/, checkpoints/ (resumed automatically), params/,
result.json and nash_md_curve.png. On real prompts with Hugging Face checkpoints
(--prompt_files): nash_md_files.py.
"""
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import plan_models, provenance
from rlhf_jax.runs import plots
from rlhf_jax.pipeline import chain, config, lm, pairwise, prompt_sets, real_models
from rlhf_jax.pipeline import reward as reward_stage, worlds
from rlhf_jax.data.tokenizer import ByteTokenizer
from rlhf_jax.losses import kl as kl_lib
from rlhf_jax.rl import loop as rl_loop
from rlhf_jax.rl.algorithms import nash_md
from rlhf_jax.rl.evaluation import mean_se, sample_heldout
from rlhf_jax.rl.rollout import RolloutStage
from rlhf_jax.sampling import SamplingConfig
from rlhf_jax.train import checkpoint
from rlhf_jax.worlds import intransitive
from rlhf_jax.train.logging import write_json

JUDGES = ("model", "raters")
KL_ESTIMATORS = {"k1": kl_lib.k1, "k3": kl_lib.k3}


@dataclasses.dataclass(frozen=True)
class NashMDConfig(lm.LMConfig, real_models.HFFlags, prompt_sets.PromptFileFlags,
                   real_models.RewardModelFlags):
  reward_flagfile: str = config.flag(
      "experiments/configs/reward_pairwise_intransitive_tiny.flags",
      "Flagfile of the pairwise preference-model stage (--reward_model=pairwise); it names the "
      "SFT stage. With --judge=raters only that SFT stage is built.")
  stage_root: str = config.flag("workdirs/stages", "Where cached upstream stages live.")
  judge: str = config.flag("model", "Who says P(y > y' | x): the learned pairwise preference "
                        "model, or the simulated raters (their exact probability).",
                        choices=JUDGES)
  nash_tau: float = config.flag(0.02, "KL(pi || mu) regularisation tau of the game (>= 0).")
  mixture_coef: float = config.flag(0.125, "Geometric-mixture coefficient a = eta * tau of the "
                                 "opponent pi_mix ∝ pi^(1-a) mu^a, in [0, 1].")
  kl_estimator: str = config.flag("k1", "Per-token KL estimator of the penalty (both unbiased "
                               "for KL(pi || mu); the loss is exact for either).",
                               choices=tuple(KL_ESTIMATORS))
  group_size: int = config.flag(1, "Responses per prompt, each judged against all of the "
                             "group's group_size opponents (the mean preference), with the "
                             "leave-one-out baseline taken within the group (>= 2); 1: one "
                             "opponent per response and the baseline over the batch.")
  baseline: bool = config.flag(True, "Subtract the leave-one-out mean of p - 1/2 (within the "
                            "prompt's group, or over the batch at --group_size=1).")
  num_minibatches: int = config.flag(1, "Optimizer updates per rollout (one pass).")
  temperature: float = config.flag(1.0, "Sampling temperature of y, y' (and of the training "
                                "forward).")
  eval_samples: int = config.flag(8, "Temperature-1 samples per held-out prompt at evaluation.")

  def __post_init__(self):
    super().__post_init__()
    if self.dry_run:
      raise ValueError(f"--dry_run plans the stages {', '.join(plan_models.STAGES)} "
                       "(rlhf_jax/plan_models.py); experiments.nash_md has no plan: run it "
                       "without --dry_run")
    if self.file_mode:
      self._check_file_mode()
    elif self.init_hf or self.export_hf or self.reward_hf:
      raise ValueError("--init_hf, --reward_hf and --export_hf need --prompt_files (the "
                       "world's Nash-MD starts from its own SFT and preference stages)")
    elif self.world != "intransitive":
      raise ValueError(f"experiments.nash_md runs on --world=intransitive (its report is the "
                       f"game's exploitability), got {self.world!r}")
    if self.nash_tau < 0:
      raise ValueError(f"--nash_tau must be >= 0, got {self.nash_tau}")
    if not 0.0 <= self.mixture_coef <= 1.0:
      raise ValueError(f"--mixture_coef must be in [0, 1], got {self.mixture_coef}")
    for name in ("num_minibatches", "eval_samples", "group_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
    if self.temperature <= 0:
      raise ValueError(f"--temperature must be > 0, got {self.temperature}")
    if self.batch_size * self.group_size < 2 and self.baseline:
      raise ValueError("--baseline needs --batch_size * --group_size >= 2 (a leave-one-out "
                       "mean)")
    if self.rows % (self.num_minibatches * self.num_microbatches):
      raise ValueError(f"--batch_size * --group_size = {self.rows} rollout rows must be "
                       f"divisible by --num_minibatches * --num_microbatches = "
                       f"{self.num_minibatches * self.num_microbatches}")

  def _check_file_mode(self):
    """What --prompt_files cannot run, refused from the flags alone (before any model)."""
    self.check_prompt_files()
    self.check_reward_model_flags()
    if self.judge != "model":
      raise ValueError(f"--judge={self.judge} is the intransitive world's simulated raters; "
                       "with --prompt_files the --reward_hf reward model judges (Bradley-"
                       "Terry): pass --judge=model")
    if self.value_hf:
      raise ValueError("--value_hf: Nash-MD has no value model")
    if self.max_new_tokens < 1:
      raise ValueError("--prompt_files needs --max_new_tokens (response tokens per sample)")
    if self.seq_len < self.max_prompt_len + self.max_new_tokens + 1:
      raise ValueError(f"--seq_len={self.seq_len} must hold what the judge scores: bos + "
                       f"prompt (--max_prompt_len={self.max_prompt_len}) + --max_new_tokens="
                       f"{self.max_new_tokens} + eos; raise --seq_len")

  def effective(self) -> "NashMDConfig":
    if not self.smoke:
      return self
    return dataclasses.replace(super().effective(), steps=3, eval_every=3, save_every=2,
                               batch_size=8, eval_batch_size=8, eval_samples=2)

  @property
  def updates(self) -> int:
    return self.steps * self.num_minibatches

  @property
  def rows(self) -> int:
    return self.batch_size * self.group_size


def preference_config(cfg: NashMDConfig) -> reward_stage.RewardConfig:
  """The preference stage's config; refuses a scalar (BT) stage where a pairwise model is
  needed, from the flags alone."""
  rcfg = chain.upstream_config("reward", cfg.reward_flagfile, cfg)
  if cfg.judge == "model" and rcfg.reward_model != "pairwise":
    raise ValueError(f"--judge=model needs a pairwise preference model, but "
                     f"{cfg.reward_flagfile} trains a {rcfg.reward_model!r} (scalar) reward "
                     "model; pass a --reward_model=pairwise flagfile or --judge=raters")
  return rcfg


def make_judge(cfg: NashMDConfig, world_cfg, model):
  """(prompts, ys, ys_opp) -> P(y > y' | x) float32 [B]."""
  if cfg.judge == "raters":
    return lambda ps, a, b: intransitive.rater_preference(world_cfg, ps, a, b).astype(np.float32)
  return lambda ps, a, b: model(ps, a, b, batch_size=len(ps)).astype(np.float32)


def style_eval(cfg: NashMDConfig, stage: RolloutStage, prompts, ref_params, world_cfg, *,
               samples: int, key):
  """evaluate(policy_params) -> `samples` temperature samples per held-out prompt (fixed
  keys): the style shares, exploitability and distances of intransitive.metrics, the ground
  truth ("gold") and the KL to SFT per sequence, each +- its standard error."""
  def evaluate(policy_params) -> dict:
    held = sample_heldout(stage, policy_params, ref_params, None, list(prompts) * samples,
                          batch_size=cfg.batch_size, key=key)
    ps, ys = held.experience.prompts, held.experience.responses
    out = intransitive.metrics(ps, ys, world_cfg)
    gold, gold_se = mean_se(intransitive.ground_truth(ps, ys, world_cfg))
    kl, kl_se = mean_se(held.kl_B)
    out.update(gold=gold, gold_se=gold_se, kl=kl, kl_se=kl_se, samples=len(ps))
    return out
  return evaluate


def describe(world_cfg):
  """An iteration's logged world metrics: the policy's styles, the opponents' style shares
  and the raters' preference over the judged pairs."""
  def fn(exp) -> dict:
    out = {f"rollout_{k}": v for k, v in
           intransitive.metrics(exp.prompts, exp.responses, world_cfg).items()}
    out.update({f"opponent_{k}": v for k, v in
                intransitive.metrics(exp.prompts, exp.extras["opponents"], world_cfg).items()
                if k.startswith("share_")})
    out["rater_preference"] = float(
        intransitive.rater_preference(world_cfg, *exp.extras["pairs"]).mean())
    return out
  return fn


def run(cfg: NashMDConfig) -> dict:
  cfg = cfg.effective()
  rcfg = preference_config(cfg)
  wall = {}
  t0 = time.perf_counter()
  if cfg.judge == "model":
    pref_dir = chain.ensure("reward", rcfg)
    sft_dir = reward_stage.read_manifest(pref_dir)["sft_workdir"]
  else:
    pref_dir = None
    sft_dir = chain.ensure("sft", chain.upstream_config("sft", rcfg.sft_flagfile, rcfg))
  wall["upstream_stages_s"] = time.perf_counter() - t0
  mesh = lm.setup(cfg, sharded_eval=False)
  data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
  if (cfg.rows // cfg.num_minibatches // cfg.num_microbatches) % data_parallel:
    raise ValueError(f"a Nash-MD microbatch (--batch_size * --group_size / --num_minibatches / "
                     f"--num_microbatches) must be divisible by the data-parallel size "
                     f"{data_parallel}")
  world_cfg = cfg.world_config()
  split = worlds.split_prompts(cfg)
  test_prompts = worlds.test_prompts(cfg)
  prompt_len = worlds.world_prompt_len(cfg)

  g, sft_params, shardings = lm.init_model(cfg, mesh, init_from=sft_dir)
  model = (pairwise.load_preference_model(rcfg, mesh, pref_dir, sft_params)
           if cfg.judge == "model" else None)
  judge = make_judge(cfg, world_cfg, model)
  scfg = SamplingConfig(max_new_tokens=worlds.max_new_tokens(cfg), eos_id=ByteTokenizer.eos_id,
                        pad_id=ByteTokenizer.pad_id, temperature=cfg.temperature)
  stage = RolloutStage(g, scfg, prompt_len)
  algorithm = nash_md.NashMD(stage, judge, split["train"], sft_params, cfg.batch_size,
                             cfg.group_size, cfg.seed, cfg.mixture_coef, cfg.baseline)
  loss_fn = nash_md.nash_md_loss_fn(g, nash_tau=cfg.nash_tau,
                                    kl_fn=KL_ESTIMATORS[cfg.kl_estimator],
                                    temperature=cfg.temperature)
  loop_cfg = rl_loop.LoopConfig(cfg.workdir, cfg.steps, num_minibatches=cfg.num_minibatches,
                                log_every=cfg.log_every, eval_every=cfg.eval_every,
                                save_every=cfg.save_every, keep_checkpoints=cfg.keep_checkpoints,
                                **rl_loop.LoopConfig.faults(cfg))
  state, train_step = rl_loop.make_trainer(
      loss_fn, jax.tree.map(jnp.copy, sft_params), shardings, nash_md.BATCH_KEYS, mesh,
      optim_cfg=lm.optim_config(cfg, loop_cfg.updates), num_microbatches=cfg.num_microbatches,
      seed=cfg.seed)
  raw_eval = style_eval(cfg, stage, test_prompts, sft_params, world_cfg,
                        samples=cfg.eval_samples, key=jax.random.key(cfg.seed + 1))
  # The SFT point fixes the tau-regularised target every later point is measured against.
  sft_point = lm.timed("eval SFT", raw_eval, sft_params)
  target = regularised_target(cfg, sft_point, world_cfg)

  def evaluate(params):
    point = raw_eval(params)
    point.update(target_distance(point, target))
    print(f"  eval: {format_point(point)}")
    return point

  t_loop = time.perf_counter()
  state, curve = rl_loop.run(loop_cfg, algorithm, state=state, train_step=train_step,
                             mesh=mesh, evaluate=evaluate, config=config.to_dict(cfg),
                             describe=describe(world_cfg),
                             initial_point={**sft_point, **target_distance(sft_point, target)})
  wall["nash_md_s"] = time.perf_counter() - t_loop
  checkpoint.save_params(os.path.join(cfg.workdir, lm.PARAMS_DIR), state.params)
  nash = intransitive.nash_equilibrium(intransitive.preference_matrix(world_cfg))
  result = {"table": {"sft": curve[0], "nash_md": curve[-1]}, "curve": curve,
            "nash": nash.tolist(), "judge": cfg.judge,
            "tau_equilibrium": None if target is None else target.tolist(),
            "preference_workdir": pref_dir, "sft_workdir": sft_dir, "updates": cfg.updates,
            "wall": wall,
            "provenance": provenance.provenance()}
  write_json(os.path.join(cfg.workdir, "result.json"), result, indent=1)
  plots.styles_over_training(
      {"Nash-MD": curve}, nash, os.path.join(cfg.workdir, "nash_md_curve.png"),
      title=f"Nash-MD-PG (judge={cfg.judge}, tau={cfg.nash_tau}, a={cfg.mixture_coef})")
  print(f"SFT:     {format_point(curve[0])}\nNash-MD: {format_point(curve[-1])}\n"
        f"Nash equilibrium: {np.round(nash, 3).tolist()}"
        + ("" if target is None else f"; tau-regularised equilibrium from SFT (F, C, P, bad): "
           f"{np.round(target, 3).tolist()}, exploitability "
           f"{intransitive.exploitability(target, intransitive.extended_matrix(world_cfg)):.3f}"))
  return result


def regularised_target(cfg: NashMDConfig, sft_point: dict, world_cfg) -> np.ndarray | None:
  """Where Nash-MD with --nash_tau converges: the regularised equilibrium
  (intransitive.regularised_equilibrium) over (formal, casual, poetic, malformed) with the
  SFT policy's measured style distribution as the reference (floored at 1e-3, as every
  outcome keeps some probability under a softmax policy). None at nash_tau 0 (the target is
  then the Nash equilibrium itself)."""
  if cfg.nash_tau <= 0:
    return None
  mu = np.array([sft_point[f"share_{n}"] for n in intransitive.STYLES]
                + [sft_point["share_malformed"]])
  mu = np.maximum(mu, 1e-3)
  return intransitive.regularised_equilibrium(intransitive.extended_matrix(world_cfg),
                                              mu / mu.sum(), cfg.nash_tau)


def target_distance(point: dict, target) -> dict:
  """TV distance of an evaluation's style distribution to the regularised target."""
  if target is None:
    return {}
  pi = np.array([point[f"share_{n}"] for n in intransitive.STYLES] + [point["share_malformed"]])
  return {"tau_distance": float(0.5 * np.abs(pi - target).sum())}


def _shares(m: dict, prefix: str = "") -> str:
  return " ".join(f"{name[0].upper()} {m[f'{prefix}share_{name}']:.2f}"
                  for name in intransitive.STYLES) + f" bad {m[f'{prefix}share_malformed']:.2f}"


def format_point(m: dict) -> str:
  return (f"{_shares(m)} | exploitability {m['exploitability']:.3f} | TV to Nash "
          f"{m['nash_distance']:.3f}"
          + (f" (to the tau-target {m['tau_distance']:.3f})" if "tau_distance" in m else "")
          + f" | gold {m['gold']:.3f} | KL {m['kl']:.2f}")

