"""GRPO / Dr. GRPO / RLOO with a verifiable reward (RLVR) on the arithmetic world.

    python -m experiments.grpo --flagfile=experiments/configs/grpo_tiny.flags

In an empty workdir this builds what it lacks, each stage cached under --stage_root
(experiments/stages.py): pretrain -> a deliberately short SFT (--sft_flagfile) -> GRPO:

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
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from experiments import cli, lm, plots, sft, stages, worlds
from rlhf_jax import evaluation, sharding
from rlhf_jax.compile_count import CompileCounter
from rlhf_jax.data import builders, pipeline
from rlhf_jax.data.tokenizer import ByteTokenizer
from rlhf_jax.sampling import SamplingConfig, sample
from rlhf_jax.train import checkpoint, grpo, optim
from rlhf_jax.train import state as state_lib, step as step_lib
from rlhf_jax.train.logging import format_progress, write_config
from rlhf_jax.worlds import arithmetic


@dataclasses.dataclass(frozen=True)
class GRPOConfig(lm.LMConfig):
  sft_flagfile: str = cli.flag("experiments/configs/sft_grpo_tiny.flags",
                               "Flagfile of the SFT stage the policy starts from.")
  stage_root: str = cli.flag("workdirs/stages", "Where cached upstream stages live.")
  advantage: str = cli.flag("grpo", "Group advantage estimator.", choices=grpo.ADVANTAGES)
  group_size: int = cli.flag(8, "Samples per prompt (G >= 2).")
  std_ddof: int = cli.flag(0, "--advantage=grpo: delta degrees of freedom of the group std "
                           "(0: population std as in MATH.md's worked example; 1: TRL).")
  adv_eps: float = cli.flag(1e-4, "--advantage=grpo: added to the group std (>= 0).")
  clip_eps_low: float = cli.flag(0.2, "Ratio clip below 1 (1 - eps_low), in (0, 1).")
  clip_eps_high: float = cli.flag(0.2, "Ratio clip above 1 (1 + eps_high), > 0; larger than "
                                  "--clip_eps_low is DAPO's clip-higher.")
  kl_coef: float = cli.flag(0.04, "k3 KL-to-SFT coefficient (>= 0; 0: no reference forward "
                            "in training).")
  aggregation: str = cli.flag("token", "Loss normaliser: token (DAPO), sequence (GRPO), "
                              "group (Dr. GRPO's constant).", choices=tuple(grpo.AGGREGATIONS))
  epochs: int = cli.flag(1, "Passes over each rollout.")
  num_minibatches: int = cli.flag(2, "Optimizer updates per pass over a rollout.")
  temperature: float = cli.flag(1.0, "Sampling temperature of rollouts and held-out samples "
                                "(and of the training forward, so the first ratio is 1).")
  eval_samples: int = cli.flag(16, "Temperature samples per held-out prompt (n of pass@k).")
  pass_k: str = cli.flag("1,4,8", "Comma-separated k of the held-out pass@k (each < "
                         "--eval_samples).")
  dynamic_sampling_rounds: int = cli.flag(
      0, "DAPO's dynamic sampling: zero-variance groups leave the loss and are replaced by "
      "informative groups of up to this many further rollouts of fresh prompts per iteration "
      "(0: off, every group enters the loss).")
  matched_sft: bool = cli.flag(False, "Also continue SFT for as many optimizer steps as GRPO "
                               "takes on the prompts of GRPO's updates (matched compute; with "
                               "dynamic sampling also on every prompt rolled out).")

  def __post_init__(self):
    super().__post_init__()
    if self.world != "arithmetic":
      raise ValueError("experiments.grpo runs on --world=arithmetic (its reward is the "
                       "arithmetic verifier)")
    if self.advantage == "rloo" and self.group_size < 2:
      raise ValueError(f"--advantage=rloo needs --group_size >= 2 (its baseline is the mean "
                       f"of the other G - 1 samples), got --group_size={self.group_size}")
    if self.group_size < 2:
      raise ValueError(f"--group_size={self.group_size}: a group of one sample has zero "
                       f"advantage under every estimator (nothing to learn); pass "
                       f"--group_size=2 or more (e.g. --group_size=8)")
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
    rows = self.batch_size * self.group_size
    if rows % (self.num_minibatches * self.num_microbatches):
      raise ValueError(f"--batch_size * --group_size = {rows} rollout rows must be divisible "
                       f"by --num_minibatches * --num_microbatches = "
                       f"{self.num_minibatches * self.num_microbatches}")

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


SHARED_WITH_SFT = sft.SHARED_WITH_PRETRAIN + ("stage_root",)


def sft_config(cfg: GRPOConfig) -> sft.SFTConfig:
  return stages.upstream_config(sft.SFTConfig, cfg.sft_flagfile, cfg, SHARED_WITH_SFT)


def ensure_sft(cfg: GRPOConfig) -> str:
  scfg = sft_config(cfg)
  return stages.ensure_stage("sft", sft.stage_key_config(scfg), cfg.stage_root,
                             lambda workdir: sft.run(dataclasses.replace(scfg, workdir=workdir)))


def check_mesh(cfg: GRPOConfig, mesh) -> None:
  """Batch shapes against the mesh, from the flags alone (before anything compiles)."""
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  rows = cfg.batch_size * cfg.group_size // cfg.num_minibatches // cfg.num_microbatches
  if rows % dp:
    raise ValueError(f"a GRPO microbatch (--batch_size * --group_size / --num_minibatches / "
                     f"--num_microbatches = {rows} rows) must be divisible by the "
                     f"data-parallel size {dp}")


def iteration_prompts(cfg: GRPOConfig, train_pairs, it: int,
                      round_: int = 0) -> tuple[list[str], list[str]]:
  """(prompts, answers) of rollout `round_` of iteration `it`: --batch_size distinct train
  pairs drawn by (seed, it, round) alone, so a resumed run sees the same ones."""
  rng = np.random.default_rng((cfg.seed, it) + ((round_,) if round_ else ()))
  idx = rng.choice(len(train_pairs), cfg.batch_size, replace=False)
  pairs = [train_pairs[i] for i in idx]
  return ([arithmetic.prompt(*p) for p in pairs],
          [str(arithmetic.correct_answer(*p)) for p in pairs])


class Round(NamedTuple):
  rollout: grpo.GroupRollout
  rewards_BxG: np.ndarray
  prompts: list[str]


def iteration_rollout(cfg: GRPOConfig, it: int, rollout_fn, params, ref_params, train_pairs,
                      prompt_len: int) -> tuple[grpo.Selection, list[Round]]:
  """Iteration `it`'s training groups: one rollout of --batch_size fresh prompts, or, with
  --dynamic_sampling_rounds, its informative groups topped up from up to that many further
  rollouts (DAPO), stopping as soon as the batch is full. Returns (selection, rounds)."""
  key = jax.random.fold_in(jax.random.key(cfg.seed), it)
  rounds, informative = [], 0
  for r in range(cfg.dynamic_sampling_rounds + 1):
    prompts, answers = iteration_prompts(cfg, train_pairs, it, r)
    toks, valid = prompt_batch(prompts, prompt_len)
    ro = rollout_fn(params, ref_params, toks, valid, jax.random.fold_in(key, r) if r else key)
    texts = responses_of(ro.tokens_BxT[:, prompt_len:], ro.mask_BxT[:, prompt_len:])
    rewards = rewards_of(texts, np.repeat(answers, cfg.group_size))
    rounds.append(Round(ro, rewards.reshape(-1, cfg.group_size), prompts))
    informative += int(grpo.informative_groups(rounds[-1].rewards_BxG).sum())
    if informative >= cfg.batch_size:
      break
  if not cfg.dynamic_sampling_rounds:  # every group enters the loss, informative or not
    sel = grpo.Selection(ro, rewards, [(0, g) for g in range(cfg.batch_size)], informative)
  else:
    sel = grpo.select_groups([(x.rollout, x.rewards_BxG.reshape(-1)) for x in rounds],
                             cfg.batch_size, cfg.group_size)
  return sel, rounds


def trained_prompts(cfg: GRPOConfig, sel: grpo.Selection, rounds: list[Round]) -> list[str]:
  """The prompts whose groups enter the loss: every prompt without dynamic sampling, the
  informative groups' with it (the fillers' masks are empty)."""
  if not cfg.dynamic_sampling_rounds:
    return list(rounds[0].prompts)
  return [rounds[r].prompts[g] for r, g in sel.picked[:sel.informative]]


def prompt_batch(prompts, prompt_len: int) -> tuple[np.ndarray, np.ndarray]:
  tok = ByteTokenizer()
  rows = [pipeline.prompt_example(p, "", tok, prompt_len) for p in prompts]
  return (np.stack([r["prompt_tokens"] for r in rows]),
          np.stack([r["prompt_valid"] for r in rows]))


def responses_of(tokens_BxN, mask_BxN) -> list[str]:
  """Response texts (EOS and padding dropped) of sampled rows."""
  tok = ByteTokenizer()
  tokens, mask = jax.device_get((tokens_BxN, mask_BxN))
  return [tok.decode([t for t in row[m > 0] if t != tok.eos_id]) for row, m in zip(tokens, mask)]


def rewards_of(texts, answers) -> np.ndarray:
  """The verifiable reward: 1.0 iff the response (cut at EOS) is exactly the answer."""
  return np.array([arithmetic.verify(t, a) for t, a in zip(texts, answers)], np.float32)


def rollout_summary(ro: grpo.GroupRollout) -> dict:
  """Length (response tokens, EOS included), truncation rate and, with a reference, the
  per-sequence KL estimate sum_t (log pi_old - log pi_ref) of the rollout."""
  mask = np.asarray(ro.mask_BxT)
  out = {"length": float(mask.sum(1).mean()),
         "truncated_frac": float(np.asarray(ro.truncated_B).mean())}
  if ro.ref_logps_BxT is not None:
    out["kl_seq"] = float(np.sum(np.asarray(ro.old_logps_BxT - ro.ref_logps_BxT) * mask, 1).mean())
  return out


@dataclasses.dataclass
class Evaluator:
  """Held-out evaluation of any policy with fixed keys: greedy answers, and --eval_samples
  temperature samples per prompt through a compiled group rollout with the SFT reference.
  Batches keep one shape (the last is filled and its extra rows dropped), so evaluating
  again compiles nothing."""
  rollout_fn: object  # grpo.make_group_rollout_fn(..., eval_samples, with_ref=True)
  graphdef: object
  greedy_cfg: SamplingConfig
  prompts: list[str]
  answers: list[str]
  prompt_len: int
  batch_size: int
  n: int
  ks: list[int]
  ref_params: object
  key: jax.Array

  def __call__(self, params) -> dict:
    m = len(self.prompts)
    fill = (-m) % self.batch_size
    ps = self.prompts + self.prompts[:fill]
    greedy, texts, kls, lengths, truncated = [], [], [], [], []
    for i in range(0, len(ps), self.batch_size):
      toks, valid = prompt_batch(ps[i:i + self.batch_size], self.prompt_len)
      key = jax.random.fold_in(self.key, i)
      g = sample(self.graphdef, params, toks, valid, key, cfg=self.greedy_cfg)
      greedy += responses_of(g.tokens_BxN, g.mask_BxN)
      ro = self.rollout_fn(params, self.ref_params, toks, valid, key)
      texts += responses_of(ro.tokens_BxT[:, self.prompt_len:], ro.mask_BxT[:, self.prompt_len:])
      mask = np.asarray(ro.mask_BxT)
      kls.append(np.sum(np.asarray(ro.old_logps_BxT - ro.ref_logps_BxT) * mask, 1))
      lengths.append(mask.sum(1))
      truncated.append(np.asarray(ro.truncated_B))
    rows = m * self.n
    kl, length = np.concatenate(kls)[:rows], np.concatenate(lengths)[:rows]
    truncated = np.concatenate(truncated)[:rows]
    answers_rows = np.repeat(self.answers, self.n)
    texts = texts[:rows]
    correct = np.array([arithmetic.verify(evaluation.first_field(t), a)
                        for t, a in zip(texts, answers_rows)]).reshape(m, self.n)
    rewards = rewards_of(texts, answers_rows).reshape(m, self.n).astype(np.float64)
    per_prompt = correct.mean(1)
    out = {"accuracy_greedy": evaluation.exact_match_rate(
               list(zip(greedy[:m], self.answers)), arithmetic.verify),
           "accuracy_temp1": float(per_prompt.mean()),
           "accuracy_temp1_se": float(per_prompt.std(ddof=1) / np.sqrt(m)) if m > 1 else 0.0}
    for k in self.ks:
      out[f"pass_at_{k}"] = float(evaluation.pass_at_k(self.n, correct.sum(1), k).mean())
    out.update(reward_mean=float(rewards.mean()), reward_std=float(rewards.std()),
               zero_variance_frac=float(np.mean(rewards.max(1) == rewards.min(1))),
               kl=float(kl.mean()), kl_se=float(kl.std(ddof=1) / np.sqrt(rows)),
               length=float(length.mean()), truncated_frac=float(truncated.mean()))
    return out


def matched_sft_params(scfg: sft.SFTConfig, workdir: str, records: list[dict], steps: int,
                       mesh, graphdef, sft_params, shardings):
  """SFT continued from sft_params for `steps` optimizer steps with the SFT stage's batch size
  and learning rate, on `records` (GRPO's training prompts with their correct answers): the
  matched-compute baseline (what the same number of updates buys with the answers given)."""
  cfg = dataclasses.replace(scfg.effective(), workdir=workdir, steps=steps,
                            warmup_steps=min(scfg.warmup_steps, steps - 1), eval_every=steps,
                            save_every=steps)
  params, _ = lm.train_lm(cfg, mesh, graphdef, jax.tree.map(jnp.copy, sft_params), shardings,
                          records, kind="sft")
  return params


def run(cfg: GRPOConfig) -> dict:
  cfg = cfg.effective()
  mesh = lm.setup(cfg)
  check_mesh(cfg, mesh)
  wall = {}
  t0 = time.perf_counter()
  sft_dir = ensure_sft(cfg)
  wall["upstream_stages_s"] = time.perf_counter() - t0
  with open(os.path.join(sft_dir, "result.json")) as f:
    base_dir = json.load(f)["pretrain_workdir"]
  world = cfg.world_config()
  train_pairs = arithmetic.split_pairs(world)["train"]
  heldout = builders.load_split(lm.build_world(cfg)["sft"], "test")
  heldout = [heldout[i] for i in range(min(cfg.eval_prompts, len(heldout)))]
  test_prompts = [pipeline._text(r["prompt"]) for r in heldout]
  test_answers = [pipeline._text(r["response"]) for r in heldout]
  prompt_len = worlds.prompt_len([arithmetic.prompt(*p) for p in
                                  train_pairs + arithmetic.split_pairs(world)["test"]])
  max_new = worlds.max_new_tokens(cfg)

  g, sft_params, shardings = lm.init_model(cfg, mesh, init_from=sft_dir)
  tok = ByteTokenizer()
  sampling = SamplingConfig(max_new_tokens=max_new, eos_id=tok.eos_id, pad_id=tok.pad_id,
                            temperature=cfg.temperature)
  with_ref = cfg.kl_coef > 0
  rollout_fn = grpo.make_group_rollout_fn(g, sampling, cfg.group_size, with_ref=with_ref)
  advantages_fn = grpo.make_group_advantages_fn(cfg.group_size, estimator=cfg.advantage,
                                                std_ddof=cfg.std_ddof, std_eps=cfg.adv_eps)
  loss_fn = grpo.grpo_loss_fn(g, clip_eps_low=cfg.clip_eps_low, clip_eps_high=cfg.clip_eps_high,
                              kl_coef=cfg.kl_coef, aggregation=cfg.aggregation,
                              max_new_tokens=max_new, temperature=cfg.temperature)
  ocfg = optim.OptimConfig(learning_rate=cfg.learning_rate, total_steps=cfg.updates,
                           warmup_steps=min(cfg.warmup_steps, cfg.updates - 1),
                           weight_decay=cfg.weight_decay, grad_clip_norm=cfg.grad_clip_norm)
  optimizer = optim.make_optimizer(ocfg)
  state = state_lib.init_train_state(jax.tree.map(jnp.copy, sft_params), optimizer,
                                     jax.random.key(cfg.seed), param_shardings=shardings)
  batch_keys = ["tokens", "valid", "mask", "old_logps", "advantages"]
  batch_keys += ["ref_logps"] if with_ref else []
  train_step = step_lib.compile_train_step(
      step_lib.make_train_step(loss_fn, optimizer, num_microbatches=cfg.num_microbatches,
                               lr_schedule=optim.make_schedule(ocfg)),
      state_lib.state_shardings(optimizer, state.params, shardings),
      {k: sharding.batch_sharding(mesh) for k in batch_keys})
  evaluator = Evaluator(
      grpo.make_group_rollout_fn(g, sampling, cfg.eval_samples, with_ref=True), g,
      dataclasses.replace(sampling, greedy=True), test_prompts, test_answers, prompt_len,
      cfg.eval_batch_size, cfg.eval_samples, cfg.ks, sft_params, jax.random.key(cfg.seed + 1))

  write_config(cfg.workdir, cli.to_dict(cfg))
  manager, logger, state, data = lm.resume_run(cfg, state, save_every=cfg.save_every)
  curve, prompts_seen, start = [], {"trained": [], "rolled_out": []}, 0
  if data is not None:
    curve, prompts_seen, start = data["curve"], data["prompts"], int(manager.latest_step())
    print(f"resumed from iteration {start}")
  if start == 0:
    # The train state's own (SFT) params: every compiled function then sees the shardings
    # it will see in the loop.
    curve.append({"iteration": 0, **lm.timed("eval SFT", evaluator, state.params)})
    logger.log(0, curve[-1], split="eval")

  t_loop = time.perf_counter()
  with CompileCounter() as counter:
    for it in range(start, cfg.steps):
      counter.reset()  # compiles per iteration are logged: after the first there should be none
      sel, rounds = iteration_rollout(cfg, it, rollout_fn, state.params,
                                      sft_params if with_ref else None, train_pairs, prompt_len)
      prompts_seen["trained"].append(trained_prompts(cfg, sel, rounds))
      prompts_seen["rolled_out"].append([p for x in rounds for p in x.prompts])
      adv, stats = advantages_fn(sel.rewards_B)
      batch = grpo.rollout_batch(sel.rollout, adv)
      state, metrics = train_on_rollout(cfg, mesh, train_step, state, batch,
                                        np.random.default_rng((cfg.seed, it, 1)))
      metrics = jax.device_get(metrics)
      values = {**{k: float(v) for k, v in jax.device_get(stats).items()},
                **{k: float(v) for k, v in metrics.items()},
                **{f"{k}_per_token": v for k, v in grpo.per_token(metrics).items()},
                # the first rollout is the on-policy sample of fresh prompts: its reward and
                # zero-variance fraction are comparable with and without dynamic sampling
                **grpo.group_stats(rounds[0].rewards_BxG), **rollout_summary(rounds[0].rollout),
                "informative_groups": sel.informative / cfg.batch_size,
                "rollout_rounds": float(len(rounds))}
      values = {k: float(v) for k, v in values.items()}
      values["compiles"] = float(counter.count)
      done = it + 1
      logger.log(done, values)
      if done % cfg.log_every == 0 or done == cfg.steps:
        rate = (done - start) / max(time.perf_counter() - t_loop, 1e-9)
        print(format_progress(done, cfg.steps, values["loss"], rate, None)
              + f" | reward {values['reward_mean']:.2f} | zero-var "
              f"{values['zero_variance_frac']:.2f} | rounds {len(rounds)} | clip "
              f"{values['clipfrac_per_token']:.3f}"
              + (f" | kl {values['kl_seq']:.3f}" if with_ref else "")
              + f" | compiles {counter.count}")
      if done % cfg.eval_every == 0 or done == cfg.steps:
        curve.append({"iteration": done, **evaluator(state.params)})
        logger.log(done, curve[-1], split="eval")
      if manager.should_save(done) or done == cfg.steps:
        checkpoint.save(manager, done, state, {"curve": curve, "prompts": prompts_seen},
                        force=done == cfg.steps)
  manager.wait_until_finished()
  logger.close()
  wall["grpo_s"] = time.perf_counter() - t_loop

  _, base_params, _ = lm.init_model(cfg, mesh, init_from=base_dir)
  table = {"base": evaluator(base_params), "sft": curve[0], "grpo": curve[-1]}
  answer = {arithmetic.prompt(*p): str(arithmetic.correct_answer(*p)) for p in train_pairs}
  matched = {"sft_matched": "trained"}
  if cfg.dynamic_sampling_rounds:
    matched["sft_matched_rolled_out"] = "rolled_out"
  for row, which in matched.items() if cfg.matched_sft else ():
    records = [{"prompt": p, "response": answer[p]}
               for p in dict.fromkeys(p for ps in prompts_seen[which] for p in ps)]
    if not records:
      print(f"{row}: GRPO trained on no prompt (every group had zero variance); no baseline")
      continue
    t1 = time.perf_counter()
    table[row] = evaluator(matched_sft_params(
        sft_config(cfg), os.path.join(cfg.workdir, row), records, cfg.updates, mesh, g,
        sft_params, shardings))
    wall[f"{row}_s"] = time.perf_counter() - t1
  checkpoint.save_params(os.path.join(cfg.workdir, lm.PARAMS_DIR), state.params)
  manager.close()
  result = {"table": table, "curve": curve, "wall": wall, "sft_workdir": sft_dir,
            "updates": cfg.updates,
            **{f"prompts_{k}": sum(map(len, v)) for k, v in prompts_seen.items()}}
  with open(os.path.join(cfg.workdir, "result.json"), "w") as f:
    json.dump(result, f, indent=1)
  baselines = {"SFT": table["sft"]["accuracy_temp1"]}
  for row, label in (("sft_matched", "SFT + matched steps"),
                     ("sft_matched_rolled_out", "... on every prompt rolled out")):
    if row in table:
      baselines[label] = table[row]["accuracy_temp1"]
  plots.curve_with_se(curve, "iteration", "accuracy_temp1",
                      os.path.join(cfg.workdir, "grpo_curve.png"),
                      title=f"{cfg.advantage}, G={cfg.group_size}, kl_coef {cfg.kl_coef}",
                      xlabel="iteration", ylabel="held-out temperature-1 accuracy",
                      baselines=baselines)
  print(format_table(table, cfg.ks))
  return result


def train_on_rollout(cfg: GRPOConfig, mesh, train_step, state, batch, rng):
  """--epochs passes over the rollout's rows, each in --num_minibatches shuffled minibatches.
  Returns (state, the last step's metrics)."""
  rows = cfg.batch_size * cfg.group_size
  mb = rows // cfg.num_minibatches
  for _ in range(cfg.epochs):
    perm = rng.permutation(rows)
    for j in range(cfg.num_minibatches):
      idx = jnp.asarray(perm[j * mb:(j + 1) * mb])
      minibatch = {k: v[idx] for k, v in batch.items()}
      state, metrics = train_step(state, sharding.shard_batch(minibatch, mesh))
  return state, metrics


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


if __name__ == "__main__":
  cli.main(GRPOConfig, run)
