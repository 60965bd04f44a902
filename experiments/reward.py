"""Reward models from simulated raters' rankings of SFT samples: a Bradley-Terry reward model
or an ensemble (--reward_model=bt), or a pairwise preference model (--reward_model=pairwise).

    python -m experiments.reward --flagfile=experiments/configs/reward_gold_tiny.flags
    python -m experiments.reward --flagfile=experiments/configs/reward_pairwise_intransitive_tiny.flags

Builds the SFT stage its --sft_flagfile names (and that stage's pretraining) unless cached,
then trains in --workdir and prints held-out accuracy against the raters and the truth. The
stages: rlhf_jax/pipeline/reward.py and pairwise.py; the chain: rlhf_jax/pipeline/chain.py.
With --data_files it trains a reward model from --init_hf (a Hugging Face checkpoint) on local
preference files (HH-RLHF, UltraFeedback, pairs, K-way rankings) instead:
rlhf_jax/pipeline/reward_files.py.
"""
from experiments import cli
from rlhf_jax.pipeline import chain, reward, reward_files


def run(cfg: reward.RewardConfig) -> dict:
  return reward_files.run(cfg) if cfg.file_mode else chain.run_stage("reward", cfg)


if __name__ == "__main__":
  cli.main(reward.RewardConfig, run, multi_process=True)
