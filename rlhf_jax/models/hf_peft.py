"""PEFT LoRA adapters: our adapters <-> adapter_config.json + adapter_model.safetensors.

PEFT stores, per adapted Linear of the Hugging Face model (prefixed "base_model.model."),
lora_A.weight (r, in_features) and lora_B.weight (out_features, r), and computes
y = W x + (lora_alpha / r) * B A x. Ours (models/layers.py: LoRA) hold A as in_shape + (r,) and
B as (r,) + out_shape on the adapted weight's own dimensions (q_proj's B: r x heads x head_dim),
so each tensor is an hf.Layout away from PEFT's, written and read by the machinery of full
checkpoints (hf_export.write_safetensors, hf_import.place: each device reads its own block).

What PEFT can express and we cannot is refused on load with a message: rsLoRA, DoRA, biases
(bias, lora_bias), per-layer rank/alpha patterns, a subset of layers, extra trained modules
(modules_to_save), target names other than the seven projections. lora_dropout, a
training-time option of PEFT's, is written as 0 (these models have no dropout) and ignored on
load.
Causal LMs only (task_type CAUSAL_LM): a reward model's trained score head would need
modules_to_save.
"""
import json
import math
import pathlib

import jax
import numpy as np
from flax import nnx

from rlhf_jax.data.local_files import read_json_object
from rlhf_jax.models import hf, hf_export, hf_import, lora
from rlhf_jax.models.config import LORA_TARGETS, ModelConfig
from rlhf_jax.models.transformer import Transformer

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_MODULE = {t: "self_attn" if lora.WEIGHTS[t][0] == "attn" else "mlp" for t in LORA_TARGETS}


def adapter_plan(cfg: ModelConfig) -> list[tuple[tuple, str, hf.Layout]]:
  """(path in the params pure dict, PEFT tensor name, layout) of every adapter tensor."""
  abstract = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  adapters, _ = lora.split(abstract.to_pure_dict())
  r, plan = cfg.lora_rank, []
  for i in range(cfg.n_layers):
    for target in cfg.lora_targets:
      module = lora.WEIGHTS[target][0]
      path = ("blocks", i, module, lora.KEY, target)
      a, b = (adapters["blocks"][i][module][lora.KEY][target][x].shape for x in "ab")
      ins, outs = a[:-1], b[1:]
      name = f"base_model.model.model.layers.{i}.{_MODULE[target]}.{target}."
      plan += [(path + ("a",), name + "lora_A.weight",  # (r, in) -> in_shape + (r,)
                hf.Layout(((r,), ins), (*range(1, len(ins) + 1), 0))),
               (path + ("b",), name + "lora_B.weight",  # (out, r) -> (r,) + out_shape
                hf.Layout((outs, (r,)), (len(outs), *range(len(outs)))))]
  return plan


def save_peft_adapters(path, params, cfg: ModelConfig, *, base_model_dir=None,
                       dtype: str = "float32") -> list[pathlib.Path]:
  """Writes the adapters of `params` (a LoRA Transformer's params, or its adapters alone) as a
  PEFT LoRA adapter directory, which peft.PeftModel.from_pretrained(base, path) loads onto the
  Hugging Face base model. base_model_dir: recorded as base_model_name_or_path. Multi-host:
  every process calls this; process 0 writes. Returns the files written."""
  if "backbone" in params:
    raise ValueError("PEFT export covers causal LMs; a ScalarHeadModel's score head would "
                     "need modules_to_save (not written)")
  if cfg.lora_rank < 1:
    raise ValueError("cfg has no adapters (lora_rank=0)")
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  files = [path / WEIGHTS_FILE, path / CONFIG_FILE]
  hf_export.write_safetensors(files[0], adapter_plan(cfg), params, dtype)
  if jax.process_index() == 0:
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.lora_rank,
        "lora_alpha": cfg.lora_alpha, "target_modules": sorted(cfg.lora_targets),
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "init_lora_weights": True, "modules_to_save": None,
        "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
        "inference_mode": True,
        "base_model_name_or_path": None if base_model_dir is None else str(base_model_dir)}
    files[1].write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
  return files


def read_lora_settings(path) -> dict:
  """lora_rank, lora_alpha and lora_targets of a PEFT adapter directory, as ModelConfig
  fields: dataclasses.replace(base_cfg, **read_lora_settings(path)) is the model it adapts.
  ValueError for what our adapters cannot express (module docstring)."""
  file = pathlib.Path(path) / CONFIG_FILE
  if not file.exists():
    raise FileNotFoundError(f"{file} not found: a PEFT adapter directory needs {CONFIG_FILE}")
  c = read_json_object(file)
  if c.get("peft_type") != "LORA":
    raise ValueError(f"{file}: peft_type={c.get('peft_type')!r}, only LORA adapters load")
  refused = {"use_rslora": c.get("use_rslora"), "use_dora": c.get("use_dora"),
             "fan_in_fan_out": c.get("fan_in_fan_out"),
             "bias": c.get("bias") not in (None, "none"), "lora_bias": c.get("lora_bias"),
             "rank_pattern": c.get("rank_pattern"), "alpha_pattern": c.get("alpha_pattern"),
             "layers_to_transform": c.get("layers_to_transform") is not None,
             "modules_to_save": c.get("modules_to_save")}
  refused = sorted(k for k, v in refused.items() if v)
  if refused:
    raise ValueError(f"{file}: {refused} set; our LoRA has plain alpha/r adapters on every "
                     "layer's projections and nothing else")
  targets = c.get("target_modules")
  targets = LORA_TARGETS if targets == "all-linear" else targets
  if (not isinstance(targets, (list, tuple)) or not targets
      or not all(isinstance(t, str) and t in LORA_TARGETS for t in targets)):
    raise ValueError(f"{file}: target_modules={targets!r:.80}; supported: a list of "
                     f"{LORA_TARGETS} or 'all-linear'")
  r, alpha = c.get("r"), c.get("lora_alpha")
  if isinstance(r, bool) or not isinstance(r, int) or r < 1:
    raise ValueError(f"{file}: r={r!r:.40}, expected a positive integer (the adapters' rank)")
  if (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
      or not math.isfinite(alpha)):
    raise ValueError(f"{file}: lora_alpha={alpha!r:.40}, expected a number")
  return {"lora_rank": r, "lora_alpha": float(alpha),
          "lora_targets": tuple(t for t in LORA_TARGETS if t in targets)}


def load_peft_adapters(path, cfg: ModelConfig, base, mesh):
  """The LoRA model of a PEFT adapter directory over the plain model's params `base` (e.g.
  hf_import.load_hf_model's; cfg: its config, lora.config_of): (graphdef, params, shardings)
  like lora.add_adapters, each device reading only its block of each adapter tensor."""
  if "backbone" in base:
    raise ValueError("PEFT adapters load onto causal LMs only (module docstring)")
  settings = read_lora_settings(path)
  cfg, _, graphdef, shardings = lora.adapted_model(
      cfg, base, mesh, rank=settings["lora_rank"], alpha=settings["lora_alpha"],
      targets=settings["lora_targets"])
  adapter_shardings, _ = lora.split(shardings)
  file = hf_import.SafetensorsFile(pathlib.Path(path) / WEIGHTS_FILE)
  plan = adapter_plan(cfg)
  unexpected = sorted(set(file.header) - {name for _, name, _ in plan})
  if unexpected:
    raise ValueError(f"{path}: tensors our adapters do not have: {unexpected[:8]}")
  for _, name, layout in plan:  # fail before reading anything
    shape = tuple(file.header[name]["shape"]) if name in file.header else None
    if shape != layout.hf_shape:
      raise ValueError(f"{path}: tensor {name} has shape {shape}, the config implies "
                       f"{layout.hf_shape}")
  adapters: dict = {}
  for our_path, name, layout in plan:
    node = adapters
    for k in our_path[:-1]:
      node = node.setdefault(k, {})
    node[our_path[-1]] = hf_import.place(file.array(name), layout, layout.our_shape,
                                         np.dtype(np.float32), _get(adapter_shardings, our_path))
  return graphdef, lora.join(adapters, base), shardings


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree
