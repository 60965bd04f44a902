"""What a resumed offline run REPORTS equals the uninterrupted run's (the kill campaign found
three ways it did not): the held-out loss_drop continues from the last logged evaluation, a run
resumed at its last step returns the final train and eval metrics, and an evaluation due at the
checkpoint's step is logged even when the run died before logging it."""
import os
import shutil

import numpy as np
import pytest

import toy_train
from rlhf_jax.pipeline.lm import LossDropEval
from rlhf_jax.train import checkpoint, loop, step
from rlhf_jax.train.logging import MetricsLogger, read_metrics

TOTAL, EVERY = 8, 2  # evaluate and save every 2 steps


class Killed(Exception):
  """Stands in for a SIGKILL: the loop ends without its final save."""


class DiesAt(toy_train.ToyData):
  def __init__(self, batch: int | None):
    super().__init__(8)
    self.dies_at = batch

  def __next__(self):
    if self.index == self.dies_at:
      raise Killed
    return super().__next__()


def _train(workdir, dies_at=None):
  state, fn = toy_train.trainer(TOTAL, seed=3)
  fn = step.compile_train_step(fn)
  evaluate = LossDropEval(lambda params: {"loss": float(np.sum(np.asarray(params["embed"]) ** 2))})
  manager = checkpoint.make_manager(str(workdir), save_every=EVERY, async_save=False,
                                    max_to_keep=None)
  logger = MetricsLogger(str(workdir))
  try:
    return loop.train(workdir=str(workdir), train_step=fn, state=state,
                      train_iter=DiesAt(dies_at), total_steps=TOTAL, manager=manager,
                      logger=logger, eval_fn=evaluate, eval_every=EVERY, log_every=1,
                      print_fn=None)[1]
  finally:
    logger.close()
    manager.close()


def _logged(workdir):
  return {(r["split"], r["step"]): r["metrics"] for r in read_metrics(str(workdir))}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("straight")
  return workdir, _train(workdir)


def test_loss_drop_continues_from_the_last_logged_evaluation(straight, tmp_path):
  workdir, _ = straight
  with pytest.raises(Killed):
    _train(tmp_path, dies_at=5)  # after checkpoint 4, during step 6
  _train(tmp_path)
  want, got = _logged(workdir), _logged(tmp_path)
  assert got == want
  assert "loss_drop" in got[("eval", 6)]  # the first evaluation after the resume has it


def test_a_run_resumed_at_its_last_step_returns_the_final_metrics(straight, tmp_path):
  workdir, summary = straight
  shutil.copytree(workdir, tmp_path, dirs_exist_ok=True)  # finished; its result.json lost
  again = _train(tmp_path)
  assert again["start_step"] == again["final_step"] == TOTAL
  assert again["train"] == summary["train"] and again["eval"] == summary["eval"]
  assert summary["eval"]["loss_drop"] != 0


def test_an_evaluation_the_killed_run_did_not_log_is_run_on_resume(straight, tmp_path):
  workdir, _ = straight
  shutil.copytree(workdir, tmp_path, dirs_exist_ok=True)
  for later in (6, 8):  # died right after checkpoint 4 was written, before logging its eval
    shutil.rmtree(tmp_path / "checkpoints" / str(later))
  lines = open(tmp_path / "metrics.jsonl").read().splitlines()
  kept = [l for l in lines if '"step": 4, "split": "eval"' not in l]
  assert len(kept) == len(lines) - 1
  with open(tmp_path / "metrics.jsonl", "w") as f:
    f.write("\n".join(kept) + "\n")
  _train(tmp_path)
  assert _logged(tmp_path) == _logged(workdir)
  assert os.path.exists(tmp_path / "checkpoints" / str(TOTAL))
