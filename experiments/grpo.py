"""GRPO / GSPO / RLOO / REINFORCE++ with verifiable rewards: on the arithmetic world, or on
real prompt files (GSM8K, MATH) from a Hugging Face checkpoint with --prompt_files.

    python -m experiments.grpo --flagfile=experiments/configs/grpo_tiny.flags

The runs, their config and their documentation: rlhf_jax/runs/grpo.py (world) and
rlhf_jax/runs/grpo_files.py (files).
"""
from experiments import cli
from rlhf_jax.runs import grpo, grpo_files

if __name__ == "__main__":
  cli.main(grpo.GRPOConfig, grpo_files.run, multi_process=True)
