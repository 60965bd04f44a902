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

A run started with --init_hf exports with the imported config.json as base, so token ids and
generation settings survive a round trip.
"""
import dataclasses
import hashlib
import pathlib
import shutil

from rlhf_jax import distributed
from rlhf_jax.data import pairs
from rlhf_jax.data import preference_formats as pf
from rlhf_jax.data.chat import ChatTemplate
from rlhf_jax.data.hf_tokenizer import HFTokenizer
from rlhf_jax.data.tokenizer import ByteTokenizer
from rlhf_jax.models import hf, hf_export, hf_import
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

  def __post_init__(self):
    if self.export_dtype and not self.export_hf:
      raise ValueError("--export_dtype without --export_hf: name the export directory")
    getattr(super(), "__post_init__", lambda: None)()


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
    except ValueError:  # base models often have no chat template
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
      return hf.config_from_hf(hf.read_hf_config(cfg.init_hf), dtype="float32",
                               compute_dtype=cfg.dtype)
    if not dry_run:
      raise FileNotFoundError(f"--init_hf={cfg.init_hf}: no config.json (a Hugging Face model "
                              "directory holds config.json and model*.safetensors)")
    print(f"[dry run] {cfg.init_hf}/config.json not found: using the --model={cfg.model} shape")
  return fallback(cfg)


def check_vocabulary(tok, mcfg) -> None:
  if tok.vocab_size > mcfg.vocab_size:
    raise ValueError(f"the tokenizer has {tok.vocab_size} ids but the model's vocabulary is "
                     f"{mcfg.vocab_size}: --tokenizer does not belong to this model")


def load(path: str, mesh, cfg, *, kind: str = "lm"):
  """(graphdef, params, shardings) of the HF directory `path` on `mesh`: float32 storage,
  --dtype compute. kind "lm" (causal LM) or "scalar" (a reward model)."""
  return hf_import.load_hf_model(path, mesh, dtype="float32", compute_dtype=cfg.dtype, kind=kind)


def export(cfg: HFFlags, graphdef, params, *, drop_head_bias: bool = False) -> None:
  """Writes params to --export_hf (nothing without it) with the tokenizer files, config.json
  based on --init_hf's. Every process calls it (tensors are gathered); process 0 writes."""
  if not cfg.export_hf:
    return
  base = hf.read_hf_config(cfg.init_hf) if has_checkpoint_config(cfg) else None
  hf_export.save_hf_model(cfg.export_hf, graphdef, params, hf_config_base=base,
                          dtype=cfg.export_dtype or "float32", drop_head_bias=drop_head_bias)
  source = tokenizer_dir(cfg)
  for name in TOKENIZER_FILES if source and distributed.is_writer() else ():
    if (pathlib.Path(source) / name).exists():
      shutil.copy(pathlib.Path(source) / name, pathlib.Path(cfg.export_hf) / name)
  print(f"exported to {cfg.export_hf}")


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
