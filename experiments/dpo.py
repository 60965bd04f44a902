"""DPO / cDPO / IPO on preference pairs from local files, from a real or a random model; and
DPO / cDPO / IPO / KTO on rater-labelled pairs of SFT samples on a preference world.

    python -m experiments.dpo --flagfile=experiments/configs/dpo_tiny.flags
    python -m experiments.dpo --flagfile=experiments/configs/dpo_llama3_1b_hh_v5e8.flags --dry_run
    python -m experiments.dpo --flagfile=experiments/configs/dpo_gold_tiny.flags

The run, its config and their documentation: rlhf_jax/runs/dpo_files.py.
"""
from experiments import cli
from rlhf_jax.runs import dpo, dpo_files

if __name__ == "__main__":
  cli.main(dpo.DPOConfig, dpo_files.run, multi_process=True)
