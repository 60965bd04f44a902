"""Launchers that run one experiment command on every host of a TPU pod, a GKE cluster or a
SLURM GPU cluster (docs/launch.md):

    python -m launch.tpu_vm <create|copy|install|run|logs|delete> --name=... -- <command>
    python -m launch.gke <apply|logs|status|delete|xpk> --name=... -- <command>
    python -m launch.slurm --nodes=... -- <command>

Each takes `--dry_run`, which prints the exact commands (and generated files) and runs
nothing. The experiment itself starts JAX's multi-process runtime (jax.distributed); the
launchers only start the same command on every host, passing the coordinator flags where the
environment does not let JAX find its peers by itself.
"""
