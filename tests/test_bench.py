"""rlhf_jax.bench: every workload runs at a tiny shape and reports the documented keys with
sane values (docs/benchmarks.md). Timings themselves are not checked: only that they are
measured. The peers (bench/peers.py) are never part of the test suite."""
import io
import json

import numpy as np
import pytest

from rlhf_jax.bench import suite
from rlhf_jax.bench.__main__ import main
from rlhf_jax.bench.rl_workloads import IdTokenizer, even_token_reward

TINY = suite.Shapes(batch=2, prompt_len=8, response_len=8, new_tokens=8, naive_new_tokens=8,
                    grpo_prompts=2, group_size=2, grpo_new_tokens=8)
MEMORY_KEYS = {"argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "peak_bytes"}


@pytest.fixture(scope="module")
def report():
  return suite.run(["nano"], suite.WORKLOADS, shapes=TINY, repeats=1, log=io.StringIO())


def _check_memory(memory):
  assert set(memory) == MEMORY_KEYS
  assert memory["peak_bytes"] == (memory["argument_bytes"] + memory["output_bytes"]
                                  - memory["alias_bytes"] + memory["temp_bytes"])
  assert memory["peak_bytes"] > 0


def test_report_header(report):
  assert report["dtype"] == "float32" and report["repeats"] == 1
  assert report["shapes"]["batch"] == 2
  assert report["peak_matmul_flops_per_s"] > 0
  assert set(report["presets"]["nano"]) == {"params", *suite.WORKLOADS}
  json.dumps(report)  # the printed object: plain JSON


@pytest.mark.parametrize("name", suite.TRAIN_WORKLOADS)
def test_train_steps(report, name):
  r = report["presets"]["nano"][name]
  tokens = TINY.batch * (TINY.prompt_len + TINY.response_len) * (1 if name == "sft" else 2)
  assert r["seconds_per_step"] > 0
  np.testing.assert_allclose(r["tokens_per_s"] * r["seconds_per_step"], tokens)
  assert 0 < r["mfu"] and r["model_flops_per_s"] > 0
  assert r["compile_s"] >= 0
  _check_memory(r["memory"])
  assert r["memory"]["alias_bytes"] > 0  # the donated state is updated in place


def test_reference_in_step_counts_its_forward(report):
  nano = report["presets"]["nano"]
  flops = lambda r: r["model_flops_per_s"] * r["seconds_per_step"]  # noqa: E731
  np.testing.assert_allclose(flops(nano["dpo_ref_in_step"]) / flops(nano["dpo"]), 4 / 3)


def test_samplers(report):
  nano = report["presets"]["nano"]
  for name in ("sampler", "sampler_naive"):
    r = nano[name]
    assert r["seconds"] > 0 and r["compile_s"] >= 0
    np.testing.assert_allclose(r["new_tokens_per_s"] * r["seconds"], TINY.batch * 8)
    _check_memory(r["memory"])
  assert nano["sampler_naive"]["speedup_over_naive"] > 0


@pytest.mark.parametrize("name", ("grpo", "grpo_shared", "grpo_fast"))
def test_grpo_iteration(report, name):
  r = report["presets"]["nano"][name]
  assert r["seconds"] > 0 and 0 < r["generation_share"] < 1
  assert r["compile_s"] >= 0 and r["rollout_compile_s"] >= 0
  assert r["compiles_steady"] == 0  # a steady iteration compiles nothing
  for program in ("train_step", "rollout"):
    _check_memory(r["memory"][program])


def test_table_has_a_row_per_workload(report):
  rows = suite.table(report).splitlines()
  assert len(rows) == 1 + len(suite.WORKLOADS)


def test_reward_reads_the_decoded_tokens():
  tok = IdTokenizer(16)
  text = tok.decode([0, 1, 2, 4, 5, 6, 8])  # pad, bos and eos are dropped
  assert text == "t4 t5 t6 t8" and tok.encode(text) == [4, 5, 6, 8]
  assert even_token_reward([""], [text], [None]) == [0.75]


def test_cli_refuses_zero_repeats(capsys):
  with pytest.raises(SystemExit):
    main(["--repeats=0"])
  assert "--repeats must be >= 1" in capsys.readouterr().err
