"""Online (iterative) DPO: DPO on pairs of the CURRENT policy's samples, on the gold world, or on
real prompt files from a Hugging Face checkpoint labelled by a reward model with --prompt_files.

    python -m experiments.online_dpo --flagfile=experiments/configs/online_dpo_tiny.flags

The runs, their config and their documentation: rlhf_jax/runs/online_dpo.py (world) and
rlhf_jax/runs/online_dpo_files.py (--prompt_files).
"""
from experiments import cli
from rlhf_jax.runs import online_dpo, online_dpo_files

if __name__ == "__main__":
  cli.main(online_dpo.OnlineDPOConfig, online_dpo_files.run)
