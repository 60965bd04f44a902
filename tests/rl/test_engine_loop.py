"""The online loop (rlhf_jax.rl.loop): minibatch epochs visit every rollout row once per pass,
iterations after the first compile nothing, a run cut after iteration 2 resumes to the
uninterrupted run's parameters bit for bit (with the algorithm's state restored), and
LoopConfig's validation. The run is GRPO (GroupSampling + grpo_loss_fn) on a 1-layer nano
model over an 8-device data mesh, with a scorer that rewards odd first response tokens."""
import dataclasses
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from rlhf_jax import sharding
from rlhf_jax.data.tokenizer import ByteTokenizer
from rlhf_jax.models.transformer import Transformer
from rlhf_jax.rl import loop
from rlhf_jax.rl.algorithms import grpo
from rlhf_jax.rl.rollout import RolloutStage
from rlhf_jax.sampling import SamplingConfig
from rlhf_jax.train import optim
from rlhf_jax.train.logging import read_metrics

CFG = helpers.nano(n_layers=1)
TOK = ByteTokenizer()
PROMPT_LEN, N, G, BATCH = 4, 4, 4, 4  # 16 rows per iteration
PROMPTS = [f"{a}{b}" for a in "abcd" for b in "xyz"]
ITERATIONS, SEED = 3, 5


# ---------------------------------------------------------------------------------------
# epoch_order and train_on_rollout with a recording train step

def test_train_on_rollout_visits_every_row_once_per_epoch():
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  rows, mbs, epochs = 12, 3, 2
  batch = {"row": jnp.arange(rows), "x": 10 * jnp.arange(rows)}
  seen = []

  def train_step(state, minibatch):
    seen.append({k: np.asarray(v) for k, v in minibatch.items()})
    return state + 1, {"loss": jnp.float32(state)}

  extend = lambda mb: {**mb, "extra": mb["row"] * 0 + 7}
  order = loop.epoch_order(rows, np.random.default_rng(0), epochs=epochs, num_minibatches=mbs)
  state, metrics = loop.train_on_rollout(train_step, 0, batch, order, mesh, extend=extend)
  assert state == epochs * mbs == len(seen) == len(metrics)
  assert [float(m["loss"]) for m in metrics] == list(range(state))
  for mb in seen:
    assert len(mb["row"]) == rows // mbs
    np.testing.assert_array_equal(mb["x"], 10 * mb["row"])  # keys gathered by the same rows
    np.testing.assert_array_equal(mb["extra"], 7)  # extend_minibatch applied to each
  passes = [np.concatenate([mb["row"] for mb in seen[e * mbs:(e + 1) * mbs]])
            for e in range(epochs)]
  for p in passes:
    np.testing.assert_array_equal(np.sort(p), np.arange(rows))  # each row exactly once
  assert not np.array_equal(passes[0], passes[1])  # reshuffled every epoch
  assert not np.array_equal(passes[0], np.arange(rows))  # shuffled at all
  with pytest.raises(ValueError, match="do not split into 3 minibatches"):
    loop.epoch_order(10, np.random.default_rng(0), epochs=1, num_minibatches=3)


@pytest.mark.parametrize("name", ["iterations", "epochs", "num_minibatches", "log_every",
                                  "eval_every", "save_every", "keep_checkpoints"])
def test_loop_config_refuses_non_positive(name, tmp_path):
  ok = loop.LoopConfig(str(tmp_path), iterations=3, epochs=2, num_minibatches=4)
  assert ok.updates == 24
  for bad in (0, -1):
    with pytest.raises(ValueError, match=f"{name} must be >= 1"):
      dataclasses.replace(ok, **{name: bad})


# ---------------------------------------------------------------------------------------
# A 3-iteration GRPO run through loop.run

def odd_first_token(exp):
  """1 if the first response token is odd: varies within groups, so gradients flow."""
  return np.asarray(exp.rollout.tokens_BxT[:, PROMPT_LEN] % 2, np.float32)


def build(workdir):
  """(LoopConfig, algorithm, state, train_step, mesh) of a fresh run in `workdir`."""
  mesh = sharding.make_mesh()  # data = 8 devices; 8 rows per minibatch
  g, params, shardings = sharding.init_sharded(lambda r: Transformer(CFG, rngs=r),
                                               jax.random.key(SEED), mesh)
  sampling = SamplingConfig(max_new_tokens=N, eos_id=TOK.eos_id, pad_id=TOK.pad_id)
  algorithm = grpo.GroupSampling(
      RolloutStage(g, sampling, PROMPT_LEN, group_size=G, with_ref=False), odd_first_token,
      PROMPTS, None, BATCH, SEED, make_batch=grpo.grpo_batch_fn(G, estimator="grpo",
                                                                std_eps=1e-4))
  cfg = loop.LoopConfig(str(workdir), ITERATIONS, epochs=2, num_minibatches=2,
                        keep_checkpoints=3)
  loss_fn = grpo.grpo_loss_fn(g, clip_eps_low=0.2, clip_eps_high=0.2, kl_coef=0.0,
                              aggregation="token", max_new_tokens=N)
  state, train_step = loop.make_trainer(
      loss_fn, params, shardings, ("tokens", "valid", "mask", "old_logps", "advantages"),
      mesh, optim_cfg=optim.OptimConfig(learning_rate=3e-3, total_steps=cfg.updates),
      num_microbatches=1, seed=SEED)
  return cfg, algorithm, state, train_step, mesh


def evaluate(params):
  """Host-side only (compiles nothing): the embedding's norm."""
  return {"embed_norm": float(np.linalg.norm(np.asarray(params["embed"], np.float64)))}


def run(workdir):
  cfg, algorithm, state, train_step, mesh = build(workdir)
  state, curve = loop.run(cfg, algorithm, state=state, train_step=train_step, mesh=mesh,
                          evaluate=evaluate, config={"test": True})
  return jax.device_get(state), curve, algorithm


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("loop") / "full"
  init_params = jax.device_get(build(tmp_path_factory.mktemp("unused"))[2].params)
  state, curve, algorithm = run(workdir)
  return workdir, init_params, state, curve, algorithm


def test_run_trains_logs_and_compiles_once(full_run):
  workdir, init_params, state, curve, algorithm = full_run
  assert int(state.step) == ITERATIONS * 2 * 2
  moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(state.params),
                                                         jax.tree.leaves(init_params)))
  assert moved > 1e-4
  train = read_metrics(str(workdir), split="train")
  assert [r["step"] for r in train] == [1, 2, 3]
  assert train[0]["metrics"]["compiles"] > 0  # the first iteration compiles the step
  assert [r["metrics"]["compiles"] for r in train[1:]] == [0.0, 0.0]
  for r in train:
    m = r["metrics"]
    assert m["rollout_rounds"] == 1.0 and 0 <= m["clipfrac_per_token"] <= 1
    assert 0 <= m["reward_mean"] <= 1 and np.isfinite(m["loss"])
  assert [p["iteration"] for p in curve] == [0, 1, 2, 3]
  assert curve[0]["embed_norm"] != curve[-1]["embed_norm"]
  assert [r["step"] for r in read_metrics(str(workdir), split="eval")] == [0, 1, 2, 3]
  # Prompts seen: BATCH distinct prompts per iteration, drawn by (seed, it).
  assert algorithm.prompts_seen["trained"] == [algorithm.draw(it) for it in range(ITERATIONS)]
  assert algorithm.prompts_seen["rolled_out"] == algorithm.prompts_seen["trained"]


def test_cut_run_resumes_bitwise(full_run, tmp_path, capsys):
  workdir, _, state, curve, algorithm = full_run
  cut = tmp_path / "cut"
  shutil.copytree(workdir, cut)
  shutil.rmtree(cut / "checkpoints" / "3")
  capsys.readouterr()
  state2, curve2, algorithm2 = run(cut)
  assert "resumed from iteration 2" in capsys.readouterr().out
  assert int(state2.step) == int(state.step)
  jax.tree.map(np.testing.assert_array_equal, state2.params, state.params)
  jax.tree.map(np.testing.assert_array_equal, state2.opt_state, state.opt_state)
  assert curve2 == curve
  # The algorithm's state came back from checkpoint 2 (JSON), then iteration 3 was added.
  assert algorithm2.prompts_seen == algorithm.prompts_seen
  assert len(algorithm2.prompts_seen["trained"]) == ITERATIONS
  # The rerun logged iteration 3 again: the same values (timings aside).
  rows = [r for r in read_metrics(str(cut), split="train", dedupe=False) if r["step"] == 3]
  a, b = rows[0]["metrics"], rows[-1]["metrics"]
  assert len(rows) == 2 and {k: v for k, v in a.items() if k != "compiles"} == {
      k: v for k, v in b.items() if k != "compiles"}
