"""Stages on real checkpoints: the one mechanism every experiment uses to start from a Hugging
Face model directory, read its tokenizer and chat template, and export what it trained.

    --init_hf=DIR     the model to start from (Llama / Qwen2, *ForCausalLM; a reward model
                      from *ForSequenceClassification). Parameters are stored in float32 on the
                      devices (Adam's master copy) and computed in --dtype; a bfloat16
                      checkpoint is read tensor by tensor, each device's block cast on its own
                      (models/hf_import.py), so the host never holds a float32 copy of the
                      whole model.
    --tokenizer=DIR   its tokenizer.json (+ tokenizer_config.json, chat template); empty: the
                      --init_hf directory's when it has one, else the byte tokenizer.
    --export_hf=DIR   the trained model as a Hugging Face directory (config.json, safetensors,
                      the tokenizer files), loadable by transformers' from_pretrained.
    --export_dtype    float32 or bfloat16 weights in the export (empty: float32).
    --lora_rank=r     LoRA: adapters (models/lora.py) on --lora_targets of the model a stage
                      trains; only they (and a reward/value model's scalar head) train, the
                      base frozen without optimizer state (train/lora.py); the reference
                      policy is the base view (adapters off), not a second copy. --export_lora
                      writes the merged model or the PEFT adapters.

A run started with --init_hf exports with the imported config.json as base, so token ids and
generation settings survive a round trip.
"""
import dataclasses
import hashlib
import math
import pathlib
import shutil

import jax
import jax.numpy as jnp

from rlhf_jax import distributed, plan, sharding
from rlhf_jax.data import builders, file_datasets, pairs
from rlhf_jax.data import preference_formats as pf
from rlhf_jax.data.chat import ChatTemplate, NoChatTemplate, encode_chat
from rlhf_jax.data.hf_tokenizer import HFTokenizer
from rlhf_jax.data.tokenizer import ByteTokenizer
from rlhf_jax.models import hf, hf_export, hf_import, hf_peft, lora
from rlhf_jax.models.config import LORA_TARGETS
from rlhf_jax.pipeline import lm
from rlhf_jax.pipeline.config import flag

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")
EXPORT_DTYPES = ("", "float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class HFFlags:
  """The flags of a stage that can start from and export to Hugging Face directories."""
  init_hf: str = flag("", "Hugging Face model directory to start from (config.json + "
                      "safetensors; Llama or Qwen2).")
  tokenizer: str = flag("", "HF tokenizer directory (tokenizer.json); empty: --init_hf's when "
                        "it has one, else the byte tokenizer.")
  export_hf: str = flag("", "Directory to export the trained model to (HF layout, with the "
                        "tokenizer files).")
  export_dtype: str = flag("", "Weights dtype of --export_hf (empty: float32).",
                           choices=EXPORT_DTYPES)
  lora_rank: int = flag(0, "LoRA rank r of the adapters on the trained model's projections "
                        "(0: full fine-tuning); the base stays frozen, without optimizer state.")
  lora_alpha: float = flag(16.0, "LoRA alpha: the update is (alpha / r) A @ B.")
  lora_targets: str = flag(",".join(LORA_TARGETS), "Comma-separated projections that get "
                           "adapters (PEFT names).")
  dry_run: bool = flag(False, "Resolve shapes and shardings and print the per-device memory "
                       "plan only: no weights loaded, no data read, no training.")
  dry_run_compile: bool = flag(True, "--dry_run also compiles the stage's programs on abstract "
                               "arrays (rlhf_jax.plan) and prints XLA's memory beside the "
                               "analytic estimate.")
  export_lora: str = flag("merged", "--export_hf of a LoRA run: merged (W + update, a plain "
                          "checkpoint) or peft (adapter_model.safetensors + adapter_config.json "
                          "for the --init_hf base).", choices=("merged", "peft"))

  def __post_init__(self):
    if self.export_dtype and not self.export_hf:
      raise ValueError("--export_dtype without --export_hf: name the export directory")
    if self.lora_rank < 0:
      raise ValueError(f"--lora_rank must be >= 0 (0: full fine-tuning), got {self.lora_rank}")
    if self.lora_rank and not self.init_hf:
      raise ValueError("--lora_rank adapts a pretrained checkpoint: give --init_hf")
    unknown = sorted(set(self.lora_target_names) - set(LORA_TARGETS))
    if unknown or not self.lora_target_names:
      raise ValueError(f"--lora_targets={self.lora_targets}: name some of {LORA_TARGETS}")
    getattr(super(), "__post_init__", lambda: None)()

  @property
  def lora_target_names(self) -> tuple[str, ...]:
    return tuple(t for t in self.lora_targets.split(",") if t)


def tokenizer_dir(cfg: HFFlags) -> str:
  """--tokenizer, else --init_hf when it holds a tokenizer.json, else "" (byte tokenizer)."""
  if cfg.tokenizer:
    return cfg.tokenizer
  if cfg.init_hf and (pathlib.Path(cfg.init_hf) / "tokenizer.json").exists():
    return cfg.init_hf
  return ""


def load_tokenizer(cfg: HFFlags, system_prompt: str = ""):
  """(tokenizer, render_fn, render_id). Message prompts render with the tokenizer directory's
  chat template when it has one, else preference_formats.default_render; a system_prompt is
  put before every conversation that has none. render_id names the rendering in dataset
  hashes."""
  directory = tokenizer_dir(cfg)
  tok, render_fn, render_id = ByteTokenizer(), pf.default_render, "default_render"
  if directory:
    tok = HFTokenizer.from_file(directory)
    try:
      template = ChatTemplate.from_file(directory)
    except NoChatTemplate:  # base models often have none; a broken one raises
      template = None
    if template is not None:
      digest = hashlib.sha256(template.source.encode()).hexdigest()[:12]
      render_fn, render_id = pairs.chat_render_fn(template), f"chat_template:{digest}"
  if system_prompt:
    render_fn = with_system_prompt(render_fn, system_prompt)
    render_id += ":system:" + hashlib.sha256(system_prompt.encode()).hexdigest()[:12]
  return tok, render_fn, render_id


def with_system_prompt(render_fn: pf.RenderFn, system_prompt: str) -> pf.RenderFn:
  def render(messages):
    messages = list(messages)
    if not messages or messages[0]["role"] != "system":
      messages = [{"role": "system", "content": system_prompt}, *messages]
    return render_fn(messages)
  return render


def has_checkpoint_config(cfg: HFFlags) -> bool:
  return bool(cfg.init_hf) and (pathlib.Path(cfg.init_hf) / "config.json").exists()


def model_config(cfg, fallback, *, dry_run: bool = False):
  """The ModelConfig of --init_hf (stored float32, computed in --dtype), else fallback(cfg)
  (the --model preset). A dry run of an --init_hf directory without config.json plans with the
  preset's shape, so a real flagfile can be checked before the checkpoint is downloaded."""
  if cfg.init_hf:
    if has_checkpoint_config(cfg):
      return config_of(cfg.init_hf, cfg)
    if not dry_run:
      raise FileNotFoundError(f"--init_hf={cfg.init_hf}: no config.json (a Hugging Face model "
                              "directory holds config.json and model*.safetensors)")
    print(f"[dry run] {cfg.init_hf}/config.json not found: using the --model={cfg.model} shape")
  return fallback(cfg)


def config_of(path: str, cfg):
  """The ModelConfig of the HF directory `path` under the run's flags (see _hf_options)."""
  return hf.config_from_hf(hf.read_hf_config(path), **_hf_options(cfg))


def check_vocabulary(tok, mcfg) -> None:
  if tok.vocab_size > mcfg.vocab_size:
    raise ValueError(f"the tokenizer has {tok.vocab_size} ids but the model's vocabulary is "
                     f"{mcfg.vocab_size}: --tokenizer does not belong to this model")


def load(path: str, mesh, cfg, *, kind: str = "lm"):
  """(graphdef, params, shardings) of the HF directory `path` on `mesh`: float32 storage,
  --dtype compute. kind "lm" (causal LM) or "scalar" (a reward model)."""
  return hf_import.load_hf_model(path, mesh, kind=kind, **_hf_options(cfg))


def _hf_options(cfg) -> dict:
  """A checkpoint's parameters stay float32; the flags choose how it is computed."""
  options = lm.model_options(cfg)
  return dict(dtype="float32", compute_dtype=options.pop("dtype"), **options)


def with_adapters(cfg: HFFlags, graphdef, params, shardings, mesh):
  """(graphdef, params, shardings) of the model a stage trains: with --lora_rank, LoRA
  adapters over the loaded params (A seeded by --seed, B zero: it starts as the checkpoint),
  else the model as it is."""
  if not cfg.lora_rank:
    return graphdef, params, shardings
  return lora.add_adapters(lora.config_of(graphdef, params), params,
                           jax.random.fold_in(jax.random.key(cfg.seed), 0x10BA), mesh,
                           rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                           targets=cfg.lora_target_names)


def trained_model(cfg: HFFlags, mesh, fallback):
  """(graphdef, params, shardings) of the policy a stage trains: --init_hf (with --lora_rank
  adapters), else fallback(cfg, mesh) (a random preset, for smoke runs)."""
  if not cfg.init_hf:
    return fallback(cfg, mesh)
  return with_adapters(cfg, *load(cfg.init_hf, mesh, cfg), mesh)


def reference_of(params):
  """The frozen reference of a trained model's initial params: a LoRA model's base view (the
  adapters switched off, no second copy of the base), else a copy (the train state donates
  its params)."""
  adapters, base = lora.split(params)
  if adapters:  # the adapters are copied: the train state donates them (a few MB)
    return lora.base_view(lora.join(jax.tree.map(jnp.copy, adapters), base))
  return jax.tree.map(jnp.copy, params)


def export(cfg: HFFlags, graphdef, params, *, drop_head_bias: bool = False) -> None:
  """Writes params to --export_hf (nothing without it) with the tokenizer files, config.json
  based on --init_hf's; a LoRA model merged or as PEFT adapters (--export_lora). Every
  process calls it (tensors are gathered); process 0 writes."""
  if not cfg.export_hf:
    return
  base = hf.read_hf_config(cfg.init_hf) if has_checkpoint_config(cfg) else None
  model = graphdef
  if lora.split(params)[0]:
    lcfg = lora.config_of(graphdef, params)
    if cfg.export_lora == "peft":
      hf_peft.save_peft_adapters(cfg.export_hf, params, lcfg, base_model_dir=cfg.init_hf)
      _copy_tokenizer(cfg)
      print(f"exported LoRA adapters (PEFT) to {cfg.export_hf}")
      return
    model, params = lora.plain_config(lcfg), lora.merge(params, lcfg)
  hf_export.save_hf_model(cfg.export_hf, model, params, hf_config_base=base,
                          dtype=cfg.export_dtype or "float32", drop_head_bias=drop_head_bias)
  _copy_tokenizer(cfg)
  print(f"exported to {cfg.export_hf}")


def _copy_tokenizer(cfg: HFFlags) -> None:
  source = tokenizer_dir(cfg)
  for name in TOKENIZER_FILES if source and distributed.is_writer() else ():
    if (pathlib.Path(source) / name).exists():
      shutil.copy(pathlib.Path(source) / name, pathlib.Path(cfg.export_hf) / name)


@dataclasses.dataclass(frozen=True)
class RewardModelFlags:
  reward_hf: str = flag("", "With --prompt_files: the reward model, a Hugging Face "
                        "*ForSequenceClassification directory.")
  value_hf: str = flag("", "With --prompt_files: the value model's start, a reward model or a "
                       "causal LM (empty: --reward_hf).")

  def check_reward_model_flags(self):
    if not self.reward_hf:
      raise ValueError("--prompt_files needs --reward_hf (the reward model scoring responses; "
                       "experiments.reward --data_files=... --export_hf=DIR trains one)")


def lora_config(cfg: HFFlags, mcfg):
  """mcfg with the flags' adapters (what a --lora_rank stage trains; for memory plans)."""
  if not cfg.lora_rank:
    return mcfg
  return dataclasses.replace(mcfg, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                             lora_targets=cfg.lora_target_names)


def dry_run(cfg, stage: str, mcfg, shapes) -> dict:
  """The stage's memory plan on the flags' mesh (fake CPU devices when this host has too few:
  a v5e-8 flagfile plans on a laptop), compiled unless --nodry_run_compile; no weights."""
  sizes = (cfg.mesh_data, cfg.mesh_fsdp, cfg.mesh_tensor)
  devices = plan.plan_devices(math.prod(sizes)) if -1 not in sizes else None
  mesh = sharding.make_mesh(*sizes, devices=devices)
  result = plan.plan(stage, lora_config(cfg, mcfg), mesh, shapes, compile=cfg.dry_run_compile)
  print(plan.format_plan(result))
  return {"dry_run": True, "mesh": dict(mesh.shape), "num_params": mcfg.num_params(),
          "plan": result}


@dataclasses.dataclass(frozen=True)
class LocalDataFlags:
  """What the offline stages' file modes share (SFT, reward): each adds its own data_files
  and data_format (their help and formats differ)."""
  test_fraction: float = flag(0.05, "Held-out fraction of --data_files (hashed by prompt).")
  on_error: str = flag("raise", "Malformed records: fail the build or skip and count them.",
                       choices=file_datasets.ON_ERROR)
  pack: bool = flag(False, "Pack several examples (whole rankings for a reward model) per "
                    "--seq_len row, attention kept inside each sequence (data/packing.py); "
                    "--batch_size then counts rows.")

  @property
  def file_mode(self) -> bool:
    return bool(self.data_files)

  def check_data_files(self):
    if not 0.0 < self.test_fraction < 1.0:
      raise ValueError(f"--test_fraction must be in (0, 1), got {self.test_fraction}")


def _masks_checked(render_fn: pf.RenderFn, tok, template: ChatTemplate) -> pf.RenderFn:
  """render_fn that first builds the conversation's assistant masks (chat.encode_chat raises
  for one it cannot mask), so the build's length check refuses what the SFT encoder would."""
  def render(messages):
    encode_chat(tok, template, messages)
    return render_fn(messages)
  return render


def read_local_data(cfg, mcfg, *, chat_template: ChatTemplate | None = None,
                    packed: bool = False):
  """(tokenizer, render_fn, build report, train split, test split) of an offline stage's
  --data_files: the tokenizer (checked against the model), the files built once and
  validated (records over --seq_len are malformed, a prompt format's reference answer
  counted: SFT trains on it), split by --test_fraction. chat_template (SFT's, which builds
  assistant masks with it): a conversation it cannot mask is malformed at the build too, not
  refused by the encoder mid-training. packed: a record's sequences must fit one row
  together (--pack of rankings)."""
  tok, render_fn, render_id = load_tokenizer(cfg)
  check_vocabulary(tok, mcfg)
  length_render = render_fn
  if chat_template is not None:
    length_render, render_id = _masks_checked(render_fn, tok, chat_template), render_id + ":masks"
  built = file_datasets.build_file_dataset(
      cfg.data_files.split(","), format=cfg.data_format, data_dir=cfg.data_dir,
      on_error=cfg.on_error, test_fraction=cfg.test_fraction, tokenizer=tok,
      max_len=cfg.seq_len, render_fn=length_render, render_id=render_id, train_answers=True,
      packed=packed)
  train, test = (builders.load_split(built.builder, s) for s in ("train", "test"))
  return tok, render_fn, built.report, train, test
