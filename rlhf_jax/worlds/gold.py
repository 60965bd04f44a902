"""Gold-preference world: short descriptive texts scored by a hidden gold reward r*(x, y).

Why it exists: to reproduce reward-model overoptimisation (Gao et al. 2023) on a CPU, the
quantity RLHF is meant to improve must be measurable exactly on every policy sample. Proxy
reward models only ever see comparisons labelled through r* (rlhf_jax.worlds.raters);
r* itself is measured on every policy, so "proxy up, gold down" is visible.

The world (everything derives from one `GoldConfig` and its seed):
- prompts "describe the cat." from TOPICS x PROMPT_TEMPLATES, split train/test by a stable
  hash of the prompt text.
- responses are 1..2 sentences (3 in the pretraining corpus) from a small lexicon ("the cat is soft. it rests near the
  gate."), with deliberate SFT-level noise so a tiny byte model's samples differ in r*:
  off-topic answers, filler words ("um"), a repeated sentence, a missing final period.
- a pretraining corpus of prompt + response texts (train prompts, up to 5 sentences) and a
  curated SFT set (train prompts) plus held-out test prompts with a reference response.

The gold reward, from the prompt and response TEXT only (words = [a-z']+ after lowercasing):
  r* = sum_k WEIGHTS[k] * facets[k], with
  relevance       +1.0  1 if the prompt's topic word occurs in the response, else 0.
  period          +0.5  1 if the response (stripped) ends with ".", else 0.
  off_vocabulary  -1.0  fraction of words outside LEXICON (1 for an empty response).
  length          +1.5  an asymmetric parabola with peak 1 at LENGTH_PEAK (16) words:
                        1 - ((n - 16) / 16)^2 below the peak (0 at 0 words), and
                        1 - ((n - 16) / LENGTH_FALL)^2 above it (LENGTH_FALL = 8: 0 at 24
                        words, -2 at 30). SFT responses are mostly 4..15 words, so comparisons
                        of SFT samples show only the rising side: a proxy learns "longer is
                        better", which reverses sharply a few words past the SFT range.
  repetition      -3.0  d^2, d = 1 - unique/total word trigrams (0 under 3 words): one repeated
                        sentence in an SFT answer costs ~0.1-0.2, a looped text costs ~2.5.
Worked example (checked in tests/worlds/test_gold.py):
  prompt "describe the cat.", response "the cat is soft. the cat is soft."
  words = 8, all in LEXICON; trigrams 6, unique 4 -> d = 1/3; length 1 - (8/16)^2 = 3/4
  r* = 1.0*1 + 0.5*1 - 1.0*0 + 1.5*(3/4) - 3.0*(1/9) = 1.5 + 1.125 - 0.3333 = 2.2917
"""
import dataclasses
import hashlib
import random
import re
from typing import Callable, Sequence

import numpy as np

TOPICS = ("cat", "dog", "horse", "bird", "fish", "frog", "owl", "bee", "fox", "wolf", "bear",
          "deer", "river", "lake", "sea", "hill", "forest", "garden", "field", "road", "bridge",
          "tower", "house", "boat", "train", "bike", "lamp", "clock", "book", "song", "storm",
          "rain", "snow", "wind", "moon", "sun", "star", "cloud", "apple", "bread")
PROMPT_TEMPLATES = ("tell me about the {t}.", "describe the {t}.", "what is the {t} like?",
                    "write about the {t}.", "say something about the {t}.")
_SLOTS = {
    "adj": ("big", "small", "old", "young", "quiet", "loud", "bright", "dark", "warm", "cold",
            "soft", "hard", "fast", "slow", "green", "red", "blue", "calm", "wild", "gentle"),
    "verb": ("moves", "rests", "sleeps", "shines", "grows", "waits", "sings", "runs", "glows",
             "drifts", "stands", "turns"),
    "adv": ("slowly", "quickly", "quietly", "often", "softly", "gently", "early", "late"),
    "place": ("door", "wall", "gate", "path", "shore", "window"),
    "verb2": ("watch", "like", "see", "love", "draw", "remember"),
}
# "{t}" is the topic; templates without it keep the answer on topic only through the others.
SENTENCE_TEMPLATES = ("the {t} is {adj}.", "the {t} {verb} {adv}.", "it {verb} near the {place}.",
                      "the {t} is {adj} and {adj}.", "people {verb2} the {t}.",
                      "you can see the {t} near the {place}.", "it is very {adj}.")
FILLERS = ("um", "uh", "erm", "hmm")
LEXICON = frozenset(TOPICS).union(*_SLOTS.values(), *(
    re.findall(r"[a-z']+", re.sub(r"\{\w+\}", " ", s)) for s in SENTENCE_TEMPLATES))

LENGTH_PEAK = 16
LENGTH_FALL = 8
WEIGHTS = {"relevance": 1.0, "period": 0.5, "off_vocabulary": -1.0, "length": 1.5,
           "repetition": -3.0}
_WEIGHT_VECTOR = np.array(list(WEIGHTS.values()))


@dataclasses.dataclass(frozen=True)
class GoldConfig:
  """The gold-preference world. Defaults: 200 prompts (~40 held out), SFT answers of ~8
  words (~60 bytes), sized for a tiny byte model on 2 CPU cores.

  test_fraction: fraction of prompts held out (by a hash of the prompt text).
  num_pretrain_texts, num_sft: corpus sizes (train prompts, sampled with replacement, so
    each prompt is seen with many different responses).
  num_test: held-out test prompts (distinct); capped by the split size.
  p_off_topic, p_filler, p_repeat, p_no_period: per-response noise rates of the SFT/corpus
    generator; they are what makes r* vary across responses.
  seed: the split and every sample derive from it.
  """
  test_fraction: float = 0.2
  num_pretrain_texts: int = 4000
  num_sft: int = 1000
  num_test: int = 40
  p_off_topic: float = 0.1
  p_filler: float = 0.15
  p_repeat: float = 0.2
  p_no_period: float = 0.1
  seed: int = 0

  def __post_init__(self):
    if not 0.0 < self.test_fraction < 1.0:
      raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
    for name in ("p_off_topic", "p_filler", "p_repeat", "p_no_period"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


# ---------------------------------------------------------------- the gold reward


def words(text: str) -> list[str]:
  return re.findall(r"[a-z']+", text.lower())


def topic_of(prompt: str) -> str | None:
  """The first TOPICS word of the prompt; None for prompts from outside the world."""
  return next((w for w in words(prompt) if w in TOPICS), None)


def length_score(num_words: int) -> float:
  """Peak 1 at LENGTH_PEAK words, 0 at 0 words and at LENGTH_PEAK + LENGTH_FALL words."""
  width = LENGTH_PEAK if num_words <= LENGTH_PEAK else LENGTH_FALL
  return 1.0 - ((num_words - LENGTH_PEAK) / width) ** 2


def duplicate_trigram_fraction(ws: Sequence[str]) -> float:
  trigrams = list(zip(ws, ws[1:], ws[2:]))
  return 1.0 - len(set(trigrams)) / len(trigrams) if trigrams else 0.0


def facets(prompt: str, response: str) -> dict[str, float]:
  """The unweighted facet values (keys of WEIGHTS) plus "words", for diagnostics."""
  ws = words(response)
  topic = topic_of(prompt)
  return {
      "relevance": float(topic is not None and topic in ws),
      "period": float(response.strip().endswith(".")),
      "off_vocabulary": sum(w not in LEXICON for w in ws) / len(ws) if ws else 1.0,
      "length": length_score(len(ws)),
      "repetition": duplicate_trigram_fraction(ws) ** 2,
      "words": float(len(ws)),
  }


def gold_rewards(prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
  """r* for a batch: float64 [N]. Facets are per text; the weighting is one matmul."""
  if len(prompts) != len(responses):
    raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
  table = np.array([[f[k] for k in WEIGHTS] for f in map(facets, prompts, responses)],
                   dtype=np.float64).reshape(-1, len(WEIGHTS))
  return table @ _WEIGHT_VECTOR


def gold_reward(prompt: str, response: str) -> float:
  return float(gold_rewards([prompt], [response])[0])


# The preference-world interface (registry.py): the ground truth is r* itself, and
# the raters are Plackett-Luce on r* at a temperature the experiments calibrate on the pairs
# they rate (raters.py), so rater functions live there.
ground_truth = gold_rewards
# Response tokens sampled by default: 120 bytes (~24 words) reach past the length peak
# (16 words) to its zero (24).
DEFAULT_MAX_NEW_TOKENS = 120


def metrics(prompts: Sequence[str], responses: Sequence[str]) -> dict[str, float]:
  """Mean words and the share of responses ending with a period."""
  fs = [facets(p, y) for p, y in zip(prompts, responses)]
  return {"words": float(np.mean([f["words"] for f in fs])),
          "period": float(np.mean([f["period"] for f in fs]))}


def truth_better(prompts: Sequence[str], ys_a: Sequence[str], ys_b: Sequence[str]) -> np.ndarray:
  """1.0 where r*(a) > r*(b), 0.0 where r*(a) < r*(b), 0.5 on ties."""
  diff = gold_rewards(prompts, ys_a) - gold_rewards(prompts, ys_b)
  return np.where(diff > 0, 1.0, np.where(diff < 0, 0.0, 0.5))


# ---------------------------------------------------------------- the world's texts


def _unit_hash(*parts) -> float:
  """A uniform number in [0, 1) fixed by `parts`, stable across processes (unlike hash())."""
  digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def all_prompts(config: GoldConfig | None = None) -> list[str]:
  """Every prompt of the world (the same for every config)."""
  del config
  return [t.format(t=topic) for topic in TOPICS for t in PROMPT_TEMPLATES]


def split_prompts(config: GoldConfig) -> dict[str, list[str]]:
  """{"train": [...], "test": [...]}, disjoint, decided per prompt by a seeded hash."""
  out = {"train": [], "test": []}
  for p in all_prompts():
    out["test" if _unit_hash("split", config.seed, p) < config.test_fraction else "train"].append(p)
  return out


def _sentence(rng: random.Random, topic: str) -> str:
  template = rng.choice(SENTENCE_TEMPLATES)
  return re.sub(r"\{(\w+)\}", lambda m: topic if m[1] == "t" else rng.choice(_SLOTS[m[1]]),
                template)


def sample_response(config: GoldConfig, rng: random.Random, prompt: str,
                    max_sentences: int = 2) -> str:
  """One noisy answer of 1..max_sentences sentences (plus possibly a repeated one)."""
  topic = topic_of(prompt)
  if rng.random() < config.p_off_topic:
    topic = rng.choice([t for t in TOPICS if t != topic])
  n = rng.choices(range(1, max_sentences + 1), weights=range(max_sentences, 0, -1))[0]
  sentences = [_sentence(rng, topic) for _ in range(n)]
  if rng.random() < config.p_repeat:
    sentences.append(rng.choice(sentences))
  ws = " ".join(sentences).split(" ")
  if rng.random() < config.p_filler:
    ws.insert(rng.randrange(len(ws) + 1), rng.choice(FILLERS))
  text = " ".join(ws)
  return text.rstrip(".") if rng.random() < config.p_no_period else text


# Pretraining texts are at most this many bytes (longer draws are redrawn), so a 128-token
# row holds any text with bos and eos.
MAX_PRETRAIN_BYTES = 126


def pretrain_records(config: GoldConfig) -> list[dict[str, str]]:
  """[{"text": "<prompt> <response>"}] over train prompts, answers of up to 3 sentences.

  The corpus is noisier than the SFT set (web text vs curated demonstrations): every noise
  rate is doubled (capped at 1), so SFT has something to fix."""
  noisy = dataclasses.replace(config, **{k: min(1.0, 2 * getattr(config, k)) for k in (
      "p_off_topic", "p_filler", "p_repeat", "p_no_period")})
  train = split_prompts(config)["train"]
  rng = random.Random(f"pretrain:{config.seed}")
  out = []
  while len(out) < config.num_pretrain_texts:
    p = rng.choice(train)
    text = f"{p} {sample_response(noisy, rng, p, max_sentences=3)}"
    if len(text.encode()) <= MAX_PRETRAIN_BYTES:
      out.append({"text": text})
  return out


def sft_records(config: GoldConfig) -> list[dict[str, str]]:
  train = split_prompts(config)["train"]
  rng = random.Random(f"sft:{config.seed}")
  return [{"prompt": p, "response": sample_response(config, rng, p)}
          for p in (rng.choice(train) for _ in range(config.num_sft))]


def heldout_records(config: GoldConfig) -> list[dict[str, str]]:
  """Distinct test prompts, each with one reference answer from the SFT generator."""
  test = split_prompts(config)["test"]
  rng = random.Random(f"test:{config.seed}")
  chosen = rng.sample(test, min(config.num_test, len(test)))
  return [{"prompt": p, "response": sample_response(config, rng, p)} for p in chosen]


# dataset -> (its text fields, config -> {split: records}); same shape as arithmetic.DATASETS.
DATASETS: dict[str, tuple[tuple[str, ...], Callable[[GoldConfig], dict]]] = {
    "pretrain": (("text",), lambda c: {"train": pretrain_records(c)}),
    "sft": (("prompt", "response"),
            lambda c: {"train": sft_records(c), "test": heldout_records(c)}),
}


def records(config: GoldConfig) -> dict[str, dict[str, list[dict[str, str]]]]:
  """Every dataset of the world in memory: {dataset: {split: records}}."""
  return {name: make(config) for name, (_, make) in DATASETS.items()}


def build_datasets(config: GoldConfig, data_dir: str) -> dict:
  """Materialises {"pretrain", "sft"} as array_record TFDS datasets (see arithmetic)."""
  from rlhf_jax.data import builders  # The world's generators stay usable without TFDS.
  return builders.build_world_datasets("gold", config, DATASETS, data_dir)
