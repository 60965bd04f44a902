"""Reward models (InstructGPT stage 2) on a preference world: one, or an ensemble.

    python -m experiments.reward --flagfile=experiments/configs/reward_gold_tiny.flags

Builds (or reuses) the SFT stage and its pretraining stage, then:
1. samples --ranking_k responses for each of --num_rankings training prompts (drawn with
   replacement from the train split) and for every held-out prompt from the SFT policy;
2. labels them with the world's simulated raters (rlhf_jax/worlds/registry.py; on the gold world
   Plackett-Luce rankings on r*/T, T calibrated so two raters agree --rater_agreement of the
   time on these pairs; the intransitive world only compares pairs, --ranking_k=2);
3. trains --ensemble_size reward models, each a ScalarHeadModel whose backbone is a copy of
   the SFT model (fresh scalar head, own seed; own bootstrap resample with --bootstrap),
   on the K-way ranking loss (all C(K,2) pairs of a prompt in one batch, 1/C(K,2) each);
4. reports held-out pairwise accuracy on fresh rater labels and on ground-truth labels, per
   member and for the ensemble mean, next to the raters' own ceilings (and, on the sycophancy
   world, how often the model prefers the sycophantic wrong answer of a pair).

--reward_model=pairwise trains a pairwise preference model P(y > y' | x) instead
(pairwise.py beside this module; the intransitive world, where no scalar reward fits).

Outputs in --workdir: member_<e>/{params, checkpoints, metrics.jsonl, tb/}, result.json, and
reward_models.json (members, normalisation statistics, rater temperature), which
`load_reward_models` reads for PPO and best-of-n.
"""
import dataclasses
import json
import os

import jax
import numpy as np

from rlhf_jax import sharding
from rlhf_jax.data import pairs
from rlhf_jax.losses import bradley_terry as bt
from rlhf_jax.models.transformer import ScalarHeadModel
from rlhf_jax.pipeline import lm, real_models, reward_files, worlds
from rlhf_jax.pipeline.config import flag, to_dict
from rlhf_jax.rl import comparisons, scorers
from rlhf_jax.train import checkpoint, reward
from rlhf_jax.train import step as step_lib
from rlhf_jax.train.logging import write_config, write_json
from rlhf_jax.worlds import raters, registry

MANIFEST = "reward_models.json"
REWARD_MODELS = ("bt", "pairwise")


@dataclasses.dataclass(frozen=True)
class RewardConfig(lm.LMConfig, lm.SycophancyFlags, real_models.HFFlags,
                   reward_files.RewardFileFlags):
  sft_flagfile: str = flag("experiments/configs/sft_gold_tiny.flags",
                               "Flagfile of the SFT stage whose samples are ranked and whose "
                               "backbone initialises the reward models.")
  stage_root: str = flag("workdirs/stages", "Where cached upstream stages live.")
  num_rankings: int = flag(512, "Training prompts ranked (drawn with replacement).")
  ranking_k: int = flag(4, "Responses ranked per prompt (K; all C(K,2) pairs train).")
  rater_agreement: float = flag(raters.INSTRUCTGPT_AGREEMENT,
                                    "Target agreement of two independent raters (0.5, 1).")
  sample_temperature: float = flag(1.0, "Temperature of the SFT samples that get ranked.")
  ensemble_size: int = flag(1, "Reward models trained (own seeds; see --bootstrap).")
  bootstrap: bool = flag(False, "Each ensemble member trains on its own bootstrap "
                             "resample of the rankings (otherwise all see the same data).")
  # Not --model, which names the architecture preset in every experiment.
  reward_model: str = flag("bt", "bt: a scalar Bradley-Terry reward model; pairwise: a "
                               "pairwise preference model P(y > y' | x).",
                               choices=REWARD_MODELS)

  def __post_init__(self):
    super().__post_init__()
    if self.file_mode:
      self.check_data_files()
    elif self.init_hf or self.export_hf:
      raise ValueError("--init_hf and --export_hf need --data_files (the world's reward models "
                       "start from its own SFT stage, in its byte vocabulary)")
    if self.world not in registry.PREFERENCE_WORLDS and not self.file_mode:
      raise ValueError(f"experiments.reward needs a preference world "
                       f"(--world={'|'.join(registry.PREFERENCE_WORLDS)}), got {self.world!r}")
    if ((registry.get(self.world).pairs_only or self.reward_model == "pairwise")
        and self.ranking_k != 2):
      raise ValueError(f"--ranking_k={self.ranking_k} with --world={self.world} "
                       f"--reward_model={self.reward_model}: the intransitive world and the "
                       "pairwise model compare pairs (a cyclic preference has no K-way ranking "
                       "model); pass --ranking_k=2")
    if self.reward_model == "pairwise" and self.ensemble_size != 1:
      raise ValueError("--reward_model=pairwise trains one model: pass --ensemble_size=1")
    for name in ("num_rankings", "ensemble_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
    if self.ranking_k < 2:
      raise ValueError(f"--ranking_k must be >= 2 (a ranking needs two responses), "
                       f"got {self.ranking_k}")
    if not 0.5 < self.rater_agreement < 1.0:
      raise ValueError(f"--rater_agreement must be in (0.5, 1), got {self.rater_agreement}")
    if self.sample_temperature <= 0:
      raise ValueError(f"--sample_temperature must be > 0, got {self.sample_temperature}")

  def effective(self) -> "RewardConfig":
    cfg = super().effective()
    return dataclasses.replace(cfg, num_rankings=16) if cfg.smoke else cfg


def check_ensemble(cfg, rcfg: RewardConfig) -> None:
  """Refuses, from the flags alone and before anything is built, a pairwise preference model
  where a downstream run `cfg` (PPO, best-of-n) needs a scalar reward, and an ensemble
  aggregator (--aggregate) over a single-model reward stage."""
  if rcfg.reward_model != "bt":
    raise ValueError(f"{cfg.reward_flagfile} trains a {rcfg.reward_model} preference model, "
                     "but this experiment needs a scalar reward: point --reward_flagfile at a "
                     "--reward_model=bt stage (Nash-MD, experiments.nash_md, uses pairwise "
                     "models)")
  if cfg.aggregate != "mean" and rcfg.ensemble_size < 2:
    raise ValueError(f"--aggregate={cfg.aggregate}: {reward.SINGLE_MEMBER_REFUSAL} in the "
                     f"reward stage ({cfg.reward_flagfile}); pass --aggregate=mean or an "
                     "ensemble flagfile")


def init_reward_model(cfg, mesh, policy_params, seed: int):
  """(graphdef, params, shardings) of a ScalarHeadModel with the policy's backbone."""
  g, fresh, shardings = sharding.init_sharded(
      lambda r: ScalarHeadModel(lm.model_config(cfg), rngs=r), jax.random.key(seed), mesh)
  return g, reward.init_reward_from_policy(policy_params, fresh), shardings


def _batches(examples: list[dict], batch_size: int):
  """Fixed-shape eval batches; the last is padded with rows whose responses are all invalid
  (they add nothing to the loss sums or the denominator)."""
  k = examples[0]["tokens_BxKxT"].shape[0]
  rows = [dict(e, response_valid_BxK=np.ones(k, bool)) for e in examples]
  filler = dict(rows[0], response_valid_BxK=np.zeros(k, bool))
  for i in range(0, len(rows), batch_size):
    chunk = rows[i:i + batch_size]
    chunk += [filler] * (batch_size - len(chunk))
    yield {key: np.stack([r[key] for r in chunk]) for key in chunk[0]}


def proxy_scores(rms: "RewardModels", samples: comparisons.Samples, cfg) -> np.ndarray:
  """Normalised, --aggregate'd proxy reward N x K of every sample, as PPO scores rollouts."""
  return scorer(rms, cfg).score_samples(samples, seq_len=cfg.seq_len,
                                        batch_size=cfg.eval_batch_size)


def scorer(rms: "RewardModels", cfg) -> scorers.RewardModelScorer:
  """The reward models as the engine's scorer, aggregated by --aggregate."""
  return scorers.RewardModelScorer(rms.graphdef, rms.params, cfg.aggregate, cfg.uwo_coef,
                                   rms.norm_mean, rms.norm_std)


def start(cfg: RewardConfig, sft_dir: str):
  """What both reward stages (this one and pairwise.py) begin with: the mesh, the resolved
  flags in the workdir, the SFT policy and the prompts to compare: (mesh, graphdef,
  policy_params, prompt_len, train_prompts (--num_rankings drawn with replacement by --seed),
  test_prompts, rng): rng is the generator that drew them, which the stage goes on drawing
  labels from."""
  mesh = lm.setup(cfg, sharded_eval=False)  # eval batches are only sampled and scored
  write_config(cfg.workdir, to_dict(cfg))
  graphdef, policy_params, _ = lm.init_model(cfg, mesh, init_from=sft_dir)
  rng = np.random.default_rng(cfg.seed)
  train_prompts = list(rng.choice(worlds.split_prompts(cfg)["train"], cfg.num_rankings))
  return (mesh, graphdef, policy_params, worlds.world_prompt_len(cfg), train_prompts,
          worlds.test_prompts(cfg), rng)


def run(cfg: RewardConfig, sft_dir: str) -> dict:
  """Bradley-Terry reward model(s) on raters' rankings of samples of the SFT stage in
  sft_dir (--reward_model=bt; the pairwise model is pairwise.py's)."""
  cfg = cfg.effective()
  (mesh, graphdef, policy_params, prompt_len, train_prompts, test_prompts,
   rng) = start(cfg, sft_dir)
  sample = lambda prompts, key: comparisons.sample_k(
      graphdef, policy_params, prompts, k=cfg.ranking_k, batch_size=cfg.eval_batch_size,
      prompt_len=prompt_len, max_new_tokens=worlds.max_new_tokens(cfg),
      temperature=cfg.sample_temperature, key=key)
  train_s = lm.timed("sample rankings data", sample, train_prompts, jax.random.key(cfg.seed))
  test_s = sample(test_prompts, jax.random.key(cfg.seed + 10_000))
  raters_ = worlds.make_raters(cfg, train_s.prompts, train_s.responses)
  train_rank = raters_.rank(train_s.prompts, train_s.responses, rng)
  test_rank = raters_.rank(test_s.prompts, test_s.responses, rng)
  examples = comparisons.ranking_examples(train_s, train_rank, cfg.seq_len)
  test_examples = comparisons.ranking_examples(test_s, test_rank, cfg.seq_len)

  member_dirs, member_scores, train_scores = [], [], []
  batch_shardings = {k: sharding.batch_sharding(mesh) for k in ("tokens_BxKxT", "valid_BxKxT")}
  for e in range(cfg.ensemble_size):
    mcfg = dataclasses.replace(cfg, workdir=os.path.join(cfg.workdir, f"member_{e}"),
                               seed=cfg.seed + e)
    source = examples
    if cfg.bootstrap:
      idx = np.random.default_rng((cfg.seed, e)).integers(0, len(examples), len(examples))
      source = [examples[i] for i in idx]
    rm_graphdef, params, shardings = init_reward_model(cfg, mesh, policy_params, mcfg.seed)
    loss_fn = reward.ranking_loss_fn(rm_graphdef)
    eval_step = step_lib.compile_eval_step(step_lib.make_eval_step(loss_fn))
    eval_fn = lambda p: step_lib.evaluate(eval_step, p, _batches(test_examples, cfg.batch_size))
    it = pairs.make_pair_train_iterator(source, batch_size=cfg.batch_size, seed=mcfg.seed,
                                        encode=lambda r: r,
                                        rows=sharding.process_rows(mesh, cfg.batch_size))
    final, _ = lm.run_training(mcfg, mesh, loss_fn, params, shardings, batch_shardings, it,
                               eval_fn=eval_fn,
                               tokens_per_batch=cfg.batch_size * cfg.ranking_k * cfg.seq_len)
    member_dirs.append(os.path.relpath(mcfg.workdir, cfg.workdir))
    kw = dict(seq_len=cfg.seq_len, batch_size=cfg.eval_batch_size)
    member_scores.append(scorers.member_scores(rm_graphdef, final.params, test_s, **kw))
    train_scores.append(scorers.member_scores(rm_graphdef, final.params, train_s, **kw))

  # Normalisation statistics of each member on the SFT samples (Coste 2024): members of an
  # ensemble live on arbitrary scales; PPO and best-of-n aggregate normalised scores.
  norm_mean, norm_std = bt.fit_reward_normalization(
      np.stack([s.ravel() for s in train_scores]))
  labels = worlds.pair_labels(cfg, raters_, test_s.prompts, test_s.responses)
  # The ensemble's score: the mean of the members' normalised scores.
  ens = np.mean([(s - m) / sd for s, m, sd in
                 zip(member_scores, np.asarray(norm_mean), np.asarray(norm_std))], 0)
  result = evaluate(member_scores, ens, test_rank, labels)
  result.update(worlds.world(cfg).reward_pair_metrics(
      worlds.world_config(cfg), test_s.prompts, test_s.responses, ens, labels["rater"]))
  temperature = getattr(raters_, "temperature", None)
  result.update(rater_temperature=temperature, rater_agreement_target=cfg.rater_agreement,
                sft_workdir=sft_dir, train_prompts=cfg.num_rankings, ranking_k=cfg.ranking_k,
                sft_train_gold=float(train_s.ground_truth_NxK(worlds.ground_truth(cfg)).mean()))
  manifest = {"members": member_dirs, "norm_mean": np.asarray(norm_mean).tolist(),
              "norm_std": np.asarray(norm_std).tolist(), "rater_temperature": temperature,
              "sft_workdir": sft_dir, "reward_model": "bt"}
  write_json(os.path.join(cfg.workdir, MANIFEST), manifest, indent=1)
  write_json(os.path.join(cfg.workdir, "result.json"), result, indent=1)
  print(format_result(result))
  return result


def evaluate(member_scores, ensemble_scores, test_rank, labels) -> dict:
  """Held-out pairwise accuracy on a fresh rater's labels and on ground-truth labels (strict
  order; ties left out), per member and for the normalised ensemble mean; the ceilings are
  the raters': a rater agrees with another rater `rater_vs_rater` and with the truth
  `rater_vs_gold` of the time. labels: worlds.pair_labels of the test samples."""
  rater_labels = comparisons.ranking_to_better(test_rank)
  gold_labels = labels["truth"] == 1.0
  i, j = np.triu_indices(test_rank.shape[1], k=1)
  p, truth = labels["rater"][:, i, j], labels["truth"][:, i, j]
  decided = truth != 0.5
  out = {"members": [], "rater_vs_rater": float(np.mean(p**2 + (1 - p) ** 2)),
         "rater_vs_gold": float(np.where(truth == 1.0, p, 1 - p)[decided].mean()),
         "test_pairs": int(rater_labels.sum()), "test_gold_pairs": int(gold_labels.sum())}
  for s in member_scores:
    out["members"].append({"accuracy_rater": comparisons.pairwise_accuracy(s, rater_labels),
                           "accuracy_gold": comparisons.pairwise_accuracy(s, gold_labels)})
  out["ensemble"] = {
      "accuracy_rater": comparisons.pairwise_accuracy(ensemble_scores, rater_labels),
      "accuracy_gold": comparisons.pairwise_accuracy(ensemble_scores, gold_labels)}
  return out


def format_result(result: dict) -> str:
  lines = ["held-out pairwise accuracy     rater labels   gold labels"]
  for e, m in enumerate(result["members"]):
    lines.append(f"  member {e:<22} {m['accuracy_rater']:.3f}          {m['accuracy_gold']:.3f}")
  if len(result["members"]) > 1:
    m = result["ensemble"]
    lines.append(f"  ensemble mean          {m['accuracy_rater']:.3f}          "
                 f"{m['accuracy_gold']:.3f}")
  lines.append(f"  raters' ceiling        {result['rater_vs_rater']:.3f}          "
               f"{result['rater_vs_gold']:.3f}")
  if "rm_prefers_sycophantic" in result:
    lines.append(f"sycophantic wrong vs correct ({result['sycophantic_pairs']} pairs): reward "
                 f"model prefers the sycophantic one {result['rm_prefers_sycophantic']:.3f}, "
                 f"raters {result['raters_prefer_sycophantic']:.3f}")
  return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class RewardModels:
  """Trained reward models as PPO and best-of-n use them."""
  graphdef: object
  params: list
  norm_mean: np.ndarray
  norm_std: np.ndarray


def read_manifest(workdir: str) -> dict:
  """<workdir>/reward_models.json: members, normalisation statistics, rater temperature and
  the SFT stage the reward models were trained from (downstream runs load that very one)."""
  with open(os.path.join(workdir, MANIFEST)) as f:
    return json.load(f)


def load_reward_models(cfg, mesh, workdir: str, policy_params) -> RewardModels:
  """The members listed in <workdir>/reward_models.json, restored into this run's model
  shape (a checkpoint of another shape fails naming the tensor)."""
  manifest = read_manifest(workdir)
  graphdef, params, shardings = init_reward_model(cfg, mesh, policy_params, cfg.seed)
  abstract = lm.abstract_params((graphdef, params, shardings))
  members = [checkpoint.load_params(os.path.join(workdir, d, lm.PARAMS_DIR), abstract)
             for d in manifest["members"]]
  return RewardModels(graphdef, members, np.asarray(manifest["norm_mean"], np.float32),
                      np.asarray(manifest["norm_std"], np.float32))

