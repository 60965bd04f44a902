"""Sycophancy amplification (Sharma et al. 2023) on the sycophancy world, over several seeds.

    python -m experiments.sycophancy --flagfile=experiments/configs/sycophancy.flags

The run, its config and their documentation: rlhf_jax/runs/sycophancy.py.
"""
from experiments import cli
from rlhf_jax.runs import sycophancy

if __name__ == "__main__":
  cli.main(sycophancy.SycophancyConfig, sycophancy.run)
