"""experiments.dpo: the real flagfiles' dry runs, an end-to-end run from a Hugging Face model
that transformers builds (exported back and reloaded by transformers), and invalid flags
stopping before anything compiles."""
import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest
import tokenizers
import torch
import transformers
from flax import nnx
from tokenizers import decoders, models, pre_tokenizers, trainers

from rlhf_jax.runs import dpo_files as dpo
from rlhf_jax.pipeline import config
from rlhf_jax.runs.dpo import DPOConfig
from helpers import make_model
from rlhf_jax import memory
from rlhf_jax.compile_count import CompileCounter
from rlhf_jax.models import hf
from rlhf_jax.models.config import preset
from rlhf_jax.models.hf_import import load_hf_model
from rlhf_jax.sharding import make_mesh
from rlhf_jax.train import checkpoint
from rlhf_jax.train.logging import read_metrics

FLAGS_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "configs")
SPECIALS = ["<s>", "</s>", "<pad>"]
# jax converts a Python scalar fill value eagerly even under eval_shape (optax's Adam count
# = jnp.zeros([], int32)): a one-element program, not a compile of the model or the step.
SCALAR_CONSTANTS = {"jit(convert_element_type)"}


def _model_compiles(counter):
  return [n for n in counter.names if n not in SCALAR_CONSTANTS]


def _pairs(n=32):
  rng = np.random.default_rng(0)
  rows = []
  for _ in range(n):
    a, b = rng.integers(10, 50, size=2)
    rows.append({"prompt": f"{a} plus {b} is", "chosen": f" {a + b}.",
                 "rejected": f" {a + b + rng.choice([-10, 1, 10])}."})
  return rows


@pytest.mark.parametrize("flagfile, devices", [("dpo_llama3_1b_hh_v5e8.flags", 8),
                                               ("dpo_llama3_1b_hh_h100.flags", 1)])
def test_real_flagfiles_dry_run(flagfile, devices, capsys):
  cfg = config.parse(DPOConfig, [f"--flagfile={FLAGS_DIR}/{flagfile}", "--dry_run",
                                  "--nodry_run_compile"])  # compiling: tests/test_plan.py
  with CompileCounter() as compiles:
    result = dpo.run(cfg)
  assert _model_compiles(compiles) == []
  assert int(np.prod(list(result["mesh"].values()))) == devices
  assert result["num_params"] > 1e9
  est = result["memory"]
  for term in ("params", "optimizer", "gradients", "activations"):
    assert est[term] > 0
  assert est["total"] == sum(v for k, v in est.items() if k != "total")
  out = capsys.readouterr().out
  for term in (*memory.TERMS, "total"):
    assert term in out


def test_dry_run_reads_the_checkpoint_config_without_its_weights(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(hf.config_to_hf(preset("1b"))))
  cfg = config.parse(DPOConfig, [f"--flagfile={FLAGS_DIR}/dpo_llama3_1b_hh_v5e8.flags",
                                  "--dry_run", "--nodry_run_compile", f"--init_hf={tmp_path}",
                                  "--model=nano"])
  assert dpo.run(cfg)["num_params"] == preset("1b").num_params()


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("dpo")
  data = root / "pairs.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in _pairs()))
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator([json.dumps(r) for r in _pairs()], trainers.BpeTrainer(
      vocab_size=300, special_tokens=SPECIALS,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  model_dir = root / "model"
  model_dir.mkdir()
  tok.save(str(model_dir / "tokenizer.json"))
  (model_dir / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}))
  torch.manual_seed(0)
  hf_cfg = transformers.LlamaConfig(
      vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
      max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=2)
  transformers.LlamaForCausalLM(hf_cfg).save_pretrained(model_dir)
  cfg = config.parse(DPOConfig, [
      f"--init_hf={model_dir}", f"--tokenizer={model_dir}", f"--data_files={data}",
      "--data_format=pairs", "--test_fraction=0.25", f"--workdir={root}/run",
      f"--data_dir={root}/data", f"--export_hf={root}/export", "--seq_len=24", "--batch_size=8",
      "--eval_batch_size=8", "--steps=8", "--warmup_steps=1", "--learning_rate=1e-2",
      "--log_every=1", "--eval_every=8", "--save_every=4", "--beta=0.5"])
  return root, cfg, dpo.run(cfg)


def test_end_to_end_from_hf_checkpoint(hf_run):
  root, cfg, result = hf_run
  train = read_metrics(cfg.workdir, split="train")
  assert [r["step"] for r in train] == list(range(1, 9))
  first, last = train[0]["metrics"], train[-1]["metrics"]
  assert first["loss"] == pytest.approx(np.log(2), rel=1e-4)  # step 1: policy == reference
  assert last["loss"] < first["loss"] and last["rewards/margins"] > first["rewards/margins"]
  for key in ("loss", "rewards/accuracies", "logps/chosen", "logps/rejected"):
    assert key in result["eval"]
  assert 0.0 <= result["eval"]["rewards/accuracies"] <= 1.0
  assert result["data"]["train"] + result["data"]["test"] == 32
  with open(os.path.join(cfg.workdir, "result.json")) as f:
    assert json.load(f)["eval"] == result["eval"]


def test_export_loads_in_transformers_with_our_logits(hf_run):
  root, cfg, _ = hf_run
  mesh = make_mesh()  # the run set the 8-device mesh as the context mesh
  graphdef, params, shardings = load_hf_model(cfg.init_hf, mesh, dtype="float32")
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        params, shardings)
  trained = checkpoint.load_params(os.path.join(cfg.workdir, "params"), target)
  tokens = np.array([[0, 5, 17, 40, 99, 120, 7, 1]])
  ours = nnx.merge(graphdef, trained)(tokens).logits_BxTxV
  exported = transformers.AutoModelForCausalLM.from_pretrained(root / "export").eval()
  with torch.no_grad():
    theirs = exported(torch.tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4, rtol=1e-4)
  original = nnx.merge(graphdef, params)(tokens).logits_BxTxV
  assert not np.allclose(np.asarray(original), theirs, atol=1e-4)  # training changed it
  assert (root / "export" / "tokenizer.json").exists()


def test_interrupted_run_resumes_bitwise(hf_run, tmp_path, capsys):
  """A copy of the run's workdir cut back to its step-4 checkpoint finishes like the run."""
  _, cfg, _ = hf_run
  workdir = tmp_path / "run"
  shutil.copytree(cfg.workdir, workdir)
  shutil.rmtree(workdir / "checkpoints" / "8")
  shutil.rmtree(workdir / "params")
  (workdir / "metrics.jsonl").unlink()
  dpo.run(dataclasses.replace(cfg, workdir=str(workdir), export_hf=""))
  assert "resumed from step 4" in capsys.readouterr().out
  resumed = read_metrics(str(workdir), split="train")
  assert [r["step"] for r in resumed] == [5, 6, 7, 8]
  assert [r["metrics"] for r in resumed] == [r["metrics"] for r in
                                              read_metrics(cfg.workdir, split="train")[4:]]


@pytest.mark.parametrize("flag, message", [
    ("--beta=0", "beta must be > 0"), ("--beta=-1", "beta must be > 0"),
    ("--loss=kto", "KTO needs desirable/undesirable labels; this dataset format has pairs"),
    ("--label_smoothing=0.7", "label_smoothing must be in"),
])
def test_invalid_flags(flag, message):
  with pytest.raises(ValueError, match=message):
    config.parse(DPOConfig, [f"--flagfile={FLAGS_DIR}/dpo_tiny.flags", flag])


def test_unsupported_architecture_stops_before_compiling(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(
      {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
  cfg = config.parse(DPOConfig, [f"--flagfile={FLAGS_DIR}/dpo_tiny.flags",
                                  f"--init_hf={tmp_path}", f"--workdir={tmp_path}/run"])
  with CompileCounter() as compiles, pytest.raises(ValueError, match="unsupported architecture"):
    dpo.run(cfg)
  assert _model_compiles(compiles) == []


def test_params_of_another_model_size_named_before_compiling(tmp_path):
  _, params = make_model()  # nano
  checkpoint.save_params(str(tmp_path / "stage" / "params"), params)
  cfg = config.parse(DPOConfig, [f"--flagfile={FLAGS_DIR}/dpo_tiny.flags", "--model=tiny",
                                  f"--init_from={tmp_path}/stage", f"--workdir={tmp_path}/run"])
  with CompileCounter() as compiles, pytest.raises(ValueError, match=r"tensor \S+ has shape"):
    dpo.run(cfg)
  assert _model_compiles(compiles) == []


def test_tiny_flagfile_smoke_with_in_step_reference_and_ipo(tmp_path):
  """The committed example data and flagfile; the reference recomputed in every step."""
  cfg = config.parse(DPOConfig, [
      f"--flagfile={FLAGS_DIR}/dpo_tiny.flags", "--smoke", "--precompute_ref=false",
      "--loss=ipo", "--average_logps", f"--workdir={tmp_path}/run",
      f"--data_dir={tmp_path}/data",
      f"--data_files={os.path.join(FLAGS_DIR, '..', 'data', 'pairs_tiny.jsonl')}"])
  result = dpo.run(cfg)
  assert result["memory"]["reference"] > 0
  train = read_metrics(cfg.workdir, split="train")
  assert train[0]["metrics"]["loss"] == pytest.approx((1 / (2 * cfg.ipo_tau)) ** 2, rel=1e-4)
  assert 0.0 <= result["eval"]["rewards/accuracies"] <= 1.0


def test_simpo_runs_without_any_reference(tmp_path):
  """SimPO is reference-free: no precompute pass, no reference copy in memory; the step-1
  loss is SimPO's on the policy's own averaged log-probs, so it is finite and positive."""
  cfg = config.parse(DPOConfig, [
      f"--flagfile={FLAGS_DIR}/dpo_tiny.flags", "--smoke", "--loss=simpo", "--beta=2",
      "--precompute_ref=false", f"--workdir={tmp_path}/run", f"--data_dir={tmp_path}/data",
      f"--data_files={os.path.join(FLAGS_DIR, '..', 'data', 'pairs_tiny.jsonl')}"])
  result = dpo.run(cfg)
  assert result["memory"]["reference"] == 0
  first = read_metrics(cfg.workdir, split="train")[0]["metrics"]
  assert np.isfinite(first["loss"]) and first["loss"] > 0
