"""PPO from a learned reward (InstructGPT stage 3) on a preference world: THE MAIN JOB (gold).

    python -m experiments.ppo --flagfile=experiments/configs/ppo_tiny.flags

The run, its config and their documentation: rlhf_jax/runs/ppo.py.
"""
from experiments import cli
from rlhf_jax.runs import ppo

if __name__ == "__main__":
  cli.main(ppo.PPOConfig, ppo.run, multi_process=True)
