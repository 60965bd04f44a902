"""Online DPO on real prompts from a Hugging Face checkpoint, each round's pairs labelled by a
reward model from another; the gold world otherwise (online_dpo.py).

    python -m experiments.online_dpo --init_hf=out/sft --reward_hf=out/rm \\
        --prompt_files=data/hh/train.jsonl --prompt_format=hh_rlhf --max_prompt_len=256 \\
        --max_new_tokens=128 --seq_len=400 --rounds=10 --export_hf=out/online_dpo

File mode (--prompt_files set):
  policy     --init_hf (an SFT model); the DPO reference is that starting point, frozen;
             --lora_rank trains adapters only, the reference then the base view
             (pipeline/real_models.py)
  prompts    pipeline/prompt_sets.py: prompt files (the prompts of preference pairs too),
             rendered with the chat template; each round draws --prompts_per_round of the
             train split; held out: --eval_files or --test_fraction
  labeler    --reward_hf, a *ForSequenceClassification reward model (experiments.reward
             --export_hf writes one), scores both samples of a prompt and the higher is
             chosen (ties: the first), as the world's --labeler=reward_model does, on raw
             scores (no normalisation statistics exist for a model trained elsewhere); the
             gold world's raters (--labeler=raters) do not exist here
  pairs      each sample decoded and re-encoded with the tokenizer (rl/comparisons.py):
             [bos] + prompt + response (+ eos where the sampler emitted it) in --seq_len
  logged     per round: the reward of its samples, the chosen-minus-rejected margin, their
             words and truncated fraction, and the DPO metrics
  evaluation before training and after every round, PPO's file-mode evaluation
             (ppo_files.reward_eval): 4 temperature-1 samples per held-out prompt (fixed keys,
             --eval_prompts of them), the reward (+- se), KL to the reference per sequence
             (+- se), length and truncation
  export     --export_hf: the trained policy in the HF layout with the tokenizer files
             (with --lora_rank merged, or PEFT adapters: --export_lora)
Rounds, the losses (--loss dpo|cdpo|ipo), the step and the resume are the world mode's;
--matched_sft needs the world's SFT data and stays in world mode.
"""
import os
import time

import numpy as np

from rlhf_jax import provenance
from rlhf_jax.pipeline import config, lm, prompt_sets, real_models, reward_files
from rlhf_jax.rl import comparisons, loop as rl_loop, scorers
from rlhf_jax.rl.algorithms import online_dpo
from rlhf_jax.rl.rollout import RolloutStage
from rlhf_jax.runs import online_dpo as online_dpo_run, plots, ppo_files
from rlhf_jax.sampling import SamplingConfig
from rlhf_jax.train import checkpoint
from rlhf_jax.train.logging import write_json


def reward_labeler(rm: scorers.RewardModelScorer, cfg, tok):
  """label(samples, rng) -> (chosen_N, stats): the reward model's choice of each pair and
  what the log shows about the round's samples."""
  def label(samples: comparisons.Samples, rng):
    del rng  # the labeler is deterministic
    r_Nx2 = rm.score_samples(samples, seq_len=cfg.seq_len, batch_size=cfg.eval_batch_size,
                             tokenizer=tok)
    chosen = (r_Nx2[:, 1] > r_Nx2[:, 0]).astype(int)
    return chosen, {"sample_reward": float(r_Nx2.mean()),
                    "reward_margin": float(np.abs(r_Nx2[:, 1] - r_Nx2[:, 0]).mean()),
                    "sample_words": float(np.mean([len(y.split()) for ys in samples.responses
                                                   for y in ys])),
                    "truncated_frac": float(1.0 - samples.finished.mean())}
  return label


def run(cfg: online_dpo_run.OnlineDPOConfig) -> dict:
  """File mode when --prompt_files is set, else the gold world (online_dpo.run)."""
  if not cfg.file_mode:
    return online_dpo_run.run(cfg)
  cfg = cfg.effective()
  mcfg = real_models.model_config(cfg, lm.model_config)
  mesh = lm.setup(cfg, sharded_eval=False)
  tok, data = prompt_sets.load(cfg, mcfg)
  g, params, shardings = real_models.trained_model(cfg, mesh, lm.init_model)
  ref_params = real_models.reference_of(params)
  rm_g, rm_params, _ = reward_files.init_scalar_model(cfg.reward_hf, cfg, mcfg, mesh, cfg.seed)
  rm = scorers.RewardModelScorer(rm_g, [rm_params])

  def sample(params, prompts, key):
    return comparisons.sample_k(g, params, prompts, k=2, batch_size=cfg.eval_batch_size,
                                prompt_len=data.prompt_len, max_new_tokens=cfg.max_new_tokens,
                                temperature=cfg.sample_temperature, key=key, tokenizer=tok)
  ref_fn, loss_fn = online_dpo_run.dpo_parts(cfg, g, shardings, mesh)
  algorithm = online_dpo.OnlineDPO(
      sample, reward_labeler(rm, cfg, tok), ref_fn, ref_params, data.train,
      cfg.prompts_per_round, cfg.steps_per_round, cfg.batch_size, cfg.seq_len, cfg.seed, mesh,
      tokenizer=tok)
  algorithm.progress_keys = ("sample_reward", "reward_margin")
  loop_cfg = rl_loop.LoopConfig(cfg.workdir, cfg.rounds, keep_checkpoints=cfg.keep_checkpoints,
                                **rl_loop.LoopConfig.faults(cfg))
  state, train_step, view = rl_loop.make_trainer_for(
      loss_fn, params, shardings, online_dpo.BATCH_KEYS, mesh,
      optim_cfg=lm.optim_config(cfg, cfg.total_steps), num_microbatches=cfg.num_microbatches,
      seed=cfg.seed)
  sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, eos_id=tok.eos_id,
                            pad_id=tok.pad_id, temperature=1.0)
  stage = RolloutStage(g, sampling, data.prompt_len, tokenizer=tok)
  evaluate = ppo_files.reward_eval(cfg, stage, rm, data.test[:cfg.eval_prompts], ref_params,
                                   None)
  t0 = time.perf_counter()
  state, curve = rl_loop.run(loop_cfg, algorithm, state=state, train_step=train_step, mesh=mesh,
                             evaluate=evaluate, config=config.to_dict(cfg), params_view=view)
  wall = {"online_dpo_s": time.perf_counter() - t0}
  params = view(state.params)
  checkpoint.save_params(os.path.join(cfg.workdir, lm.PARAMS_DIR), params)
  real_models.export(cfg, g, params)
  result = {"table": {"initial": curve[0], "online_dpo": curve[-1]}, "curve": curve,
            "loss": cfg.loss, "optimizer_steps": cfg.total_steps, "wall": wall,
            "data": {"train": len(data.train), "test": len(data.test),
                     "skipped": data.report.skipped, "too_long": data.too_long},
            "provenance": provenance.provenance()}
  write_json(os.path.join(cfg.workdir, "result.json"), result, indent=1)
  plots.curve_with_se(curve, "iteration", "reward",
                      os.path.join(cfg.workdir, "online_dpo_reward.png"),
                      title=f"online {cfg.loss}, labeler {cfg.reward_hf}", xlabel="round",
                      ylabel="held-out reward (--reward_hf)",
                      baselines={"initial": curve[0]["reward"]})
  for row, m in result["table"].items():
    print(f"  {row:<10} reward {m['reward']:+.3f} +- {m['reward_se']:.3f}  KL {m['kl']:.3f} "
          f"+- {m['kl_se']:.3f}  length {m['length']:.1f}")
  return result
