"""rlhf_jax.memory: every term against a hand computation on the nano preset, and sharding
dividing exactly the terms it should."""
import dataclasses

import pytest

from rlhf_jax import memory
from rlhf_jax.models.config import preset

NANO = preset("nano")  # V=264, D=64, L=2, N=4, KV=2, F=192, head_dim 16, untied, f32
# embed V*D + per layer (attn D*16*(2*4+2*2) + MLP 3*D*F + 2 norms D) + final norm + lm_head
NUMEL = 264 * 64 + 2 * (64 * 16 * 12 + 3 * 64 * 192 + 2 * 64) + 64 + 64 * 264
NORMS = 2 * 2 * 64 + 64  # replicated under every mesh


def test_unsharded_terms_by_hand():
  assert NANO.num_params() == NUMEL
  b, t = 6, 10
  est = memory.estimate(NANO, {}, batch_size=b, seq_len=t, reference_params=True,
                        other_model_params=1000, sample_batch=3, sample_len=20)
  # L + 1 = 3 layers of, per token, 4 bytes x (4 D + 2 N H + 2 K H + 4 F) and N t (2 x 4 + 1)
  # attention bytes; then f32 logits and log-softmax
  act = 3 * b * t * (4 * (4 * 64 + 2 * 4 * 16 + 2 * 2 * 16 + 4 * 192) + 4 * t * 9)
  act += b * t * 264 * 4 * 2
  assert est == {
      "params": 4 * NUMEL, "optimizer": 8 * NUMEL, "gradients": 4 * NUMEL,
      "reference": 4 * NUMEL, "other_models": 4 * 1000, "activations": act, "gathered": 0,
      "kv_cache": 2 * 2 * 3 * 20 * 2 * 16 * 4,
      "total": 4 * NUMEL * 5 + 4000 + act + 2 * 2 * 3 * 20 * 2 * 16 * 4}
  assert memory.estimate(NANO, {}, batch_size=b, seq_len=t)["reference"] == 0


def test_dtypes():
  bf16 = dataclasses.replace(NANO, param_dtype="bfloat16", dtype="bfloat16")
  est = memory.estimate(bf16, {}, batch_size=2, seq_len=4)
  assert est["params"] == 2 * NUMEL and est["optimizer"] == 8 * NUMEL  # Adam stays f32
  f32 = memory.estimate(NANO, {}, batch_size=2, seq_len=4)
  assert est["activations"] < f32["activations"]


def test_sharding_divides_the_sharded_terms():
  one = memory.estimate(NANO, {}, batch_size=8, seq_len=10, reference_params=True,
                        sample_batch=8, sample_len=10)
  fsdp = memory.estimate(NANO, {"fsdp": 4}, batch_size=8, seq_len=10, reference_params=True,
                         sample_batch=8, sample_len=10)
  per_device = (NUMEL - NORMS) // 4 + NORMS  # norms stay replicated
  assert memory.sharded_numel(NANO, {"fsdp": 4}) == per_device
  for term, bytes_per in (("params", 4), ("optimizer", 8), ("gradients", 4), ("reference", 4)):
    assert fsdp[term] == bytes_per * per_device
  assert fsdp["activations"] * 4 == one["activations"]  # batch over data*fsdp
  assert fsdp["kv_cache"] * 4 == one["kv_cache"]
  tensor = memory.estimate(NANO, {"tensor": 2}, batch_size=8, seq_len=10, sample_batch=8,
                           sample_len=10)
  assert tensor["kv_cache"] * 2 == one["kv_cache"]  # kv heads over tensor
  assert tensor["activations"] < one["activations"]  # attention heads and vocab split
  assert memory.estimate(NANO, {}, batch_size=8, seq_len=10, num_microbatches=4)[
      "activations"] * 4 == one["activations"]


def test_forward_scalar_head_microbatch_and_fsdp_terms():
  fwd = memory.estimate(NANO, {}, batch_size=2, seq_len=8, train=False)
  assert fwd["optimizer"] == fwd["gradients"] == 0
  # per token, the widest of: logits 264 x 4 x 2 = 2112 bytes, the MLP 4 (D + 2 F) = 1792,
  # the attention 4 (D + N H + 2 K H) + N t 9 = 1056
  assert fwd["activations"] == 2 * 8 * 2112
  rm = memory.estimate(NANO, {}, batch_size=2, seq_len=8, train=False, scalar_head=True)
  assert rm["params"] == 4 * (NUMEL - 64 * 264 + 64 + 1)  # no LM head; head_w (D) and head_b
  assert rm["activations"] == 2 * 8 * 1792  # no logits: the MLP is the widest
  one = memory.estimate(NANO, {}, batch_size=8, seq_len=8)
  two = memory.estimate(NANO, {}, batch_size=8, seq_len=8, num_microbatches=2)
  assert one["gradients"] == 4 * NUMEL and two["gradients"] == 2 * 4 * NUMEL
  assert one["gathered"] == 0
  # under fsdp a device holds one all-gathered copy of the weights (compute dtype), still
  # split over tensor
  assert memory.estimate(NANO, {"fsdp": 4}, batch_size=8, seq_len=8)["gathered"] == 4 * NUMEL
  assert memory.estimate(NANO, {"fsdp": 2, "tensor": 2}, batch_size=8, seq_len=8)[
      "gathered"] == 4 * memory.sharded_numel(NANO, {"tensor": 2})


def test_table_lists_every_term():
  est = memory.estimate(preset("1b"), {"fsdp": 8}, batch_size=16, seq_len=1024)
  table = memory.format_table(est)
  for term in (*memory.TERMS, "total"):
    assert term in table
  assert est["total"] == pytest.approx(sum(v for k, v in est.items() if k != "total"))


def test_lora_terms_by_hand():
  """Adapters (float32) trained, base frozen: optimizer and gradients cover the adapters
  alone, the reference is the base view (no copy), and each adapter keeps x @ A."""
  cfg = dataclasses.replace(NANO, lora_rank=2)
  # r * (in + out) per projection and layer: q, o 64+64; k, v 64+32; gate, up, down 64+192
  adapters = 2 * 2 * (128 + 96 + 96 + 128 + 3 * 256)
  b, t = 6, 10
  est = memory.estimate(cfg, {}, batch_size=b, seq_len=t, reference_params=True)
  full = memory.estimate(NANO, {}, batch_size=b, seq_len=t, reference_params=True)
  assert est["params"] == 4 * NUMEL + 4 * adapters
  assert est["optimizer"] == 8 * adapters and est["gradients"] == 4 * adapters
  assert est["reference"] == 0
  # L + 1 = 3 layers keep, per token, r = 2 values (4 bytes) for each of the 7 adapters
  assert est["activations"] == full["activations"] + 3 * b * t * 7 * 2 * 4
  bf16 = dataclasses.replace(cfg, param_dtype="bfloat16")
  assert memory.estimate(bf16, {}, batch_size=b, seq_len=t)["params"] == (
      2 * NUMEL + 4 * adapters)  # adapters stay float32
  assert memory.sharded_numel(cfg, {}, part="adapters") == adapters
  assert memory.sharded_numel(cfg, {"fsdp": 4}, part="base") == memory.sharded_numel(
      NANO, {"fsdp": 4})


def test_lora_saves_memory_on_1b():
  mesh, shape = {"fsdp": 8}, dict(batch_size=16, seq_len=1024, reference_params=True)
  full = memory.estimate(preset("1b"), mesh, **shape)
  adapted = memory.estimate(preset("1b", lora_rank=16, lora_alpha=32.0), mesh, **shape)
  terms = ("params", "optimizer", "gradients", "reference")
  state = {name: sum(e[k] for k in terms) for name, e in (("full", full), ("lora", adapted))}
  assert state["lora"] < state["full"] / 4  # 0.70 vs 2.88 GiB per device
  assert adapted["total"] < full["total"] - 2 * 2**30
  assert adapted["params"] > full["params"]  # the base is all still there
