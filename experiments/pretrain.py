"""Pretrain a base model on an embedded world's corpus (arithmetic: with systematic errors).

    python -m experiments.pretrain --flagfile=experiments/configs/pretrain_tiny.flags

Writes <workdir>/{config.json, metrics.jsonl, tb/, checkpoints/, params/, result.json} and
prints the base model's held-out metrics. The stage itself: rlhf_jax/pipeline/pretrain.py.
"""
from experiments import cli
from rlhf_jax.pipeline import chain, pretrain

if __name__ == "__main__":
  cli.main(pretrain.PretrainConfig, lambda cfg: chain.run_stage("pretrain", cfg),
           multi_process=True)
