"""Supervised fine-tuning of the pretrained base on a small curated set (LIMA-style).

    python -m experiments.sft --flagfile=experiments/configs/sft_tiny.flags

Builds the pretraining stage its --pretrain_flagfile names (cached under --stage_root) unless
cached, then fine-tunes in --workdir and prints held-out metrics before and after. The stage
itself: rlhf_jax/pipeline/sft.py; the chain: rlhf_jax/pipeline/chain.py. With --data_files it
fine-tunes --init_hf (a Hugging Face checkpoint) on local files instead:
rlhf_jax/pipeline/sft_files.py.
"""
from experiments import cli
from rlhf_jax.pipeline import chain, sft, sft_files


def run(cfg: sft.SFTConfig) -> dict:
  return sft_files.run(cfg) if cfg.file_mode else chain.run_stage("sft", cfg)


if __name__ == "__main__":
  cli.main(sft.SFTConfig, run, multi_process=True)
