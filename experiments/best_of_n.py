"""Best-of-n sampling against a learned reward: on the gold world, the no-training baseline of
the overoptimisation picture (Gao et al. 2023); or on real prompt files, a Hugging Face
policy's samples ranked by a reward model, with --prompt_files.

    python -m experiments.best_of_n --flagfile=experiments/configs/best_of_n_tiny.flags

The runs, their config and their documentation: rlhf_jax/runs/best_of_n.py (world) and
rlhf_jax/runs/best_of_n_files.py (--prompt_files).
"""
from experiments import cli
from rlhf_jax.runs import best_of_n, best_of_n_files

if __name__ == "__main__":
  cli.main(best_of_n.BestOfNConfig, best_of_n_files.run)
