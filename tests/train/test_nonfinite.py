"""Numerical faults in the offline loop: a step whose loss or gradients are NaN/inf never
reaches the state (the step keeps the previous params and optimizer state, bit for bit);
under --on_nonfinite=stop the run ends naming the step and its example ids, with a debug dump,
and no checkpoint is written from that step on; under skip the run goes on, the step counted
and logged, and ends where stepping past that batch by hand ends."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import toy_train
from rlhf_jax.train import checkpoint, loop, nonfinite, step
from rlhf_jax.train.logging import MetricsLogger, read_metrics

BATCH, SAVE_EVERY = 4, 2


def loss_fn(params, batch, rng):
  """The toy LM loss; a row's `poison` (0, or inf/NaN) multiplies into the embedding, so a
  poisoned batch has a NaN loss AND NaN gradients, as an overflow would."""
  loss, aux = toy_train.make_loss_fn()(params, batch, rng)
  return loss * (1.0 + 0.0 * jnp.sum(batch["poison"])), aux


class PoisonedData(toy_train.ToyData):
  """ToyData whose batch number `bad` (0-based) carries inf; knows its example ids."""

  def __init__(self, bad: int):
    super().__init__(BATCH)
    self.bad, self.example_ids = bad, None

  def __next__(self):
    index = self.index
    batch = super().__next__()
    self.example_ids = np.arange(index * BATCH, (index + 1) * BATCH)
    batch["poison"] = np.full((BATCH,), np.inf if index == self.bad else 0.0, np.float32)
    return batch


def _setup(total):
  return toy_train.trainer(total, loss_fn=loss_fn, seed=1)


def _train(workdir, total, bad, policy):
  state, fn = _setup(total)
  manager = checkpoint.make_manager(str(workdir), save_every=SAVE_EVERY, async_save=False)
  logger = MetricsLogger(str(workdir))
  try:
    return loop.train(workdir=str(workdir), train_step=step.compile_train_step(fn),
                      state=state, train_iter=PoisonedData(bad), total_steps=total,
                      manager=manager, logger=logger, log_every=1, on_nonfinite=policy,
                      print_fn=None)
  finally:
    logger.close()
    manager.close()


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_a_nonfinite_step_keeps_the_state_bitwise_and_flags_it():
  state, fn = _setup(4)
  jitted = jax.jit(fn)  # no donation: the input state is compared after the step
  data = PoisonedData(bad=2)
  state, _ = jitted(state, next(data))  # step 1's learning rate is 0 (warmup)
  good, m_good = jitted(state, next(data))
  bad, m_bad = jitted(good, next(data))
  assert float(m_good["nonfinite"]) == 0 and float(m_bad["nonfinite"]) == 1
  assert not np.isfinite(float(m_bad["loss"])) and not np.isfinite(float(m_bad["grad_norm"]))
  for before, after in zip(_leaves((good.params, good.opt_state)),
                           _leaves((bad.params, bad.opt_state))):
    assert np.array_equal(before, after)
  assert int(bad.step) == 3  # the batch is consumed
  assert any(not np.array_equal(a, b) for a, b in zip(_leaves(state.params),
                                                      _leaves(good.params)))


@pytest.mark.parametrize("bad", [4, 3])  # step 5 (between saves), step 4 (a save step)
def test_stop_names_the_step_and_examples_dumps_the_batch_and_saves_nothing_after(tmp_path,
                                                                                  bad):
  at = bad + 1
  with pytest.raises(nonfinite.NonfiniteError) as e:
    _train(tmp_path, 8, bad, "stop")
  ids = list(range(bad * BATCH, at * BATCH))
  message = str(e.value)
  assert f"step {at}:" in message and f"example ids {ids}" in message
  assert "--on_nonfinite=skip" in message
  latest = (at - 1) // SAVE_EVERY * SAVE_EVERY
  assert f"the latest checkpoint is step {latest}" in message
  steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  assert steps[-1] == latest

  dump = tmp_path / nonfinite.DUMP_DIR / f"step_{at}"
  with np.load(dump / "batch.npz") as f:
    assert np.isinf(f["poison"]).all()
    np.testing.assert_array_equal(f["tokens"], toy_train.make_batch(bad, BATCH)["tokens"])
  info = json.loads((dump / "info.json").read_text())
  assert info["step"] == at and info["example_ids"] == ids
  assert info["data_position"] == {"index": bad}


def test_skip_drops_the_update_counts_it_and_matches_stepping_past_by_hand(tmp_path):
  total, bad = 6, 2
  final, summary = _train(tmp_path, total, bad, "skip")
  assert summary["skipped_nonfinite"] == 1 and summary["final_step"] == total
  faults = [r for r in read_metrics(str(tmp_path)) if r["split"] == "faults"]
  assert [(r["step"], r["metrics"]) for r in faults] == [(bad + 1, {"nonfinite_skipped": 1.0})]

  # By hand: the healthy batches stepped, the poisoned one only advancing the step counter.
  state, fn = _setup(total)
  jitted, data = jax.jit(fn), PoisonedData(bad)
  for i in range(total):
    batch = next(data)
    state = state.replace(step=state.step + 1) if i == bad else jitted(state, batch)[0]
  for want, got in zip(_leaves(state.params), _leaves(final.params)):
    assert np.array_equal(want, got)


def test_an_unknown_policy_is_refused(tmp_path):
  with pytest.raises(ValueError, match="--on_nonfinite must be one of"):
    _train(tmp_path, 2, 0, "ignore")
