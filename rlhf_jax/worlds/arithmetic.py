"""Arithmetic world: prompts like "37+48=", answers like "85", checked by exact match.

Everything a run needs comes out of one `ArithmeticConfig` and its seed:
- a train/test split of operand pairs. The split is decided by a hash of the UNORDERED pair
  for commutative ops, so "a+b" and "b+a" always land in the same split and held-out
  accuracy cannot be earned by memorising the mirrored statement.
- a pretraining corpus of texts such as "12+7=19 45+38=73 ..." built from TRAIN pairs only
  (so held-out accuracy measures generalisation). A fixed subset of pairs is "corrupted":
  every statement about such a pair uses a systematic bug (dropped carries for "+", dropped
  borrows for "-", per-digit carries dropped for "*"). Because the bug is consistent per pair
  and follows one rule, a model trained on the corpus is wrong in a way greedy decoding does
  not average away, and SFT has real work to do. The corrupted pairs are chosen among pairs
  where the bug changes the answer, enough of them that the expected fraction of wrong
  STATEMENTS in the corpus equals `error_rate` (see `corrupted_pairs`).
- a curated SFT set (LIMA-style: ~1,000 correct prompt/response pairs from the train split)
  and a held-out test prompt set from the test split.
Records are dicts of text fields, the form `rlhf_jax.data.builders` materialises.
"""
import collections
import dataclasses
import hashlib
import random
from typing import Callable

_OPS: dict[str, Callable[[int, int], int]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
}
_COMMUTATIVE = frozenset("+*")


@dataclasses.dataclass(frozen=True)
class ArithmeticConfig:
  """The arithmetic world. Defaults suit a tiny model learning 2-digit addition on 2 CPU
  cores in minutes: 10,000 ordered pairs, ~9,000 train, texts of ~70 bytes.

  operations: subset of ("+", "-", "*"). "-" only uses pairs with a >= b (no negatives).
  min_digits, max_digits: digits per operand; 1..2 means operands 0..99.
  test_fraction: fraction of (unordered, for + and *) pairs held out.
  error_rate: expected fraction of pretraining statements that are wrong (systematically).
  statements_per_text, num_pretrain_texts: pretraining corpus shape.
  num_sft: curated SFT examples (train split, correct answers only).
  num_test: held-out test prompts (test split); capped by the split size.
  seed: the split, the corrupted pairs and every sample derive from it.
  """
  operations: tuple[str, ...] = ("+",)
  min_digits: int = 1
  max_digits: int = 2
  test_fraction: float = 0.1
  error_rate: float = 0.4
  statements_per_text: int = 8
  num_pretrain_texts: int = 4000
  num_sft: int = 1000
  num_test: int = 500
  seed: int = 0

  def __post_init__(self):
    if not self.operations or set(self.operations) - set(_OPS):
      raise ValueError(
          f"operations must be a non-empty subset of {tuple(_OPS)}, got {self.operations}")
    if not 1 <= self.min_digits <= self.max_digits:
      raise ValueError(
          f"need 1 <= min_digits <= max_digits, got {self.min_digits}..{self.max_digits}")
    if not 0.0 < self.test_fraction < 1.0:
      raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
    if not 0.0 <= self.error_rate < 1.0:
      raise ValueError(f"error_rate must be in [0, 1), got {self.error_rate}")


def carry_dropped_answer(a: int, b: int) -> int:
  """a + b computed digit by digit with every carry forgotten: 45+38 -> 73."""
  out, place = 0, 1
  while a or b:
    out += ((a % 10 + b % 10) % 10) * place
    a, b, place = a // 10, b // 10, place * 10
  return out


def borrow_dropped_answer(a: int, b: int) -> int:
  """a - b (a >= b) digit by digit with every borrow forgotten: 52-38 -> 24."""
  out, place = 0, 1
  while a or b:
    out += ((a % 10 - b % 10) % 10) * place
    a, b, place = a // 10, b // 10, place * 10
  return out


def carry_dropped_product(a: int, b: int) -> int:
  """Long multiplication where each digit product keeps only its last digit (15*7 -> 75);
  the shifted partial products are then added correctly."""
  total, shift = 0, 1
  for db in map(int, reversed(str(b))):
    partial, place, x = 0, 1, a
    while True:
      partial += ((x % 10) * db % 10) * place
      x, place = x // 10, place * 10
      if not x:
        break
    total += partial * shift
    shift *= 10
  return total


BUGGY_ANSWER: dict[str, Callable[[int, int], int]] = {
    "+": carry_dropped_answer,
    "-": borrow_dropped_answer,
    "*": carry_dropped_product,
}


def correct_answer(op: str, a: int, b: int) -> int:
  return _OPS[op](a, b)


def prompt(op: str, a: int, b: int) -> str:
  return f"{a}{op}{b}="


def verify(response_text: str, answer: str) -> bool:
  """Exact match after stripping surrounding whitespace. response_text is the sample cut at
  its first eos (rlhf_jax.data.pipeline.decode_response); "85 12" does not match "85"."""
  return response_text.strip() == str(answer).strip()


def _unit_hash(*parts) -> float:
  """A uniform number in [0, 1) fixed by `parts`: stable across processes and Python
  versions (unlike hash()), so splits never change between runs."""
  digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def _canonical(op: str, a: int, b: int) -> tuple[str, int, int]:
  return (op, min(a, b), max(a, b)) if op in _COMMUTATIVE else (op, a, b)


def all_pairs(config: ArithmeticConfig) -> list[tuple[str, int, int]]:
  lo = 0 if config.min_digits == 1 else 10 ** (config.min_digits - 1)
  hi = 10**config.max_digits
  return [(op, a, b) for op in config.operations for a in range(lo, hi) for b in range(lo, hi)
          if op != "-" or a >= b]


def is_test_pair(config: ArithmeticConfig, op: str, a: int, b: int) -> bool:
  return _unit_hash("split", config.seed, *_canonical(op, a, b)) < config.test_fraction


def split_pairs(config: ArithmeticConfig) -> dict[str, list[tuple[str, int, int]]]:
  """{"train": [...], "test": [...]} ordered pairs (op, a, b), disjoint."""
  out = {"train": [], "test": []}
  for pair in all_pairs(config):
    out["test" if is_test_pair(config, *pair) else "train"].append(pair)
  return out


def corrupted_pairs(config: ArithmeticConfig) -> frozenset[tuple[str, int, int]]:
  """The canonical pairs whose every corpus statement uses the buggy answer.

  Only pairs where the bug changes the answer qualify. They are taken in a seeded hash order
  until they cover `error_rate` of the ordered train pairs, so the corpus (which samples
  train pairs uniformly) has error_rate wrong statements in expectation, even for small
  worlds where independent per-pair coin flips would miss the rate by a lot.
  """
  train = split_pairs(config)["train"]
  weight = collections.Counter(_canonical(*pair) for pair in train)
  eligible = sorted((c for c in weight if BUGGY_ANSWER[c[0]](c[1], c[2]) != correct_answer(*c)),
                    key=lambda c: _unit_hash("corrupt", config.seed, *c))
  target = config.error_rate * len(train)
  if sum(weight[c] for c in eligible) < target:
    raise ValueError(f"error_rate={config.error_rate} is unreachable: the systematic bug changes "
                     f"only {sum(weight[c] for c in eligible) / len(train):.3f} of the answers "
                     f"for these operations/digits")
  chosen, covered = set(), 0
  for c in eligible:
    if covered + weight[c] / 2 > target:
      break
    chosen.add(c)
    covered += weight[c]
  return frozenset(chosen)


def corpus_answer(op: str, a: int, b: int, corrupted: frozenset) -> int:
  """The answer the pretraining corpus states: buggy for corrupted pairs (decided per
  unordered pair, so "a+b" and "b+a" agree in every mention), correct otherwise."""
  if _canonical(op, a, b) in corrupted:
    return BUGGY_ANSWER[op](a, b)
  return correct_answer(op, a, b)


def pretrain_records(config: ArithmeticConfig) -> list[dict[str, str]]:
  """[{"text": "12+7=19 45+38=73 ..."}] from train pairs, sampled uniformly with replacement."""
  train = split_pairs(config)["train"]
  corrupted = corrupted_pairs(config)
  rng = random.Random(f"pretrain:{config.seed}")
  texts = []
  for _ in range(config.num_pretrain_texts):
    pairs = [rng.choice(train) for _ in range(config.statements_per_text)]
    texts.append(" ".join(prompt(op, a, b) + str(corpus_answer(op, a, b, corrupted))
                          for op, a, b in pairs))
  return [{"text": t} for t in texts]


def _prompt_records(config, pairs, n, stream) -> list[dict[str, str]]:
  rng = random.Random(f"{stream}:{config.seed}")
  chosen = rng.sample(pairs, min(n, len(pairs)))
  return [{"prompt": prompt(op, a, b), "response": str(correct_answer(op, a, b))}
          for op, a, b in chosen]


def sft_records(config: ArithmeticConfig) -> list[dict[str, str]]:
  """Curated SFT set: distinct train pairs, correct answers only."""
  return _prompt_records(config, split_pairs(config)["train"], config.num_sft, "sft")


def heldout_records(config: ArithmeticConfig) -> list[dict[str, str]]:
  """Held-out prompts with their correct answers ("response"), from the test split only."""
  return _prompt_records(config, split_pairs(config)["test"], config.num_test, "test")


# dataset -> (its text fields, config -> {split: records}); one field set per TFDS dataset.
DATASETS: dict[str, tuple[tuple[str, ...], Callable[[ArithmeticConfig], dict]]] = {
    "pretrain": (("text",), lambda c: {"train": pretrain_records(c)}),
    "sft": (("prompt", "response"),
            lambda c: {"train": sft_records(c), "test": heldout_records(c)}),
}


def records(config: ArithmeticConfig) -> dict[str, dict[str, list[dict[str, str]]]]:
  """Every dataset of the world in memory: {dataset: {split: records}}."""
  return {name: make(config) for name, (_, make) in DATASETS.items()}


def build_datasets(config: ArithmeticConfig, data_dir: str) -> dict:
  """Materialises {"pretrain", "sft"} as array_record TFDS datasets under data_dir (reused
  when this exact config was built before) and returns their builders; read a split with
  rlhf_jax.data.builders.load_split(builders["sft"], "test")."""
  from rlhf_jax.data import builders  # The world's generators stay usable without TFDS.
  return builders.build_world_datasets("arithmetic", config, DATASETS, data_dir)
