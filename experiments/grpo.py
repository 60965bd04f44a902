"""GRPO / Dr. GRPO / RLOO with a verifiable reward (RLVR) on the arithmetic world.

    python -m experiments.grpo --flagfile=experiments/configs/grpo_tiny.flags

The run, its config and their documentation: rlhf_jax/runs/grpo.py.
"""
from experiments import cli
from rlhf_jax.runs import grpo

if __name__ == "__main__":
  cli.main(grpo.GRPOConfig, grpo.run, multi_process=True)
