"""Hugging Face interop: config.json <-> ModelConfig and the tensor-name/layout table.

Supported architectures (config.json "architectures"[0]):
  LlamaForCausalLM, Qwen2ForCausalLM                      -> Transformer       (kind="lm")
  LlamaForSequenceClassification, Qwen2ForSequenceClassification (num_labels=1)
                                                          -> ScalarHeadModel   (kind="scalar")
Llama 3.1+ rope scaling (rope_type "llama3") and plain RoPE ("default") import; other rope
types (linear, dynamic, yarn, longrope), Llama attention_bias/mlp_bias (biases on o_proj and
the MLP), Qwen2 sliding-window attention and non-SiLU activations are refused with a message.
Both config dialects are read: transformers<5 (torch_dtype, rope_theta, rope_scaling) and
transformers>=5 (dtype, rope_parameters); exports write both.

Reward heads: HF's score is `Linear(D, num_labels, bias=False)`, so importing one sets our
head_b to 0, and exporting a ScalarHeadModel refuses a nonzero head_b (HF has nowhere to put
it) unless the caller explicitly drops it.

The loader lives in hf_import (load_hf_model), the writer in hf_export (save_hf_model); both
are re-exported here.
"""
import dataclasses
import math
import pathlib

from rlhf_jax.data.local_files import read_json_object
from rlhf_jax.models.config import ModelConfig, RopeScaling

ARCHITECTURES = {  # HF class -> (model_type, kind)
    "LlamaForCausalLM": ("llama", "lm"),
    "Qwen2ForCausalLM": ("qwen2", "lm"),
    "LlamaForSequenceClassification": ("llama", "scalar"),
    "Qwen2ForSequenceClassification": ("qwen2", "scalar"),
}
# Values transformers' LlamaConfig/Qwen2Config use when a key is absent from config.json.
HF_DEFAULTS = {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
               "max_position_embeddings": 2048, "hidden_act": "silu"}
DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float32"}  # ckpt -> ours


def read_hf_config(path) -> dict:
  """config.json of a model directory as a dict, checked now (config_from_hf's every check,
  the error naming the file) so no later use of it fails on a bad value."""
  file = pathlib.Path(path) / "config.json"
  if not file.exists():
    raise FileNotFoundError(f"{file} not found: a Hugging Face model directory needs config.json")
  config = read_json_object(file)
  try:
    config_from_hf(config)
  except ValueError as e:
    raise ValueError(f"{file}: {e}") from None
  return config


def architecture(hf: dict) -> tuple[str, str, str]:
  """(HF class name, model_type, kind) of a config, or a clear error if unsupported."""
  archs = hf.get("architectures") or []
  if (not isinstance(archs, list) or len(archs) != 1 or not isinstance(archs[0], str)
      or archs[0] not in ARCHITECTURES):
    raise ValueError(f"unsupported architecture {archs} (model_type={hf.get('model_type')!r}); "
                     f"rlhf_jax imports one of {sorted(ARCHITECTURES)}")
  return (archs[0], *ARCHITECTURES[archs[0]])


def _opt(hf: dict, key: str):
  return hf[key] if hf.get(key) is not None else HF_DEFAULTS[key]


# Sizes a model needs (required) and may state (absent or null: the default), and numbers.
_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
          "intermediate_size")
_OPTIONAL_SIZES = ("num_key_value_heads", "head_dim", "max_position_embeddings")
_NUMBERS = ("rope_theta", "rms_norm_eps")
_LLAMA3 = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _positive(value, integer: bool) -> bool:
  """A positive int below 2**31 (what an array dimension can be), or with integer=False also
  a positive finite float."""
  if isinstance(value, bool):
    return False
  if isinstance(value, int):
    return 0 < value < 2**31
  return not integer and isinstance(value, float) and math.isfinite(value) and value > 0


def _check_values(hf: dict, name: str) -> None:
  """The types and ranges config_from_hf relies on: a bad value is a ValueError naming its key,
  not a TypeError or a division by zero, nor a model of negative size."""
  for key in _SIZES + _OPTIONAL_SIZES:
    if (key in _SIZES or hf.get(key) is not None) and not _positive(hf.get(key), True):
      raise ValueError(f"{name}: {key} must be a positive integer, got {hf.get(key)!r:.40}")
  for key in _NUMBERS:
    if hf.get(key) is not None and not _positive(hf[key], False):
      raise ValueError(f"{name}: {key} must be a positive number, got {hf[key]!r}")
  for key in ("rope_scaling", "rope_parameters", "id2label"):
    if hf.get(key) is not None and not isinstance(hf[key], dict):
      raise ValueError(f"{name}: {key} must be an object, got {hf[key]!r}")
  for key in ("dtype", "torch_dtype", "hidden_act"):
    if hf.get(key) is not None and not isinstance(hf[key], str):
      raise ValueError(f"{name}: {key} must be a string, got {hf[key]!r}")
  if hf.get("num_labels") is not None and not _positive(hf["num_labels"], True):
    raise ValueError(f"{name}: num_labels must be a positive integer, got {hf['num_labels']!r}")


def config_from_hf(hf: dict, *, dtype: str | None = None, compute_dtype: str | None = None,
                   max_seq_len: int | None = None, **options) -> ModelConfig:
  """ModelConfig of a Llama/Qwen2 config.json dict. dtype (parameter storage) defaults to the
  checkpoint's (float16 checkpoints load as float32); compute_dtype defaults to dtype.
  options: how to compute it (ModelConfig's remat, scan_layers, attention)."""
  name, model_type, kind = architecture(hf)
  _check_values(hf, name)
  if _opt(hf, "hidden_act") != "silu":
    raise ValueError(f"{name}: hidden_act={hf['hidden_act']!r} is not supported "
                     "(SwiGLU with silu only)")
  if hf.get("mlp_bias"):
    raise ValueError(f"{name}: mlp_bias=True is not supported (the MLP has no biases)")
  if model_type == "llama" and hf.get("attention_bias"):
    raise ValueError(f"{name}: attention_bias=True (biases on q/k/v AND o_proj) is not supported")
  if model_type == "qwen2" and hf.get("use_sliding_window"):
    raise ValueError(f"{name}: use_sliding_window=True is not supported (full attention only)")
  if kind == "scalar" and hf.get("num_labels", len(hf.get("id2label") or {0: 0})) != 1:
    raise ValueError(f"{name}: only num_labels=1 reward heads import into ScalarHeadModel")
  # transformers>=5 nests theta and scaling in rope_parameters; older configs keep them flat.
  rope = dict(hf.get("rope_parameters") or {})
  rope.update(hf.get("rope_scaling") or {})
  theta = hf["rope_theta"] if hf.get("rope_theta") is not None else rope.get(
      "rope_theta", HF_DEFAULTS["rope_theta"])
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type == "llama3":
    for key in _LLAMA3:
      if not _positive(rope.get(key), key.startswith("original")):
        raise ValueError(f"{name}: llama3 rope scaling needs a positive {key}, got "
                         f"{rope.get(key)!r}")
    scaling = RopeScaling(float(rope["factor"]), float(rope["low_freq_factor"]),
                          float(rope["high_freq_factor"]),
                          int(rope["original_max_position_embeddings"]))
  elif rope_type == "default":
    scaling = None
  else:
    raise ValueError(f"{name}: rope_type={rope_type!r:.40} is not supported ('default' or "
                     "'llama3')")
  n_heads = hf["num_attention_heads"]
  head_dim = hf.get("head_dim")
  if head_dim == hf["hidden_size"] // n_heads:
    head_dim = None
  ckpt_dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
  if ckpt_dtype not in DTYPES:
    raise ValueError(f"{name}: checkpoint dtype {ckpt_dtype!r} is not supported ({sorted(DTYPES)})")
  dtype = dtype or DTYPES[ckpt_dtype]
  return ModelConfig(
      vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
      n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
      d_ff=hf["intermediate_size"], head_dim=head_dim, rope_theta=float(theta),
      rope_scaling=scaling, norm_eps=float(_opt(hf, "rms_norm_eps")),
      qkv_bias=model_type == "qwen2", tie_embeddings=bool(_opt(hf, "tie_word_embeddings")),
      max_seq_len=max_seq_len or _opt(hf, "max_position_embeddings"),
      dtype=compute_dtype or dtype, param_dtype=dtype, **options)


def config_to_hf(cfg: ModelConfig, *, kind: str = "lm", dtype: str | None = None,
                 base: dict | None = None) -> dict:
  """config.json dict for `cfg`. Keys of `base` (e.g. the imported config.json: token ids,
  generation settings) are kept unless this function writes them."""
  model_type = "qwen2" if cfg.qkv_bias else "llama"
  arch = {v: k for k, v in ARCHITECTURES.items()}[(model_type, kind)]
  dtype = dtype or cfg.param_dtype
  rope_params = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
  scaling = None
  if cfg.rope_scaling is not None:
    scaling = {"rope_type": "llama3", **dataclasses.asdict(cfg.rope_scaling)}
    rope_params.update(scaling)
  out = {k: v for k, v in (base or {}).items()
         if k not in ("rope_scaling", "rope_parameters", "torch_dtype", "dtype", "head_dim")}
  out.update(
      architectures=[arch], model_type=model_type, vocab_size=cfg.vocab_size,
      hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layers,
      num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
      head_dim=cfg.dim_per_head, hidden_act="silu", rms_norm_eps=cfg.norm_eps,
      rope_theta=cfg.rope_theta, rope_scaling=scaling, rope_parameters=rope_params,
      tie_word_embeddings=cfg.tie_embeddings, max_position_embeddings=cfg.max_seq_len,
      torch_dtype=dtype, dtype=dtype)
  if model_type == "llama":
    out.update(attention_bias=False, mlp_bias=False)
  else:
    out.update(use_sliding_window=False)
  if kind == "scalar":
    out.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
  return out


@dataclasses.dataclass(frozen=True)
class Layout:
  """ours = reshape(hf, concat(split)).transpose(perm); split[i] are the sizes HF dim i
  splits into (() drops a size-1 HF dim)."""
  split: tuple[tuple[int, ...], ...]
  perm: tuple[int, ...]

  @property
  def hf_shape(self) -> tuple[int, ...]:
    return tuple(math.prod(g) for g in self.split)

  @property
  def our_shape(self) -> tuple[int, ...]:
    flat = [s for g in self.split for s in g]
    return tuple(flat[p] for p in self.perm)


def tensor_plan(cfg: ModelConfig, kind: str) -> list[tuple[tuple, str | None, Layout | None]]:
  """(path in the params pure dict, HF tensor name, layout) for every parameter. The name is
  None for head_b (no HF counterpart: zero on import)."""
  d, n, k, h, f, v = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.dim_per_head, cfg.d_ff,
                      cfg.vocab_size)
  same = lambda *shape: Layout(tuple((s,) for s in shape), tuple(range(len(shape))))  # noqa: E731
  t2 = lambda a, b: Layout(((a,), (b,)), (1, 0))  # noqa: E731  HF (a, b) -> ours (b, a)
  pre = ("backbone",) if kind == "scalar" else ()
  plan = [(pre + ("embed",), "model.embed_tokens.weight", same(v, d)),
          (pre + ("final_norm", "scale"), "model.norm.weight", same(d))]
  for i in range(cfg.n_layers):
    p, hp = pre + ("blocks", i), f"model.layers.{i}."
    plan += [
        (p + ("attn_norm", "scale"), hp + "input_layernorm.weight", same(d)),
        (p + ("mlp_norm", "scale"), hp + "post_attention_layernorm.weight", same(d)),
        (p + ("attn", "wq"), hp + "self_attn.q_proj.weight", Layout(((n, h), (d,)), (2, 0, 1))),
        (p + ("attn", "wk"), hp + "self_attn.k_proj.weight", Layout(((k, h), (d,)), (2, 0, 1))),
        (p + ("attn", "wv"), hp + "self_attn.v_proj.weight", Layout(((k, h), (d,)), (2, 0, 1))),
        (p + ("attn", "wo"), hp + "self_attn.o_proj.weight", Layout(((d,), (n, h)), (1, 2, 0))),
        (p + ("mlp", "w_gate"), hp + "mlp.gate_proj.weight", t2(f, d)),
        (p + ("mlp", "w_up"), hp + "mlp.up_proj.weight", t2(f, d)),
        (p + ("mlp", "w_down"), hp + "mlp.down_proj.weight", t2(d, f)),
    ]
    if cfg.qkv_bias:
      plan += [(p + ("attn", "bq"), hp + "self_attn.q_proj.bias", Layout(((n, h),), (0, 1))),
               (p + ("attn", "bk"), hp + "self_attn.k_proj.bias", Layout(((k, h),), (0, 1))),
               (p + ("attn", "bv"), hp + "self_attn.v_proj.bias", Layout(((k, h),), (0, 1)))]
  if kind == "scalar":
    plan += [(("head_w",), "score.weight", Layout(((), (d,)), (0,))), (("head_b",), None, None)]
  elif not cfg.tie_embeddings:
    plan.append((("lm_head",), "lm_head.weight", t2(v, d)))
  return plan

