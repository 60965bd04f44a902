"""The cached stage chain pretrain -> SFT -> reward model, as an explicit graph. An online or
offline run (PPO, GRPO, DPO, ...) names the stage it starts from by flagfile and asks for it
with ensure(); the chain builds whatever upstream is missing, each stage cached under the
run's --stage_root by a key of its resolved flags, its upstream stages' and the code version
(stages.py).

  stage     config                  starts from   named by the config field
  pretrain  pretrain.PretrainConfig  -             -
  sft       sft.SFTConfig            pretrain      pretrain_flagfile
  reward    reward.RewardConfig      sft           sft_flagfile   (--reward_model=bt|pairwise)

An upstream stage's config is ITS OWN flagfile plus the downstream run's RUN_FLAGS: how and
where the chain runs (model preset, mesh, --smoke, data and stage directories), which a run
sets for all of its stages. Nothing else is passed down. WORLD_FLAGS say what the world's
data are and must agree along the chain: a downstream run whose value differs from an
upstream stage's (e.g. --pretrain_texts=4000 against a pretraining flagfile's 8000) is
refused with both values named, never silently applied to the upstream stage.
"""
import dataclasses
from typing import Callable

from rlhf_jax.pipeline import config, pairwise, pretrain, reward, sft, stages

RUN_FLAGS = ("model", "mesh_data", "mesh_fsdp", "mesh_tensor", "smoke", "data_dir",
             "stage_root")
WORLD_FLAGS = ("world", "world_seed", "pretrain_texts", "error_rate", "min_digits",
               "max_digits", "statements_per_text", "p_syc")


def _reward_run(cfg: reward.RewardConfig, sft_dir: str) -> dict:
  return (pairwise.run if cfg.reward_model == "pairwise" else reward.run)(cfg, sft_dir)


@dataclasses.dataclass(frozen=True)
class Stage:
  config_cls: type
  run: Callable  # run(config, upstream workdir or None) -> result dict
  upstream: str | None = None
  upstream_flagfile: str | None = None  # the config field naming the upstream's flagfile


GRAPH = {"pretrain": Stage(pretrain.PretrainConfig, lambda cfg, _: pretrain.run(cfg)),
         "sft": Stage(sft.SFTConfig, sft.run, "pretrain", "pretrain_flagfile"),
         "reward": Stage(reward.RewardConfig, _reward_run, "sft", "sft_flagfile")}


def upstream_config(name: str, flagfile: str, downstream):
  """Stage `name`'s config: its flagfile, then the downstream run's RUN_FLAGS; refuses a
  WORLD_FLAGS disagreement with the downstream run."""
  cls = GRAPH[name].config_cls
  fields = {f.name for f in dataclasses.fields(cls)}
  overrides = [f"--{n}={getattr(downstream, n)}" for n in RUN_FLAGS
               if n in fields and hasattr(downstream, n)]
  cfg = config.parse(cls, [f"--flagfile={flagfile}", *overrides])
  conflicts = [f"--{n}={getattr(downstream, n)} here, {getattr(cfg, n)} in {flagfile}"
               for n in WORLD_FLAGS
               if hasattr(downstream, n) and getattr(downstream, n) != getattr(cfg, n)]
  if conflicts:
    raise ValueError(f"the {name} stage must describe the same world as this run: "
                     f"{'; '.join(conflicts)}. Set these flags in the stage's flagfile (or a "
                     f"copy of it that this run names), not only here")
  return cfg


def _upstream(name: str, cfg):
  stage = GRAPH[name]
  return upstream_config(stage.upstream, getattr(cfg, stage.upstream_flagfile), cfg)


def key_config(name: str, cfg) -> dict:
  """What stage `name`'s key hashes: its resolved flags and its upstream stages', recursively."""
  stage = GRAPH[name]
  upstream = None
  if stage.upstream:
    upstream = {stage.upstream: key_config(stage.upstream, _upstream(name, cfg))}
  return stages.key_config(cfg, upstream)


def ensure(name: str, cfg, stage_root: str | None = None) -> str:
  """Stage `name` with config `cfg`: its cached workdir, built (with whatever upstream it
  lacks) unless complete. stage_root defaults to cfg.stage_root."""
  root = stage_root or cfg.stage_root
  stage = GRAPH[name]
  upstream_dir = ensure(stage.upstream, _upstream(name, cfg), root) if stage.upstream else None
  return stages.ensure_stage(
      name, key_config(name, cfg), root,
      lambda workdir: stage.run(dataclasses.replace(cfg, workdir=workdir), upstream_dir))


def run_stage(name: str, cfg) -> dict:
  """Runs stage `name` in cfg.workdir itself (a main: python -m experiments.sft ...), its
  upstream stages taken from the cache."""
  stage = GRAPH[name]
  upstream_dir = (ensure(stage.upstream, _upstream(name, cfg), cfg.stage_root)
                  if stage.upstream else None)
  return stage.run(cfg, upstream_dir)
