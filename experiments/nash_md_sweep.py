"""Nash-MD-PG against a pairwise preference model vs PPO against a Bradley-Terry reward
model on the intransitive world, over several seeds (Munos et al. 2024's claim, measured).

    python -m experiments.nash_md_sweep --flagfile=experiments/configs/nash_md_sweep.flags

The run, its config and their documentation: rlhf_jax/runs/nash_md_sweep.py.
"""
from experiments import cli
from rlhf_jax.runs import nash_md_sweep

if __name__ == "__main__":
  cli.main(nash_md_sweep.NashMDSweepConfig, nash_md_sweep.run)
