"""A toy model, toy data and a toy training script for the train/ tests.

The model is a bigram-style LM written as plain jnp over a params dict (an embedding, a
norm scale, an output projection with bias), with optional dropout so the step's rng
matters. The data iterator is in-memory and resumable (get_state/set_state).

As a script it trains with rlhf_jax.train.loop.train, checkpointing every few steps:
    python tests/train/toy_train.py WORKDIR [--steps N] [--save-every K] [--sleep S]
        [--preempt-deadline S] [--disk-full-at STEP]
and writes WORKDIR/final_params.npz. --sleep slows each step so a test can kill it.
"""
import argparse
import os
import resource
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np

VOCAB, DIM, SEQ = 16, 8, 9


def init_params(seed: int = 0) -> dict:
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {
      "embed": jax.random.normal(k1, (VOCAB, DIM)) * 0.5,
      "norm_scale": jnp.ones((DIM,)),
      "out": {"kernel": jax.random.normal(k2, (DIM, VOCAB)) * 0.5, "bias": jnp.zeros((VOCAB,))},
  }


def make_loss_fn(dropout: float = 0.0):
  """loss_fn(params, batch, rng) -> (sum of masked token NLL, {"denominator", "correct"})."""
  def loss_fn(params, batch, rng):
    inputs, targets = batch["tokens"][:, :-1], batch["tokens"][:, 1:]
    mask = batch["mask"][:, 1:].astype(jnp.float32)
    h = params["embed"][inputs]
    h = h * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + 1e-6) * params["norm_scale"]
    if dropout:
      keep = jax.random.bernoulli(rng, 1.0 - dropout, h.shape)
      h = jnp.where(keep, h / (1.0 - dropout), 0.0)
    logits = h @ params["out"]["kernel"] + params["out"]["bias"]
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    return jnp.sum(nll * mask), {"denominator": jnp.sum(mask), "correct": jnp.sum(correct * mask)}
  return loss_fn


def make_batch(index: int, batch_size: int, seed: int = 0) -> dict:
  """A deterministic batch: noisy 'next = prev + 1' sequences with ragged lengths."""
  rng = np.random.default_rng([seed, index])
  start = rng.integers(0, VOCAB, (batch_size, 1))
  tokens = (start + np.arange(SEQ)) % VOCAB
  noise = rng.random(tokens.shape) < 0.1
  tokens = np.where(noise, rng.integers(0, VOCAB, tokens.shape), tokens).astype(np.int32)
  lengths = rng.integers(2, SEQ + 1, (batch_size, 1))
  mask = (np.arange(SEQ) < lengths).astype(np.int32)
  return {"tokens": tokens, "mask": mask}


class ToyData:
  """Resumable in-memory iterator: its whole position is the next batch index."""

  def __init__(self, batch_size: int, seed: int = 0):
    self.batch_size, self.seed, self.index = batch_size, seed, 0

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = make_batch(self.index, self.batch_size, self.seed)
    self.index += 1
    return batch

  def get_state(self) -> dict:
    return {"index": self.index}

  def set_state(self, state: dict) -> None:
    self.index = int(state["index"])


def trainer(total_steps: int, *, loss_fn=None, seed: int = 0, warmup_steps: int = 1,
            num_microbatches: int = 1):
  """(a fresh TrainState, the uncompiled train step) of the toy model: AdamW at 0.05 with
  linear warmup then cosine decay over total_steps."""
  from rlhf_jax.train import optim, step
  from rlhf_jax.train.state import init_train_state
  cfg = optim.OptimConfig(learning_rate=0.05, total_steps=total_steps, warmup_steps=warmup_steps)
  optimizer = optim.make_optimizer(cfg)
  state = init_train_state(init_params(0), optimizer, jax.random.key(seed))
  return state, step.make_train_step(loss_fn or make_loss_fn(), optimizer,
                                     num_microbatches=num_microbatches,
                                     lr_schedule=optim.make_schedule(cfg))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("workdir")
  parser.add_argument("--steps", type=int, default=12)
  parser.add_argument("--save-every", type=int, default=3)
  parser.add_argument("--sleep", type=float, default=0.0)
  parser.add_argument("--preempt-deadline", type=float, default=120.0)
  # From step --disk-full-at on, files may not grow past 4 KB (RLIMIT_FSIZE): a write that
  # would fails with EFBIG, as on a full disk (a checkpoint's largest file is ~5 KB, the logs
  # stay under 4 KB). For the full-disk test.
  parser.add_argument("--disk-full-at", type=int, default=0)
  args = parser.parse_args(argv)

  from rlhf_jax import runtime
  from rlhf_jax.train import checkpoint, loop, step
  from rlhf_jax.train.logging import MetricsLogger

  runtime.enable_compilation_cache()
  state, fn = trainer(args.steps, loss_fn=make_loss_fn(dropout=0.1), seed=42, warmup_steps=2,
                      num_microbatches=2)
  compiled = step.compile_train_step(fn)
  if args.sleep or args.disk_full_at:
    inner = compiled

    def compiled(state, batch):
      time.sleep(args.sleep)
      if args.disk_full_at and int(state.step) + 1 == args.disk_full_at:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
      return inner(state, batch)

  manager = checkpoint.make_manager(args.workdir, save_every=args.save_every, max_to_keep=2)
  logger = MetricsLogger(args.workdir)
  state, _ = loop.train(workdir=args.workdir, train_step=compiled, state=state,
                        train_iter=ToyData(batch_size=8), total_steps=args.steps,
                        manager=manager, logger=logger, log_every=1, tokens_per_batch=8 * SEQ,
                        preempt_deadline_s=args.preempt_deadline,
                        # test instrumentation, not training: the resumed run drops it
                        config={k: v for k, v in vars(args).items()
                                if k not in ("sleep", "preempt_deadline", "disk_full_at")})
  logger.close()
  params = jax.device_get(state.params)
  np.savez(os.path.join(args.workdir, "final_params.npz"),
           **{jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(params)})


if __name__ == "__main__":
  main()
