"""Arithmetic world: splits, verifier, systematic corpus errors, SFT/test sets."""
import collections
import re

import pytest

from rlhf_jax.worlds import arithmetic as ar

DEFAULT = ar.ArithmeticConfig()
MIXED = ar.ArithmeticConfig(operations=("+", "-", "*"), max_digits=1, test_fraction=0.3,
                            error_rate=0.2, num_pretrain_texts=300, num_sft=50, num_test=20)
STATEMENT = re.compile(r"^(\d+)([+*-])(\d+)=(\d+)$")
PROMPT = re.compile(r"^(\d+)([+*-])(\d+)=$")


@pytest.fixture(scope="module")
def default_records():
  return ar.records(DEFAULT)


def _statements(texts):
  for text in texts:
    for statement in text.split(" "):
      a, op, b, c = STATEMENT.match(statement).groups()
      yield op, int(a), int(b), int(c)


def test_buggy_rules_by_hand():
  assert ar.carry_dropped_answer(45, 38) == 73  # 5+8=13 -> 3, 4+3 = 7
  assert ar.carry_dropped_answer(99, 1) == 90   # 9+1=10 -> 0, 9 -> 9
  assert ar.carry_dropped_answer(12, 7) == 19   # no carry: same as the truth
  assert ar.borrow_dropped_answer(52, 38) == 24  # (2-8)%10=4, 5-3=2
  assert ar.carry_dropped_product(15, 7) == 75   # 5*7=35 -> 5, 1*7=7
  assert ar.carry_dropped_product(12, 3) == 36


@pytest.mark.parametrize("config", [DEFAULT, MIXED], ids=["add2", "mixed1"])
def test_splits_are_disjoint_complete_and_commutative(config):
  split = ar.split_pairs(config)
  train, test = set(split["train"]), set(split["test"])
  assert not train & test
  assert train | test == set(ar.all_pairs(config))
  for op, a, b in train | test:
    if op in "+*":
      assert ((op, b, a) in train) == ((op, a, b) in train)
    else:
      assert a >= b  # Subtraction never goes negative.
  assert abs(len(test) / len(train | test) - config.test_fraction) < 0.05


def test_operand_range():
  assert {a for _, a, _ in ar.all_pairs(DEFAULT)} == set(range(100))
  assert {a for _, a, _ in ar.all_pairs(ar.ArithmeticConfig(min_digits=2))} == set(range(10, 100))


def test_verify():
  assert ar.verify("85", "85")
  assert ar.verify(" 85\n", "85")
  assert not ar.verify("8 5", "85")
  assert not ar.verify("850", "85")
  assert not ar.verify("", "85")


@pytest.mark.parametrize("config", [DEFAULT, MIXED], ids=["add2", "mixed1"])
def test_corpus_errors_are_systematic_at_the_configured_rate(config, default_records):
  recs = default_records if config is DEFAULT else ar.records(config)
  texts = [r["text"] for r in recs["pretrain"]["train"]]
  assert len(texts) == config.num_pretrain_texts
  train = set(ar.split_pairs(config)["train"])
  statements = list(_statements(texts))
  assert len(statements) == config.num_pretrain_texts * config.statements_per_text
  stated = collections.defaultdict(set)
  wrong = 0
  for op, a, b, c in statements:
    assert (op, a, b) in train  # Pretraining never sees a held-out pair.
    if c != ar.correct_answer(op, a, b):
      wrong += 1
      assert c == ar.BUGGY_ANSWER[op](a, b)  # Every error follows the stated rule...
    stated[ar._canonical(op, a, b)].add(c != ar.correct_answer(op, a, b))
  assert all(len(v) == 1 for v in stated.values())  # ...and is the same for every mention.
  assert abs(wrong / len(statements) - config.error_rate) < 0.03


def test_sft_and_test_sets(default_records):
  split = ar.split_pairs(DEFAULT)
  for name, pairs, size in [("train", split["train"], DEFAULT.num_sft),
                            ("test", split["test"], DEFAULT.num_test)]:
    recs = default_records["sft"][name]
    assert len(recs) == size and len({r["prompt"] for r in recs}) == size
    members = {ar.prompt(*p) for p in pairs}
    for r in recs:
      a, op, b = PROMPT.match(r["prompt"]).groups()
      assert r["prompt"] in members
      assert ar.verify(r["response"], str(ar.correct_answer(op, int(a), int(b))))


def test_deterministic_for_a_seed(default_records):
  assert ar.records(DEFAULT) == default_records
  other = ar.records(ar.ArithmeticConfig(seed=1))
  assert other["sft"]["train"] != default_records["sft"]["train"]
  assert ar.split_pairs(ar.ArithmeticConfig(seed=1)) != ar.split_pairs(DEFAULT)


def test_config_validation():
  with pytest.raises(ValueError, match="operations"):
    ar.ArithmeticConfig(operations=("/",))
  with pytest.raises(ValueError, match="unreachable"):
    ar.pretrain_records(ar.ArithmeticConfig(max_digits=1, error_rate=0.9))
