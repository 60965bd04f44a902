"""Model shapes: one frozen dataclass and the named presets.

The fields mirror a Hugging Face Llama/Qwen2 config.json so real checkpoints map onto them
one to one (num_attention_heads -> n_heads, num_key_value_heads -> n_kv_heads, ...).
"""
import dataclasses

import jax.numpy as jnp

# The projections low-rank adapters can target, by their Hugging Face / PEFT module names
# (target_modules in a PEFT adapter_config.json).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Rematerialisation (models/layer_stack.py): "none" keeps every activation backprop needs;
# "block" keeps only each block's input and recomputes the block in the backward pass;
# "attention" recomputes only the attention scores and probabilities (the T x T arrays).
REMAT_POLICIES = ("none", "block", "attention")
# Attention (models/attention.py): "einsum" writes the scores out; "fused" calls
# jax.nn.dot_product_attention (cuDNN's flash kernel on GPU where it applies, XLA's otherwise);
# "auto" is fused on accelerators and einsum on CPU.
ATTENTION_IMPLS = ("auto", "einsum", "fused")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama 3.1+ "llama3" rotary frequency scaling (HF rope_scaling with rope_type=llama3)."""
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A Llama-family decoder. dtype is the compute dtype; param_dtype the storage dtype."""
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  d_ff: int
  head_dim: int | None = None  # None: d_model // n_heads
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  norm_eps: float = 1e-5
  qkv_bias: bool = False  # Qwen2 has biases on q, k and v
  tie_embeddings: bool = False
  max_seq_len: int = 2048
  dtype: str = "float32"
  param_dtype: str = "float32"
  init_std: float = 0.02
  # LoRA (rlhf_jax/models/lora.py): rank 0 is the plain model, parameter for parameter; rank
  # r > 0 adds W + (lora_alpha / r) * A @ B on each of lora_targets (names in LORA_TARGETS).
  lora_rank: int = 0
  lora_alpha: float = 8.0
  lora_targets: tuple[str, ...] = LORA_TARGETS
  # How the same function is computed on an accelerator (docs/performance.md); none of these
  # changes a parameter's value, only the layout of the layer stack (scan_layers).
  remat: str = "none"  # REMAT_POLICIES: what the backward recomputes instead of keeping
  scan_layers: bool = False  # layers stored stacked and run under one lax.scan
  attention: str = "auto"  # ATTENTION_IMPLS: how attention scores are computed

  def __post_init__(self):
    if self.n_heads % self.n_kv_heads:
      raise ValueError(
          f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads} "
          "(grouped-query attention shares each kv head across n_heads/n_kv_heads query heads)")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in ("float32", "bfloat16"):
        raise ValueError(f"{name} must be 'float32' or 'bfloat16', got {getattr(self, name)!r}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat must be one of {REMAT_POLICIES} (--remat), got {self.remat!r}")
    if self.attention not in ATTENTION_IMPLS:
      raise ValueError(f"attention must be one of {ATTENTION_IMPLS} (--attention), got "
                       f"{self.attention!r}")
    if self.scan_layers and self.lora_rank:
      raise ValueError("LoRA adapters (lora_rank > 0) are not supported with scan_layers yet: "
                       "their export and PEFT files address layers one by one; drop "
                       "--scan_layers for a LoRA run")
    if self.head_dim is None and self.d_model % self.n_heads:
      raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                       "set head_dim explicitly")
    # A list would make the config unhashable, and modules keep it as static graph data.
    object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
    if self.lora_rank < 0:
      raise ValueError(f"lora_rank must be >= 0 (0: no adapters), got {self.lora_rank}")
    unknown = sorted(set(self.lora_targets) - set(LORA_TARGETS))
    if unknown or (self.lora_rank and not self.lora_targets):
      raise ValueError(f"lora_targets must be a nonempty subset of {LORA_TARGETS}, got "
                       f"{self.lora_targets}")

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def storage_dtype(self):
    return jnp.dtype(self.param_dtype)

  def num_params(self, *, with_lm_head: bool = True) -> int:
    h, d = self.dim_per_head, self.d_model
    attn = d * h * (2 * self.n_heads + 2 * self.n_kv_heads)
    if self.qkv_bias:
      attn += h * (self.n_heads + 2 * self.n_kv_heads)
    layer = attn + 3 * d * self.d_ff + 2 * d
    head = 0 if (self.tie_embeddings or not with_lm_head) else d * self.vocab_size
    return self.vocab_size * d + self.n_layers * layer + d + head

  @property
  def lora_scale(self) -> float:
    """alpha / r, PEFT's scaling (not rsLoRA's alpha / sqrt(r))."""
    return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

  def lora_targeted(self, target: str) -> bool:
    return self.lora_rank > 0 and target in self.lora_targets

  def num_lora_params(self) -> int:
    """Adapter parameters: r * (in + out features) per targeted projection and layer."""
    d, f, q, kv = self.d_model, self.d_ff, self.n_heads * self.dim_per_head, (
        self.n_kv_heads * self.dim_per_head)
    width = {"q_proj": d + q, "k_proj": d + kv, "v_proj": d + kv, "o_proj": q + d,
             "gate_proj": d + f, "up_proj": d + f, "down_proj": f + d}
    return self.n_layers * self.lora_rank * sum(width[t] for t in self.lora_targets)


# nano/tiny run the CPU tests and embedded worlds; small is the CPU benchmark shape (vocab 264 = 259 byte-tokenizer ids rounded
# up to a multiple of 8). The large presets are shapes for accelerators: tests only ever
# eval_shape them.
PRESETS: dict[str, ModelConfig] = {
    "nano": ModelConfig(vocab_size=264, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                        d_ff=192, max_seq_len=256),
    "tiny": ModelConfig(vocab_size=264, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2,
                        d_ff=384, max_seq_len=512),
    # 16M params: the shape of the CPU benchmarks that compare rlhf_jax with TRL, a plain
    # PyTorch training loop and tunix (Llama-shaped, random weights).
    "small": ModelConfig(vocab_size=4096, d_model=512, n_layers=4, n_heads=8, n_kv_heads=4,
                         d_ff=1408, max_seq_len=1024),
    "125m": ModelConfig(vocab_size=32000, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12,
                        d_ff=2048, max_seq_len=2048, dtype="bfloat16"),
    "1b": ModelConfig(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                      d_ff=8192, rope_theta=500000.0, rope_scaling=RopeScaling(factor=32.0),
                      tie_embeddings=True, max_seq_len=8192, dtype="bfloat16"),
    # Qwen2.5-1.5B(-Instruct): biases on q/k/v, tied embeddings.
    "1.5b": ModelConfig(vocab_size=151936, d_model=1536, n_layers=28, n_heads=12, n_kv_heads=2,
                        d_ff=8960, rope_theta=1000000.0, norm_eps=1e-6, qkv_bias=True,
                        tie_embeddings=True, max_seq_len=32768, dtype="bfloat16"),
    "8b": ModelConfig(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                      d_ff=14336, rope_theta=500000.0, rope_scaling=RopeScaling(),
                      max_seq_len=8192, dtype="bfloat16"),
    "70b": ModelConfig(vocab_size=128256, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                       d_ff=28672, rope_theta=500000.0, rope_scaling=RopeScaling(),
                       max_seq_len=8192, dtype="bfloat16"),
}


def preset(name: str, **overrides) -> ModelConfig:
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
  return dataclasses.replace(PRESETS[name], **overrides)
