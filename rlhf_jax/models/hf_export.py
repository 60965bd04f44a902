"""Write parameters back as a Hugging Face model directory (config.json + safetensors).

Tensors are streamed: the safetensors header is computed from shapes alone, then each tensor
is fetched to the host, converted to the HF layout and written before the next one is read,
so the writer never holds more than one tensor. Above `max_shard_bytes` the weights are split
into model-0000i-of-0000n.safetensors files with model.safetensors.index.json, as
transformers' save_pretrained does. Multi-host: every process must call this (each tensor is
all-gathered); only process 0 writes.
"""
import json
import pathlib

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from rlhf_jax.models import hf, layer_stack, lora
from rlhf_jax.models.config import ModelConfig

_ST_NAMES = {"float32": ("F32", np.dtype(np.float32)),
             "bfloat16": ("BF16", np.dtype(ml_dtypes.bfloat16))}


def _host(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def write_safetensors(file: pathlib.Path, entries, params, dtype: str):
  """Streams the tensors of `entries` ((path in params, HF name, hf.Layout), as
  hf.tensor_plan lists them) into one safetensors file in `dtype` (only process 0 writes)."""
  st_name, np_dtype = _ST_NAMES[dtype]
  header, offset = {"__metadata__": {"format": "pt"}}, 0
  for _, tensor, layout in entries:
    nbytes = int(np.prod(layout.hf_shape)) * np_dtype.itemsize
    header[tensor] = {"dtype": st_name, "shape": list(layout.hf_shape),
                      "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # align the data section to 8 bytes
  write = jax.process_index() == 0
  with open(file, "wb") if write else open("/dev/null", "wb") as f:
    f.write(len(blob).to_bytes(8, "little") + blob)
    for our_path, tensor, layout in entries:
      x = _host(_get(params, our_path))
      inverse = tuple(np.argsort(layout.perm))
      out = np.ascontiguousarray(x.transpose(inverse).reshape(layout.hf_shape), dtype=np_dtype)
      f.write(out.view(np.uint8).data)
      del x, out


def save_hf_model(path, model, params, *, hf_config_base: dict | None = None,
                  dtype: str | None = None, max_shard_bytes: int = 5 * 2**30,
                  drop_head_bias: bool = False) -> list[pathlib.Path]:
  """Writes `params` as a Hugging Face model directory at `path`.

  model: the ModelConfig, or the graphdef from nnx.split / load_hf_model. A params dict with a
  "backbone" is a ScalarHeadModel and exports as *ForSequenceClassification (num_labels=1);
  its head_b must be 0 (HF's score has no bias) unless drop_head_bias=True. Llama or Qwen2 is
  chosen by cfg.qkv_bias. hf_config_base: a config.json dict whose other keys (token ids, ...)
  are kept. dtype: the file dtype, default the parameters' storage dtype.
  Returns the files written.
  """
  cfg = model if isinstance(model, ModelConfig) else nnx.merge(model, params)
  if not isinstance(cfg, ModelConfig):
    cfg = cfg.backbone.cfg if hasattr(cfg, "backbone") else cfg.cfg
  if lora.split(params)[0]:  # the tensor plan has no place for them: they would be dropped
    raise ValueError("params carry LoRA adapters: export lora.merge(params, cfg) with "
                     "lora.plain_config(cfg), or the adapters alone (hf_peft.save_peft_adapters)")
  params = layer_stack.listed_params(params)  # the tensor plan names each layer's tensors
  kind = "scalar" if "backbone" in params else "lm"
  if kind == "lm" and not cfg.tie_embeddings and "lm_head" not in params:
    raise ValueError("params have no lm_head (a Transformer built with lm_head=False) and the "
                     "embeddings are not tied: there is no causal-LM head to export")
  dtype = dtype or cfg.param_dtype
  if dtype not in _ST_NAMES:
    raise ValueError(f"dtype must be one of {sorted(_ST_NAMES)}, got {dtype!r}")
  if kind == "scalar" and not drop_head_bias:
    bias = float(_host(params["head_b"]))
    if bias != 0.0:
      raise ValueError(f"head_b = {bias} but HF's score layer has no bias; pass "
                       "drop_head_bias=True to export without it (shifts every reward by it)")
  entries = [e for e in hf.tensor_plan(cfg, kind) if e[1] is not None]
  itemsize = _ST_NAMES[dtype][1].itemsize
  shards, size = [[]], 0
  for e in entries:
    nbytes = int(np.prod(e[2].hf_shape)) * itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(e)
    size += nbytes
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  names = (["model.safetensors"] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  files = [path / n for n in names]
  for file, shard in zip(files, shards):
    write_safetensors(file, shard, params, dtype)
  if jax.process_index() == 0:
    config = hf.config_to_hf(cfg, kind=kind, dtype=dtype, base=hf_config_base)
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    files.append(path / "config.json")
    if len(shards) > 1:
      index = {"metadata": {"total_size": sum(int(np.prod(e[2].hf_shape)) * itemsize
                                              for e in entries)},
               "weight_map": {e[1]: n for n, shard in zip(names, shards) for e in shard}}
      (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
      files.append(path / "model.safetensors.index.json")
    elif (path / "model.safetensors.index.json").exists():
      (path / "model.safetensors.index.json").unlink()  # a stale index would shadow the file
  return files
