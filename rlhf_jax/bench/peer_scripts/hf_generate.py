"""Hugging Face generate: new_tokens tokens after each of `batch` random prompts, temperature 1
(top-k and top-p off), no EOS (min_new_tokens = max_new_tokens), KV cache (the default).
Timed: generate until it returns, after one warm-up call."""
import numpy as np
import torch

import peer_common as pc


def main():
  s = pc.spec()
  sh = s["shapes"]
  model = pc.llama(s["model"]).eval()
  ids = torch.as_tensor(pc.random_ids(np.random.default_rng(0), s["model"]["vocab_size"],
                                      (sh["batch"], sh["prompt_len"])), dtype=torch.long)
  n = sh["new_tokens"]
  kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                top_k=0, top_p=1.0, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
  times = []
  with torch.no_grad():
    for i in range(1 + s["repeats"]):
      start = pc.time.perf_counter()
      out = model.generate(ids, **kwargs)
      if i:
        times.append(pc.time.perf_counter() - start)
  assert out.shape[1] == sh["prompt_len"] + n, out.shape
  seconds = pc.median(times)
  pc.emit({"seconds": seconds, "new_tokens_per_s": sh["batch"] * n / seconds})


if __name__ == "__main__":
  main()
