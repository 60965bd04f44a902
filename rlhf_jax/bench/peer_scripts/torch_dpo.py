"""The plain PyTorch DPO step: forward of chosen + rejected rows in one batch, DPO loss
(beta 0.1) against precomputed reference log-probs, backward, gradient clipping at norm 1 and
an AdamW step, as rlhf_jax's step does. Timed: the step until its update is applied (torch on
CPU is synchronous); the reference pass before it is not."""
import numpy as np
import torch
import torch.nn.functional as F

import peer_common as pc


def pair_batch(model: dict, shapes: dict):
  """chosen and rejected ids [B, T] sharing bos + prompt, response ending in eos, and the
  response mask: rlhf_jax's dpo_batch layout."""
  rng = np.random.default_rng(0)
  b, p, r = shapes["batch"], shapes["prompt_len"], shapes["response_len"]
  prompt = pc.random_ids(rng, model["vocab_size"], (b, p))
  prompt[:, 0] = 1
  sides = []
  for _ in range(2):
    response = pc.random_ids(rng, model["vocab_size"], (b, r))
    response[:, -1] = 2
    sides.append(torch.as_tensor(np.concatenate([prompt, response], 1), dtype=torch.long))
  mask = torch.zeros(b, p + r)
  mask[:, p:] = 1.0
  return torch.cat(sides), torch.cat([mask, mask])


def sequence_logps(model, ids, mask):
  logits = model(input_ids=ids).logits[:, :-1].float()
  token = torch.gather(F.log_softmax(logits, -1), 2, ids[:, 1:, None])[..., 0]
  return (token * mask[:, 1:]).sum(-1)


def main():
  s = pc.spec()
  model = pc.llama(s["model"])
  ids, mask = pair_batch(s["model"], s["shapes"])
  b = s["shapes"]["batch"]
  with torch.no_grad():
    ref = sequence_logps(model, ids, mask)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
  model.train()
  times = []
  for i in range(1 + s["repeats"]):  # the first step warms up
    start = pc.time.perf_counter()
    logps = sequence_logps(model, ids, mask)
    ratio = (logps - ref).view(2, b)
    loss = -F.logsigmoid(0.1 * (ratio[0] - ratio[1])).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if i:
      times.append(pc.time.perf_counter() - start)
  pc.emit({"seconds": pc.median(times), "threads": torch.get_num_threads()})


if __name__ == "__main__":
  main()
