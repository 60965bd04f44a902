"""rlhf_jax: RLHF as pure JAX functions compiled into sharded training steps."""
