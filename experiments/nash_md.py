"""Nash-MD-PG (Munos et al. 2024) on the intransitive world: the policy is trained towards
the MIXED Nash equilibrium of a cyclic preference that no scalar reward represents (how near
it gets is measured: exploitability and distance to the equilibrium over training).

    python -m experiments.nash_md --flagfile=experiments/configs/nash_md_tiny.flags

The run, its config and their documentation: rlhf_jax/runs/nash_md.py.
"""
from experiments import cli
from rlhf_jax.runs import nash_md

if __name__ == "__main__":
  cli.main(nash_md.NashMDConfig, nash_md.run)
