"""A stage's criterion (rlhf_jax/pipeline/criterion.py) and the loop's stop at the first
evaluation where it holds (rlhf_jax/train/loop.py: stop_fn)."""
import jax
import pytest

from rlhf_jax.pipeline import criterion
from rlhf_jax.train import checkpoint, loop, step
from tests.train import toy_train


def test_parse_reads_every_condition_and_its_direction():
  conds = criterion.parse("accuracy_greedy>=0.45, loss <= 2.5e-1")
  assert conds == (criterion.Condition("accuracy_greedy", ">=", 0.45),
                   criterion.Condition("loss", "<=", 0.25))
  assert criterion.parse("  ") == ()


@pytest.mark.parametrize("text", ["accuracy_greedy>0.4", "accuracy_greedy=>0.4", ">=0.4",
                                  "accuracy_greedy>=high", "a>=0.1,,b<=2"])
def test_parse_rejects_what_is_not_a_condition(text):
  with pytest.raises(ValueError, match="--criterion"):
    criterion.parse(text)


def test_met_needs_every_condition_and_is_inclusive_at_the_bound():
  conds = criterion.parse("accuracy_greedy>=0.5,loss<=1.0")
  assert criterion.met(conds, {"accuracy_greedy": 0.5, "loss": 1.0})
  assert not criterion.met(conds, {"accuracy_greedy": 0.4999, "loss": 0.1})
  assert not criterion.met(conds, {"accuracy_greedy": 0.9, "loss": 1.0001})


def test_a_metric_not_yet_defined_does_not_meet_its_condition():
  conds = criterion.parse("loss_drop<=0.01")
  assert not criterion.met(conds, {"loss": 1.0})  # the first evaluation has no drop yet
  assert criterion.met(conds, {"loss": 1.0, "loss_drop": 0.005})
  assert "loss_drop nan" in criterion.describe(conds, {"loss": 1.0})


def test_unknown_metric_names_the_available_ones():
  with pytest.raises(ValueError, match="accuracy_gredy.*accuracy_greedy, loss"):
    criterion.check_names(criterion.parse("accuracy_gredy>=0.5"), ["loss", "accuracy_greedy"])


def test_failure_message_says_what_was_reached_and_expected():
  msg = criterion.failure("pretraining", criterion.parse("accuracy_greedy>=0.45"),
                          {"accuracy_greedy": 0.142}, 1000)
  assert "pretraining" in msg and "0.142" in msg and ">=0.45" in msg and "1000" in msg
  assert "--steps" in msg


def _toy_run(workdir, *, total_steps, stop_fn, eval_every=2, manager=None):
  state, fn = toy_train.trainer(total_steps)
  compiled = step.compile_train_step(fn)
  evals = []

  def eval_fn(params):
    evals.append(int(jax.device_get(params["embed"]).size))  # one entry per evaluation
    return {"evals": float(len(evals))}

  data = toy_train.ToyData(batch_size=4)
  state, summary = loop.train(workdir=str(workdir), train_step=compiled, state=state,
                              train_iter=data, total_steps=total_steps, manager=manager,
                              eval_fn=eval_fn, eval_every=eval_every, log_every=1,
                              stop_fn=stop_fn, print_fn=None)
  return state, summary, data


def test_loop_stops_at_the_first_evaluation_where_the_criterion_holds(tmp_path):
  # The 3rd evaluation (step 6) is the first where evals >= 3 holds.
  state, summary, data = _toy_run(tmp_path, total_steps=20,
                                  stop_fn=lambda m: m["evals"] >= 3)
  assert summary["stopped"] and summary["final_step"] == 6 and int(state.step) == 6
  assert data.index == 6  # no batch drawn past the stop


def test_loop_without_the_criterion_met_runs_its_whole_budget(tmp_path):
  _, summary, _ = _toy_run(tmp_path, total_steps=8, stop_fn=lambda m: False)
  assert not summary["stopped"] and summary["final_step"] == 8


def test_a_run_resumed_after_it_stopped_does_not_train_on(tmp_path):
  manager = checkpoint.make_manager(str(tmp_path), save_every=100, max_to_keep=2)
  _, first, _ = _toy_run(tmp_path, total_steps=20, stop_fn=lambda m: m["evals"] >= 2,
                         manager=manager)
  manager.close()
  assert first["final_step"] == 4
  manager = checkpoint.make_manager(str(tmp_path), save_every=100, max_to_keep=2)
  # Resumed at step 4, an evaluation step: it evaluates before any step, and stops.
  _, resumed, data = _toy_run(tmp_path, total_steps=20, stop_fn=lambda m: m["evals"] >= 1,
                              manager=manager)
  manager.close()
  assert resumed["start_step"] == 4 and resumed["final_step"] == 4 and resumed["stopped"]
  assert data.index == 4  # the restored position; nothing drawn
