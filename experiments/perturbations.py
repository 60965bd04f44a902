"""An experiment's results under seeds and float-rounding perturbations (data order, 8 fake
devices, one XLA thread, XLA fast math), each over its whole stage chain.

    python -m experiments.perturbations --flagfile=experiments/configs/perturb_sft_grpo_tiny.flags

The run, its variants and the report: rlhf_jax/runs/perturbations.py.
"""
from experiments import cli
from rlhf_jax.runs import perturbations

if __name__ == "__main__":
  cli.main(perturbations.PerturbationConfig, perturbations.run)
