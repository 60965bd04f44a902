"""TRL's GRPOTrainer: one iteration = grpo_prompts prompts x group_size samples of exactly
grpo_new_tokens tokens (min_new_tokens: no EOS), the even-token reward, no KL (beta 0), one
optimizer step per rollout (generation_batch_size = the step's rows). Timed: each step from
the Trainer's on_step_begin to on_step_end; generation: the model's generate calls within it.
The first step is a warm-up."""
import tempfile

import numpy as np
from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

import peer_common as pc


class Timer(pc.StepTimer, TrainerCallback):
  pass


def reward(completions, **kwargs):
  del kwargs
  return pc.even_token_reward(completions)


def main():
  s = pc.spec()
  sh, vocab = s["shapes"], s["model"]["vocab_size"]
  rng = np.random.default_rng(0)
  steps, rows, n = 1 + s["repeats"], sh["grpo_prompts"] * sh["group_size"], sh["grpo_new_tokens"]
  prompts = [{"prompt": pc.words([1, *pc.random_ids(rng, vocab, sh["prompt_len"] - 1)])}
             for _ in range(sh["grpo_prompts"] * steps)]
  model = pc.llama(s["model"])
  generate, generation = model.generate, []

  def timed_generate(*args, **kwargs):
    start = pc.time.perf_counter()
    out = generate(*args, **kwargs)
    generation.append(pc.time.perf_counter() - start)
    return out

  model.generate = timed_generate
  timer = Timer()
  with tempfile.TemporaryDirectory() as out:
    args = GRPOConfig(output_dir=out, per_device_train_batch_size=rows,
                      generation_batch_size=rows, num_generations=sh["group_size"],
                      max_completion_length=n, generation_kwargs={"min_new_tokens": n},
                      temperature=1.0, top_k=0, beta=0.0, num_iterations=1, max_steps=steps,
                      learning_rate=1e-6, logging_steps=10 ** 6, save_strategy="no",
                      report_to="none", use_cpu=True, seed=0, dataloader_num_workers=0,
                      disable_tqdm=True, bf16=False)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args,
                          train_dataset=Dataset.from_list(prompts),
                          processing_class=pc.hf_tokenizer(vocab), callbacks=[timer])
    trainer.train()
  times = timer.times[1:]
  i = int(np.argsort(times)[len(times) // 2])
  gen = generation[1 + i] if len(generation) == len(timer.times) else float("nan")
  pc.emit({"seconds": times[i], "generation_s": gen, "generation_share": gen / times[i]})


if __name__ == "__main__":
  main()
