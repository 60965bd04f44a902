"""PPO from a learned reward (InstructGPT stage 3) on a preference world: THE MAIN JOB (gold);
or on real prompt files with policy, value and reward models from Hugging Face checkpoints.

    python -m experiments.ppo --flagfile=experiments/configs/ppo_tiny.flags

The runs, their config and their documentation: rlhf_jax/runs/ppo.py (world) and
rlhf_jax/runs/ppo_files.py (--prompt_files).
"""
from experiments import cli
from rlhf_jax.runs import ppo, ppo_files

if __name__ == "__main__":
  cli.main(ppo.PPOConfig, ppo_files.run, multi_process=True)
