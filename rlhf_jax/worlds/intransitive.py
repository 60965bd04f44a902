"""Intransitive world: responses in three styles that raters prefer CYCLICALLY, so no scalar
reward can represent the preference and the best policy is a MIXTURE (Munos et al. 2024).

Why it exists: Nash learning from human feedback claims that optimising a pairwise preference
model reaches the mixed Nash equilibrium of the preference game, where RLHF against a
Bradley-Terry reward collapses onto one style. Here the game, its equilibrium and the
exploitability of any policy are known exactly, so both claims are measurable on a CPU.

The world (everything derives from one `IntransitiveConfig` and its seed):
- prompts "talk about the cat." from TOPICS x PROMPT_TEMPLATES (60), split train/test by a
  stable hash of the prompt text.
- responses are one short sentence (<= 36 bytes) in one of three STYLES, each a fixed
  template over a small lexicon (the style is visible from the first word):
    formal (A)  "certainly. the cat is calm."
    casual (B)  "oh, the cat? so calm!"
    poetic (C)  "ah, the cat, calm as snow."
  Anything else (mixed templates, off-lexicon words, truncation) is MALFORMED; style_of
  classifies a response from its text alone (the topic need not be the prompt's).
- the pretraining corpus mixes the styles uniformly with p_malformed_pretrain malformed texts;
  the curated SFT set draws styles from the SKEWED mixture `mu` (mostly casual): far from the
  equilibrium, so Nash-MD has somewhere to go.

The raters (simulated): P(a > b) = PREFERENCE[style(a), style(b)], with
  P(A > B) = 0.8, P(B > C) = 0.65, P(C > A) = 0.7    (a cycle, NOT symmetric)
same style 1/2; a malformed response beats a well-formed one with probability
`malformed_win` (0.05), two malformed ones tie at 1/2. The 4 x 4 matrix over (A, B, C,
malformed) satisfies P + P^T = 1. A rater's label is a Bernoulli draw of that probability;
a cycle has no K-way ranking model, so only K = 2 (rater_rankings refuses K != 2).

Ground truth:
- the Nash equilibrium of the symmetric game on P (found by linear programming,
  `nash_equilibrium`; for a 3-cycle in closed form, `cyclic_equilibrium`): with
  M = P - 1/2, a = M[A,B] = 0.3, b = M[B,C] = 0.15, c = M[C,A] = 0.2, pi* ∝ (b, c, a) =
  (0.15, 0.2, 0.3), i.e. (0.231, 0.308, 0.462). The malformed outcome is strictly dominated,
  so it gets no mass in the 4 x 4 game either.
- exploitability(pi) = max_y P(y > pi) - 1/2 over the 4 outcomes (0 at the equilibrium):
  pure formal 0.2 (poetic beats it 0.7), pure casual 0.3, pure poetic 0.15, mu 0.18.
- `ground_truth` (the scalar column experiments report as "gold"): P(y > y'), y' ~ mu, the
  probability that the response beats a draw from the SFT style mixture (malformed:
  `malformed_win`). It is a fixed-opponent score, so a policy can raise it by collapsing on
  formal (0.68): it shows what a scalar reward rewards, not what the game's solution is.
- `metrics`: share of each style and of malformed responses, the exploitability of the
  empirical 4-outcome distribution, and its total-variation distance
  TV = 1/2 sum |pi - pi*| to the (malformed-padded) equilibrium.

A least-squares Bradley-Terry fit of logit P(i > j) = r_i - r_j ranks formal first, so PPO
against a BT reward model should collapse onto formal (exploitability 0.2).
"""
import dataclasses
import hashlib
import random
import re
from typing import Callable, Sequence

import numpy as np

STYLES = ("formal", "casual", "poetic")
MALFORMED = len(STYLES)  # the 4th outcome's index in the extended matrix
TOPICS = ("cat", "dog", "bird", "fish", "fox", "owl", "bee", "horse", "river", "sea", "hill",
          "forest", "garden", "road", "boat", "train", "lamp", "book", "moon", "rain")
PROMPT_TEMPLATES = ("talk about the {t}.", "what about the {t}?", "tell me of the {t}.")
ADJECTIVES = ("calm", "wild", "old", "small", "bright", "dark", "warm", "cold")
NOUNS = ("snow", "gold", "stone", "fire", "mist", "silk")
TEMPLATES = ("certainly. the {t} is {adj}.", "oh, the {t}? so {adj}!",
             "ah, the {t}, {adj} as {noun}.")
_PATTERNS = (re.compile(r"certainly\. the ([a-z]+) is ([a-z]+)\."),
             re.compile(r"oh, the ([a-z]+)\? so ([a-z]+)!"),
             re.compile(r"ah, the ([a-z]+), ([a-z]+) as ([a-z]+)\."))
_LEXICONS = ((TOPICS, ADJECTIVES), (TOPICS, ADJECTIVES), (TOPICS, ADJECTIVES, NOUNS))

# Response tokens sampled per answer: the longest well-formed response is 34 bytes (+ EOS).
DEFAULT_MAX_NEW_TOKENS = 40
# The longest pretraining text (prompt, space, response): a 64-token row holds it with bos/eos.
MAX_PRETRAIN_BYTES = 62


@dataclasses.dataclass(frozen=True)
class IntransitiveConfig:
  """The intransitive world. Defaults: 60 prompts (~12 held out), SFT answers of ~25 bytes.

  preference: (P(A > B), P(B > C), P(C > A)) of the raters, each in (0, 1); the other
    off-diagonal entries are 1 minus these, the diagonal 1/2.
  mu: the SFT style mixture (formal, casual, poetic), positive, summing to 1.
  malformed_win: P(a malformed response beats a well-formed one), in [0, 1/2).
  p_malformed_pretrain, p_malformed_sft: rates of malformed texts in the two corpora.
  test_fraction: share of prompts held out (by a hash of the prompt text).
  num_pretrain_texts, num_sft: corpus sizes (train prompts drawn with replacement).
  num_test: held-out test prompts (distinct; capped by the split size).
  seed: the split and every sample derive from it.
  """
  preference: tuple[float, float, float] = (0.8, 0.65, 0.7)
  mu: tuple[float, float, float] = (0.15, 0.7, 0.15)
  malformed_win: float = 0.05
  p_malformed_pretrain: float = 0.1
  p_malformed_sft: float = 0.03
  test_fraction: float = 0.2
  num_pretrain_texts: int = 4000
  num_sft: int = 1000
  num_test: int = 12
  seed: int = 0

  def __post_init__(self):
    if len(self.preference) != 3 or not all(0.0 < p < 1.0 for p in self.preference):
      raise ValueError(f"preference must be 3 probabilities in (0, 1), got {self.preference}")
    if (len(self.mu) != 3 or min(self.mu) <= 0 or abs(sum(self.mu) - 1.0) > 1e-9):
      raise ValueError(f"mu must be 3 positive probabilities summing to 1, got {self.mu}")
    if not 0.0 <= self.malformed_win < 0.5:
      raise ValueError(f"malformed_win must be in [0, 0.5), got {self.malformed_win}")
    for name in ("p_malformed_pretrain", "p_malformed_sft"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
    if not 0.0 < self.test_fraction < 1.0:
      raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")


DEFAULT = IntransitiveConfig()


# ---------------------------------------------------------------- the game


def preference_matrix(config: IntransitiveConfig = DEFAULT) -> np.ndarray:
  """P[i, j] = P(style i > style j), float64 3 x 3, P + P^T = 1."""
  ab, bc, ca = config.preference
  return np.array([[0.5, ab, 1.0 - ca],
                   [1.0 - ab, 0.5, bc],
                   [ca, 1.0 - bc, 0.5]], np.float64)


def extended_matrix(config: IntransitiveConfig = DEFAULT) -> np.ndarray:
  """The 4 x 4 matrix over (formal, casual, poetic, malformed)."""
  out = np.full((4, 4), 0.5)
  out[:3, :3] = preference_matrix(config)
  out[MALFORMED, :3] = config.malformed_win
  out[:3, MALFORMED] = 1.0 - config.malformed_win
  return out


def nash_equilibrium(P) -> np.ndarray:
  """The maximin mixed strategy of the symmetric game on P (P[i, j] = P(i > j), P + P^T = 1)
  by linear programming: max v s.t. (P^T pi)_j >= v for every j, pi in the simplex. The value
  of such a game is 1/2. Returns pi (float64, clipped at 0 and renormalised)."""
  from scipy import optimize
  P = np.asarray(P, np.float64)
  n = P.shape[0]
  c = np.r_[np.zeros(n), -1.0]  # minimise -v
  res = optimize.linprog(c, A_ub=np.hstack([-P.T, np.ones((n, 1))]), b_ub=np.zeros(n),
                         A_eq=np.r_[np.ones(n), 0.0][None], b_eq=[1.0],
                         bounds=[(0, None)] * n + [(None, None)], method="highs")
  if not res.success:
    raise RuntimeError(f"linprog failed: {res.message}")
  pi = np.clip(res.x[:n], 0.0, None)
  return pi / pi.sum()


def cyclic_equilibrium(P) -> np.ndarray:
  """Closed form for a 3-cycle (A > B > C > A): with M = P - 1/2, a = M[0,1], b = M[1,2],
  c = M[2,0] all > 0, M pi = 0 gives pi ∝ (b, c, a)."""
  M = np.asarray(P, np.float64) - 0.5
  a, b, c = M[0, 1], M[1, 2], M[2, 0]
  if min(a, b, c) <= 0:
    raise ValueError("not a strict 3-cycle A > B > C > A")
  pi = np.array([b, c, a])
  return pi / pi.sum()


def regularised_equilibrium(P, mu, tau: float, *, tol: float = 1e-12,
                            max_iter: int = 200_000) -> np.ndarray:
  """The equilibrium of the KL-regularised game Nash-MD actually solves (Munos 2024):
  pi*_tau = softmax(log mu + P pi*_tau / tau), unique for tau > 0. Where P depends on the
  style alone, a sequence-level policy's style marginal obeys the same equation with mu the
  reference's style distribution, so this is the target of Nash-MD with --nash_tau=tau from
  an SFT policy of style distribution mu. Damped fixed-point iteration in float64 (the step
  shrinks until the map contracts); tau -> 0 recovers the Nash equilibrium's support."""
  P, mu = np.asarray(P, np.float64), np.asarray(mu, np.float64)
  if tau <= 0:
    raise ValueError(f"tau must be > 0 (tau = 0 is the unregularised game: nash_equilibrium), "
                     f"got {tau}")
  if mu.shape != (P.shape[0],) or np.any(mu <= 0):
    raise ValueError(f"mu must be a strictly positive distribution over the {P.shape[0]} "
                     f"outcomes, got {mu}")
  log_mu = np.log(mu / mu.sum())
  damping = min(1.0, tau / 2.0)  # |d(softmax(P pi / tau))/d pi| <= |P| / (2 tau)
  pi = mu / mu.sum()
  for _ in range(max_iter):
    z = log_mu + P @ pi / tau
    target = np.exp(z - z.max())
    target /= target.sum()
    if np.abs(target - pi).max() < tol:
      return target
    pi = (1.0 - damping) * pi + damping * target
  raise RuntimeError(f"no fixed point within {max_iter} iterations (tau={tau})")


def exploitability(pi, P) -> float:
  """max_y P(y > pi) - 1/2: how much a best response beats pi by (0 at the equilibrium)."""
  return float(np.max(np.asarray(P, np.float64) @ np.asarray(pi, np.float64)) - 0.5)


def bradley_terry_fit(P, weights=None) -> np.ndarray:
  """Least-squares scores r (mean 0) of logit P[i, j] = r_i - r_j over pairs i < j, each
  weighted by weights[i, j] (default 1): what a scalar reward makes of the preference."""
  P = np.asarray(P, np.float64)
  n = P.shape[0]
  w = np.ones((n, n)) if weights is None else np.asarray(weights, np.float64)
  rows, targets = [], []
  for i in range(n):
    for j in range(i + 1, n):
      row = np.zeros(n)
      row[i], row[j] = 1.0, -1.0
      rows.append(np.sqrt(w[i, j]) * row)
      targets.append(np.sqrt(w[i, j]) * np.log(P[i, j] / (1.0 - P[i, j])))
  rows.append(np.ones(n))  # gauge: mean 0
  targets.append(0.0)
  r, *_ = np.linalg.lstsq(np.array(rows), np.array(targets), rcond=None)
  return r


# ---------------------------------------------------------------- styles of texts


def style_of(response: str) -> int | None:
  """0 formal, 1 casual, 2 poetic, None malformed (exact template over the lexicon; leading
  and trailing whitespace is ignored: the pretraining corpus puts a space after the prompt,
  the SFT set does not)."""
  for s, (pattern, lexicons) in enumerate(zip(_PATTERNS, _LEXICONS)):
    m = pattern.fullmatch(response.strip())
    if m:
      return s if all(w in lex for w, lex in zip(m.groups(), lexicons)) else None
  return None


def outcomes(responses: Sequence[str]) -> np.ndarray:
  """int [N]: the style index, MALFORMED (3) for malformed responses."""
  return np.array([MALFORMED if (s := style_of(y)) is None else s for y in responses],
                  np.int64).reshape(len(responses))


def style_distribution(responses: Sequence[str]) -> np.ndarray:
  """Empirical distribution over (formal, casual, poetic, malformed), float64 [4]."""
  if not len(responses):
    raise ValueError("need at least one response")
  return np.bincount(outcomes(responses), minlength=4) / len(responses)


def _check_pairs(prompts, ys_a, ys_b) -> None:
  if not len(prompts) == len(ys_a) == len(ys_b):
    raise ValueError(f"{len(prompts)} prompts, {len(ys_a)} and {len(ys_b)} responses")


def rater_preference(config: IntransitiveConfig, prompts, ys_a, ys_b) -> np.ndarray:
  """P(a rater prefers a over b), float64 [N] (the prompt does not matter)."""
  _check_pairs(prompts, ys_a, ys_b)
  return extended_matrix(config)[outcomes(ys_a), outcomes(ys_b)]


def rater_labels(config: IntransitiveConfig, prompts, ys_a, ys_b,
                 rng: np.random.Generator) -> np.ndarray:
  """One rater's labels: True where the rater prefers a (a Bernoulli draw per pair)."""
  return rng.random(len(prompts)) < rater_preference(config, prompts, ys_a, ys_b)


def rater_rankings(config: IntransitiveConfig, prompts, responses_NxK,
                   rng: np.random.Generator) -> np.ndarray:
  """int [N, 2] rankings (best first) of K = 2 responses per prompt; K != 2 is refused."""
  k = len(responses_NxK[0]) if len(responses_NxK) else 0
  if any(len(ys) != 2 for ys in responses_NxK) or k != 2:
    raise ValueError(f"the intransitive raters compare pairs only (K = 2), got K = {k}: a "
                     "cyclic preference has no K-way ranking model (use --ranking_k=2)")
  a_wins = rater_labels(config, prompts, [ys[0] for ys in responses_NxK],
                        [ys[1] for ys in responses_NxK], rng)
  return np.where(a_wins[:, None], [[0, 1]], [[1, 0]]).astype(np.int64)


def truth_better(prompts, ys_a, ys_b, config: IntransitiveConfig = DEFAULT) -> np.ndarray:
  """The majority preference: 1.0 if P(a > b) > 1/2, 0.0 if < 1/2, 0.5 on a tie."""
  p = rater_preference(config, prompts, ys_a, ys_b)
  return np.where(p > 0.5, 1.0, np.where(p < 0.5, 0.0, 0.5))


def rater_agreement(p) -> float:
  """P(two independent raters label a pair alike) = E[p^2 + (1 - p)^2]."""
  p = np.asarray(p, np.float64)
  return float(np.mean(p**2 + (1.0 - p) ** 2))


def ground_truth(prompts, responses, config: IntransitiveConfig = DEFAULT) -> np.ndarray:
  """P(y > y'), y' ~ mu: float64 [N] (see the module docstring)."""
  if len(prompts) != len(responses):
    raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
  mu4 = np.r_[np.asarray(config.mu, np.float64), 0.0]
  return (extended_matrix(config) @ mu4)[outcomes(responses)]


def metrics(prompts, responses, config: IntransitiveConfig = DEFAULT) -> dict[str, float]:
  """share_<style>, share_malformed, exploitability and nash_distance of the responses'
  empirical style distribution (4 outcomes; the equilibrium padded with 0 for malformed)."""
  if len(prompts) != len(responses):
    raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
  pi = style_distribution(responses)
  nash = np.r_[nash_equilibrium(preference_matrix(config)), 0.0]
  out = {f"share_{name}": float(pi[s]) for s, name in enumerate(STYLES)}
  out.update(share_malformed=float(pi[MALFORMED]),
             exploitability=exploitability(pi, extended_matrix(config)),
             nash_distance=float(0.5 * np.abs(pi - nash).sum()))
  return out


# ---------------------------------------------------------------- the world's texts


def _unit_hash(*parts) -> float:
  digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def all_prompts(config: IntransitiveConfig | None = None) -> list[str]:
  del config  # the prompt set is fixed; the split depends on the seed
  return [t.format(t=topic) for topic in TOPICS for t in PROMPT_TEMPLATES]


def split_prompts(config: IntransitiveConfig) -> dict[str, list[str]]:
  """{"train": [...], "test": [...]}, disjoint, decided per prompt by a seeded hash."""
  out = {"train": [], "test": []}
  for p in all_prompts():
    out["test" if _unit_hash("split", config.seed, p) < config.test_fraction else "train"].append(p)
  return out


def _topic(prompt: str) -> str:
  return next((w for w in re.findall(r"[a-z]+", prompt) if w in TOPICS), TOPICS[0])


def styled_response(rng: random.Random, style: int, topic: str) -> str:
  return TEMPLATES[style].format(t=topic, adj=rng.choice(ADJECTIVES), noun=rng.choice(NOUNS))


def malformed_response(rng: random.Random, topic: str) -> str:
  """A near miss: two styles' halves spliced, an off-lexicon word, or a cut-off answer."""
  a, b = rng.sample(range(len(STYLES)), 2)
  kind = rng.randrange(3)
  if kind == 0:
    x, y = styled_response(rng, a, topic), styled_response(rng, b, topic)
    return x[:len(x) // 2] + y[len(y) // 2:]
  if kind == 1:
    return styled_response(rng, a, topic).replace(topic, rng.choice(("thing", "it", "um")), 1)
  text = styled_response(rng, a, topic)
  return text[:rng.randrange(4, len(text) - 2)]


def sample_response(rng: random.Random, prompt: str, weights, p_malformed: float) -> str:
  topic = _topic(prompt)
  if rng.random() < p_malformed:
    return malformed_response(rng, topic)
  return styled_response(rng, rng.choices(range(len(STYLES)), weights=weights)[0], topic)


def pretrain_records(config: IntransitiveConfig) -> list[dict[str, str]]:
  """[{"text": "<prompt> <response>"}] over train prompts, styles uniform."""
  train = split_prompts(config)["train"]
  rng = random.Random(f"pretrain:{config.seed}")
  out = []
  for _ in range(config.num_pretrain_texts):
    p = rng.choice(train)
    text = f"{p} {sample_response(rng, p, (1, 1, 1), config.p_malformed_pretrain)}"
    assert len(text.encode()) <= MAX_PRETRAIN_BYTES, text  # the templates guarantee it
    out.append({"text": text})
  return out


def sft_records(config: IntransitiveConfig) -> list[dict[str, str]]:
  """Curated answers with styles drawn from mu (the skewed SFT mixture)."""
  train = split_prompts(config)["train"]
  rng = random.Random(f"sft:{config.seed}")
  return [{"prompt": p, "response": sample_response(rng, p, config.mu, config.p_malformed_sft)}
          for p in (rng.choice(train) for _ in range(config.num_sft))]


def heldout_records(config: IntransitiveConfig) -> list[dict[str, str]]:
  test = split_prompts(config)["test"]
  rng = random.Random(f"test:{config.seed}")
  chosen = rng.sample(test, min(config.num_test, len(test)))
  return [{"prompt": p, "response": sample_response(rng, p, config.mu, 0.0)} for p in chosen]


DATASETS: dict[str, tuple[tuple[str, ...], Callable[[IntransitiveConfig], dict]]] = {
    "pretrain": (("text",), lambda c: {"train": pretrain_records(c)}),
    "sft": (("prompt", "response"),
            lambda c: {"train": sft_records(c), "test": heldout_records(c)}),
}


def records(config: IntransitiveConfig) -> dict[str, dict[str, list[dict[str, str]]]]:
  return {name: make(config) for name, (_, make) in DATASETS.items()}


def build_datasets(config: IntransitiveConfig, data_dir: str) -> dict:
  """Materialises {"pretrain", "sft"} as array_record TFDS datasets (see gold)."""
  from rlhf_jax.data import builders  # The world's generators stay usable without TFDS.
  return builders.build_world_datasets("intransitive", config, DATASETS, data_dir)
