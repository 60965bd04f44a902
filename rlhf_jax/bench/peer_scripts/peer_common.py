"""What the peer scripts share. They run in the peers' scratch virtualenv (bench/peers.py),
never import rlhf_jax, and get the workload as one JSON argument:

    {"model": {vocab_size, d_model, n_layers, n_heads, n_kv_heads, d_ff, rope_theta,
               norm_eps, tie_embeddings}, "shapes": suite.Shapes as a dict, "repeats": n}

Each prints one JSON object on its last stdout line. Models have random weights built from
the config; the tokenizer is a local word-level one over the ids ("t17" is id 17; pad 0,
bos 1, eos 2, as rlhf_jax's benchmark places them), so nothing is downloaded.
"""
import json
import statistics
import sys
import time


def spec() -> dict:
  return json.loads(sys.argv[1])


def emit(result: dict) -> None:
  print(json.dumps(result), flush=True)


def median(values) -> float:
  return float(statistics.median(values))


def words(ids) -> str:
  return " ".join(f"t{int(i)}" for i in ids)


def random_ids(rng, vocab: int, shape):
  """Ids 3..vocab-1 (0-2 are pad, bos, eos), from a numpy Generator."""
  return rng.integers(3, vocab, shape)


def even_token_reward(completions) -> list[float]:
  """The benchmark's verifiable reward: the fraction of a completion's ids that are even."""
  out = []
  for text in completions:
    ids = [int(w[1:]) for w in text.split() if w[1:].isdigit()]
    out.append(sum(i % 2 == 0 for i in ids) / max(len(ids), 1))
  return out


def hf_tokenizer(vocab: int):
  """A transformers fast tokenizer over the words t0..t{vocab-1}, built in memory."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t3"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
  return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", bos_token="t1",
                                 eos_token="t2", unk_token="t3")


def llama(model: dict):
  """transformers.LlamaForCausalLM of rlhf_jax's shape, random weights, float32, eval
  numerics as rlhf_jax's (SDPA attention, no dropout)."""
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM
  torch.manual_seed(0)
  cfg = LlamaConfig(vocab_size=model["vocab_size"], hidden_size=model["d_model"],
                    num_hidden_layers=model["n_layers"], num_attention_heads=model["n_heads"],
                    num_key_value_heads=model["n_kv_heads"], intermediate_size=model["d_ff"],
                    rope_theta=model["rope_theta"], rms_norm_eps=model["norm_eps"],
                    tie_word_embeddings=model["tie_embeddings"], max_position_embeddings=1024,
                    pad_token_id=0, bos_token_id=1, eos_token_id=2,
                    attn_implementation="sdpa", torch_dtype="float32")
  return LlamaForCausalLM(cfg)


class StepTimer:
  """Wall time between a Trainer's on_step_begin and on_step_end (one optimizer step each);
  mixed into a transformers.TrainerCallback by the scripts that use it."""

  def __init__(self):
    self.times, self._start = [], None

  def on_step_begin(self, args, state, control, **kwargs):
    self._start = time.perf_counter()

  def on_step_end(self, args, state, control, **kwargs):
    self.times.append(time.perf_counter() - self._start)
