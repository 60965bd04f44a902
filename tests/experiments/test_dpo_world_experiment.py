"""experiments.dpo on the gold world in --smoke mode through its flagfile (DPO and KTO on
rater-labelled pairs of SFT samples, with the CHES / likelihood-displacement report and the
held-out gold win rate), the refusals that must stop a run before anything compiles, and the
KTO loss_fn against a float64 NumPy computation of Ethayarajh et al.'s objective."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.runs import dpo_files as dpo
from rlhf_jax.pipeline import config
from rlhf_jax.runs import dpo_world
from rlhf_jax.runs.dpo import DPOConfig
from helpers import apply, make_model
from rlhf_jax.rl import comparisons
from rlhf_jax.data import pairs
from rlhf_jax.data.tokenizer import ByteTokenizer
from rlhf_jax.train import preference
from rlhf_jax.train.logging import read_metrics

from conftest import FLAGS_DIR


def _config(gold_stages, workdir, *extra):
  # DPO reads the SFT stage itself: the reward stage's flag is not one of DPOConfig's.
  shared = [a for a in gold_stages["args"] if not a.startswith("--reward_flagfile")]
  return config.parse(DPOConfig, [f"--flagfile={FLAGS_DIR}/dpo_gold_tiny.flags", *shared,
                                   f"--workdir={workdir}", *extra])


@pytest.fixture(scope="module", params=[("dpo", "--matched_sft"), ("kto",)],
                ids=lambda p: p[0])
def gold_run(request, gold_stages, tmp_path_factory):
  loss, *extra = request.param
  cfg = _config(gold_stages, tmp_path_factory.mktemp(loss) / "run", f"--loss={loss}", *extra)
  return cfg, dpo.run(cfg)


def test_smoke_reports_gold_win_rate_and_ches(gold_run):
  cfg, result = gold_run
  expected_rows = {"sft", "policy", "sft_matched"} if cfg.matched_sft else {"sft", "policy"}
  assert set(result["table"]) == expected_rows
  for name, row in result["table"].items():
    for key in ("gold", "gold_se", "words", "period"):
      assert math.isfinite(row[key]), (name, key, row)
    if name != "sft":
      assert 0.0 <= row["win_rate_lo"] <= row["win_rate"] <= row["win_rate_hi"] <= 1.0, row
  for key, value in {**result["ches"], **result["labels"]}.items():
    assert math.isfinite(value), (key, result["ches"], result["labels"])
  assert 0.0 <= result["ches"]["chosen_decreased_fraction"] <= 1.0
  pairs_n = result["data"]["pairs"]
  assert pairs_n == cfg.effective().num_pairs == 16
  assert result["data"]["train_examples"] == (2 * pairs_n if cfg.loss == "kto" else pairs_n)
  with open(os.path.join(cfg.workdir, "ches.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  assert len(lines) == pairs_n == result["ches"]["pairs"]
  for line in lines:
    for key in ("ches", "chosen_logp_change", "rejected_logp_change", "ref_chosen_logp"):
      assert math.isfinite(line[key]), line
  changes = np.array([line["chosen_logp_change"] for line in lines])
  assert result["ches"]["chosen_decreased_fraction"] == pytest.approx(np.mean(changes < 0))
  with open(os.path.join(cfg.workdir, "result.json")) as f:
    assert json.load(f)["table"] == result["table"]


def test_metrics_log_implicit_rewards_and_logps_from_the_sft_reference(gold_run):
  cfg, _ = gold_run
  train = read_metrics(str(cfg.workdir), split="train")
  assert [r["step"] for r in train] == [1, 2, 3]
  for r in train:
    for key in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
      assert math.isfinite(r["metrics"][key]), (key, r)
  # Step 1 runs the SFT params against the SFT reference: every log-ratio is 0, so DPO's loss
  # is log 2 and KTO's is lambda / 2 with z_0 = 0.
  first = train[0]["metrics"]
  assert first["loss"] == pytest.approx(math.log(2) if cfg.loss == "dpo" else 0.5, abs=1e-4)
  assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-4)
  assert train[-1]["metrics"]["loss"] != first["loss"]


@pytest.mark.parametrize("extra, message", [
    (["--beta=0"], "--beta must be > 0"),
    (["--data_files=experiments/data/pairs_tiny.jsonl"], "--data_files cannot be combined"),
    (["--init_hf=/nonexistent"], "--init_hf cannot be combined with --world=gold"),
    (["--init_from=/nonexistent"], "--init_from cannot be combined with --world=gold"),
    (["--num_pairs=0"], "--num_pairs must be >= 1"),
    (["--rater_agreement=0.4"], "--rater_agreement must be in"),
])
def test_invalid_gold_combinations_fail_before_running(tmp_path, extra, message):
  with pytest.raises(ValueError, match=message):
    dpo.run(config.parse(DPOConfig, [f"--flagfile={FLAGS_DIR}/dpo_gold_tiny.flags",
                                      f"--workdir={tmp_path}/run", *extra]))


def test_kto_on_file_pairs_is_refused():
  with pytest.raises(ValueError, match=preference.KTO_REFUSAL):
    config.parse(DPOConfig, [f"--flagfile={FLAGS_DIR}/dpo_tiny.flags", "--loss=kto"])
  config.parse(DPOConfig, [f"--flagfile={FLAGS_DIR}/dpo_gold_tiny.flags", "--loss=kto"])


def _kto_batch(seq_len=40):
  records = [{"prompt": p, "prompt_kind": "text", "chosen": c, "rejected": r}
             for p, c, r in [("Tell me about owls.", " Owls hunt.", " owls owls"),
                             ("Describe rain.", " Rain falls.", " no"),
                             ("Tell me about owls.", " They fly.", " x"),
                             ("Explain tides.", " The moon pulls.", " tides?")]]
  examples = pairs.kto_examples(records)
  encode = pairs.kto_encoder(pairs.make_encoder(ByteTokenizer(), seq_len, "pairs"))
  batch = {k: np.stack([encode(e)[k] for e in examples]) for k in encode(examples[0])}
  batch["example_valid"][-1] = False  # a padding row: must count for nothing
  own = {}
  for rec in records:
    own.setdefault(rec["prompt"], set()).update((rec["chosen"], rec["rejected"]))
  # Every KL row pairs a prompt with a response written for another prompt.
  assert all(e["kl_response"] not in own[e["prompt"]] for e in examples)
  return examples, batch


def _np_seq_logps(graphdef, params, tokens, valid, mask):
  """Sum over target tokens of log softmax(logits)[next token], in float64."""
  logits, _ = apply(graphdef, params, jnp.asarray(tokens), jnp.asarray(valid))
  logits = np.asarray(logits, np.float64)[:, :-1]
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  token_logp = np.take_along_axis(logp, tokens[:, 1:, None].astype(np.int64), -1)[..., 0]
  return (token_logp * mask[:, 1:]).sum(-1)


# Mean mismatched log-ratio of these models: +3.1 (z_0 > 0), -3.1 (z_0 clamped to 0), +0.05.
@pytest.mark.parametrize("policy_seed, ref_seed", [(0, 2), (2, 0), (0, 3)])
def test_kto_loss_fn_matches_float64_reference(policy_seed, ref_seed):
  """KTO (Ethayarajh 2024): r = log pi/pi_ref; z_0 = max(0, mean r over mismatched pairs);
  v = lambda_D s(beta (r - z_0)) | lambda_U s(beta (z_0 - r)); L = E[lambda_y - v]."""
  _, batch = _kto_batch()
  graphdef, params = make_model(seed=policy_seed)
  _, ref_params = make_model(seed=ref_seed)
  beta, lam_d, lam_u = 0.5, 1.0, 0.7
  keep = batch["example_valid"]
  side = lambda p, s: _np_seq_logps(graphdef, p, batch[f"{s}_tokens"], batch[f"{s}_valid"],
                                    batch[f"{s}_mask"])
  r = side(params, "chosen") - side(ref_params, "chosen")
  kl = side(params, "rejected") - side(ref_params, "rejected")
  z0 = max(0.0, kl[keep].mean())
  sig = lambda x: 1.0 / (1.0 + np.exp(-x))
  good = batch["desirable"]
  v = np.where(good, lam_d * sig(beta * (r - z0)), lam_u * sig(beta * (z0 - r)))
  expected = (np.where(good, lam_d, lam_u) - v)[keep].mean()

  loss_fn = preference.kto_loss_fn(graphdef, beta=beta, desirable_weight=lam_d,
                                   undesirable_weight=lam_u, ref_params=ref_params)
  loss_sum, aux = jax.jit(loss_fn)(params, batch, jax.random.key(0))
  assert float(aux["denominator"]) == keep.sum()
  assert float(loss_sum) / keep.sum() == pytest.approx(expected, rel=1e-4, abs=1e-6)
  assert float(aux["kl"]) / keep.sum() == pytest.approx(kl[keep].mean(), rel=1e-4, abs=1e-4)
  assert float(aux["chosen_fraction"]) == (good & keep).sum()
  assert float(aux["rewards/chosen"]) == pytest.approx((beta * r)[good & keep].sum(),
                                                        rel=1e-4, abs=1e-4)
  # Precomputed reference log-probs in the batch give the same loss as the in-step reference.
  ref = jax.jit(preference.reference_logps_fn(graphdef))(ref_params, batch)
  pre_sum, _ = jax.jit(preference.kto_loss_fn(graphdef, beta=beta, desirable_weight=lam_d,
                                              undesirable_weight=lam_u))(
      params, {**batch, **ref}, jax.random.key(0))
  assert float(pre_sum) == pytest.approx(float(loss_sum), rel=1e-5)
