"""TRL's DPOTrainer: one optimizer step on `batch` pairs of the benchmark's layout (text of
word tokens through a local tokenizer; TRL appends the eos), reference log-probs precomputed
(precompute_ref_log_probs=True, not timed), sigmoid loss, beta 0.1. Timed: each step from the
Trainer's on_step_begin to on_step_end (forward, loss, backward, optimizer step); the first
step is a warm-up."""
import tempfile

import numpy as np
from datasets import Dataset
from transformers import TrainerCallback
from trl import DPOConfig, DPOTrainer

import peer_common as pc


class Timer(pc.StepTimer, TrainerCallback):
  pass


def main():
  s = pc.spec()
  sh, vocab = s["shapes"], s["model"]["vocab_size"]
  rng = np.random.default_rng(0)
  steps = 1 + s["repeats"]
  rows = []
  for _ in range(sh["batch"] * steps):
    prompt = [1, *pc.random_ids(rng, vocab, sh["prompt_len"] - 1)]
    chosen, rejected = (pc.random_ids(rng, vocab, sh["response_len"] - 1) for _ in range(2))
    rows.append({"prompt": pc.words(prompt), "chosen": " " + pc.words(chosen),
                 "rejected": " " + pc.words(rejected)})
  timer = Timer()
  with tempfile.TemporaryDirectory() as out:
    args = DPOConfig(output_dir=out, per_device_train_batch_size=sh["batch"], max_steps=steps,
                     learning_rate=1e-3, beta=0.1, precompute_ref_log_probs=True,
                     max_length=sh["prompt_len"] + sh["response_len"], logging_steps=10 ** 6,
                     save_strategy="no", report_to="none", use_cpu=True, seed=0,
                     dataloader_num_workers=0, disable_tqdm=True, bf16=False)
    trainer = DPOTrainer(model=pc.llama(s["model"]), args=args,
                         train_dataset=Dataset.from_list(rows),
                         processing_class=pc.hf_tokenizer(vocab), callbacks=[timer])
    trainer.train()
  pc.emit({"seconds": pc.median(timer.times[1:]), "steps_timed": len(timer.times) - 1})


if __name__ == "__main__":
  main()
