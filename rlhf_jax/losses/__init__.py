"""Pure-jnp RLHF objectives: arrays in, (loss, metrics) out. No model, no config objects."""
