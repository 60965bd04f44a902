"""Best-of-n sampling against a learned reward on the gold world: the no-training baseline
of the overoptimisation picture (Gao et al. 2023).

    python -m experiments.best_of_n --flagfile=experiments/configs/best_of_n_tiny.flags

The run, its config and their documentation: rlhf_jax/runs/best_of_n.py.
"""
from experiments import cli
from rlhf_jax.runs import best_of_n

if __name__ == "__main__":
  cli.main(best_of_n.BestOfNConfig, best_of_n.run)
