"""Nash-MD-PG on real prompts from a Hugging Face checkpoint, judged by the Bradley-Terry
preference of a reward model from another; the intransitive world otherwise (nash_md.py).

    python -m experiments.nash_md --init_hf=out/sft --reward_hf=out/rm \\
        --prompt_files=data/hh/train.jsonl --prompt_format=hh_rlhf --max_prompt_len=256 \\
        --max_new_tokens=128 --seq_len=400 --group_size=4 --export_hf=out/nash_md

File mode (--prompt_files set):
  policy     --init_hf (an SFT model); mu, the reference of the KL term and of the opponent's
             geometric mixture, is that starting point, frozen; --lora_rank trains adapters
             only, mu then the base view (pipeline/real_models.py)
  prompts    pipeline/prompt_sets.py: prompt files (the prompts of preference pairs too),
             rendered with the chat template; held out: --eval_files or --test_fraction
  judge      P(y > y' | x) = sigmoid(r(x, y) - r(x, y')) of --reward_hf, a
             *ForSequenceClassification reward model (experiments.reward --export_hf writes
             one): the preference its Bradley-Terry training fits (rl/scorers.py:
             RewardModelJudge; texts re-encoded with the tokenizer in --seq_len, closed by
             eos as in training). A BT judge is transitive: the unregularised game's
             equilibrium is the reward's maximiser, and --nash_tau regularises it towards mu
             (Munos et al.'s regularised equilibrium, not RLHF's KL-regularised optimum)
  evaluation before training and every --eval_every iterations, --eval_samples samples per
             held-out prompt (--temperature, fixed keys, --eval_prompts of them): the reward
             (+- se), the judge's preference over the reference's samples of the same prompts
             and keys, mean sigmoid(r(y) - r(y_ref)) (+- se; 0.5 at the start), KL to the
             reference per sequence (+- se), length and truncation
  export     --export_hf: the trained policy in the HF layout with the tokenizer files
             (with --lora_rank merged, or PEFT adapters: --export_lora)
The opponents, the loss, --group_size and --baseline are the world mode's.
"""
import os
import time

import jax
import numpy as np

from rlhf_jax import provenance
from rlhf_jax.pipeline import config, lm, prompt_sets, real_models, reward_files
from rlhf_jax.rl import loop as rl_loop, scorers
from rlhf_jax.rl.algorithms import nash_md
from rlhf_jax.rl.evaluation import mean_se, sample_heldout
from rlhf_jax.rl.rollout import RolloutStage
from rlhf_jax.runs import nash_md as nash_md_run
from rlhf_jax.sampling import SamplingConfig
from rlhf_jax.train import checkpoint
from rlhf_jax.train.logging import write_json


def judged_eval(cfg, stage: RolloutStage, scorer, prompts, ref_params):
  """evaluate(params) -> the held-out row; the reference's rewards on the same rows (its
  samples under the same keys) are computed once, here, and its row is `initial`."""
  key = jax.random.key(cfg.seed + 1)
  ps = list(prompts) * cfg.eval_samples

  def rewards_row(params):
    held = sample_heldout(stage, params, ref_params, None, ps, batch_size=cfg.batch_size,
                          key=key, scorer=scorer)
    exp = held.experience
    row = dict(zip(("reward", "reward_se"), mean_se(exp.rewards_B)))
    row.update(zip(("kl", "kl_se"), mean_se(held.kl_B)))
    row.update(length=float(np.asarray(exp.rollout.mask_BxT).sum(1).mean()),
               truncated_frac=float(np.asarray(exp.rollout.truncated_B).mean()))
    return row, np.asarray(exp.rewards_B, np.float64)

  initial, ref_rewards = lm.timed("eval reference", rewards_row, ref_params)

  def evaluate(params) -> dict:
    row, rewards = rewards_row(params)
    wins = 1.0 / (1.0 + np.exp(ref_rewards - rewards))
    row.update(zip(("preference_vs_ref", "preference_vs_ref_se"), mean_se(wins)))
    return row

  initial.update(preference_vs_ref=0.5, preference_vs_ref_se=0.0)
  return evaluate, initial


def run(cfg: nash_md_run.NashMDConfig) -> dict:
  """File mode when --prompt_files is set, else the intransitive world (nash_md.run)."""
  if not cfg.file_mode:
    return nash_md_run.run(cfg)
  cfg = cfg.effective()
  mcfg = real_models.model_config(cfg, lm.model_config)
  mesh = lm.setup(cfg, sharded_eval=False)
  data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
  if (cfg.rows // cfg.num_minibatches // cfg.num_microbatches) % data_parallel:
    raise ValueError(f"a Nash-MD microbatch (--batch_size * --group_size / --num_minibatches / "
                     f"--num_microbatches) must be divisible by the data-parallel size "
                     f"{data_parallel}")
  tok, data = prompt_sets.load(cfg, mcfg)
  g, params, shardings = real_models.trained_model(cfg, mesh, lm.init_model)
  ref_params = real_models.reference_of(params)
  rm_g, rm_params, _ = reward_files.init_scalar_model(cfg.reward_hf, cfg, mcfg, mesh, cfg.seed)
  judge = scorers.RewardModelJudge(rm_g, rm_params, tok, cfg.seq_len, cfg.eval_batch_size)
  sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, eos_id=tok.eos_id,
                            pad_id=tok.pad_id, temperature=cfg.temperature)
  stage = RolloutStage(g, sampling, data.prompt_len, tokenizer=tok)
  algorithm = nash_md.NashMD(stage, judge, data.train, ref_params, cfg.batch_size,
                             cfg.group_size, cfg.seed, cfg.mixture_coef, cfg.baseline)
  loss_fn = nash_md.nash_md_loss_fn(g, nash_tau=cfg.nash_tau,
                                    kl_fn=nash_md_run.KL_ESTIMATORS[cfg.kl_estimator],
                                    temperature=cfg.temperature)
  loop_cfg = rl_loop.LoopConfig(cfg.workdir, cfg.steps, num_minibatches=cfg.num_minibatches,
                                log_every=cfg.log_every, eval_every=cfg.eval_every,
                                save_every=cfg.save_every, keep_checkpoints=cfg.keep_checkpoints,
                                **rl_loop.LoopConfig.faults(cfg))
  state, train_step, view = rl_loop.make_trainer_for(
      loss_fn, params, shardings, nash_md.BATCH_KEYS, mesh,
      optim_cfg=lm.optim_config(cfg, loop_cfg.updates), num_microbatches=cfg.num_microbatches,
      seed=cfg.seed)
  evaluate, initial = judged_eval(cfg, stage, scorers.RewardModelScorer(rm_g, [rm_params]),
                                  data.test[:cfg.eval_prompts], ref_params)
  t0 = time.perf_counter()
  state, curve = rl_loop.run(loop_cfg, algorithm, state=state, train_step=train_step,
                             mesh=mesh, evaluate=evaluate, config=config.to_dict(cfg),
                             initial_point=initial, params_view=view)
  wall = {"nash_md_s": time.perf_counter() - t0}
  params = view(state.params)
  checkpoint.save_params(os.path.join(cfg.workdir, lm.PARAMS_DIR), params)
  real_models.export(cfg, g, params)
  result = {"table": {"initial": curve[0], "nash_md": curve[-1]}, "curve": curve,
            "updates": cfg.updates, "wall": wall,
            "data": {"train": len(data.train), "test": len(data.test),
                     "skipped": data.report.skipped, "too_long": data.too_long},
            "provenance": provenance.provenance()}
  write_json(os.path.join(cfg.workdir, "result.json"), result, indent=1)
  for row, m in result["table"].items():
    print(f"  {row:<8} reward {m['reward']:+.3f} +- {m['reward_se']:.3f}  preference vs the "
          f"reference {m['preference_vs_ref']:.3f} +- {m['preference_vs_ref_se']:.3f}  KL "
          f"{m['kl']:.3f}  length {m['length']:.1f}")
  return result
