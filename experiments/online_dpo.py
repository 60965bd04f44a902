"""Online (iterative) DPO on the gold world: DPO on pairs of the CURRENT policy's samples.

    python -m experiments.online_dpo --flagfile=experiments/configs/online_dpo_tiny.flags

The run, its config and their documentation: rlhf_jax/runs/online_dpo.py.
"""
from experiments import cli
from rlhf_jax.runs import online_dpo

if __name__ == "__main__":
  cli.main(online_dpo.OnlineDPOConfig, online_dpo.run)
