"""Reward-model overoptimisation (Gao et al. 2023) on the gold world, over several seeds.

    python -m experiments.overoptimisation --flagfile=experiments/configs/overoptimisation.flags

The run, its config and their documentation: rlhf_jax/runs/overoptimisation.py.
"""
from experiments import cli
from rlhf_jax.runs import overoptimisation

if __name__ == "__main__":
  cli.main(overoptimisation.OveroptimisationConfig, overoptimisation.run)
