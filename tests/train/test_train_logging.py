"""Logging: metrics.jsonl, TensorBoard events read back, progress line; the loop writes them."""
import json
import re

import jax
import jax.numpy as jnp
import pytest

import toy_train
from rlhf_jax.train import logging as tlog
from rlhf_jax.train import loop, optim, step
from rlhf_jax.train.state import init_train_state


def test_jsonl_and_tensorboard_round_trip(tmp_path):
  logger = tlog.MetricsLogger(str(tmp_path))
  logger.log(1, {"loss": jnp.float32(2.5), "grad_norm": 0.75})
  logger.log(2, {"loss": 1.25, "grad_norm": jnp.array(0.5)})
  logger.log(2, {"loss": 3.0}, split="eval")
  logger.close()

  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 3
  first = json.loads(lines[0])
  assert first["step"] == 1 and first["split"] == "train"
  assert first["metrics"] == {"loss": 2.5, "grad_norm": 0.75}
  assert isinstance(first["time"], float)
  assert [r["step"] for r in tlog.read_metrics(str(tmp_path), split="train")] == [1, 2]

  scalars = tlog.read_tensorboard_scalars(str(tmp_path))
  assert scalars["train/loss"] == [(1, 2.5), (2, 1.25)]
  assert scalars["train/grad_norm"] == [(1, 0.75), (2, 0.5)]
  assert scalars["eval/loss"] == [(2, 3.0)]


def test_read_metrics_keeps_last_record_of_a_replayed_step(tmp_path):
  for value in (1.0, 2.0):  # a resumed run re-logs step 3
    logger = tlog.MetricsLogger(str(tmp_path))
    logger.log(3, {"loss": value})
    logger.close()
  assert [r["metrics"]["loss"] for r in tlog.read_metrics(str(tmp_path))] == [2.0]
  assert len(tlog.read_metrics(str(tmp_path), dedupe=False)) == 2


def test_progress_line_format():
  line = tlog.format_progress(120, 1000, 2.34567, 12.5, 3200.0)
  assert line == "step  120/1000 | loss 2.3457 | 12.50 steps/s | 3,200 tok/s | eta 0:01:10"
  assert tlog.format_progress(5, 10, 1.0, 0.0, None) == (
      "step  5/10 | loss 1.0000 | 0.00 steps/s | eta 0:00:00")
  assert tlog.format_duration(27 * 3600 + 3 * 60 + 9.4) == "27:03:09"


def test_write_config(tmp_path):
  tlog.write_config(str(tmp_path), {"lr": 0.1, "name": "toy"})
  assert json.loads((tmp_path / "config.json").read_text()) == {"lr": 0.1, "name": "toy"}


def test_train_loop_logs_evaluates_and_summarises(tmp_path, capsys):
  """The loop without a checkpoint manager: progress lines, metrics, eval, config."""
  cfg = optim.OptimConfig(learning_rate=0.05, total_steps=6, warmup_steps=1)
  tx = optim.make_optimizer(cfg)
  state = init_train_state(toy_train.init_params(0), tx, jax.random.key(0))
  fn = step.compile_train_step(step.make_train_step(
      toy_train.make_loss_fn(), tx, num_microbatches=2, lr_schedule=optim.make_schedule(cfg)))
  eval_step = step.compile_eval_step(step.make_eval_step(toy_train.make_loss_fn()))
  eval_batches = [toy_train.make_batch(1000 + i, 8) for i in range(2)]
  logger = tlog.MetricsLogger(str(tmp_path))
  state, summary = loop.train(
      workdir=str(tmp_path), train_step=fn, state=state, train_iter=toy_train.ToyData(8),
      total_steps=6, logger=logger, log_every=2, tokens_per_batch=72,
      eval_fn=lambda p: step.evaluate(eval_step, p, eval_batches), eval_every=3,
      config={"total_steps": 6})
  logger.close()

  assert int(state.step) == 6 and summary["final_step"] == 6 and summary["start_step"] == 0
  progress = [l for l in capsys.readouterr().out.splitlines() if l.startswith("step")]
  assert len(progress) == 3
  assert re.fullmatch(r"step 6/6 \| loss \d+\.\d{4} \| [\d.]+ steps/s \| [\d,]+ tok/s \| "
                      r"eta \d+:\d\d:\d\d", progress[-1]), progress[-1]
  train = tlog.read_metrics(str(tmp_path), split="train")
  assert [r["step"] for r in train] == [2, 4, 6]
  assert set(train[0]["metrics"]) >= {"loss", "grad_norm", "learning_rate", "denominator"}
  assert [r["step"] for r in tlog.read_metrics(str(tmp_path), split="eval")] == [3, 6]
  assert summary["eval"]["loss"] == pytest.approx(
      tlog.read_metrics(str(tmp_path), split="eval")[-1]["metrics"]["loss"])
  assert summary["train"]["loss"] < train[0]["metrics"]["loss"]  # it learns
  assert json.loads((tmp_path / "config.json").read_text()) == {"total_steps": 6}
  assert "eval/loss" in tlog.read_tensorboard_scalars(str(tmp_path))
