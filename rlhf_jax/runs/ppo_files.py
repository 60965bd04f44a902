"""PPO from a learned reward on real prompts, with policy, value and reward models from Hugging
Face checkpoints; the preference worlds otherwise (ppo.py).

    python -m experiments.ppo --init_hf=out/sft --reward_hf=out/rm \\
        --prompt_files=data/hh/train.jsonl --prompt_format=hh_rlhf --max_new_tokens=128 \\
        --export_hf=out/ppo

File mode (--prompt_files set):
  policy     --init_hf (an SFT model); the reference of the per-token KL penalty is that
             starting point, frozen
  reward     --reward_hf, a *ForSequenceClassification reward model (experiments.reward
             --export_hf writes one) scoring prompt + response at its last token; its raw
             score (no normalisation statistics exist for a model trained elsewhere), minus
             --truncation_penalty for responses cut at --max_new_tokens
  value      --value_hf: a reward model (the InstructGPT choice, the default: --reward_hf) or
             a causal LM whose backbone gets a fresh scalar head
  prompts    pipeline/prompt_sets.py: prompt files (the prompts of preference pairs too),
             rendered with the chat template; held out: --eval_files or --test_fraction
  evaluation 4 temperature samples per held-out prompt (fixed keys): the reward (+- se), KL
             to the reference per sequence (+- se), length and truncation
Everything else (GAE, whitening, clipping, adaptive KL) is the world mode's PPO.
"""
import os
import time

import jax
import numpy as np

from rlhf_jax import plan_models, provenance
from rlhf_jax.pipeline import config, lm, prompt_sets, real_models, reward_files
from rlhf_jax.rl import loop as rl_loop, scorers
from rlhf_jax.rl.algorithms import ppo
from rlhf_jax.rl.evaluation import mean_se, sample_heldout
from rlhf_jax.rl.rollout import RolloutStage
from rlhf_jax.runs import ppo as ppo_run
from rlhf_jax.sampling import SamplingConfig
from rlhf_jax.train import checkpoint
from rlhf_jax.train.logging import write_json

EVAL_SAMPLES = 4  # temperature samples per held-out prompt


def reward_eval(cfg, stage: RolloutStage, scorer, prompts, ref_params, value_params):
  key = jax.random.key(cfg.seed + 1)

  def evaluate(policy_params) -> dict:
    held = sample_heldout(stage, policy_params, ref_params, value_params,
                          list(prompts) * EVAL_SAMPLES, batch_size=cfg.batch_size, key=key,
                          scorer=scorer)
    exp = held.experience
    out = dict(zip(("reward", "reward_se"), mean_se(exp.rewards_B)))
    out.update(zip(("kl", "kl_se"), mean_se(held.kl_B)))
    out.update(length=float(np.asarray(exp.rollout.mask_BxT).sum(1).mean()),
               truncated_frac=float(np.asarray(exp.rollout.truncated_B).mean()))
    return out
  return evaluate


def run(cfg) -> dict:
  """File mode when --prompt_files is set, else the preference world (ppo.run)."""
  if not cfg.file_mode:
    return ppo_run.run(cfg)
  cfg = cfg.effective()
  mcfg = real_models.model_config(cfg, lm.model_config, dry_run=cfg.dry_run)
  if cfg.dry_run:  # policy, value and reward model of one shape, as the plan assumes
    return real_models.dry_run(cfg, "ppo", mcfg, plan_models.Shapes(
        batch_size=cfg.batch_size // cfg.num_minibatches,
        num_microbatches=cfg.num_microbatches, prompt_len=cfg.max_prompt_len,
        max_new_tokens=cfg.max_new_tokens, rollout_prompts=cfg.batch_size,
        forward_chunk_rows=cfg.rollout_chunk_rows))
  mesh = lm.setup(cfg, sharded_eval=False)
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  if (cfg.batch_size // cfg.num_minibatches // cfg.num_microbatches) % dp:
    raise ValueError(f"a PPO microbatch (--batch_size / --num_minibatches / "
                     f"--num_microbatches) must be divisible by the data-parallel size {dp}")
  tok, data = prompt_sets.load(cfg, mcfg)
  g, policy_params, pol_shardings = real_models.trained_model(cfg, mesh, lm.init_model)
  rm_g, rm_params, _ = reward_files.init_scalar_model(cfg.reward_hf, cfg, mcfg, mesh, cfg.seed)
  v_g, v_params, v_shardings = real_models.with_adapters(cfg, *reward_files.init_scalar_model(
      cfg.value_hf or cfg.reward_hf, cfg, mcfg, mesh, cfg.seed), mesh)
  # The reference and the evaluation's value model stay; the train state donates its params.
  ref_params, eval_value = (real_models.reference_of(policy_params),
                            real_models.reference_of(v_params))
  params = {"policy": policy_params, "value": v_params}
  shardings = {"policy": pol_shardings, "value": v_shardings}
  sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, eos_id=tok.eos_id,
                            pad_id=tok.pad_id, temperature=cfg.temperature)
  stage = RolloutStage(g, sampling, data.prompt_len, value_graphdef=v_g, tokenizer=tok,
                       forward_chunk_rows=cfg.rollout_chunk_rows)
  scorer = scorers.Penalised(scorers.RewardModelScorer(rm_g, [rm_params]),
                             truncation_penalty=cfg.truncation_penalty)
  algorithm = ppo.PPO(stage, scorer, data.train, ref_params, cfg.batch_size, cfg.seed,
                      cfg.kl_coef, cfg.gae_gamma, cfg.gae_lambda,
                      ppo.AdaptiveKL(cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl else None)
  algorithm.progress_keys = ("score", "kl", "kl_coef")
  loss_fn = ppo.ppo_loss_fn(g, v_g, clip_eps=cfg.clip_eps, value_clip_eps=cfg.value_clip_eps,
                            vf_coef=cfg.vf_coef, entropy_coef=cfg.entropy_coef,
                            temperature=cfg.temperature)
  loop_cfg = rl_loop.LoopConfig(cfg.workdir, cfg.steps, epochs=cfg.ppo_epochs,
                                num_minibatches=cfg.num_minibatches, log_every=cfg.log_every,
                                eval_every=cfg.eval_every, save_every=cfg.save_every,
                                keep_checkpoints=cfg.keep_checkpoints,
                                **rl_loop.LoopConfig.faults(cfg))
  state, train_step, view = rl_loop.make_trainer_for(
      loss_fn, params, shardings, algorithm.batch_keys(), mesh,
      optim_cfg=lm.optim_config(cfg, loop_cfg.updates), num_microbatches=cfg.num_microbatches,
      seed=cfg.seed)
  evaluate = reward_eval(cfg, stage, scorer, data.test[:cfg.eval_prompts], ref_params,
                         eval_value)
  t0 = time.perf_counter()
  state, curve = rl_loop.run(loop_cfg, algorithm, state=state, train_step=train_step,
                             mesh=mesh, evaluate=lambda p: evaluate(p["policy"]),
                             config=config.to_dict(cfg), params_view=view)
  wall = {"ppo_s": time.perf_counter() - t0}
  trained = view(state.params)["policy"]
  checkpoint.save_params(os.path.join(cfg.workdir, lm.PARAMS_DIR), trained)
  real_models.export(cfg, g, trained)
  result = {"table": {"initial": curve[0], "ppo": curve[-1]}, "curve": curve, "wall": wall,
            "final_kl_coef": algorithm.kl_coef, "updates": cfg.updates,
            "data": {"train": len(data.train), "test": len(data.test),
                     "skipped": data.report.skipped, "too_long": data.too_long},
            "provenance": provenance.provenance()}
  write_json(os.path.join(cfg.workdir, "result.json"), result, indent=1)
  for row, m in result["table"].items():
    print(f"  {row:<8} reward {m['reward']:+.3f} +- {m['reward_se']:.3f}  KL {m['kl']:.3f}  "
          f"length {m['length']:.1f}")
  return result
