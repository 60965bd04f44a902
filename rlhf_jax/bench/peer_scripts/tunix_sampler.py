"""tunix's Sampler on tunix's Llama3 model of the benchmark's shape (random weights, float32):
new_tokens tokens after each of `batch` random prompts, temperature 1 (top-p 1.0 selects
tunix's sampling mode; greedy otherwise), eos forbidden so every row runs to new_tokens. tunix
takes prompt strings: a word-level tokenizer object (encode, decode, bos/eos/pad ids) does the
host-side string handling, which is part of tunix's sampler call and so of the timing.
compile_s: the first call minus a steady one."""
import numpy as np
from flax import nnx
from tunix.generate import sampler as sampler_lib
from tunix.models.llama3 import model as llama3

import peer_common as pc


class WordTokenizer:
  def encode(self, text: str, **kwargs) -> list[int]:
    del kwargs
    return [int(w[1:]) for w in text.split()]

  def decode(self, ids, **kwargs) -> str:
    del kwargs
    return pc.words(i for i in ids if int(i) > 2)

  def bos_id(self) -> int:
    return 1

  def eos_id(self) -> int:
    return 2

  def pad_id(self) -> int:
    return 0


def main():
  s = pc.spec()
  m, sh = s["model"], s["shapes"]
  head_dim = m["d_model"] // m["n_heads"]
  cfg = llama3.ModelConfig(num_layers=m["n_layers"], vocab_size=m["vocab_size"],
                           embed_dim=m["d_model"], hidden_dim=m["d_ff"], num_heads=m["n_heads"],
                           head_dim=head_dim, num_kv_heads=m["n_kv_heads"],
                           rope_theta=int(m["rope_theta"]), norm_eps=m["norm_eps"],
                           weight_tying=m["tie_embeddings"])
  model = llama3.Llama3(cfg, rngs=nnx.Rngs(0))
  p, n = sh["prompt_len"], sh["new_tokens"]
  sampler = sampler_lib.Sampler(model, WordTokenizer(), sampler_lib.CacheConfig(
      cache_size=p + n, num_layers=m["n_layers"], num_kv_heads=m["n_kv_heads"],
      head_dim=head_dim))
  # bos + prompt_len - 1 ids: the same prompt_len tokens as the other samplers see.
  prompts = [pc.words([1, *row]) for row in pc.random_ids(np.random.default_rng(0),
                                                          m["vocab_size"], (sh["batch"], p - 1))]
  times = []
  for i in range(1 + s["repeats"]):
    start = pc.time.perf_counter()
    out = sampler(prompts, max_generation_steps=n, max_prompt_length=p, temperature=1.0,
                  top_p=1.0, eos_tokens=[2], forbidden_tokens=[2], seed=i)
    np.asarray(out.tokens[0])  # waits for the device
    times.append(pc.time.perf_counter() - start)
  seconds = pc.median(times[1:])  # the first call compiles
  pc.emit({"seconds": seconds, "new_tokens_per_s": sh["batch"] * n / seconds,
           "compile_s": max(times[0] - seconds, 0.0)})


if __name__ == "__main__":
  main()
