"""experiments.grpo on GSM8K-format prompt files from a tiny Qwen2 checkpoint: the run, its
export reloaded by transformers with our logits, user reward functions by import path, and
flag errors raised before anything compiles."""
import dataclasses
import json
import os
import sys

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from real_formats import gsm8k_records, write_jsonl
from rlhf_jax.compile_count import CompileCounter
from rlhf_jax.models.hf_import import load_hf_model
from rlhf_jax.pipeline import config
from rlhf_jax.runs import grpo_files
from rlhf_jax.runs.grpo import GRPOConfig
from rlhf_jax.sharding import make_mesh
from rlhf_jax.train import checkpoint, config_check
from rlhf_jax.train.logging import read_metrics

# User reward functions: the length of the completion in characters, None for empty ones
# (not computed); and one that cannot score every other completion, so the runs mask rows.
USER_MODULE = '''
def length_reward(prompts, completions, answers):
  return [None if not c else min(len(c), 40) / 40 for c in completions]


def every_other(prompts, completions, answers):
  return [None if i % 2 else min(len(c), 40) / 40 for i, c in enumerate(completions)]
'''


def _flags(root, hf_root, **extra):
  flags = {"init_hf": hf_root["qwen2"], "prompt_files": root / "train.jsonl",
           "prompt_format": "gsm8k", "test_fraction": 0.2, "workdir": root / "run",
           "data_dir": root / "data", "max_new_tokens": 8, "max_prompt_len": 64,
           "batch_size": 8, "group_size": 4, "num_minibatches": 2, "steps": 3,
           "warmup_steps": 1, "learning_rate": 1e-3, "eval_every": 3, "save_every": 2,
           "log_every": 1, "eval_prompts": 4, "eval_batch_size": 4, "eval_samples": 4,
           "pass_k": "1,2", "kl_coef": 0.05, "system_prompt": "Answer with #### and a number.",
           **extra}
  return [f"--{k}={v}" for k, v in flags.items()]


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory, hf_root):
  root = tmp_path_factory.mktemp("grpo")
  write_jsonl(root / "train.jsonl", gsm8k_records(40))
  (root / "user_rewards.py").write_text(USER_MODULE)
  sys.path.insert(0, str(root))
  try:
    cfg = config.parse(GRPOConfig, _flags(
        root, hf_root, reward_fns="math,user_rewards:length_reward",
        reward_weights="1,0.5", export_hf=root / "export"))
    result = grpo_files.run(cfg)
  finally:
    sys.path.remove(str(root))
  return root, cfg, result


def test_runs_on_gsm8k_prompts_and_logs_every_reward(grpo_run):
  root, cfg, result = grpo_run
  train = read_metrics(cfg.workdir, split="train")
  assert [r["step"] for r in train][-1] == 3
  for r in train:
    m = r["metrics"]
    for key in ("reward_mean", "unscored_frac", "reward_math", "reward_user_rewards:length_reward",
                "zero_variance_frac"):
      assert key in m and np.isfinite(m[key]), (key, m)
  assert all(r["metrics"]["compiles"] == 0 for r in train[1:])
  final = result["table"]["grpo"]
  for key in ("accuracy_greedy", "accuracy_temp1", "pass_at_1", "pass_at_2", "kl", "length"):
    assert key in final
  assert result["data"]["train"] + result["data"]["test"] == 40
  with open(os.path.join(cfg.workdir, "result.json")) as f:
    assert json.load(f)["reward_fns"] == {"math": 1.0, "user_rewards:length_reward": 0.5}


def test_export_reloads_in_transformers_with_our_logits(grpo_run, hf_root):
  root, cfg, _ = grpo_run
  mesh = make_mesh()
  graphdef, params, shardings = load_hf_model(hf_root["qwen2"], mesh, dtype="float32")
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        params, shardings)
  trained = checkpoint.load_params(os.path.join(cfg.workdir, "params"), target)
  tokens = np.array([[0, 5, 17, 40, 99, 120, 7, 2]])
  ours = np.asarray(nnx.merge(graphdef, trained)(tokens).logits_BxTxV)
  exported = transformers.AutoModelForCausalLM.from_pretrained(root / "export").eval()
  assert type(exported).__name__ == "Qwen2ForCausalLM"
  with torch.no_grad():
    theirs = exported(torch.tensor(tokens)).logits.numpy()
  # Two float32 forwards of a 2-layer d-32 model: logits of size ~1 agree to ~1e-5.
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)
  initial = np.asarray(nnx.merge(graphdef, params)(tokens).logits_BxTxV)
  assert not np.allclose(initial, theirs, atol=1e-4)  # training moved the policy
  for name in ("tokenizer.json", "tokenizer_config.json"):
    assert (root / "export" / name).exists()


@pytest.mark.parametrize("extra, message", [
    ({"reward_fns": "no_such_module_xyz:f"}, "no_such_module_xyz"),
    ({"reward_fns": "math,format_boxed", "reward_weights": "1"}, "reward_weights"),
    ({"advantage": "dr_grpo"}, "adv_std_scale=none"),
    ({"advantage": "rloo", "reward_normalization": "each"}, "reward_normalization=sum"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
])
def test_bad_flags_stop_before_anything_compiles(tmp_path, hf_root, extra, message):
  with CompileCounter() as compiles, pytest.raises(ValueError, match=message):
    config.parse(GRPOConfig, _flags(tmp_path, hf_root, **extra))
  assert compiles.names == []


@pytest.mark.parametrize("extra", [{"algorithm": "reinforce_pp", "group_size": 2},
                                   {"advantage": "rloo", "adv_std_scale": "none"}])
def test_reinforce_pp_and_rloo_mask_unscored_rows(tmp_path, hf_root, extra):
  write_jsonl(tmp_path / "train.jsonl", gsm8k_records(40))
  (tmp_path / "user_rewards_b.py").write_text(USER_MODULE)
  sys.path.insert(0, str(tmp_path))
  try:
    cfg = config.parse(GRPOConfig, _flags(
        tmp_path, hf_root, reward_fns="user_rewards_b:every_other", steps=2, eval_every=2,
        clip_eps_high=0.2, **extra))
    grpo_files.run(cfg)
  finally:
    sys.path.remove(str(tmp_path))
  train = read_metrics(cfg.workdir, split="train")
  for r in train:
    assert r["metrics"]["unscored_frac"] == pytest.approx(0.5)  # every other row
    assert np.isfinite(r["metrics"]["loss"])


def test_neutral_fill_gives_unscored_rows_their_groups_mean():
  total = np.array([1.0, np.nan, 3.0, np.nan, np.nan, np.nan])
  np.testing.assert_array_equal(grpo_files.neutral_fill(total, 3), [1, 2, 3, 0, 0, 0])


def test_online_resume_refuses_a_changed_learning_rate(grpo_run):
  root, cfg, _ = grpo_run
  sys.path.insert(0, str(root))
  try:
    with pytest.raises(config_check.ConfigChangedError, match="--learning_rate"):
      grpo_files.run(dataclasses.replace(cfg, learning_rate=cfg.learning_rate * 3))
  finally:
    sys.path.remove(str(root))
