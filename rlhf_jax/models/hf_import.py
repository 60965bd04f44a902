"""Load a Hugging Face Llama/Qwen2 safetensors checkpoint straight into sharded parameters.

The abstract model comes from nnx.eval_shape, target shardings from
rlhf_jax.sharding.param_shardings. Tensors are then read one at a time: each safetensors file
is memory-mapped (the header is parsed here, so bfloat16 maps onto ml_dtypes.bfloat16, which
safetensors' own numpy path lacks), and each addressable device receives exactly the block it
holds (read_block reads only the HF rows that block covers). A host therefore materialises
at most one tensor's local blocks at a time, never a full state dict: an 8B checkpoint
loads on a host with little memory beyond its own shards.
"""
import json
import math
import os
import pathlib
import struct

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from rlhf_jax.data.local_files import read_json_object
from rlhf_jax.models import hf, layer_stack
from rlhf_jax.models.transformer import ScalarHeadModel, Transformer
from rlhf_jax.sharding import param_shardings

ST_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
             "BF16": np.dtype(ml_dtypes.bfloat16), "F64": np.dtype(np.float64)}
# Buffers older checkpoints carry that are not parameters.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class SafetensorsFile:
  """Header of one .safetensors file; `array(name)` is a lazy read-only memory map. The header
  is checked against the file first: a truncated or damaged file raises naming it, and no
  tensor is mapped past the end of the file or with a size that does not match its shape."""

  def __init__(self, path):
    self.path = str(path)
    size = os.path.getsize(self.path)
    with open(self.path, "rb") as f:
      prefix = f.read(8)
      n = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else None
      if n is None or n > size - 8:
        raise ValueError(f"{self.path}: not a complete safetensors file ({size} bytes; the "
                         f"header claims {n}); download it again")
      try:
        header = json.loads(f.read(n))
      except (ValueError, RecursionError) as e:
        raise ValueError(f"{self.path}: the safetensors header is not JSON ({e}); download it "
                         "again") from None
    if not isinstance(header, dict):
      raise ValueError(f"{self.path}: the safetensors header is a {type(header).__name__}, not "
                       "an object")
    header.pop("__metadata__", None)
    self.header, self.data_start = header, 8 + n
    for name, info in header.items():
      self._check(name, info, size - self.data_start)

  def _check(self, name: str, info, data_size: int) -> None:
    problem = None
    if not isinstance(info, dict):
      problem = f"is a {type(info).__name__}, not an object"
    elif not isinstance(info.get("dtype"), str):
      problem = f"has dtype {info.get('dtype')!r}"
    elif not (isinstance(info.get("shape"), list) and all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in info["shape"])):
      problem = f"has shape {info.get('shape')!r}, not a list of sizes"
    elif not (isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
              and all(isinstance(o, int) and not isinstance(o, bool) for o in info["data_offsets"])
              and 0 <= info["data_offsets"][0] <= info["data_offsets"][1] <= data_size):
      problem = (f"has data_offsets {info.get('data_offsets')!r}, not [begin, end] within the "
                 f"{data_size} data bytes")
    elif info["dtype"] in ST_DTYPES:
      begin, end = info["data_offsets"]
      expected = math.prod(info["shape"]) * ST_DTYPES[info["dtype"]].itemsize
      if end - begin != expected:
        problem = (f"has {end - begin} bytes for shape {info['shape']} of {info['dtype']} "
                   f"({expected} expected)")
    if problem:
      raise ValueError(f"{self.path}: tensor {name!r:.80} {problem:.200}; the file is damaged: "
                       "download it again")

  def array(self, name: str) -> np.ndarray:
    info = self.header[name]
    if info["dtype"] not in ST_DTYPES:
      raise ValueError(f"{self.path}: tensor {name}: dtype {info['dtype']!r:.20} is not "
                       f"supported ({sorted(ST_DTYPES)})")
    shape = tuple(info["shape"])
    begin, end = info["data_offsets"]
    if end == begin:
      return np.zeros(shape, ST_DTYPES[info["dtype"]])
    return np.memmap(self.path, dtype=ST_DTYPES[info["dtype"]], mode="r",
                     offset=self.data_start + begin, shape=shape)


class Checkpoint:
  """The tensors of a model directory: model.safetensors, or shards listed in
  model.safetensors.index.json."""

  def __init__(self, path):
    path = pathlib.Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
      weight_map = read_json_object(index).get("weight_map")
      if not isinstance(weight_map, dict) or not all(
          isinstance(f, str) and pathlib.Path(f).name == f for f in weight_map.values()):
        raise ValueError(f"{index}: weight_map must map tensor names to file names in "
                         f"{path}, got {weight_map!r:.100}")
      for f in sorted(set(weight_map.values())):
        if not (path / f).is_file():
          raise FileNotFoundError(f"{index} lists {f}, which is not in {path}: download every "
                                  "shard the index names")
      files = {f: SafetensorsFile(path / f) for f in sorted(set(weight_map.values()))}
      self.where = {name: files[f] for name, f in weight_map.items()}
      for name, file in self.where.items():
        if name not in file.header:
          raise ValueError(f"{index} places tensor {name!r:.80} in {file.path}, which does not "
                           "hold it: the shards and the index do not match")
    elif (path / "model.safetensors").exists():
      single = SafetensorsFile(path / "model.safetensors")
      self.where = {name: single for name in single.header}
    else:
      raise FileNotFoundError(f"{path}: neither model.safetensors nor "
                              "model.safetensors.index.json (only safetensors checkpoints "
                              "import; convert pytorch_model.bin with transformers first)")

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.where[name].header[name]["shape"])

  def array(self, name: str) -> np.ndarray:
    return self.where[name].array(name)


def read_block(src: np.ndarray, layout: hf.Layout, index: tuple[slice, ...], dtype) -> np.ndarray:
  """The block `index` (in our layout) of the HF tensor `src`, reading only the HF rows that
  block covers."""
  flat = [s for g in layout.split for s in g]
  idx_r = [None] * len(flat)
  for i, p in enumerate(layout.perm):
    idx_r[p] = slice(*index[i].indices(flat[p])[:2])
  hf_idx, post, block_shape, j = [], [], [], 0
  for group in layout.split:
    if not group:  # a size-1 HF dim that our layout drops
      hf_idx.append(slice(0, 1))
      continue
    sub, inner = idx_r[j:j + len(group)], int(np.prod(group[1:]))
    hf_idx.append(slice(sub[0].start * inner, sub[0].stop * inner))
    block_shape += [sub[0].stop - sub[0].start, *group[1:]]
    post += [slice(None), *sub[1:]]
    j += len(group)
  block = src[tuple(hf_idx)].reshape(block_shape)[tuple(post)].transpose(layout.perm)
  return np.array(block, dtype=dtype)  # the only copy: this device's block


def place(src: np.ndarray, layout: hf.Layout, shape, dtype, sharding) -> jax.Array:
  """A jax.Array of `shape` in `sharding`, each addressable device's block read from `src`.
  Devices holding the same block (replication) share one host read, and blocks are copied
  onto devices (may_alias=False: on CPU, jax would otherwise keep the numpy block alive as
  the device buffer), so host memory returns to baseline after every tensor."""
  blocks: dict = {}
  arrays = []
  for device, index in sharding.addressable_devices_indices_map(tuple(shape)).items():
    key = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))
    k = tuple((s.start, s.stop) for s in key)
    if k not in blocks:
      blocks[k] = read_block(src, layout, key, dtype)
    arrays.append(jax.device_put(blocks[k], device, may_alias=False))
  # Wait for the copies (transfers are asynchronous) before the host blocks are released.
  out = jax.make_array_from_single_device_arrays(tuple(shape), sharding, arrays)
  return out.block_until_ready()


def _nested(flat: dict) -> dict:
  out: dict = {}
  for path, value in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return out


def load_hf_model(path, mesh, *, dtype: str | None = None, compute_dtype: str | None = None,
                  kind: str | None = None, max_seq_len: int | None = None, **options):
  """Imports a Hugging Face model directory onto `mesh`.

  dtype: parameter storage dtype ("float32" | "bfloat16"; default the checkpoint's);
  compute_dtype defaults to dtype. kind: "lm" (Transformer) or "scalar" (ScalarHeadModel,
  from a *ForSequenceClassification checkpoint; head_b = 0); default from the architecture.
  options: ModelConfig's remat, scan_layers, attention. A scan_layers model is read layer by
  layer like any other, then stacked on the devices (which briefly hold the layers twice).
  Returns (graphdef, params pure dict, shardings pure dict).
  """
  hf_cfg = hf.read_hf_config(path)
  name, _, arch_kind = hf.architecture(hf_cfg)
  kind = kind or arch_kind
  if kind != arch_kind:
    raise ValueError(f"{path}: a {name} checkpoint imports as kind={arch_kind!r}, not {kind!r}")
  cfg = hf.config_from_hf(hf_cfg, dtype=dtype, compute_dtype=compute_dtype,
                          max_seq_len=max_seq_len, **options)
  factory = ScalarHeadModel if kind == "scalar" else Transformer
  if cfg.scan_layers:
    return _stacked(factory, cfg, mesh, load_hf_model(path, mesh, dtype=dtype,
                                                      compute_dtype=compute_dtype, kind=kind,
                                                      max_seq_len=max_seq_len,
                                                      **options | {"scan_layers": False})[1])
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: factory(cfg, rngs=nnx.Rngs(0))))
  shardings = param_shardings(abstract, mesh)
  targets = dict(jax.tree.flatten_with_path(abstract.to_pure_dict())[0])
  ckpt = Checkpoint(path)
  plan = hf.tensor_plan(cfg, kind)
  wanted = {n for _, n, _ in plan if n}
  if cfg.tie_embeddings:
    wanted.add("lm_head.weight")  # some tied checkpoints still store it: ignored
  unexpected = sorted(n for n in ckpt.where
                      if n not in wanted and not n.endswith(_IGNORED_SUFFIXES))
  if unexpected:
    raise ValueError(f"{path}: tensors the {name} -> {factory.__name__} mapping does not use: "
                     f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
  for _, tensor, layout in plan:  # fail before reading anything
    if tensor is None:
      continue
    if tensor not in ckpt.where:
      raise ValueError(f"{path}: tensor {tensor} missing from the checkpoint "
                       f"(expected shape {layout.hf_shape})")
    if ckpt.shape(tensor) != layout.hf_shape:
      raise ValueError(f"{path}: tensor {tensor} has shape {ckpt.shape(tensor)} in the "
                       f"checkpoint, but the config implies {layout.hf_shape}")
  flat = {}
  for our_path, tensor, layout in plan:
    key = tuple(jax.tree_util.DictKey(k) for k in our_path)
    target, sharding = targets[key], _get(shardings, our_path)
    if tensor is None:  # head_b: HF's score has no bias
      layout = hf.Layout((), ())
      src = np.zeros((), target.dtype)
    else:
      src = ckpt.array(tensor)
    flat[our_path] = place(src, layout, target.shape, target.dtype, sharding)
    del src
  if len(flat) != len(targets):
    raise AssertionError(f"tensor plan covers {len(flat)} of {len(targets)} parameters")
  return graphdef, _nested(flat), shardings


def _stacked(factory, cfg, mesh, listed: dict):
  """(graphdef, params, shardings) of a scan_layers model from its listed-layout params."""
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: factory(cfg, rngs=nnx.Rngs(0))))
  shardings = param_shardings(abstract, mesh)
  # No donation: the stacked arrays have other shapes, so XLA could not reuse the listed ones.
  stack = jax.jit(layer_stack.stacked_params, out_shardings=shardings)
  return graphdef, stack(listed), shardings


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree
