"""The project's benchmark (docs/benchmarks.md): `python -m rlhf_jax.bench` times the
workloads researchers run (DPO, SFT, sampling, a GRPO iteration) with their compile times and
memory; `python -m rlhf_jax.bench.peers` runs the same workloads in TRL, a plain PyTorch loop
and tunix, side by side. common.py: presets, timing, memory; train_workloads.py,
rl_workloads.py: the workloads; suite.py: the report; peer_scripts/: the peers' side."""
