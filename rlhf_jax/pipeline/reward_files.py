"""Bradley-Terry reward models on local preference files from a Hugging Face checkpoint (the
reward stage's file mode; the simulated raters' rankings are reward.py's).

    python -m experiments.reward --init_hf=out/sft --data_files=data/hh/train.jsonl \\
        --data_format=hh_rlhf --seq_len=512 --export_hf=out/rm

Data (--data_files): preference pairs (hh_rlhf, ultrafeedback, pairs: a ranking of K = 2,
chosen first) or K-way rankings (rankings: K >= 2 responses best first, or ranked by their
scores). Every pair of a prompt's ranking trains in one batch, weighted 1/C(K,2) (the
InstructGPT ranking loss, train/reward.py); prompts with fewer responses than the file's
largest K are padded with absent responses. Message prompts render with the tokenizer's chat
template (each response as the assistant reply), text prompts verbatim.

Model: --init_hf a causal LM (an SFT model: its backbone with a fresh scalar head, Ouyang 2022
sec 3.5) or a *ForSequenceClassification reward model (trained further). Held out: a hashed
--test_fraction, its pairwise accuracy and loss logged every --eval_every steps. --export_hf
writes *ForSequenceClassification (num_labels=1), the layout transformers' reward models load,
scoring at the last non-padding token. HF's score layer has no bias: the head's bias, which
the pairwise loss cannot see (r_w - r_l is shift invariant), is dropped from the export.
"""
import dataclasses
import json
import os

import jax
import numpy as np

from rlhf_jax import plan_models, provenance, sharding
from rlhf_jax.data import packing, pairs, pipeline, shared_prefix
from rlhf_jax.data import preference_formats as pf
from rlhf_jax.models import hf
from rlhf_jax.models.transformer import ScalarHeadModel
from rlhf_jax.pipeline import lm, real_models
from rlhf_jax.pipeline.config import flag
from rlhf_jax.train import reward
from rlhf_jax.train import step as step_lib
from rlhf_jax.train.logging import write_json

REWARD_FORMATS = (*pf.PREFERENCE_FORMATS, "rankings")


@dataclasses.dataclass(frozen=True)
class RewardFileFlags(real_models.LocalDataFlags):
  data_files: str = flag("", "Comma-separated preference files / globs (JSONL, JSON, Parquet); "
                         "set, the stage trains on them instead of simulated raters' labels.")
  data_format: str = flag("hh_rlhf", "Record format of --data_files.", choices=REWARD_FORMATS)
  response_len: int = flag(0, "Prefix sharing: N > 0 puts each ranking in ONE row [prompt | "
                           "response 1 | ... | response K] of --seq_len + (K - 1) N tokens, "
                           "the prompt computed once; N bounds each response (with eos). 0: K "
                           "rows of --seq_len.")

  def check_data_files(self):
    super().check_data_files()
    if self.response_len:
      shared_prefix.check_response_len(self.response_len, self.seq_len)
      if self.pack:
        raise ValueError("--pack and --response_len are two layouts of the rankings (several "
                         "per row, or one row per ranking sharing its prompt): pick one")
    if self.reward_model != "bt" or self.ensemble_size != 1:
      raise ValueError("--data_files trains one Bradley-Terry reward model: pass "
                       "--reward_model=bt --ensemble_size=1")


def max_responses(source, fmt: str) -> int:
  if fmt != "rankings":
    return 2
  return max(len(json.loads(pipeline._text(source[i]["responses"]))) for i in range(len(source)))


def make_encoder(fmt: str, tokenizer, render_fn, seq_len: int, k: int, response_len: int = 0):
  """record -> {tokens_BxKxT: K x T, valid_BxKxT, response_valid_BxK: K}: [bos] + prompt +
  response + [eos] per response in rank order, right-padded; absent responses are all
  padding with response_valid False. With response_len > 0: one shared-prompt row of
  seq_len + (K - 1) * response_len tokens (data/shared_prefix.py; absent responses empty)
  and response_valid_BxK."""
  def encode(record):
    seqs = pf.render_pairs(record, fmt, render_fn)
    if response_len:
      return shared(seqs)
    tokens = np.full((k, seq_len), tokenizer.pad_id, np.int32)
    valid = np.zeros((k, seq_len), bool)
    for j, (prompt, response) in enumerate(seqs):
      ids = [tokenizer.bos_id, *tokenizer.encode(prompt), *tokenizer.encode(response),
             tokenizer.eos_id]
      if len(ids) > seq_len:
        raise ValueError(f"prompt + response {j} of {prompt[:40]!r} is {len(ids)} tokens, "
                         f"longer than --seq_len={seq_len}")
      tokens[j, :len(ids)], valid[j, :len(ids)] = ids, True
    return {"tokens_BxKxT": tokens, "valid_BxKxT": valid,
            "response_valid_BxK": np.arange(k) < len(seqs)}

  def shared(seqs):
    head = [tokenizer.bos_id, *tokenizer.encode(seqs[0][0])]
    responses = [tokenizer.encode(r) + [tokenizer.eos_id] for _, r in seqs]
    for j, r in enumerate(responses):
      if len(head) + len(r) > seq_len:
        raise ValueError(f"prompt + response {j} of {seqs[0][0][:40]!r} is "
                         f"{len(head) + len(r)} tokens, longer than --seq_len={seq_len}")
    row = shared_prefix.shared_row(head, responses + [[]] * (k - len(responses)),
                                   row_len=seq_len + (k - 1) * response_len,
                                   response_len=response_len, pad_id=tokenizer.pad_id)
    return {**row, "response_valid_BxK": np.arange(k) < len(seqs)}
  return encode


def init_scalar_model(path: str, cfg, mcfg, mesh, seed: int):
  """(graphdef, params, shardings) of a ScalarHeadModel: the HF reward model at `path` as it
  is, an HF causal LM's backbone there with a fresh scalar head (seeded), or with path "" a
  random mcfg model."""
  if path and hf.architecture(hf.read_hf_config(path))[2] == "scalar":
    return real_models.load(path, mesh, cfg, kind="scalar")
  if path:
    mcfg = real_models.config_of(path, cfg)
  g, fresh, shardings = sharding.init_sharded(lambda r: ScalarHeadModel(mcfg, rngs=r),
                                              jax.random.key(seed), mesh)
  if path:
    _, policy, _ = real_models.load(path, mesh, cfg)
    fresh = reward.init_reward_from_policy(policy, fresh)
  return g, fresh, shardings


def run(cfg) -> dict:
  """Trains a reward model on --data_files; writes <workdir>/result.json (and --export_hf)."""
  cfg = cfg.effective()
  mcfg = real_models.model_config(cfg, lm.model_config, dry_run=cfg.dry_run)
  if cfg.dry_run:  # planned for pairs (K = 2); a rankings file's K is known once it is read
    return real_models.dry_run(cfg, "reward", mcfg, plan_models.Shapes(
        batch_size=cfg.batch_size, seq_len=cfg.seq_len, num_microbatches=cfg.num_microbatches,
        ranking_k=2))
  mesh = lm.setup(cfg)
  tok, render_fn, report, train, test = real_models.read_local_data(cfg, mcfg, packed=cfg.pack)
  k = max(max_responses(train, cfg.data_format), max_responses(test, cfg.data_format))
  encode = make_encoder(cfg.data_format, tok, render_fn, cfg.seq_len, k, cfg.response_len)
  graphdef, params, shardings = real_models.with_adapters(
      cfg, *init_scalar_model(cfg.init_hf, cfg, mcfg, mesh, cfg.seed), mesh)
  loss_fn = reward.ranking_loss_fn(graphdef)
  batch_shardings = {key: sharding.batch_sharding(mesh) for key in encode(train[0])}
  eval_step = step_lib.compile_eval_step(step_lib.make_eval_step(loss_fn), shardings,
                                         batch_shardings)

  # The last eval batch is filled with rows of no valid response: they add nothing to a sum.
  filler = {**encode(test[0]), "response_valid_BxK": np.zeros(k, bool)}

  def eval_fn(p):
    ds = pipeline.global_order_batches(len(test), cfg.eval_batch_size, seed=None,
                                       repeat=False).map(pipeline.read_rows(
        test, encode, sharding.process_rows(mesh, cfg.eval_batch_size), cfg.eval_batch_size,
        filler))
    batches = iter(ds.to_iter_dataset(pipeline._READ_OPTIONS))
    return step_lib.evaluate(eval_step, p, (sharding.shard_batch(b, mesh) for b in batches))

  source, train_encode, train_shardings, packed = train, encode, batch_shardings, None
  if cfg.pack:  # rows of several whole rankings, computed once
    packed = packing.pack_rankings(packing.shuffled(
        [encode(train[i]) for i in range(len(train))], lm.data_seed(cfg)), cfg.seq_len,
        tok.pad_id)
    source, train_encode = packed.rows, lambda row: row
    train_shardings = {key: sharding.batch_sharding(mesh) for key in packing.RANKING_KEYS}
    print(f"packed {packed.examples} rankings into {len(packed.rows)} rows of {cfg.seq_len} "
          f"tokens ({packed.fill:.0%} full)")
  it = pairs.make_pair_train_iterator(source, batch_size=cfg.batch_size,
                                      seed=lm.data_seed(cfg), encode=train_encode,
                                      rows=sharding.process_rows(mesh, cfg.batch_size))
  final, summary = lm.run_training(
      cfg, mesh, loss_fn, params, shardings, train_shardings, it, eval_fn=eval_fn,
      tokens_per_batch=cfg.batch_size * (cfg.seq_len * (1 if packed else k)
                                         if not cfg.response_len else
                                         cfg.seq_len + (k - 1) * cfg.response_len),
      stage="reward")
  real_models.export(cfg, graphdef, final.params, drop_head_bias=True)
  result = {"train": summary["train"], "eval": summary["eval"], "wall_s": summary["wall_s"],
            "steps": summary["final_step"], "responses_per_prompt": k,
            "packed_rows": len(packed.rows) if packed else None,
            "data": {"train": len(train), "test": len(test), "skipped": report.skipped},
            "head_bias_dropped": float(sharding.to_host(final.params["head_b"])),
            "provenance": provenance.provenance()}
  write_json(os.path.join(cfg.workdir, "result.json"), result, indent=1)
  print(f"held-out pairwise accuracy {summary['eval']['accuracy']:.3f}, loss "
        f"{summary['eval']['loss']:.4f}")
  return result
