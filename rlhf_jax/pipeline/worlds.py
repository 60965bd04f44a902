"""The world of a run, from its flags: the experiments' side of rlhf_jax/worlds/registry.py.

Every experiment config derived from lm.LMConfig carries --world, --world_seed,
--pretrain_texts, --smoke and the worlds' own parameters; these helpers turn them into the
registry's World, its config and what follows from it (datasets, prompts, lengths, raters).
"""
import numpy as np

from rlhf_jax import distributed
from rlhf_jax.worlds import heldout, registry


def world(cfg) -> registry.World:
  return registry.get(cfg.world)


def world_config(cfg, **overrides):
  """The world's own config from the run's flags (--smoke shrinks the corpora); only the
  world's own parameters (registry World.params) are passed on."""
  w = world(cfg)
  params = {name: getattr(cfg, name) for name in w.params if hasattr(cfg, name)}
  params.update(overrides)
  return w.config(seed=cfg.world_seed, num_pretrain_texts=cfg.pretrain_texts, smoke=cfg.smoke,
                  **params)


def build_datasets(cfg) -> dict:
  """The world's TFDS datasets in --data_dir; in a job of several processes process 0
  materialises them and the others then read what it wrote (no two writers of one file)."""
  if not distributed.is_writer():
    distributed.barrier("world datasets built")
  built = world(cfg).build_datasets(world_config(cfg), cfg.data_dir)
  if distributed.is_writer():
    distributed.barrier("world datasets built")
  return built


def max_new_tokens(cfg) -> int:
  """--max_new_tokens, or the world's default when it is 0."""
  return cfg.max_new_tokens or world(cfg).default_max_new_tokens


def split_prompts(cfg) -> dict[str, list[str]]:
  """{"train": [...], "test": [...]} prompts."""
  return world(cfg).split_prompts(world_config(cfg))


def test_prompts(cfg) -> list[str]:
  """The held-out prompts an experiment evaluates on: up to --eval_prompts of the test split."""
  return split_prompts(cfg)["test"][:min(cfg.eval_prompts, world_config(cfg).num_test)]


def world_prompt_len(cfg) -> int:
  """Prompt columns that fit every prompt of the world."""
  return world(cfg).prompt_len(world_config(cfg))


def summary(cfg, prompts, responses, prefix: str = "") -> dict:
  """A preference world's table row of responses (registry PreferenceWorld.summary)."""
  return world(cfg).summary(world_config(cfg), prompts, responses, prefix)


def ground_truth(cfg):
  """(prompts, responses) -> the world's ground truth, float64 [N]."""
  w, wcfg = world(cfg), world_config(cfg)
  return lambda prompts, responses: w.ground_truth(wcfg, prompts, responses)


def make_raters(cfg, prompts, responses_NxK):
  """The world's raters for these responses (gold calibrates its temperature to
  --rater_agreement on all within-prompt pairs of them)."""
  return world(cfg).raters(world_config(cfg), prompts, responses_NxK,
                           agreement=cfg.rater_agreement)


def pair_labels(cfg, raters_, prompts, responses_NxK) -> dict:
  """Per within-prompt pair (i, j) [N, K, K]: the raters' P(i > j) and the truth (1/0/0.5)."""
  n, k = len(prompts), len(responses_NxK[0])
  i, j = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
  ps = [p for p in prompts for _ in range(k * k)]
  ya = [ys[a] for ys in responses_NxK for a in i.ravel()]
  yb = [ys[b] for ys in responses_NxK for b in j.ravel()]
  return {"rater": raters_.preference(ps, ya, yb).reshape(n, k, k),
          "truth": world(cfg).truth_better(world_config(cfg), ps, ya, yb).reshape(n, k, k)}


def heldout_metrics(cfg, graphdef, params, heldout_source, *, key) -> dict:
  """The world's held-out evaluation of a policy on up to --eval_prompts test records."""
  source = [heldout_source[i] for i in range(min(cfg.eval_prompts, len(heldout_source)))]
  return heldout.heldout_metrics(world(cfg), world_config(cfg), graphdef, params, source,
                                 batch_size=cfg.eval_batch_size, max_new=max_new_tokens(cfg),
                                 key=key)


def heldout_metric_names(cfg, heldout_source) -> tuple[str, ...]:
  """The names heldout_metrics returns for this world (computed without a model)."""
  return heldout.metric_names(world(cfg), world_config(cfg), heldout_source[0])


def headline(cfg) -> tuple[str, ...]:
  return heldout.headline(world(cfg))
