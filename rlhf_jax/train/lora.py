"""Training only the LoRA adapters of a model, the base frozen.

The frozen base has no optimizer state and no gradient: the TrainState holds the adapters
alone (so do its checkpoints), and the train step (step.make_train_step with join=lora.join)
takes the base as its own argument, a sharded jit input that is neither differentiated nor
donated (not a constant closed over: an 8B base stays where load_hf_model put it). The loss
function keeps the usual contract, loss_fn(params, batch, rng), and sees the joined params.

A stage (pipeline/lm.py: run_training's steps, the adapters alone; `lora` is rlhf_jax.models.lora
and `lora_train` this module):

    graphdef, base, _ = hf_import.load_hf_model(hf_dir, mesh)
    graphdef, params, shardings = lora.add_adapters(lora.config_of(graphdef, base), base,
                                                    key, mesh, rank=16, alpha=32.0)
    state, train_step, base = lora_train.adapter_training(
        loss_fn, optimizer, params, shardings, batch_shardings, key,
        num_microbatches=M, lr_schedule=schedule)
    state, summary = loop.train(train_step=train_step, state=state,
                                eval_fn=lambda adapters: eval_fn(lora.join(adapters, base)),
                                ...)
    params = lora.join(state.params, base)
"""
from typing import Callable

import optax

from rlhf_jax.models.lora import join, split
from rlhf_jax.train import state as state_lib, step as step_lib
from rlhf_jax.train.state import TrainState

# A scalar-head model's head (reward / value): new or task-specific, so it trains with the
# adapters (PEFT's modules_to_save), never frozen at its initialisation.
HEADS = ("head_w", "head_b")


def trainable_split(params) -> tuple[dict, dict]:
  """(trainable, frozen): the adapters, plus the scalar heads of the ScalarHeadModels in
  `params` (a dict with a "backbone"), and everything else. join() puts them back together."""
  adapters, base = split(params)

  def heads(tree, out):
    if "backbone" in tree:
      for key in HEADS:
        if key in tree:
          out[key] = tree.pop(key)
    for key, value in tree.items():
      if isinstance(value, dict):
        sub = heads(value, {})
        if sub:
          out[key] = {**out.get(key, {}), **sub}
    return out

  base = _copy_dicts(base)
  moved = heads(base, {})
  return _merge(adapters, moved), base


def _copy_dicts(tree):
  return {k: _copy_dicts(v) if isinstance(v, dict) else v for k, v in tree.items()}


def _merge(a: dict, b: dict) -> dict:
  out = dict(a)
  for key, value in b.items():
    out[key] = _merge(out[key], value) if key in out and isinstance(value, dict) else value
  return out


def with_base(train_step: Callable, base) -> Callable:
  """train_step(state, batch) of a compiled train_step(state, base, batch), the base passed on
  every call (an argument, not a constant): what loop.train calls."""
  def bound(state: TrainState, batch):
    return train_step(state, base, batch)
  return bound


def adapter_training(loss_fn: step_lib.LossFn, optimizer: optax.GradientTransformation,
                     params, shardings, batch_shardings, rng, *, num_microbatches: int,
                     lr_schedule: optax.Schedule | None = None):
  """(state, train_step, base) to train the adapters of a LoRA model's `params`.

  state: a step-0 TrainState of the adapters (and scalar heads: trainable_split) and their
  optimizer state, born sharded like them;
  train_step(state, batch) -> (state, metrics): make_train_step compiled with the base as a
  separate input (state donated, base not); base: the frozen params, to join with
  state.params (lora.join) for evaluation, sampling or export. shardings/batch_shardings: as
  step.compile_train_step's; None for both compiles without (one device).
  """
  adapters, base = trainable_split(params)
  if not split(params)[0]:
    raise ValueError("params hold no LoRA adapters (a model with lora_rank=0)")
  adapter_sh, base_sh = trainable_split(shardings) if shardings is not None else (None, None)
  state = state_lib.init_train_state(adapters, optimizer, rng, param_shardings=adapter_sh)
  step_fn = step_lib.make_train_step(loss_fn, optimizer, num_microbatches=num_microbatches,
                                     lr_schedule=lr_schedule, join=join)
  state_sh = (None if adapter_sh is None
              else state_lib.state_shardings(optimizer, adapters, adapter_sh))
  compiled = step_lib.compile_train_step(step_fn, state_sh, batch_shardings,
                                         frozen_shardings=base_sh)
  return state, with_base(compiled, base), base
