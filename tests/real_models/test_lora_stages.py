"""LoRA in every stage that trains on real checkpoints (SFT, reward, DPO, GRPO, PPO): only the
adapters (and a reward model's head) train, the base is bitwise unchanged, the reference is
the base, and exports load in transformers (merged) and peft (adapters) with our logits."""
import os

import jax
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx

from real_formats import gsm8k_records, write_jsonl
from experiments import reward as reward_main, sft as sft_main
from rlhf_jax.models import hf_import, lora
from rlhf_jax.pipeline import config
from rlhf_jax.pipeline.reward import RewardConfig
from rlhf_jax.pipeline.sft import SFTConfig
from rlhf_jax.runs import dpo_files, grpo_files
from rlhf_jax.runs.dpo import DPOConfig
from rlhf_jax.runs.grpo import GRPOConfig
from rlhf_jax.sharding import make_mesh
from rlhf_jax.train import checkpoint
from rlhf_jax.train.logging import read_metrics
from test_reward_files import hh_records

LORA = {"lora_rank": 4, "lora_alpha": 8.0}
COMMON = {"test_fraction": 0.25, "batch_size": 8, "eval_batch_size": 8, "warmup_steps": 1,
          "log_every": 1, "save_every": 4, "learning_rate": 1e-2, **LORA}
TOKENS = np.array([[0, 5, 17, 40, 99, 120, 7, 2]])


def _args(flags: dict) -> list[str]:
  return [f"--{k}={v}" for k, v in {**COMMON, **flags}.items()]


def _trained(workdir, hf_dir, rank=4, alpha=8.0):
  """(graphdef, saved params of the run, the base as loaded) of a LoRA run's <workdir>/params."""
  mesh = make_mesh()
  g0, base, _ = hf_import.load_hf_model(hf_dir, mesh, dtype="float32")
  g, params, sh = lora.add_adapters(lora.config_of(g0, base), base, jax.random.key(0), mesh,
                                    rank=rank, alpha=alpha)
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        params, sh)
  return g, checkpoint.load_params(os.path.join(workdir, "params"), target), base


def _logits(model, tokens=TOKENS):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


@pytest.mark.parametrize("export_lora", ["merged", "peft"])
def test_sft_trains_only_the_adapters_and_exports(tmp_path, hf_root, export_lora):
  data = write_jsonl(tmp_path / "gsm8k.jsonl", gsm8k_records(40))
  cfg = config.parse(SFTConfig, _args({
      "init_hf": hf_root["qwen2"], "data_files": data, "data_format": "gsm8k",
      "workdir": tmp_path / "run", "data_dir": tmp_path / "data", "seq_len": 96, "steps": 4,
      "eval_every": 4, "export_hf": tmp_path / "export", "export_lora": export_lora}))
  sft_main.run(cfg)
  train = read_metrics(cfg.workdir, split="train")
  assert train[-1]["metrics"]["loss"] < train[0]["metrics"]["loss"]
  g, trained, base = _trained(cfg.workdir, hf_root["qwen2"])
  adapters, frozen = lora.split(trained)
  for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(base)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the base never moved
  b_leaves = [np.asarray(x) for path, x in jax.tree_util.tree_leaves_with_path(adapters)
              if path[-1].key == "b"]
  assert b_leaves and any(np.abs(b).max() > 0 for b in b_leaves)  # B left its zero init
  ours = np.asarray(nnx.merge(g, trained)(TOKENS).logits_BxTxV)
  if export_lora == "merged":
    theirs = _logits(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export"))
  else:
    base_model = transformers.AutoModelForCausalLM.from_pretrained(hf_root["qwen2"])
    theirs = _logits(peft.PeftModel.from_pretrained(base_model, tmp_path / "export").eval())
  # Two float32 forwards of a 2-layer d-32 model (the merge adds one rank-4 matmul per weight).
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)
  assert not np.allclose(ours, _logits(transformers.AutoModelForCausalLM.from_pretrained(
      hf_root["qwen2"])), atol=1e-4)


def test_reward_model_trains_adapters_and_head(tmp_path, hf_root):
  data = write_jsonl(tmp_path / "hh.jsonl", hh_records(40))
  cfg = config.parse(RewardConfig, _args({
      "init_hf": hf_root["llama"], "data_files": data, "data_format": "hh_rlhf",
      "workdir": tmp_path / "run", "data_dir": tmp_path / "data", "seq_len": 48, "steps": 6,
      "eval_every": 6, "export_hf": tmp_path / "export"}))
  result = reward_main.run(cfg)
  train = read_metrics(cfg.workdir, split="train")
  assert train[-1]["metrics"]["loss"] < train[0]["metrics"]["loss"]
  assert result["eval"]["accuracy"] > 0.5
  exported = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "export")
  assert type(exported).__name__ == "LlamaForSequenceClassification"


def test_dpo_with_lora_plans_less_memory_and_trains(tmp_path, hf_root):
  data = write_jsonl(tmp_path / "pairs.jsonl", [
      {"prompt": f"{a} plus {a} is", "chosen": f" {2 * a}.", "rejected": f" {2 * a + 1}."}
      for a in range(10, 42)])
  flags = {"init_hf": hf_root["llama"], "data_files": data, "data_format": "pairs",
           "workdir": tmp_path / "run", "data_dir": tmp_path / "data", "seq_len": 24,
           "steps": 4, "eval_every": 4}
  lora_run = dpo_files.run(config.parse(DPOConfig, _args(flags)))
  full = dpo_files.memory_estimate(config.parse(DPOConfig, _args({**flags, "lora_rank": 0})),
                                   dpo_files.model_config(config.parse(DPOConfig, _args(flags))),
                                   make_mesh())
  assert lora_run["memory"]["optimizer"] < full["optimizer"] / 10
  train = read_metrics(str(tmp_path / "run"), split="train")
  assert train[0]["metrics"]["loss"] == pytest.approx(np.log(2), rel=1e-4)  # base == reference
  assert train[-1]["metrics"]["loss"] < train[0]["metrics"]["loss"]


def test_grpo_with_lora_keeps_the_base_as_reference(tmp_path, hf_root):
  data = write_jsonl(tmp_path / "train.jsonl", gsm8k_records(40))
  cfg = config.parse(GRPOConfig, _args({
      "init_hf": hf_root["qwen2"], "prompt_files": data, "prompt_format": "gsm8k",
      "workdir": tmp_path / "run", "data_dir": tmp_path / "data", "max_new_tokens": 8,
      "max_prompt_len": 64, "group_size": 4, "num_minibatches": 2, "steps": 2,
      "eval_every": 2, "save_every": 2, "eval_prompts": 4, "eval_samples": 2, "pass_k": "1",
      "kl_coef": 0.1, "reward_fns": "math,format_boxed"}))
  result = grpo_files.run(cfg)
  assert result["table"]["initial"]["kl"] == pytest.approx(0.0, abs=1e-5)  # policy == base
  train = read_metrics(cfg.workdir, split="train")
  assert train[-1]["metrics"]["compiles"] == 0


def test_lora_needs_a_checkpoint():
  with pytest.raises(ValueError, match="--init_hf"):
    config.parse(SFTConfig, ["--data_files=x.jsonl", "--lora_rank=4"])
