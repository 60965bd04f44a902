"""Comparison data from a policy's own samples: K responses per prompt, for raters to rank.

InstructGPT's reward-model data (Ouyang 2022 sec 3.5): K responses per prompt sampled from
the SFT policy, ranked by labellers (here a world's simulated raters). The same samples serve
the DPO family (pairs: the rater's best vs worst of K), online DPO (K = 2 from the current
policy) and best-of-n.

sample_k keys batch i of its prompt stream with fold_in(key, i) (the held-out evaluations of
rl/evaluation.py key by prompt offset instead); the reward stages' data were made this way,
so it stays.

Sequences are encoded as the policy produced them: [bos] + prompt + response, + [eos] only
when the sampler emitted EOS (a response cut at max_new_tokens has none), right-padded. The PPO
rollout scores its samples in that same form, so the reward model is trained and used on one
distribution. Every function takes the policy's tokenizer (default: the embedded worlds' byte
tokenizer, whose round trip through text gives back the sampled bytes of valid UTF-8). With a
Hugging Face tokenizer the decoded text is re-encoded: the tokenizer's own encoding, the one a
reward model trained on text files saw, which can differ from the sampled ids (a
non-canonical split; a response cut inside a multi-byte character decodes to U+FFFD, which
re-encodes a few tokens longer).
"""
import dataclasses

import numpy as np

from rlhf_jax import evaluation
from rlhf_jax.data import pipeline
from rlhf_jax.data.tokenizer import ByteTokenizer, Tokenizer
from rlhf_jax.sampling import SamplingConfig


@dataclasses.dataclass(frozen=True)
class Samples:
  """N prompts with K sampled responses each."""
  prompts: list[str]  # N
  responses: list[list[str]]  # N x K, texts without EOS
  finished: np.ndarray  # bool N x K, the sampler emitted EOS

  @property
  def k(self) -> int:
    return len(self.responses[0])

  def ground_truth_NxK(self, ground_truth) -> np.ndarray:
    """ground_truth(prompts, responses) -> float64 [n] of every sample, as N x K."""
    flat = ground_truth([p for p in self.prompts for _ in range(self.k)],
                        [y for ys in self.responses for y in ys])
    return np.asarray(flat, np.float64).reshape(len(self.prompts), self.k)


def sample_k(graphdef, params, prompts, *, k: int, batch_size: int, prompt_len: int,
             max_new_tokens: int, temperature: float, key,
             tokenizer: Tokenizer | None = None) -> Samples:
  """K temperature samples per prompt (the prompt repeated K times in one batch stream),
  prompts encoded and responses decoded with `tokenizer` (None: the byte tokenizer)."""
  tok = tokenizer or ByteTokenizer()
  scfg = SamplingConfig(max_new_tokens=max_new_tokens, eos_id=tok.eos_id, pad_id=tok.pad_id,
                        temperature=temperature)
  flat = [p for p in prompts for _ in range(k)]
  source = [{"prompt": p, "response": ""} for p in flat]
  texts, finished = [], []
  batches = pipeline.make_prompt_iterator(source, batch_size=batch_size, prompt_len=prompt_len,
                                          tokenizer=tok)
  for batch, out in evaluation.sample_stream(graphdef, params, batches, scfg, key):
    tokens, mask, done = out["tokens"], out["mask"], out["finished"]
    for row in np.flatnonzero(batch["example_valid"]):
      ids = tokens[row][mask[row]]
      texts.append(tok.decode([t for t in ids if t != tok.eos_id]))
      finished.append(bool(done[row]))
  n = len(prompts)
  return Samples(list(prompts), [texts[i * k:(i + 1) * k] for i in range(n)],
                 np.array(finished, bool).reshape(n, k))


def encode_sequences(prompts, responses, finished, seq_len: int,
                     tokenizer: Tokenizer | None = None) -> tuple[np.ndarray, np.ndarray]:
  """tokens int32 NxT and valid bool NxT: [bos] + prompt + response (+ [eos] if finished)."""
  tok = tokenizer or ByteTokenizer()
  tokens = np.full((len(prompts), seq_len), tok.pad_id, np.int32)
  valid = np.zeros((len(prompts), seq_len), bool)
  for i, (p, y, done) in enumerate(zip(prompts, responses, finished)):
    ids = [tok.bos_id, *tok.encode(p), *tok.encode(y)] + ([tok.eos_id] if done else [])
    if len(ids) > seq_len:
      raise ValueError(f"prompt + response of {len(ids)} tokens exceeds --seq_len={seq_len}; "
                       "raise --seq_len to at least prompt_len + max_new_tokens")
    tokens[i, :len(ids)] = ids
    valid[i, :len(ids)] = True
  return tokens, valid


def ranking_examples(samples: Samples, ranking_NxK: np.ndarray, seq_len: int,
                     tokenizer: Tokenizer | None = None) -> list[dict]:
  """One example per prompt for reward.ranking_loss_fn: tokens_BxKxT/valid_BxKxT rows in
  rank order (best first)."""
  out = []
  for n, order in enumerate(ranking_NxK):
    tokens, valid = encode_sequences([samples.prompts[n]] * samples.k,
                                     [samples.responses[n][j] for j in order],
                                     samples.finished[n][order], seq_len, tokenizer)
    out.append({"tokens_BxKxT": tokens, "valid_BxKxT": valid})
  return out


def pairwise_accuracy(scores_NxK: np.ndarray, labels_better_NxKxK: np.ndarray) -> float:
  """Share of labelled pairs (i, j) (labels[n, i, j] True: i is better than j) on which the
  scores agree; ties in score count half."""
  diff = scores_NxK[:, :, None] - scores_NxK[:, None, :]
  hits = np.where(diff > 0, 1.0, np.where(diff == 0, 0.5, 0.0))
  return float(hits[labels_better_NxKxK].mean())


def ranking_to_better(ranking_NxK: np.ndarray) -> np.ndarray:
  """labels[n, i, j] True where the ranking puts response i above response j."""
  n, k = ranking_NxK.shape
  place = np.empty_like(ranking_NxK)
  place[np.arange(n)[:, None], ranking_NxK] = np.arange(k)[None, :]
  return place[:, :, None] < place[:, None, :]


def sampled_pairs(prompts, chosen, rejected, chosen_finished, rejected_finished,
                  seq_len: int, tokenizer: Tokenizer | None = None) -> dict[str, np.ndarray]:
  """Pairs of a policy's own samples in rlhf_jax/data/pairs.py's batch layout (chosen_*,
  rejected_*, example_valid), each side encoded as it was sampled (encode_sequences: EOS
  only when the sampler emitted it). pairs.pair_example would append EOS to every response,
  so a response cut at max_new_tokens would be scored with a token the policy never produced.
  """
  tok = tokenizer or ByteTokenizer()
  head = np.array([1 + len(tok.encode(p)) for p in prompts])[:, None]
  out = {"example_valid": np.ones(len(prompts), bool)}
  for side, ys, done in (("chosen", chosen, chosen_finished),
                         ("rejected", rejected, rejected_finished)):
    tokens, valid = encode_sequences(prompts, ys, done, seq_len, tok)
    out[f"{side}_tokens"], out[f"{side}_valid"] = tokens, valid
    out[f"{side}_mask"] = (valid & (np.arange(seq_len)[None, :] >= head)).astype(np.float32)
  return out


def best_worst_pairs(samples: Samples, ranking_NxK: np.ndarray) -> list[dict]:
  """One preference pair per prompt for the DPO family: the rater's first response as chosen,
  its last as rejected (the most clearly ordered pair a K-way ranking gives), as "pairs"
  records (rlhf_jax.data.pairs)."""
  return [{"prompt": p, "prompt_kind": "text", "chosen": ys[order[0]],
           "rejected": ys[order[-1]]}
          for p, ys, order in zip(samples.prompts, samples.responses, ranking_NxK)]
