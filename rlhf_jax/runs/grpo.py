"""GRPO / Dr. GRPO / RLOO with a verifiable reward (RLVR) on the arithmetic world.

    python -m experiments.grpo --flagfile=experiments/configs/grpo_tiny.flags

In an empty workdir this builds what it lacks, each stage cached under --stage_root
(rlhf_jax/pipeline/chain.py): pretrain -> a deliberately short SFT (--sft_flagfile) -> GRPO:

  policy     starts from SFT; the reference (k3 KL anchor, --kl_coef) is the frozen SFT model
  rollout    --batch_size train prompts per iteration, --group_size temperature samples each;
             each prompt's prefix is processed once and its KV cache shared by the group
  reward     1 if the response (cut at EOS) is exactly the correct answer, else 0
             (rlhf_jax.worlds.arithmetic.verify): no reward model
  advantage  --advantage=grpo (std-scaled, --std_ddof, --adv_eps), dr_grpo (mean-centred),
             rloo (leave-one-out)
  loss       clipped ratio (--clip_eps_low, --clip_eps_high: DAPO's asymmetric clip when
             different), + kl_coef * k3; --aggregation=token (DAPO: global token mean),
             sequence (GRPO: mean of per-response means), group (Dr. GRPO: token sum over
             responses * max_new_tokens). kl_coef 0: the training rollout compiles no
             reference forward at all.

--steps = iterations (one rollout, then --epochs passes over it in --num_minibatches
minibatches); --eval_every / --save_every count iterations. Held-out evaluation (--eval_prompts
test prompts, the same sampling keys for every policy): greedy and temperature-1 exact match
(the first whitespace-separated field, as the SFT stage scores), the unbiased pass@k
(--eval_samples = n > every k of --pass_k), the verifier reward's mean and std, the fraction of
zero-variance groups, KL to SFT per sequence (a measurement on the temperature-1 samples, made
at every evaluation whatever --kl_coef), response length and truncation rate. The ratio's clip
fraction only exists in training: it is logged per iteration with the rollout's reward, KL,
zero-variance fraction, length, truncation rate and the number of compiles (0 after the first
iteration). --matched_sft continues SFT for as many optimizer steps as GRPO takes, on the
prompts of GRPO's updates with their correct answers (the matched-compute baseline,
"sft_matched"); with dynamic sampling, also on every prompt GRPO rolled out, the discarded
ones included ("sft_matched_rolled_out": more distinct prompts, the stronger baseline).

--dynamic_sampling_rounds=R (DAPO): a group whose rewards are all equal has zero advantage
and only dilutes the loss's denominator; such groups leave the batch and are replaced by the
informative groups of up to R further rollouts of fresh prompts, until --batch_size groups
are informative (the rest, if the rounds run out, stay in the batch with an empty mask:
absent from the loss, one compiled shape). The logged reward and zero-variance fraction are
the first rollout's (the on-policy sample), with rollout_rounds and informative_groups.
"""
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp

from rlhf_jax import provenance
from rlhf_jax.runs import plots
from rlhf_jax.pipeline import chain, config, lm, prompt_sets, real_models, sft, worlds
from rlhf_jax.data import builders, pipeline
from rlhf_jax.data.tokenizer import ByteTokenizer
from rlhf_jax.rl import loop as rl_loop, scorers
from rlhf_jax.rl.algorithms import grpo, gspo, reinforce_pp
from rlhf_jax.rl.evaluation import greedy_responses, sample_heldout, verifiable_metrics
from rlhf_jax.rl.grouped_forward import PromptGroups
from rlhf_jax.rl.rollout import RolloutStage
from rlhf_jax.sampling import SamplingConfig
from rlhf_jax.train import checkpoint
from rlhf_jax.worlds import arithmetic, registry
from rlhf_jax.train.logging import write_json


ALGORITHMS = ("grpo", "gspo", "reinforce_pp")


@dataclasses.dataclass(frozen=True)
class GRPOConfig(lm.LMConfig, lm.ArithmeticFlags, real_models.HFFlags,
                 prompt_sets.PromptFileFlags, prompt_sets.RewardFunctionFlags,
                 prompt_sets.RolloutFlags):
  sft_flagfile: str = config.flag("experiments/configs/sft_grpo_tiny.flags",
                               "Flagfile of the SFT stage the policy starts from.")
  stage_root: str = config.flag("workdirs/stages", "Where cached upstream stages live.")
  algorithm: str = config.flag("grpo", "Online algorithm over the groups: grpo (token-level "
                            "clipped ratio, --advantage, --aggregation), gspo (sequence-level "
                            "ratio and clip, --advantage), reinforce_pp (REINFORCE++: k1 KL "
                            "in the token reward, batch-normalised returns).",
                            choices=ALGORITHMS)
  reinforce_group_baseline: bool = config.flag(
      False, "--algorithm=reinforce_pp: subtract each group's mean reward first "
      "(REINFORCE++-baseline).")
  advantage: str = config.flag("grpo", "Group advantage estimator of --algorithm=grpo and gspo.",
                            choices=grpo.ADVANTAGES)
  group_size: int = config.flag(8, "Samples per prompt (G >= 2).")
  std_ddof: int = config.flag(0, "--advantage=grpo: delta degrees of freedom of the group std "
                           "(0: population std, the GRPO paper's form; 1: TRL's).")
  adv_eps: float = config.flag(1e-4, "--advantage=grpo: added to the group std (>= 0).")
  clip_eps_low: float = config.flag(0.2, "Ratio clip below 1 (1 - eps_low), in (0, 1).")
  clip_eps_high: float = config.flag(0.2, "Ratio clip above 1 (1 + eps_high), > 0; larger than "
                                  "--clip_eps_low is DAPO's clip-higher.")
  kl_coef: float = config.flag(0.04, "KL-to-SFT coefficient (>= 0; 0: no reference forward in "
                               "training): of the k3 term in the loss (grpo, gspo), of the k1 "
                               "penalty in each token's reward (reinforce_pp).")
  aggregation: str = config.flag("token", "Loss normaliser: token (DAPO), sequence (GRPO), "
                              "group (Dr. GRPO's constant).", choices=tuple(grpo.AGGREGATIONS))
  epochs: int = config.flag(1, "Passes over each rollout.")
  num_minibatches: int = config.flag(2, "Optimizer updates per pass over a rollout.")
  temperature: float = config.flag(1.0, "Sampling temperature of rollouts and held-out samples "
                                "(and of the training forward, so the first ratio is 1).")
  eval_samples: int = config.flag(16, "Temperature samples per held-out prompt (n of pass@k).")
  pass_k: str = config.flag("1,4,8", "Comma-separated k of the held-out pass@k (each < "
                         "--eval_samples).")
  dynamic_sampling_rounds: int = config.flag(
      0, "DAPO's dynamic sampling: zero-variance groups leave the loss and are replaced by "
      "informative groups of up to this many further rollouts of fresh prompts per iteration "
      "(0: off, every group enters the loss).")
  share_prompt: bool = config.flag(False, "Compute each group's prompt once in every forward "
                                   "over the rollout (its log-probs and the train step's: "
                                   "rl/grouped_forward.py), the G responses continuing its KV "
                                   "cache; minibatches then hold whole groups.")
  sampler_old_logps: bool = config.flag(False, "Take the old policy's log-probs from the "
                                        "sampler (computed while sampling, same params) "
                                        "instead of a forward over the rollout: the first "
                                        "ratio is 1 to float32 rounding, not exactly.")
  matched_sft: bool = config.flag(False, "Also continue SFT for as many optimizer steps as GRPO "
                               "takes on the prompts of GRPO's updates (matched compute; with "
                               "dynamic sampling also on every prompt rolled out).")

  def __post_init__(self):
    super().__post_init__()
    if self.file_mode:
      self._check_file_mode()
    elif self.world != "arithmetic":
      raise ValueError("experiments.grpo runs on --world=arithmetic (its reward is the "
                       "arithmetic verifier) or on --prompt_files")
    elif self.init_hf or self.export_hf:
      raise ValueError("--init_hf and --export_hf need --prompt_files (the arithmetic world "
                       "starts from its own SFT stage, in its byte vocabulary)")
    if self.advantage == "rloo" and self.group_size < 2:
      raise ValueError(f"--advantage=rloo needs --group_size >= 2 (its baseline is the mean "
                       f"of the other G - 1 samples), got --group_size={self.group_size}")
    if self.group_size < 1 or (self.group_size < 2 and (self.algorithm != "reinforce_pp"
                                                       or self.reinforce_group_baseline)):
      raise ValueError(f"--group_size={self.group_size}: a group of one sample has zero "
                       f"advantage under every group estimator (nothing to learn); pass "
                       f"--group_size=2 or more (e.g. --group_size=8), or "
                       f"--algorithm=reinforce_pp, whose baseline is the whole batch")
    if self.std_ddof not in (0, 1):
      raise ValueError(f"--std_ddof must be 0 or 1, got {self.std_ddof}")
    if self.kl_coef < 0:
      raise ValueError(f"--kl_coef must be >= 0 (0 turns the KL term off), got {self.kl_coef}")
    if self.adv_eps < 0:
      raise ValueError(f"--adv_eps must be >= 0, got {self.adv_eps}")
    if not 0 < self.clip_eps_low < 1:
      raise ValueError(f"--clip_eps_low must be in (0, 1), got {self.clip_eps_low}")
    if self.clip_eps_high <= 0:
      raise ValueError(f"--clip_eps_high must be > 0, got {self.clip_eps_high}")
    if self.algorithm == "reinforce_pp" and self.clip_eps_high != self.clip_eps_low:
      raise ValueError(f"--algorithm=reinforce_pp clips symmetrically: set --clip_eps_high "
                       f"equal to --clip_eps_low (got {self.clip_eps_low} and "
                       f"{self.clip_eps_high})")
    if self.temperature <= 0:
      raise ValueError(f"--temperature must be > 0, got {self.temperature}")
    if self.dynamic_sampling_rounds < 0:
      raise ValueError(f"--dynamic_sampling_rounds must be >= 0 (0: off), got "
                       f"{self.dynamic_sampling_rounds}")
    for name in ("epochs", "num_minibatches", "eval_samples"):
      if getattr(self, name) < 1:
        raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
    try:
      ks = [int(k) for k in self.pass_k.split(",")]
    except ValueError:
      raise ValueError(f"--pass_k must be comma-separated integers, got {self.pass_k!r}") from None
    if not ks or min(ks) < 1 or max(ks) >= self.eval_samples:
      raise ValueError(f"--pass_k={self.pass_k}: the unbiased estimator needs 1 <= k < n = "
                       f"--eval_samples={self.eval_samples}")
    if self.share_prompt and self.batch_size % self.num_minibatches:
      raise ValueError(f"--share_prompt keeps each group whole in a minibatch: --batch_size="
                       f"{self.batch_size} groups must be divisible by --num_minibatches="
                       f"{self.num_minibatches}")
    if self.share_prompt and self.num_microbatches > 1:
      raise ValueError("--share_prompt with --num_microbatches > 1: microbatches take strided "
                       "rows (train/step.py), which would split the groups; drop one")
    if self.share_prompt and self.rollout_chunk_rows:
      raise ValueError("--share_prompt and --rollout_chunk_rows: chunks would split the groups "
                       "whose prompt is computed once; drop one")
    rows = self.batch_size * self.group_size
    if rows % (self.num_minibatches * self.num_microbatches):
      raise ValueError(f"--batch_size * --group_size = {rows} rollout rows must be divisible "
                       f"by --num_minibatches * --num_microbatches = "
                       f"{self.num_minibatches * self.num_microbatches}")

  def _check_file_mode(self):
    self.check_prompt_files()
    if self.advantage == "dr_grpo":
      raise ValueError("--advantage=dr_grpo: with --prompt_files Dr. GRPO's mean-centred "
                       "advantage is --advantage=grpo --adv_std_scale=none")
    if self.advantage == "rloo" and self.reward_normalization != "sum":
      raise ValueError("--advantage=rloo's leave-one-out baseline combines the rewards first: "
                       "pass --reward_normalization=sum")
    if self.matched_sft:
      raise ValueError("--matched_sft trains on the world's correct answers; it is not "
                       "available with --prompt_files")
    if self.max_new_tokens < 1:
      raise ValueError("--prompt_files needs --max_new_tokens (response tokens per sample)")

  def effective(self) -> "GRPOConfig":
    if not self.smoke:
      return self
    return dataclasses.replace(super().effective(), steps=3, eval_every=3, save_every=2)

  @property
  def updates(self) -> int:
    return self.steps * self.epochs * self.num_minibatches

  @property
  def ks(self) -> list[int]:
    return [int(k) for k in self.pass_k.split(",")]


def sft_config(cfg: GRPOConfig) -> sft.SFTConfig:
  return chain.upstream_config("sft", cfg.sft_flagfile, cfg)


def check_mesh(cfg: GRPOConfig, mesh) -> None:
  """Batch shapes against the mesh, from the flags alone (before anything compiles)."""
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  rows = cfg.batch_size * cfg.group_size // cfg.num_minibatches // cfg.num_microbatches
  if rows % dp:
    raise ValueError(f"a GRPO microbatch (--batch_size * --group_size / --num_minibatches / "
                     f"--num_microbatches = {rows} rows) must be divisible by the "
                     f"data-parallel size {dp}")


def algorithm_parts(cfg: GRPOConfig, g, max_new_tokens: int, prompt_len: int) -> dict:
  """make_batch, loss_fn, batch_keys and logging choices of --algorithm (rl/algorithms/)."""
  keys = ("tokens", "valid", "mask", "old_logps", "advantages")
  groups = PromptGroups(cfg.group_size, prompt_len) if cfg.share_prompt else None
  if cfg.algorithm == "reinforce_pp":
    return dict(make_batch=reinforce_pp.reinforce_pp_batch_fn(
                    kl_coef=cfg.kl_coef,
                    group_size=cfg.group_size if cfg.reinforce_group_baseline else None),
                loss_fn=reinforce_pp.reinforce_pp_loss_fn(g, clip_eps=cfg.clip_eps_low,
                                                          temperature=cfg.temperature,
                                                          prompt_groups=groups),
                progress_keys=reinforce_pp.PROGRESS_KEYS, batch_keys=keys)
  keys += ("ref_logps",) if cfg.kl_coef > 0 else ()
  make_batch = grpo.grpo_batch_fn(cfg.group_size, estimator=cfg.advantage,
                                  std_ddof=cfg.std_ddof, std_eps=cfg.adv_eps)
  clip = dict(clip_eps_low=cfg.clip_eps_low, clip_eps_high=cfg.clip_eps_high,
              kl_coef=cfg.kl_coef, temperature=cfg.temperature, prompt_groups=groups)
  if cfg.algorithm == "gspo":
    return dict(make_batch=make_batch, loss_fn=gspo.gspo_loss_fn(g, **clip),
                progress_keys=gspo.PROGRESS_KEYS, token_metrics=False, batch_keys=keys)
  return dict(make_batch=make_batch, batch_keys=keys, loss_fn=grpo.grpo_loss_fn(
      g, aggregation=cfg.aggregation, max_new_tokens=max_new_tokens, **clip))


def verifiable_eval(cfg: GRPOConfig, g, sampling: SamplingConfig, prompt_len: int,
                    scorer, prompts, answers, ref_params):
  """evaluate(params) -> the held-out row (rl.evaluation.verifiable_metrics): greedy answers
  and --eval_samples temperature samples per test prompt with fixed keys, the SFT reference
  for the KL."""
  stage = RolloutStage(g, sampling, prompt_len, group_size=cfg.eval_samples, with_ref=True)
  key = jax.random.key(cfg.seed + 1)

  def evaluate(params) -> dict:
    greedy = greedy_responses(g, params, prompts, prompt_len=prompt_len,
                              batch_size=cfg.eval_batch_size, sampling=sampling, key=key)
    held = sample_heldout(stage, params, ref_params, None, prompts,
                          batch_size=cfg.eval_batch_size, key=key, scorer=scorer)
    return verifiable_metrics(held, greedy, answers, arithmetic.verify, cfg.ks)
  return evaluate


def matched_sft_params(scfg: sft.SFTConfig, workdir: str, records: list[dict], steps: int,
                       mesh, graphdef, sft_params, shardings):
  """SFT continued from sft_params for `steps` optimizer steps with the SFT stage's batch size
  and learning rate, on `records` (GRPO's training prompts with their correct answers): the
  matched-compute baseline (what the same number of updates buys with the answers given)."""
  cfg = sft.matched_compute_config(scfg, workdir, steps)
  params, _ = lm.train_lm(cfg, mesh, graphdef, jax.tree.map(jnp.copy, sft_params), shardings,
                          records, kind="sft")
  return params


def run(cfg: GRPOConfig) -> dict:
  cfg = cfg.effective()
  mesh = lm.setup(cfg, sharded_eval=False)
  check_mesh(cfg, mesh)
  wall = {}
  t0 = time.perf_counter()
  sft_dir = chain.ensure("sft", sft_config(cfg))
  wall["upstream_stages_s"] = time.perf_counter() - t0
  with open(os.path.join(sft_dir, "result.json")) as f:
    sft_result = json.load(f)
  base_dir = sft_result["pretrain_workdir"]
  # Where the upstream stages reached their checked states (their criteria stop them).
  upstream_steps = {"pretrain": sft_result.get("pretrain_steps"), "sft": sft_result.get("steps")}
  world = cfg.world_config()
  pairs = arithmetic.split_pairs(world)
  heldout = builders.load_split(lm.build_world(cfg)["sft"], "test")
  heldout = [heldout[i] for i in range(min(cfg.eval_prompts, len(heldout)))]
  prompt_len = registry.prompt_len([arithmetic.prompt(*p) for p in pairs["train"] + pairs["test"]])
  train_prompts = [arithmetic.prompt(*p) for p in pairs["train"]]
  answers = {arithmetic.prompt(*p): str(arithmetic.correct_answer(*p))
             for p in pairs["train"] + pairs["test"]}

  g, sft_params, shardings = lm.init_model(cfg, mesh, init_from=sft_dir)
  tok = ByteTokenizer()
  sampling = SamplingConfig(max_new_tokens=worlds.max_new_tokens(cfg), eos_id=tok.eos_id,
                            pad_id=tok.pad_id, temperature=cfg.temperature)
  with_ref = cfg.kl_coef > 0
  scorer = scorers.VerifierScorer(arithmetic.verify, answers)
  parts = algorithm_parts(cfg, g, sampling.max_new_tokens, prompt_len)
  loss_fn, batch_keys = parts.pop("loss_fn"), parts.pop("batch_keys")
  algorithm = grpo.GroupSampling(
      RolloutStage(g, sampling, prompt_len, group_size=cfg.group_size, with_ref=with_ref,
                   share_prompt=cfg.share_prompt, sampler_old_logps=cfg.sampler_old_logps),
      scorer, train_prompts, sft_params if with_ref else None, cfg.batch_size, cfg.seed,
      dynamic_sampling_rounds=cfg.dynamic_sampling_rounds, **parts)
  loop_cfg = rl_loop.LoopConfig(cfg.workdir, cfg.steps, epochs=cfg.epochs,
                                num_minibatches=cfg.num_minibatches, log_every=cfg.log_every,
                                eval_every=cfg.eval_every, save_every=cfg.save_every,
                                keep_checkpoints=cfg.keep_checkpoints,
                                **rl_loop.LoopConfig.faults(cfg))
  state, train_step = rl_loop.make_trainer(
      loss_fn, jax.tree.map(jnp.copy, sft_params), shardings, batch_keys, mesh,
      optim_cfg=lm.optim_config(cfg, loop_cfg.updates), num_microbatches=cfg.num_microbatches,
      seed=cfg.seed)
  evaluate = verifiable_eval(cfg, g, sampling, prompt_len, scorer,
                             [pipeline._text(r["prompt"]) for r in heldout],
                             [pipeline._text(r["response"]) for r in heldout], sft_params)
  t_loop = time.perf_counter()
  state, curve = rl_loop.run(loop_cfg, algorithm, state=state, train_step=train_step,
                             mesh=mesh, evaluate=evaluate, config=config.to_dict(cfg))
  wall["grpo_s"] = time.perf_counter() - t_loop

  _, base_params, _ = lm.init_model(cfg, mesh, init_from=base_dir)
  table = {"base": evaluate(base_params), "sft": curve[0], "grpo": curve[-1]}
  prompts_seen = algorithm.prompts_seen
  matched = {"sft_matched": "trained"}
  if cfg.dynamic_sampling_rounds:
    matched["sft_matched_rolled_out"] = "rolled_out"
  for row, which in matched.items() if cfg.matched_sft else ():
    records = [{"prompt": p, "response": answers[p]}
               for p in dict.fromkeys(p for ps in prompts_seen[which] for p in ps)]
    if not records:
      print(f"{row}: GRPO trained on no prompt (every group had zero variance); no baseline")
      continue
    t1 = time.perf_counter()
    table[row] = evaluate(matched_sft_params(
        sft_config(cfg), os.path.join(cfg.workdir, row), records, cfg.updates, mesh, g,
        sft_params, shardings))
    wall[f"{row}_s"] = time.perf_counter() - t1
  checkpoint.save_params(os.path.join(cfg.workdir, lm.PARAMS_DIR), state.params)
  result = {"table": table, "curve": curve, "wall": wall, "sft_workdir": sft_dir,
            "upstream_steps": upstream_steps,
            "updates": cfg.updates, "provenance": provenance.provenance(),
            **{f"prompts_{k}": sum(map(len, v)) for k, v in prompts_seen.items()}}
  write_json(os.path.join(cfg.workdir, "result.json"), result, indent=1)
  baselines = {"SFT": table["sft"]["accuracy_temp1"]}
  for row, label in (("sft_matched", "SFT + matched steps"),
                     ("sft_matched_rolled_out", "... on every prompt rolled out")):
    if row in table:
      baselines[label] = table[row]["accuracy_temp1"]
  plots.curve_with_se(curve, "iteration", "accuracy_temp1",
                      os.path.join(cfg.workdir, "grpo_curve.png"),
                      title=f"{cfg.algorithm} ({cfg.advantage}), G={cfg.group_size}, "
                      f"kl_coef {cfg.kl_coef}",
                      xlabel="iteration", ylabel="held-out temperature-1 accuracy",
                      baselines=baselines)
  print(format_table(table, cfg.ks))
  return result


def format_table(table: dict, ks) -> str:
  head = f"{'held-out':<24}  greedy  temp-1 (+- se)   " + "  ".join(f"pass@{k}" for k in ks)
  lines = [head + "   reward  zero-var  KL to SFT  length  trunc"]
  for name, m in table.items():
    lines.append(f"  {name:<22} {m['accuracy_greedy']:6.3f}  {m['accuracy_temp1']:6.3f} +- "
                 f"{m['accuracy_temp1_se']:.3f}   "
                 + "  ".join(f"{m[f'pass_at_{k}']:6.3f}" for k in ks)
                 + f"   {m['reward_mean']:6.3f}  {m['zero_variance_frac']:8.3f}  "
                 f"{m['kl']:9.3f}  {m['length']:6.2f}  {m['truncated_frac']:5.3f}")
  return "\n".join(lines)

