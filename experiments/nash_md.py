"""Nash-MD-PG (Munos et al. 2024) on the intransitive world: the policy is trained towards
the MIXED Nash equilibrium of a cyclic preference that no scalar reward represents (how near
it gets is measured: exploitability and distance to the equilibrium over training); or on real
prompt files from a Hugging Face checkpoint, judged by a reward model, with --prompt_files.

    python -m experiments.nash_md --flagfile=experiments/configs/nash_md_tiny.flags

The runs, their config and their documentation: rlhf_jax/runs/nash_md.py (world) and
rlhf_jax/runs/nash_md_files.py (--prompt_files).
"""
from experiments import cli
from rlhf_jax.runs import nash_md, nash_md_files

if __name__ == "__main__":
  cli.main(nash_md.NashMDConfig, nash_md_files.run)
