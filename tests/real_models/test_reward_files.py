"""experiments.reward on local preference files from a tiny Llama checkpoint: HH-RLHF pairs and
K-way rankings, the export loaded by transformers as a sequence classifier that reproduces our
scores, and the export continuing as the starting point of another reward run."""
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from real_formats import write_jsonl
from experiments import reward as reward_main
from rlhf_jax.data.hf_tokenizer import HFTokenizer
from rlhf_jax.models.hf_import import load_hf_model
from rlhf_jax.pipeline import config
from rlhf_jax.pipeline.reward import RewardConfig
from rlhf_jax.pipeline.reward_files import make_encoder, max_responses
from rlhf_jax.data import preference_formats as pf
from rlhf_jax.sharding import make_mesh
from rlhf_jax.train.logging import read_metrics


def hh_records(n: int, seed: int = 0) -> list[dict]:
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    a, b = (int(x) for x in rng.integers(2, 60, size=2))
    head = f"\n\nHuman: What is {a} plus {b}?\n\nAssistant:"
    out.append({"chosen": f"{head} It is {a + b}.", "rejected": f"{head} No idea, sorry."})
  return out


def ranking_records(n: int, seed: int = 1) -> list[dict]:
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    a = int(rng.integers(2, 60))
    responses = [f"{a} apples, counted.", f"about {a}", "no idea"][:2 + i % 2]
    out.append({"prompt": [{"role": "user", "content": f"How many apples? {a}"}],
                "responses": responses[::-1], "scores": list(range(len(responses)))})
  return out


def _flags(root, init, data, fmt, **extra):
  flags = {"init_hf": init, "data_files": data, "data_format": fmt, "test_fraction": 0.25,
           "workdir": root / "run", "data_dir": root / "data", "seq_len": 48, "batch_size": 8,
           "eval_batch_size": 8, "steps": 8, "warmup_steps": 1, "learning_rate": 3e-3,
           "log_every": 1, "eval_every": 8, "save_every": 4, **extra}
  return [f"--{k}={v}" for k, v in flags.items()]


@pytest.fixture(scope="module")
def hh_run(tmp_path_factory, hf_root):
  root = tmp_path_factory.mktemp("rm")
  data = write_jsonl(root / "hh.jsonl", hh_records(48))
  cfg = config.parse(RewardConfig, _flags(root, hf_root["llama"], data, "hh_rlhf",
                                          export_hf=root / "export"))
  return root, cfg, reward_main.run(cfg)


def test_hh_pairs_train_the_reward_model(hh_run):
  _, cfg, result = hh_run
  train = read_metrics(cfg.workdir, split="train")
  assert train[0]["metrics"]["loss"] == pytest.approx(np.log(2), abs=0.05)  # fresh head ~ 0
  assert train[-1]["metrics"]["loss"] < train[0]["metrics"]["loss"]
  assert result["eval"]["accuracy"] > 0.5  # chosen and rejected differ in an obvious way
  assert result["data"]["train"] + result["data"]["test"] == 48


def test_export_scores_like_ours_in_transformers(hh_run, hf_root):
  root, cfg, _ = hh_run
  exported = transformers.AutoModelForSequenceClassification.from_pretrained(
      root / "export").eval()
  assert type(exported).__name__ == "LlamaForSequenceClassification"
  graphdef, params, _ = load_hf_model(root / "export", make_mesh(), dtype="float32")
  tok = HFTokenizer.from_file(root / "export")
  texts = ["\n\nHuman: What is 3 plus 4?\n\nAssistant: It is 7.", "\n\nHuman: Hi\n\nAssistant:"]
  for text in texts:
    ids = [tok.bos_id, *tok.encode(text), tok.eos_id]
    ours = float(nnx.merge(graphdef, params).score(np.array([ids]),
                                                   valid_BxT=np.ones((1, len(ids)), bool))[0])
    with torch.no_grad():
      theirs = float(exported(torch.tensor([ids])).logits[0, 0])
    # A float32 2-layer d-32 forward to one scalar of size ~1: agree to ~1e-5.
    assert ours == pytest.approx(theirs, rel=1e-4, abs=1e-4)


def test_k_way_rankings_from_the_export(tmp_path, hh_run, hf_root):
  """K = 2 and 3 responses per prompt ranked by scores, message prompts through the chat
  template; a reward model export trains further (kind scalar)."""
  root, _, _ = hh_run
  data = write_jsonl(tmp_path / "rank.jsonl", ranking_records(40))
  cfg = config.parse(RewardConfig, _flags(tmp_path, root / "export", data, "rankings",
                                          tokenizer=hf_root["llama"]))
  result = reward_main.run(cfg)
  assert result["responses_per_prompt"] == 3
  assert np.isfinite(result["eval"]["loss"])


def test_rankings_encode_in_score_order_with_absent_responses(hf_root):
  tok = HFTokenizer.from_file(hf_root["llama"])
  record = pf.parse("rankings", ranking_records(2)[0])
  assert record["responses"].startswith('["')
  enc = make_encoder("rankings", tok, pf.default_render, 48, 3)(record)
  assert enc["response_valid_BxK"].tolist() == [True, True, False]
  first = tok.decode(enc["tokens_BxKxT"][0][enc["valid_BxKxT"][0]])
  assert first.endswith("counted.")  # the highest score ranks first
  assert max_responses([record], "rankings") == 2


@pytest.mark.parametrize("record, reason", [
    ({"prompt": "p", "responses": ["a", "b"], "scores": [1, 1]}, "tied_scores"),
    ({"prompt": "p", "responses": ["a"]}, "bad_messages"),
    ({"prompt": "p", "responses": ["a", "a"]}, "identical_responses"),
    ({"prompt": "p", "responses": ["a", "b"], "scores": [1]}, "wrong_type"),
])
def test_bad_ranking_records(record, reason):
  with pytest.raises(pf.Malformed) as e:
    pf.parse("rankings", record)
  assert e.value.reason == reason


def test_packed_rankings_train(tmp_path, hf_root):
  """--pack: several rankings per row, fewer rows than rankings; a fresh head scores ~0, so
  training starts near log 2, and it learns."""
  data = write_jsonl(tmp_path / "hh.jsonl", hh_records(48))
  cfg = config.parse(RewardConfig, _flags(tmp_path, hf_root["llama"], data, "hh_rlhf",
                                          seq_len=256, pack=True))
  result = reward_main.run(cfg)
  assert result["packed_rows"] < result["data"]["train"] / 2
  train = read_metrics(cfg.workdir, split="train")
  assert train[0]["metrics"]["loss"] == pytest.approx(np.log(2), abs=0.05)
  assert train[-1]["metrics"]["loss"] < train[0]["metrics"]["loss"]
  assert result["eval"]["accuracy"] > 0.5
