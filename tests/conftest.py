"""Test session setup: 8 fake CPU devices and a persistent compilation cache.

The fake device count is fixed when the backend starts, so it is set here, once, before
anything imports jax. Tests that want an unsharded baseline build a 1-device sub-mesh.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

from rlhf_jax import runtime  # noqa: E402

runtime.enable_compilation_cache()
