"""GRPO / GSPO with verifiable rewards on real prompts (GSM8K, MATH, any prompt file with
reference answers), from a Hugging Face checkpoint; the arithmetic world otherwise (grpo.py).

    python -m experiments.grpo --init_hf=models/qwen2.5-1.5b-instruct \\
        --prompt_files=data/gsm8k/train.jsonl --prompt_format=gsm8k --max_new_tokens=512 \\
        --reward_fns=math,format_boxed --reward_weights=1,0.1 --export_hf=out/grpo

File mode (--prompt_files set; pipeline/prompt_sets.py):
  policy     --init_hf (pipeline/real_models.py), else a random --model preset (smoke tests);
             the reference of the k3 term (--kl_coef > 0) is that starting point, frozen
  prompts    the files' records rendered with the tokenizer's chat template (--system_prompt
             first); held out: --eval_files or a hashed --test_fraction
  rewards    --reward_fns, one column each (rl/scorers.py: FunctionsScorer), NaN where a
             function could not score a response: that row leaves its group's statistics
             and the loss; combined by --reward_normalization with --reward_weights and
             scaled by --adv_std_scale (losses/group_rewards.py)
  evaluation greedy and --eval_samples temperature samples per held-out prompt (fixed keys):
             accuracy by the math verifier (final answer vs the reference's), pass@k, the
             weighted reward and each function's mean, the unscored fraction, length,
             truncation, and with a reference the KL to it per sequence
  export     --export_hf: the trained policy in the HF layout with the tokenizer files
--algorithm=grpo and gspo (--advantage=grpo, or rloo: the leave-one-out baseline;
--adv_std_scale=none is Dr. GRPO's mean-centred advantage) and reinforce_pp (on the weighted
total reward, unscored rows masked); --matched_sft needs the world's answers and stays in
world mode.
"""
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import evaluation, plan_models, provenance
from rlhf_jax.losses import group_rewards
from rlhf_jax.pipeline import config, lm, prompt_sets, real_models
from rlhf_jax.rewards import functions
from rlhf_jax.rl import loop as rl_loop, scorers
from rlhf_jax.rl.algorithms import grpo, reinforce_pp
from rlhf_jax.rl.evaluation import greedy_responses, mean_se, sample_heldout
from rlhf_jax.rl.rollout import Rollout, RolloutStage
from rlhf_jax.runs import grpo as grpo_run
from rlhf_jax.sampling import SamplingConfig
from rlhf_jax.train import checkpoint
from rlhf_jax.train.logging import write_json


def combined_batch_fn(cfg: grpo_run.GRPOConfig, names: list[str], weights: list[float]):
  """make_batch(rollout, rewards_BxK) -> (batch, stats): group advantages of the combined
  rewards; rows no function scored get an empty mask (absent from the loss)."""
  w = jnp.asarray(weights, jnp.float32)

  baseline = "leave_one_out" if cfg.advantage == "rloo" else "mean"

  @jax.jit
  def advantages(rewards_BxK, mask_BxT):
    adv, valid, stats = group_rewards.combined_group_advantages(
        rewards_BxK, w, group_size=cfg.group_size, normalization=cfg.reward_normalization,
        std_scale=cfg.adv_std_scale, std_ddof=cfg.std_ddof, eps=cfg.adv_eps,
        baseline=baseline)
    return adv, mask_BxT * valid[:, None].astype(mask_BxT.dtype), stats

  def named(stats):
    means, computed = np.asarray(stats.pop("reward_means_K")), stats.pop("computed_frac_K")
    stats.update({f"reward_{n}": float(m) for n, m in zip(names, means)})
    stats.update({f"scored_{n}": float(c) for n, c in zip(names, np.asarray(computed))})
    return stats

  if cfg.algorithm == "reinforce_pp":
    rpp = reinforce_pp.reinforce_pp_batch_fn(
        kl_coef=cfg.kl_coef, group_size=cfg.group_size if cfg.reinforce_group_baseline else None)

    def make_batch(rollout: Rollout, rewards_BxK):  # REINFORCE++ on the weighted total reward
      _, mask, stats = advantages(jnp.asarray(rewards_BxK), rollout.mask_BxT)
      total = neutral_fill(prompt_sets.weighted_total(rewards_BxK, weights), cfg.group_size)
      batch, rpp_stats = rpp(rollout._replace(mask_BxT=mask), jnp.asarray(total, jnp.float32))
      return batch, {**named(stats), **rpp_stats}
    return make_batch

  def make_batch(rollout: Rollout, rewards_BxK):
    adv, mask, stats = advantages(jnp.asarray(rewards_BxK), rollout.mask_BxT)
    return grpo.rollout_batch(rollout._replace(mask_BxT=mask), adv), named(stats)

  return make_batch


def neutral_fill(total_B: np.ndarray, group_size: int) -> np.ndarray:
  """Unscored rows' (NaN) reward set to their group's mean over its scored rows (0 when none):
  their loss mask is zeroed, and so filled they shift no group baseline and no batch
  statistic beyond their own (masked) tokens."""
  r = total_B.reshape(-1, group_size)
  scored = ~np.isnan(r)
  mean = np.where(scored, r, 0).sum(1, keepdims=True) / np.maximum(scored.sum(1, keepdims=True),
                                                                    1)
  return np.where(scored, r, mean).reshape(-1)


def answer_metrics(held, greedy, answers, names, weights, ks) -> dict:
  """A held-out row: accuracy (math verifier; only prompts with a reference answer), pass@k,
  the weighted reward and each function's mean over the rows it scored, unscored fraction,
  length, truncation and KL to the reference."""
  exp, n = held.experience, held.experience.group_size
  rewards = np.asarray(exp.rewards_B, np.float64)
  total = prompt_sets.weighted_total(rewards, weights)
  out = {"reward_mean": float(np.nanmean(total)) if np.isfinite(total).any() else float("nan"),
         "unscored_frac": float(np.isnan(total).mean())}
  for k, name in enumerate(names):
    col = rewards[:, k]
    out[f"reward_{name}"] = float(np.nanmean(col)) if np.isfinite(col).any() else float("nan")
  has = np.array([bool(a) for a in answers])
  if has.any():
    correct = np.array([prompt_sets.verify_math(y, a) for y, a in
                        zip(exp.responses, np.repeat(answers, n))]).reshape(-1, n)[has]
    out["accuracy_temp1"], out["accuracy_temp1_se"] = mean_se(correct.mean(1))
    out["accuracy_greedy"] = float(np.mean([prompt_sets.verify_math(y, a) for y, a, h in
                                            zip(greedy, answers, has) if h]))
    for k in ks:
      out[f"pass_at_{k}"] = float(evaluation.pass_at_k(n, correct.sum(1), k).mean())
  if held.kl_B is not None:
    out["kl"], out["kl_se"] = mean_se(held.kl_B)
  mask = np.asarray(exp.rollout.mask_BxT)
  out.update(length=float(mask.sum(1).mean()),
             truncated_frac=float(np.asarray(exp.rollout.truncated_B).mean()))
  return out


def file_eval(cfg, g, sampling, data: prompt_sets.PromptSet, tok, scorer, ref_params, names,
              weights):
  stage = RolloutStage(g, sampling, data.prompt_len, group_size=cfg.eval_samples,
                       with_ref=ref_params is not None, tokenizer=tok,
                       forward_chunk_rows=cfg.rollout_chunk_rows)
  prompts = data.test[:cfg.eval_prompts]
  answers = [data.answers[p] for p in prompts]
  key = jax.random.key(cfg.seed + 1)

  def evaluate(params) -> dict:
    greedy = greedy_responses(g, params, prompts, prompt_len=data.prompt_len,
                              batch_size=cfg.eval_batch_size, sampling=sampling, key=key,
                              tokenizer=tok)
    held = sample_heldout(stage, params, ref_params, None, prompts,
                          batch_size=cfg.eval_batch_size, key=key, scorer=scorer)
    return answer_metrics(held, greedy, answers, names, weights, cfg.ks)
  return evaluate


def run(cfg: grpo_run.GRPOConfig) -> dict:
  """File mode when --prompt_files is set, else the arithmetic world (grpo.run)."""
  if not cfg.file_mode:
    return grpo_run.run(cfg)
  cfg = cfg.effective()
  mcfg = real_models.model_config(cfg, lm.model_config, dry_run=cfg.dry_run)
  if cfg.dry_run:  # prompts planned at --max_prompt_len (the longest a file may hold)
    return real_models.dry_run(cfg, "grpo", mcfg, plan_models.Shapes(
        batch_size=cfg.batch_size * cfg.group_size // cfg.num_minibatches,
        num_microbatches=cfg.num_microbatches, prompt_len=cfg.max_prompt_len,
        max_new_tokens=cfg.max_new_tokens, rollout_prompts=cfg.batch_size,
        group_size=cfg.group_size, grpo_kl=cfg.kl_coef > 0,
        forward_chunk_rows=cfg.rollout_chunk_rows))
  mesh = lm.setup(cfg, sharded_eval=False)
  grpo_run.check_mesh(cfg, mesh)
  tok, data = prompt_sets.load(cfg, mcfg)
  if len(data.train) < cfg.batch_size:
    raise ValueError(f"{len(data.train)} training prompts, fewer than --batch_size="
                     f"{cfg.batch_size} distinct prompts per iteration")
  specs = cfg.reward_specs
  names, weights = [n for n, _ in specs], [w for _, w in specs]
  scorer = scorers.FunctionsScorer([(n, functions.resolve(n)) for n in names], data.answers)
  g, params, shardings = real_models.trained_model(cfg, mesh, lm.init_model)
  ref_params = real_models.reference_of(params) if cfg.kl_coef > 0 else None
  sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, eos_id=tok.eos_id,
                            pad_id=tok.pad_id, temperature=cfg.temperature)
  parts = grpo_run.algorithm_parts(cfg, g, sampling.max_new_tokens, data.prompt_len)
  loss_fn, batch_keys = parts.pop("loss_fn"), parts.pop("batch_keys")
  parts["make_batch"] = combined_batch_fn(cfg, names, weights)
  parts["progress_keys"] = ("reward_mean", "unscored_frac", "zero_variance_frac",
                            *(f"reward_{n}" for n in names if len(names) > 1), "kl_seq")
  algorithm = grpo.GroupSampling(
      RolloutStage(g, sampling, data.prompt_len, group_size=cfg.group_size,
                   with_ref=ref_params is not None, tokenizer=tok,
                   forward_chunk_rows=cfg.rollout_chunk_rows, share_prompt=cfg.share_prompt,
                   sampler_old_logps=cfg.sampler_old_logps),
      scorer, data.train, ref_params, cfg.batch_size, cfg.seed,
      dynamic_sampling_rounds=cfg.dynamic_sampling_rounds, **parts)
  loop_cfg = rl_loop.LoopConfig(cfg.workdir, cfg.steps, epochs=cfg.epochs,
                                num_minibatches=cfg.num_minibatches, log_every=cfg.log_every,
                                eval_every=cfg.eval_every, save_every=cfg.save_every,
                                keep_checkpoints=cfg.keep_checkpoints,
                                **rl_loop.LoopConfig.faults(cfg))
  state, train_step, view = rl_loop.make_trainer_for(
      loss_fn, params, shardings, batch_keys, mesh,
      optim_cfg=lm.optim_config(cfg, loop_cfg.updates), num_microbatches=cfg.num_microbatches,
      seed=cfg.seed)
  evaluate = file_eval(cfg, g, sampling, data, tok, scorer, ref_params, names, weights)
  t0 = time.perf_counter()
  state, curve = rl_loop.run(loop_cfg, algorithm, state=state, train_step=train_step,
                             mesh=mesh, evaluate=evaluate, config=config.to_dict(cfg),
                             params_view=view)
  wall = {"grpo_s": time.perf_counter() - t0}
  params = view(state.params)
  checkpoint.save_params(os.path.join(cfg.workdir, lm.PARAMS_DIR), params)
  real_models.export(cfg, g, params)
  result = {"table": {"initial": curve[0], "grpo": curve[-1]}, "curve": curve, "wall": wall,
            "updates": cfg.updates, "data": {"train": len(data.train), "test": len(data.test),
                                             "skipped": data.report.skipped},
            "reward_fns": dict(specs), "provenance": provenance.provenance()}
  write_json(os.path.join(cfg.workdir, "result.json"), result, indent=1)
  for row, m in result["table"].items():
    acc = (f"accuracy greedy {m['accuracy_greedy']:.3f}  temp-1 {m['accuracy_temp1']:.3f}"
           if "accuracy_greedy" in m else "")
    print(f"  {row:<8} reward {m['reward_mean']:.3f}  {acc}  length {m['length']:.1f}")
  return result
