"""Supervised fine-tuning on local files from a Hugging Face checkpoint (the SFT stage's file
mode; the embedded worlds' SFT is sft.py).

    python -m experiments.sft --init_hf=models/llama-3.2-1b --data_files=data/chat/*.jsonl \\
        --data_format=sft_messages --seq_len=1024 --export_hf=out/sft

Data (--data_files, validated and counted as every local file is: data/file_datasets.py):
  sft_messages  {"messages": [...]}: multi-turn conversations. With a chat template (the
                tokenizer directory's), the whole conversation is rendered by it and the loss
                falls on EVERY assistant turn, its end-of-turn token included, and on nothing
                else (data/chat.py: encode_chat). Without one, the final assistant turn is the
                response to the "role: content" rendering of the rest.
  gsm8k, math, prompts   a prompt with its reference solution: the solution is the one
                assistant turn (a prompts record needs an "answer").
  hh_rlhf, ultrafeedback, pairs   preference pairs: SFT on the chosen responses.
Held out: a hashed --test_fraction (by conversation prefix); its teacher-forced loss and token
accuracy are logged every --eval_every steps. The policy starts from --init_hf (else a random
--model preset) and is exported with --export_hf; checkpoints resume as in every stage.
"""
import dataclasses
import json
import os

from rlhf_jax import plan_models, provenance, sharding
from rlhf_jax.data import packing, pipeline
from rlhf_jax.data import preference_formats as pf
from rlhf_jax.data.chat import ChatTemplate, NoChatTemplate
from rlhf_jax.pipeline import lm, real_models
from rlhf_jax.pipeline.config import flag
from rlhf_jax.train import step as step_lib
from rlhf_jax.train.lm import lm_loss_fn
from rlhf_jax.train.logging import write_json

SFT_FORMATS = ("sft_messages", *pf.PROMPT_FORMATS, *pf.PREFERENCE_FORMATS)
_BATCH_KEYS = ("tokens", "loss_mask", "valid", "example_valid")


@dataclasses.dataclass(frozen=True)
class SFTFileFlags(real_models.LocalDataFlags):
  data_files: str = flag("", "Comma-separated SFT files / globs (JSONL, JSON, Parquet); set, "
                         "the stage trains on them instead of the embedded world.")
  data_format: str = flag("sft_messages", "Record format of --data_files.", choices=SFT_FORMATS)


def conversation(record: dict, fmt: str) -> list[dict] | None:
  """The message list of a normalised record, or None for a text prompt (no conversation)."""
  record = {k: pipeline._text(v) for k, v in record.items()}
  if fmt == "sft_messages":
    return json.loads(record["messages"])
  if record["prompt_kind"] != "messages":
    return None
  return [*json.loads(record["prompt"]), {"role": "assistant", "content": _target(record)}]


def _target(record: dict) -> str:
  """What a record trains on: the reference answer, or a preference pair's chosen response."""
  return pipeline._text(record["chosen"] if "chosen" in record else record["response"])


def make_encoder(fmt: str, tokenizer, template: ChatTemplate | None, render_fn, seq_len: int):
  """record -> training example (pipeline.py's layout) for the file's format."""
  def encode(record):
    messages = conversation(record, fmt)
    if messages is None:  # a text prompt: its reference answer (chosen response) continues it
      return pipeline.sft_example(pipeline._text(record["prompt"]), _target(record),
                                  tokenizer, seq_len)
    if template is not None:
      return pipeline.chat_example(messages, tokenizer, template, seq_len)
    prompt, response = render_fn(messages)  # the final assistant turn only
    return pipeline.sft_example(prompt, response, tokenizer, seq_len)
  return encode


def _template(cfg):
  directory = real_models.tokenizer_dir(cfg)
  try:
    return ChatTemplate.from_file(directory) if directory else None
  except NoChatTemplate:
    return None


def run(cfg) -> dict:
  """Fine-tunes --init_hf (or a random preset) on --data_files; writes <workdir>/result.json."""
  cfg = cfg.effective()
  mcfg = real_models.model_config(cfg, lm.model_config, dry_run=cfg.dry_run)
  if cfg.dry_run:
    return real_models.dry_run(cfg, "sft", mcfg, plan_models.Shapes(
        batch_size=cfg.batch_size, seq_len=cfg.seq_len, num_microbatches=cfg.num_microbatches))
  mesh = lm.setup(cfg)
  template = _template(cfg)
  tok, render_fn, report, train, test = real_models.read_local_data(cfg, mcfg,
                                                                    chat_template=template)
  if cfg.data_format in pf.PROMPT_FORMATS and not any(
      pipeline._text(train[i]["response"]) for i in range(len(train))):
    raise ValueError(f"--data_format={cfg.data_format}: no record has a reference answer to "
                     "train on")
  encode = make_encoder(cfg.data_format, tok, template, render_fn, cfg.seq_len)
  graphdef, params, shardings = real_models.trained_model(cfg, mesh, lm.init_model)
  batch_shardings = {k: sharding.batch_sharding(mesh) for k in _BATCH_KEYS}
  loss_fn = lm_loss_fn(graphdef)
  eval_step = step_lib.compile_eval_step(step_lib.make_eval_step(loss_fn), shardings,
                                         dict(batch_shardings))

  def eval_fn(p):
    batches = pipeline.make_eval_iterator(
        test, batch_size=cfg.eval_batch_size, seq_len=cfg.seq_len, tokenizer=tok, kind="sft",
        encode=encode, rows=sharding.process_rows(mesh, cfg.eval_batch_size))
    return step_lib.evaluate(eval_step, p, (sharding.shard_batch(b, mesh) for b in batches))

  source, train_encode, packed = train, encode, None
  if cfg.pack:  # rows of several examples, computed once; the step reads their segment ids
    packed = packing.pack_examples(
        packing.shuffled([encode(train[i]) for i in range(len(train))], lm.data_seed(cfg)),
        cfg.seq_len, tok.pad_id)
    source, train_encode = packed.rows, lambda row: row
    batch_shardings["segment_ids"] = sharding.batch_sharding(mesh)
    print(f"packed {packed.examples} examples into {len(packed.rows)} rows of {cfg.seq_len} "
          f"tokens ({packed.fill:.0%} full)")
  it = pipeline.make_train_iterator(
      source, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=lm.data_seed(cfg),
      tokenizer=tok, kind="sft", encode=train_encode,
      rows=sharding.process_rows(mesh, cfg.batch_size))
  final, summary = lm.run_training(cfg, mesh, loss_fn, params, shardings, batch_shardings, it,
                                   eval_fn=eval_fn, tokens_per_batch=cfg.batch_size * cfg.seq_len,
                                   stage="SFT")
  real_models.export(cfg, graphdef, final.params)
  result = {"train": summary["train"], "eval": summary["eval"], "wall_s": summary["wall_s"],
            "steps": summary["final_step"],
            "data": {"train": len(train), "test": len(test), "skipped": report.skipped,
                     "packed_rows": len(packed.rows) if packed else None,
                     "packed_fill": packed.fill if packed else None},
            "provenance": provenance.provenance()}
  write_json(os.path.join(cfg.workdir, "result.json"), result, indent=1)
  print(f"held-out loss {summary['eval']['loss']:.4f}, token accuracy "
        f"{summary['eval']['token_accuracy']:.3f}")
  return result
