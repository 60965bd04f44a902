"""GRPO against SFT and matched-compute SFT on the arithmetic world, over several seeds.

    python -m experiments.grpo_sweep --flagfile=... (defaults: grpo_tiny.flags, seeds 0,1,2)

The run, its config and their documentation: rlhf_jax/runs/grpo_sweep.py.
"""
from experiments import cli
from rlhf_jax.runs import grpo_sweep

if __name__ == "__main__":
  cli.main(grpo_sweep.GRPOSweepConfig, grpo_sweep.run)
