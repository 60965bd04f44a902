"""The DPO family from preference pairs, as the DPO experiment (files or a world) and the
sycophancy sweep run it: the typed config, the frozen reference's log-probs precomputed once
over the pairs, and training on them through the offline loop (pipeline/lm.py: run_training).
World mode (rater-labelled pairs of SFT samples) is dpo_world.py; the file mode, Hugging Face
checkpoints and --dry_run memory plans are dpo_files.py's.
"""
import dataclasses

import jax
import numpy as np

from rlhf_jax import sharding
from rlhf_jax.data import file_datasets, pairs, shared_prefix
from rlhf_jax.data import preference_formats as pf
from rlhf_jax.pipeline import config, lm, real_models
from rlhf_jax.train import preference
from rlhf_jax.train import step as step_lib
from rlhf_jax.worlds import raters, registry


@dataclasses.dataclass(frozen=True)
class DPOConfig(lm.LMConfig, lm.SycophancyFlags, real_models.HFFlags):
  workdir: str = config.flag("workdirs/dpo", "Run directory: checkpoints, metrics.jsonl, tb/, ...")
  init_from: str = config.flag("", "Params of an earlier stage (its workdir or params/ dir).")
  data_files: str = config.flag("", "Comma-separated preference files / globs (JSONL, JSON, Parquet).")
  data_format: str = config.flag("pairs", "Preference file format (unpaired: KTO's labelled "
                                 "completions).", choices=(*pf.PREFERENCE_FORMATS, "unpaired"))
  test_fraction: float = config.flag(0.1, "Held-out fraction (hashed by prompt); 0: no eval split.")
  on_error: str = config.flag("raise", "Malformed records: fail the build or skip and count them.",
                           choices=file_datasets.ON_ERROR)
  loss: str = config.flag("dpo", "Objective (kto needs unpaired labels: refused on pairs; "
                       "simpo needs no reference model).", choices=preference.LOSSES)
  beta: float = config.flag(0.1, "KL coefficient beta (> 0) of dpo/cdpo/robust_dpo/kto; hinge's "
                         "inverse margin 1/beta; simpo's reward scale on averaged log-probs, "
                         "where the 0.1 default is far too small: SimPO used 2 to 2.5 (later 10).")
  label_smoothing: float = config.flag(0.0, "Label-flip probability eps: cdpo's in [0, 0.5], "
                                    "robust_dpo's in [0, 0.5) (0: plain DPO).")
  kto_desirable_weight: float = config.flag(1.0, "KTO's lambda_D: weight of desirable examples "
                                         "(> 0; balance lambda_D n_D against lambda_U n_U).")
  kto_undesirable_weight: float = config.flag(1.0, "KTO's lambda_U: weight of undesirable "
                                           "examples (> 0).")
  ipo_tau: float = config.flag(0.1, "IPO regularisation tau (> 0): target margin 1/(2 tau).")
  simpo_gamma: float = config.flag(0.5, "SimPO target reward margin gamma (>= 0; margin gamma/beta "
                                "in averaged log-prob). 0.5: TRL's default, in SimPO's grid "
                                "0.3-1.6 (at beta 2: 0.25 nats per token).")
  average_logps: bool = config.flag(False, "Length-averaged sequence log-probs (TRL's IPO); "
                                 "simpo always averages.")
  pack: bool = config.flag(False, "File mode: pack several pairs per --seq_len row (each pair's "
                         "chosen and rejected adjacent, attention kept inside each response's "
                         "sequence; data/packing.py); --batch_size then counts rows.")
  response_len: int = config.flag(0, "Prefix sharing: N > 0 puts each pair in ONE row [prompt | "
                                  "chosen | rejected] of --seq_len + N tokens, so the prompt is "
                                  "computed once and the LM head runs on response tokens only; "
                                  "N bounds each response (with eos; a longer one is an error). "
                                  "0: chosen and rejected as two rows.")
  precompute_ref: bool = config.flag(True, "Precompute reference log-probs once (else per step).")
  sft_flagfile: str = config.flag("experiments/configs/sft_gold_tiny.flags",
                               "World mode: flagfile of the SFT stage that policy and "
                               "reference start from and whose samples are ranked.")
  stage_root: str = config.flag("workdirs/stages", "Where cached upstream stages live.")
  num_pairs: int = config.flag(256, "World mode: training prompts (drawn with replacement), "
                            "one rater-labelled pair each.")
  ranking_k: int = config.flag(4, "World mode: SFT samples ranked per prompt; the pair is the "
                            "rater's first vs last.")
  rater_agreement: float = config.flag(raters.INSTRUCTGPT_AGREEMENT,
                                    "--world=gold: target agreement of two independent "
                                    "raters, in (0.5, 1).")
  matched_sft: bool = config.flag(False, "World mode: also continue SFT for --steps steps (the "
                               "matched-compute baseline) and report it.")

  def __post_init__(self):
    super().__post_init__()
    if self.beta <= 0:
      raise ValueError(f"--beta must be > 0, got {self.beta}")
    if self.ipo_tau <= 0:
      raise ValueError(f"--ipo_tau must be > 0, got {self.ipo_tau}")
    if not 0.0 <= self.label_smoothing <= 0.5:
      raise ValueError(f"--label_smoothing must be in [0, 0.5], got {self.label_smoothing}")
    if self.loss == "robust_dpo" and self.label_smoothing >= 0.5:
      raise ValueError(f"--label_smoothing={self.label_smoothing} with --loss=robust_dpo: robust "
                       "DPO divides by 1 - 2 eps, so eps must be < 0.5; pass --label_smoothing "
                       "below 0.5 (your estimate of the labels' flip rate)")
    if self.simpo_gamma < 0:
      raise ValueError(f"--simpo_gamma must be >= 0, got {self.simpo_gamma}")
    if not 0.0 <= self.test_fraction < 1.0:
      raise ValueError(f"--test_fraction must be in [0, 1), got {self.test_fraction}")
    if self.world_mode:
      self._check_world_mode()
    # KTO's labels: the world's rankings split into examples, or an unpaired file.
    unpaired = self.data_format == "unpaired"
    try:
      preference.check_loss(self.loss, unpaired_labels=self.world_mode or unpaired)
    except ValueError as e:  # name the flags the refusal is about
      raise ValueError(f"--loss={self.loss} with --data_format={self.data_format}: {e}; pass "
                       "--data_format=unpaired (KTO's labelled completions) or another --loss"
                       ) from None
    if unpaired and self.loss != "kto":
      raise ValueError(f"--data_format=unpaired holds labelled single completions, which only "
                       f"KTO trains on: pass --loss=kto (got --loss={self.loss})")
    if min(self.kto_desirable_weight, self.kto_undesirable_weight) <= 0:
      raise ValueError("--kto_desirable_weight and --kto_undesirable_weight must be > 0")
    if self.response_len:
      shared_prefix.check_response_len(self.response_len, self.seq_len)
      if self.pack:
        raise ValueError("--pack and --response_len are two layouts of the pairs (several "
                         "pairs per row, or one row per pair sharing its prompt): pick one")
    if self.pack and (self.loss == "kto" or self.world_mode):
      raise ValueError("--pack packs preference pairs of --data_files; KTO's unpaired examples "
                       "and world mode train unpacked: drop --pack")
    if self.lora_rank and not self.precompute_ref and preference.needs_reference(self.loss):
      raise ValueError("--lora_rank with --precompute_ref=false: a LoRA run's reference is its "
                       "base, precomputed once; drop --precompute_ref=false")
    if self.init_hf and self.init_from:
      raise ValueError("give at most one of --init_hf and --init_from")
    if not self.data_files and not self.dry_run and not self.world_mode:
      raise ValueError("--data_files is required (preference pairs to train on)")

  @property
  def world_mode(self) -> bool:
    """World mode (a preference world): pairs come from the SFT policy's samples ranked by
    the world's simulated raters."""
    return self.world in registry.PREFERENCE_WORLDS

  def _check_world_mode(self):
    if self.data_files:
      raise ValueError(f"--data_files cannot be combined with --world={self.world} (world mode "
                       "trains on rater-labelled SFT samples); drop one of them")
    for name in ("init_hf", "init_from"):
      if getattr(self, name):
        raise ValueError(f"--{name} cannot be combined with --world={self.world}: policy and "
                         "reference start from the SFT stage of --sft_flagfile")
    if self.num_pairs < 1:
      raise ValueError(f"--num_pairs must be >= 1, got {self.num_pairs}")
    if self.ranking_k < 2:
      raise ValueError(f"--ranking_k must be >= 2 (a pair needs two responses), "
                       f"got {self.ranking_k}")
    if registry.get(self.world).pairs_only and self.ranking_k != 2:
      raise ValueError(f"--ranking_k={self.ranking_k}: the intransitive world's raters only "
                       "compare pairs (a cyclic preference has no K-way ranking); pass "
                       "--ranking_k=2")
    if not 0.5 < self.rater_agreement < 1.0:
      raise ValueError(f"--rater_agreement must be in (0.5, 1), got {self.rater_agreement}")

  def effective(self) -> "DPOConfig":
    cfg = super().effective()
    return dataclasses.replace(cfg, num_pairs=min(cfg.num_pairs, 16)) if cfg.smoke else cfg


def jit_pair_fn(fn, shardings, mesh, keys):
  """jit of fn(params, batch) -> per-row outputs, for batches with `keys`."""
  return jax.jit(sharding.traced_on(fn, mesh),
                 in_shardings=(shardings, {k: sharding.batch_sharding(mesh) for k in keys}),
                 out_shardings=sharding.batch_sharding(mesh))


def map_pairs(fn, params, source, cfg: DPOConfig, encode, mesh) -> dict[str, np.ndarray]:
  """fn(params, batch) -> dict of per-row arrays, over `source` in order, padding dropped."""
  out = {}
  for batch in pairs.make_pair_eval_iterator(source, batch_size=cfg.eval_batch_size,
                                             encode=encode):  # every row, on every process
    keep = np.asarray(batch["example_valid"])
    for k, v in fn(params, sharding.shard_global(batch, mesh)).items():
      out.setdefault(k, []).append(sharding.to_host(v)[keep])
  return {k: np.concatenate(v) for k, v in out.items()}


def precompute_reference(ref_fn, params, source, cfg: DPOConfig, encode, mesh):
  """The frozen reference's (chosen_N, rejected_N) log-probs over `source`, in order."""
  out = map_pairs(ref_fn, params, source, cfg, encode, mesh)
  return out["ref_chosen_logps"], out["ref_rejected_logps"]


def with_reference(cfg: DPOConfig, graphdef, params, shardings, mesh, source, encode):
  """`source` carrying the reference's precomputed log-probs (preference.reference_logps_fn,
  --average_logps as the loss uses them)."""
  keys = [k for k in encode(source[0]) if k not in pairs.REF_KEYS]
  ref_fn = jit_pair_fn(preference.reference_logps_fn(graphdef, average=cfg.average_logps),
                       shardings, mesh, keys)
  return pairs.WithReferenceLogps(
      source, *precompute_reference(ref_fn, params, source, cfg, encode, mesh))


def pair_eval_fn(eval_step, test_src, cfg: DPOConfig, encode, mesh):
  """eval_fn(params): the loss and metrics over the held-out pairs."""
  def eval_fn(params):
    batches = pairs.make_pair_eval_iterator(
        test_src, batch_size=cfg.eval_batch_size, encode=encode,
        rows=sharding.process_rows(mesh, cfg.eval_batch_size))
    return step_lib.evaluate(eval_step, params, (sharding.shard_batch(b, mesh) for b in batches))
  return eval_fn


def train_pairs(cfg: DPOConfig, mesh, loss_fn, params, shardings, batch_shardings, train_src,
           encode, eval_fn):
  it = pairs.make_pair_train_iterator(train_src, batch_size=cfg.batch_size, seed=cfg.seed,
                                      encode=encode,
                                      rows=sharding.process_rows(mesh, cfg.batch_size))
  # Packed: rows of several pairs; shared prompt: one longer row per pair.
  rows = cfg.batch_size if cfg.pack or cfg.response_len else 2 * cfg.batch_size
  return lm.run_training(cfg, mesh, loss_fn, params, shardings, batch_shardings, it,
                         eval_fn=eval_fn,
                         tokens_per_batch=rows * (cfg.seq_len + cfg.response_len))
