"""Online DPO, best-of-n and Nash-MD on HH-RLHF-format prompt files from a tiny Llama
checkpoint, judged by a reward model that experiments.reward trained from the same checkpoint
and exported: each run through its experiment's config and file-mode entry point, the online
DPO export reloaded by transformers with our logits, both trainings with LoRA adapters over a
frozen base, best-of-n's table recomputed from its stored samples (their rewards rescored by
transformers), the labeler and the judge against transformers' scores, and flag errors raised
before anything compiles."""
import json
import math
import os

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from real_formats import write_jsonl
from experiments import reward as reward_main
from rlhf_jax.compile_count import CompileCounter
from rlhf_jax.data.hf_tokenizer import HFTokenizer
from rlhf_jax.models import lora
from rlhf_jax.models.hf_import import load_hf_model
from rlhf_jax.pipeline import config
from rlhf_jax.pipeline.reward import RewardConfig
from rlhf_jax.rl import comparisons, scorers
from rlhf_jax.runs import best_of_n_files, nash_md_files, online_dpo_files
from rlhf_jax.runs.best_of_n import BestOfNConfig
from rlhf_jax.runs.nash_md import NashMDConfig
from rlhf_jax.runs.online_dpo import OnlineDPOConfig
from rlhf_jax.sharding import make_mesh
from rlhf_jax.train import checkpoint
from rlhf_jax.train.logging import read_metrics
from test_reward_files import hh_records

# seq_len 64 holds bos + a 40-token prompt + 6 sampled tokens re-encoded from their text (a
# random model's byte tokens decode to U+FFFD, up to 3 tokens each) + eos.
COMMON = {"prompt_format": "hh_rlhf", "test_fraction": 0.25, "max_prompt_len": 40,
          "max_new_tokens": 6, "seq_len": 64, "batch_size": 8, "eval_batch_size": 8,
          "eval_prompts": 4, "warmup_steps": 1, "learning_rate": 1e-3}


def _args(root, **flags) -> list[str]:
  flags = {"init_hf": root / "llama", "reward_hf": root / "rm",
           "prompt_files": root / "hh.jsonl", "data_dir": root / "data", **COMMON, **flags}
  return [f"--{k}={v}" for k, v in flags.items()]


def _online_dpo_args(root, **extra):
  return _args(root, **{"workdir": root / "online_dpo", "rounds": 3, "prompts_per_round": 8,
                        "steps_per_round": 2, **extra})


def _best_of_n_args(root, **extra):
  return _args(root, **{"workdir": root / "best_of_n", "n_max": 4, "ns": "1,2,4", **extra})


def _nash_md_args(root, **extra):
  return _args(root, **{"workdir": root / "nash_md", "steps": 3, "group_size": 2,
                        "eval_every": 3, "save_every": 2, "log_every": 1, "eval_samples": 2,
                        "learning_rate": 1e-2, **extra})


@pytest.fixture(scope="module")
def root(tmp_path_factory, hf_root):
  """A directory with the policy (llama), hh.jsonl and the reward model trained on it (rm)."""
  root = tmp_path_factory.mktemp("online")
  (root / "llama").symlink_to(hf_root["llama"])
  data = write_jsonl(root / "hh.jsonl", hh_records(48))
  reward_main.run(config.parse(RewardConfig, [f"--{k}={v}" for k, v in {
      "init_hf": hf_root["llama"], "data_files": data, "data_format": "hh_rlhf",
      "test_fraction": 0.25, "workdir": root / "rm_run", "data_dir": root / "data",
      "seq_len": 48, "batch_size": 8, "eval_batch_size": 8, "steps": 4, "warmup_steps": 1,
      "eval_every": 4, "save_every": 4, "learning_rate": 3e-3,
      "export_hf": root / "rm"}.items()]))
  return root


@pytest.fixture(scope="module")
def online_dpo_run(root):
  cfg = config.parse(OnlineDPOConfig, _online_dpo_args(root, export_hf=root / "dpo_export"))
  return cfg, online_dpo_files.run(cfg)


def test_online_dpo_rounds_label_with_the_reward_model(online_dpo_run):
  cfg, result = online_dpo_run
  train = read_metrics(str(cfg.workdir), split="train")
  assert [r["step"] for r in train] == [1, 2, 3]
  for r in train:
    for key in ("loss", "rewards/accuracies", "sample_reward", "reward_margin",
                "sample_words", "truncated_frac"):
      assert math.isfinite(r["metrics"][key]), (key, r)
  assert train[0]["metrics"]["compiles"] > 0
  assert [r["metrics"]["compiles"] for r in train[1:]] == [0.0, 0.0]
  assert [c["iteration"] for c in result["curve"]] == [0, 1, 2, 3]
  for row in result["table"].values():
    for key in ("reward", "reward_se", "kl", "kl_se", "length", "truncated_frac"):
      assert math.isfinite(row[key]), (key, row)
  assert result["table"]["initial"]["kl"] == pytest.approx(0.0, abs=1e-4)  # policy == ref
  assert result["table"]["online_dpo"]["kl"] != pytest.approx(0.0, abs=1e-4)
  assert result["optimizer_steps"] == 6 and result["data"]["test"] > 0


def test_online_dpo_export_reloads_with_our_logits(online_dpo_run, root):
  cfg, _ = online_dpo_run
  graphdef, params, shardings = load_hf_model(root / "llama", make_mesh(), dtype="float32")
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        params, shardings)
  trained = checkpoint.load_params(os.path.join(cfg.workdir, "params"), target)
  tokens = np.array([[0, 5, 17, 40, 99, 120, 7, 2]])
  ours = np.asarray(nnx.merge(graphdef, trained)(tokens).logits_BxTxV)
  exported = transformers.AutoModelForCausalLM.from_pretrained(root / "dpo_export").eval()
  with torch.no_grad():
    theirs = exported(torch.tensor(tokens)).logits.numpy()
  # Two float32 forwards of a 2-layer d-32 model: logits of size ~1 agree to ~1e-5.
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)
  initial = np.asarray(nnx.merge(graphdef, params)(tokens).logits_BxTxV)
  assert not np.allclose(initial, theirs, atol=1e-4)  # the rounds moved the policy


def test_best_of_n_table_from_the_reward_models_scores(root):
  cfg = config.parse(BestOfNConfig, _best_of_n_args(root))
  result = best_of_n_files.run(cfg)
  with open(os.path.join(cfg.workdir, "samples.json")) as f:
    samples = json.load(f)
  rewards = np.array(samples["reward"])
  assert rewards.shape == (4, 4) and result["prompts"] == 4
  rows = {row["n"]: row for row in result["per_n"]}
  assert sorted(rows) == [1, 2, 4]
  for n, row in rows.items():
    assert all(math.isfinite(row[k]) for k in best_of_n_files.PER_N_KEYS), row
    assert row["kl_bound"] == pytest.approx(math.log(n) - (n - 1) / n)
    assert row["kl_exact"] <= row["kl_bound"] + 1e-6
  assert rows[1]["reward"] == pytest.approx(rewards.mean())
  assert rows[4]["reward"] == pytest.approx(rewards.max(1).mean())
  assert [r["step"] for r in read_metrics(str(cfg.workdir), split="eval")] == [1, 2, 4]
  # The stored rewards are the exported reward model's scores of the re-encoded texts.
  for i, j in ((0, 0), (1, 3), (3, 2)):
    theirs = _transformers_reward(root, samples["prompts"][i], samples["responses"][i][j],
                                  samples["finished"][i][j])
    assert rewards[i, j] == pytest.approx(theirs, abs=1e-4)


def _transformers_reward(root, prompt: str, response: str, finished: bool) -> float:
  """The exported reward model's score in transformers of [bos] + prompt + response (+ eos)."""
  tok = HFTokenizer.from_file(root / "llama")
  rm = transformers.AutoModelForSequenceClassification.from_pretrained(root / "rm").eval()
  ids = [tok.bos_id, *tok.encode(prompt), *tok.encode(response)] + [tok.eos_id] * finished
  with torch.no_grad():
    return rm(torch.tensor([ids])).logits[0, 0].item()


def test_labeler_and_judge_read_the_reward_model_as_transformers_does(root):
  tok = HFTokenizer.from_file(root / "llama")
  mesh = make_mesh()
  graphdef, params, _ = load_hf_model(root / "rm", mesh, dtype="float32", kind="scalar")
  prompt = "<|im_start|>user\nWhat is 3 plus 4?<|im_end|>\n<|im_start|>assistant\n"
  ys = ["It is 7.", "No idea, sorry.", "7"]
  theirs = {(y, done): _transformers_reward(root, prompt, y, done)
            for y in ys for done in (False, True)}
  samples = comparisons.Samples([prompt] * 3, [[ys[0], ys[1]], [ys[1], ys[2]], [ys[2], ys[0]]],
                                np.array([[True, False], [True, True], [False, True]]))
  cfg = config.parse(OnlineDPOConfig, _online_dpo_args(root))
  label = online_dpo_files.reward_labeler(scorers.RewardModelScorer(graphdef, [params]), cfg,
                                          tok)
  chosen, stats = label(samples, None)
  r = np.array([[theirs[(y, bool(d))] for y, d in zip(row, done)]
                for row, done in zip(samples.responses, samples.finished)])
  np.testing.assert_array_equal(chosen, (r[:, 1] > r[:, 0]).astype(int))
  assert stats["sample_reward"] == pytest.approx(r.mean(), abs=1e-4)
  assert stats["truncated_frac"] == pytest.approx(2 / 6)
  # The judge scores texts closed by eos, as the reward model was trained.
  judge = scorers.RewardModelJudge(graphdef, params, tok, seq_len=64, batch_size=8)
  p = judge([prompt] * 3, ys, ys[1:] + ys[:1])
  diff = np.array([theirs[(a, True)] - theirs[(b, True)] for a, b in zip(ys, ys[1:] + ys[:1])])
  np.testing.assert_allclose(p, 1 / (1 + np.exp(-diff)), atol=1e-5)
  np.testing.assert_allclose(judge([prompt] * 3, ys[1:] + ys[:1], ys), 1 - p, atol=1e-6)


def test_nash_md_plays_against_the_mixture_judged_by_the_reward_model(root):
  cfg = config.parse(NashMDConfig, _nash_md_args(root, export_hf=root / "nash_export"))
  result = nash_md_files.run(cfg)
  train = read_metrics(str(cfg.workdir), split="train")
  assert [r["step"] for r in train] == [1, 2, 3]
  for r in train:
    for key in ("loss", "preference", "kl"):
      assert math.isfinite(r["metrics"][key]), (key, r)
    assert 0.0 < r["metrics"]["preference"] < 1.0
  assert train[0]["metrics"]["compiles"] > 0
  assert [r["metrics"]["compiles"] for r in train[1:]] == [0.0, 0.0]
  initial, final = result["table"]["initial"], result["table"]["nash_md"]
  assert initial["preference_vs_ref"] == 0.5 and initial["kl"] == pytest.approx(0.0, abs=1e-4)
  for key in ("reward", "reward_se", "preference_vs_ref", "preference_vs_ref_se", "kl",
              "length"):
    assert math.isfinite(final[key]), (key, final)
  assert 0.0 < final["preference_vs_ref"] < 1.0
  assert final["preference_vs_ref_se"] > 0  # the trained policy's samples differ from mu's
  assert (root / "nash_export" / "config.json").exists()


@pytest.mark.parametrize("cls, args, run", [
    (OnlineDPOConfig, _online_dpo_args, online_dpo_files.run),
    (NashMDConfig, _nash_md_args, nash_md_files.run),
])
def test_lora_trains_only_the_adapters_against_the_base(root, tmp_path, cls, args, run):
  cfg = config.parse(cls, args(root, workdir=tmp_path / "run", export_hf=tmp_path / "export",
                               lora_rank=4, lora_alpha=8.0, learning_rate=1e-2))
  result = run(cfg)
  assert result["curve"][0]["kl"] == pytest.approx(0.0, abs=1e-5)  # the base is the reference
  train = read_metrics(str(cfg.workdir), split="train")
  assert [r["metrics"]["compiles"] for r in train[1:]] == [0.0] * (len(train) - 1)
  mesh = make_mesh()
  g0, base, _ = load_hf_model(root / "llama", mesh, dtype="float32")
  g, params, sh = lora.add_adapters(lora.config_of(g0, base), base, jax.random.key(0), mesh,
                                    rank=4, alpha=8.0)
  trained = checkpoint.load_params(os.path.join(cfg.workdir, "params"), jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, sh))
  adapters, frozen = lora.split(trained)
  for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(base)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the base never moved
  assert any(np.abs(np.asarray(x)).max() > 0 for path, x in
             jax.tree_util.tree_leaves_with_path(adapters) if path[-1].key == "b")
  tokens = np.array([[0, 5, 17, 40, 99, 120, 7, 2]])
  ours = np.asarray(nnx.merge(g, trained)(tokens).logits_BxTxV)
  exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
  with torch.no_grad():
    np.testing.assert_allclose(ours, exported(torch.tensor(tokens)).logits.numpy(), atol=1e-4,
                               rtol=1e-4)


@pytest.mark.parametrize("cls, args, extra, message", [
    (OnlineDPOConfig, _online_dpo_args, {"labeler": "raters"}, "--labeler=reward_model"),
    (OnlineDPOConfig, _online_dpo_args, {"matched_sft": True}, "--nomatched_sft"),
    (OnlineDPOConfig, _online_dpo_args, {"reward_hf": ""}, "needs --reward_hf"),
    (OnlineDPOConfig, _online_dpo_args, {"seq_len": 40}, "raise --seq_len"),
    (OnlineDPOConfig, _online_dpo_args, {"prompt_files": ""}, "need --prompt_files"),
    (NashMDConfig, _nash_md_args, {"judge": "raters"}, "--judge=model"),
    (NashMDConfig, _nash_md_args, {"value_hf": "x"}, "no value model"),
    (NashMDConfig, _nash_md_args, {"max_new_tokens": 0}, "needs --max_new_tokens"),
    (BestOfNConfig, _best_of_n_args, {"export_hf": "x"}, "trains nothing"),
    (BestOfNConfig, _best_of_n_args, {"lora_rank": 4}, "trains nothing"),
    (BestOfNConfig, _best_of_n_args, {"aggregate": "wco"}, "ensemble"),
    (OnlineDPOConfig, _online_dpo_args, {"dry_run": True}, "has no plan"),
    (NashMDConfig, _nash_md_args, {"dry_run": True}, "has no plan"),
    (BestOfNConfig, _best_of_n_args, {"dry_run": True}, "has no plan"),
])
def test_bad_flags_stop_before_anything_compiles(tmp_path, cls, args, extra, message):
  with CompileCounter() as compiles, pytest.raises(ValueError, match=message):
    config.parse(cls, args(tmp_path, **extra))
  assert compiles.names == []
