"""SFT -> reward model -> PPO on HH-RLHF-format files from a tiny Llama checkpoint, each stage
through the experiments' own entry points and flags, each starting from the previous stage's
Hugging Face export; the PPO export reloads in transformers with our logits."""
import os

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from real_formats import write_jsonl
from experiments import reward as reward_main, sft as sft_main
from rlhf_jax.compile_count import CompileCounter
from rlhf_jax.models.hf_import import load_hf_model
from rlhf_jax.pipeline import config
from rlhf_jax.pipeline.reward import RewardConfig
from rlhf_jax.pipeline.sft import SFTConfig
from rlhf_jax.runs import ppo_files
from rlhf_jax.runs.ppo import PPOConfig
from rlhf_jax.sharding import make_mesh
from rlhf_jax.train import checkpoint
from rlhf_jax.train.logging import read_metrics
from test_reward_files import hh_records

COMMON = {"test_fraction": 0.25, "seq_len": 64, "batch_size": 8, "eval_batch_size": 8,
          "warmup_steps": 1, "log_every": 1, "save_every": 2}


def _args(flags: dict) -> list[str]:
  return [f"--{k}={v}" for k, v in {**COMMON, **flags}.items()]


def _ppo_flags(root, chain, **extra):
  return _args({"init_hf": chain / "sft", "reward_hf": chain / "rm",
                "prompt_files": chain / "hh.jsonl", "prompt_format": "hh_rlhf",
                "workdir": root / "ppo", "data_dir": root / "data", "max_new_tokens": 6,
                "max_prompt_len": 40, "steps": 3, "eval_every": 3, "eval_prompts": 8,
                "num_minibatches": 1, "ppo_epochs": 1, "learning_rate": 1e-3, **extra})


@pytest.fixture(scope="module")
def chain(tmp_path_factory, hf_root):
  root = tmp_path_factory.mktemp("chain")
  data = write_jsonl(root / "hh.jsonl", hh_records(48))
  sft_main.run(config.parse(SFTConfig, _args({
      "init_hf": hf_root["llama"], "data_files": data, "data_format": "hh_rlhf",
      "workdir": root / "sft_run", "data_dir": root / "data", "steps": 4, "eval_every": 4,
      "export_hf": root / "sft"})))
  reward_main.run(config.parse(RewardConfig, _args({
      "init_hf": root / "sft", "data_files": data, "data_format": "hh_rlhf",
      "workdir": root / "rm_run", "data_dir": root / "data", "steps": 4, "eval_every": 4,
      "export_hf": root / "rm"})))
  cfg = config.parse(PPOConfig, _ppo_flags(root, root, export_hf=root / "ppo_export"))
  return root, cfg, ppo_files.run(cfg)


def test_ppo_runs_from_the_exported_sft_and_reward_models(chain):
  root, cfg, result = chain
  train = read_metrics(cfg.workdir, split="train")
  assert [r["step"] for r in train][-1] == 3
  assert all(r["metrics"]["compiles"] == 0 for r in train[1:])
  for r in train:
    assert np.isfinite(r["metrics"]["score"]) and np.isfinite(r["metrics"]["kl"])
  for row in ("initial", "ppo"):
    assert {"reward", "reward_se", "kl", "length"} <= set(result["table"][row])
  assert result["table"]["initial"]["kl"] == pytest.approx(0.0, abs=1e-4)  # policy == reference
  assert result["data"]["train"] > 0 and result["data"]["test"] > 0


def test_ppo_export_reloads_with_our_logits(chain):
  root, cfg, _ = chain
  graphdef, params, shardings = load_hf_model(root / "sft", make_mesh(), dtype="float32")
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        params, shardings)
  trained = checkpoint.load_params(os.path.join(cfg.workdir, "params"), target)
  tokens = np.array([[0, 5, 17, 40, 99, 120, 7, 2]])
  ours = np.asarray(nnx.merge(graphdef, trained)(tokens).logits_BxTxV)
  exported = transformers.AutoModelForCausalLM.from_pretrained(root / "ppo_export").eval()
  with torch.no_grad():
    theirs = exported(torch.tensor(tokens)).logits.numpy()
  # Two float32 forwards of a 2-layer d-32 model: logits of size ~1 agree to ~1e-5.
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)


def test_ppo_with_lora_on_policy_and_value(chain):
  """Adapters on the policy and the value model (its head trains too); the reference is the
  policy's base: the first evaluation's KL is 0."""
  root, _, _ = chain
  cfg = config.parse(PPOConfig, _ppo_flags(root / "lora", root, lora_rank=4, steps=2,
                                           eval_every=2))
  result = ppo_files.run(cfg)
  assert result["table"]["initial"]["kl"] == pytest.approx(0.0, abs=1e-5)
  train = read_metrics(cfg.workdir, split="train")
  assert all(np.isfinite(r["metrics"]["loss"]) for r in train)
  assert train[-1]["metrics"]["compiles"] == 0


@pytest.mark.parametrize("extra, message", [
    ({"reward_hf": ""}, "needs --reward_hf"),
    ({"ptx_coef": 0.1}, "ptx_coef"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
])
def test_bad_flags_stop_before_anything_compiles(tmp_path, extra, message):
  with CompileCounter() as compiles, pytest.raises(ValueError, match=message):
    config.parse(PPOConfig, _ppo_flags(tmp_path, tmp_path, **extra))
  assert compiles.names == []
