"""The train and eval steps: module-level pure functions, compiled once with shardings.

Loss contract (every trainer in the project uses it):

    loss_fn(params, microbatch, rng) -> (loss_sum, aux)

loss_sum is a SUM over the loss's units (target tokens, or examples); aux is a dict of
metric SUMS over the same units and must contain "denominator": how many units loss_sum
covers (e.g. the number of non-masked target tokens). Sums, not means, are what make
gradient accumulation and data parallelism exact: the step sums
grads of loss_sum over microbatches and divides once by the step's GLOBAL denominator.
Under jit, arrays are global, so the denominator is already the count over all devices.

Frozen parameters (LoRA, rlhf_jax/train/lora.py): with make_train_step(..., join=fn) the
state holds only the trainable part, and the step takes the frozen rest as its own argument,
train_step(state, frozen, batch); loss_fn sees join(trainable, frozen). Only the trainable part
is differentiated and has optimizer state; the frozen part is a jit input (sharded like the
params, not a constant baked into the program) and is not donated.

Randomness: step t uses fold_in(base_key, t), split into one key per microbatch. The
state's key is never advanced, so a step's randomness depends only on (seed, step) --
which is what makes a resumed run bitwise equal to an uninterrupted one.
"""
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from rlhf_jax import sharding
from rlhf_jax.train.state import TrainState

PyTree = Any
LossFn = Callable[[PyTree, PyTree, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def split_microbatches(batch: PyTree, num_microbatches: int) -> PyTree:
  """[B, ...] -> [M, B/M, ...], microbatch i taking rows i, i+M, i+2M, ...

  Strided rather than contiguous: with the batch dim sharded over devices, every
  microbatch then keeps rows on every device, so no microbatch idles part of the mesh.
  """
  def split(x):
    if x.shape[0] % num_microbatches:
      raise ValueError(
          f"batch dim {x.shape[0]} is not divisible by num_microbatches={num_microbatches}")
    x = x.reshape(x.shape[0] // num_microbatches, num_microbatches, *x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return jax.tree.map(split, batch)


def _accumulate(fn, params, batch, keys, num_microbatches):
  """Sums fn(params, microbatch, key) -> (pytree of sums) over microbatches with lax.scan;
  one microbatch is one call (a scan of one iteration still costs a loop around the step's
  whole forward and backward: ~5% of a small DPO step on CPU)."""
  if num_microbatches == 1:
    out = fn(params, batch, keys[0])
    return jax.tree.map(lambda o: o.astype(jnp.promote_types(o.dtype, jnp.float32)), out)
  micro = split_microbatches(batch, num_microbatches)
  first = jax.tree.map(lambda x: x[0], micro)
  shapes = jax.eval_shape(fn, params, first, keys[0])
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.promote_types(s.dtype, jnp.float32)),
                       shapes)

  def body(acc, xs):
    out = fn(params, *xs)
    return jax.tree.map(lambda a, o: a + o.astype(a.dtype), acc, out), None

  total, _ = jax.lax.scan(body, zeros, (micro, keys))
  return total


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *,
                    num_microbatches: int, lr_schedule: optax.Schedule | None = None,
                    join: Callable[[PyTree, PyTree], PyTree] | None = None) -> Callable:
  """Returns train_step(state, batch) -> (state, metrics), a pure function; with `join`,
  train_step(state, frozen, batch): state.params are the trainable part alone and loss_fn
  sees join(state.params, frozen) (module docstring: frozen parameters).

  metrics: loss (= loss_sum / denominator), grad_norm (global, before clipping),
  denominator (the global unit count), every other aux key as sum / denominator,
  learning_rate when lr_schedule is given (the rate this update used), and nonfinite (1.0 when
  the loss or gradients were NaN/inf: the update was then not applied, train/nonfinite.py).
  """
  if num_microbatches < 1:
    raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def sums_and_grads(params, microbatch, key):
    (loss_sum, aux), grads = grad_fn(params, microbatch, key)
    return {"loss": loss_sum, **aux}, grads

  def frozen_step(state: TrainState, frozen: PyTree, batch: PyTree) -> tuple[TrainState, dict]:
    def trainable_sums_and_grads(trainable, microbatch, key):
      (loss_sum, aux), grads = jax.value_and_grad(
          lambda p: loss_fn(join(p, frozen), microbatch, key), has_aux=True)(trainable)
      return {"loss": loss_sum, **aux}, grads
    return update(state, batch, trainable_sums_and_grads)

  def train_step(state: TrainState, batch: PyTree) -> tuple[TrainState, dict]:
    return update(state, batch, sums_and_grads)

  def update(state: TrainState, batch: PyTree, sums_and_grads) -> tuple[TrainState, dict]:
    step_key = jax.random.fold_in(state.key, state.step)
    keys = jax.random.split(step_key, num_microbatches)
    sums, grad_sums = _accumulate(sums_and_grads, state.params, batch, keys, num_microbatches)
    # max(., 1): a step whose units are all masked has zero grads, not NaN.
    denom = jnp.maximum(sums["denominator"], 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grad_sums, state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = _normalise(sums)
    metrics["grad_norm"] = optax.global_norm(grads)
    # A NaN/inf loss or gradient never reaches the state (train/nonfinite.py): the previous
    # params and optimizer state are kept and the flag tells the loop. A cond picks them, not a
    # select: a select fused into the update's kernels changed how XLA compiled the update (its
    # last bits, so a long run's numbers); with the cond a healthy step stays bitwise the
    # unguarded step, with the same memory (checked on CPU: 10 steps of a 2-layer model, and
    # the compiled step's temp bytes).
    finite = jnp.isfinite(sums["loss"]) & jnp.isfinite(metrics["grad_norm"])
    params, opt_state = jax.lax.cond(finite, lambda: (params, opt_state),
                                     lambda: (state.params, state.opt_state))
    metrics["nonfinite"] = (~finite).astype(jnp.float32)
    if lr_schedule is not None:
      metrics["learning_rate"] = jnp.asarray(lr_schedule(state.step), jnp.float32)
    new_state = state.replace(params=params, opt_state=opt_state, step=state.step + 1)
    return new_state, metrics

  return train_step if join is None else frozen_step


def _normalise(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
  denom = jnp.maximum(sums["denominator"], 1.0)
  out = {k: v / denom for k, v in sums.items() if k != "denominator"}
  out["denominator"] = sums["denominator"]
  return out


def make_eval_step(loss_fn: LossFn, *, num_microbatches: int = 1) -> Callable:
  """Returns eval_step(params, batch) -> dict of SUMS ("loss" and every aux key).

  Sums so that `evaluate` can combine batches exactly. The loss_fn gets a fixed key:
  eval losses should not depend on it (no dropout at eval).
  """
  def eval_step(params: PyTree, batch: PyTree) -> dict[str, jax.Array]:
    keys = jax.random.split(jax.random.key(0), num_microbatches)

    def sums(params, microbatch, key):
      loss_sum, aux = loss_fn(params, microbatch, key)
      return {"loss": loss_sum, **aux}
    return _accumulate(sums, params, batch, keys, num_microbatches)

  return eval_step


def evaluate(eval_step: Callable, params: PyTree, batches) -> dict[str, float]:
  """Runs eval_step over an iterable of batches; returns sums / total denominator."""
  total = None
  for batch in batches:
    sums = eval_step(params, batch)
    total = sums if total is None else jax.tree.map(jnp.add, total, sums)
  if total is None:
    raise ValueError("evaluate got no batches")
  return {k: float(sharding.to_host(v)) for k, v in _normalise(total).items()}


def _mesh(shardings: PyTree):
  return jax.tree.leaves(shardings)[0].mesh


def _replicated(shardings: PyTree) -> NamedSharding | None:
  leaves = jax.tree.leaves(shardings)
  return sharding.replicated(leaves[0].mesh) if leaves else None


def compile_train_step(step_fn: Callable, state_shardings: TrainState | None = None,
                       batch_shardings: PyTree | None = None, *,
                       frozen_shardings: PyTree | None = None):
  """jax.jit with in/out shardings and the state donated (updated in place).

  With no shardings (single device) jit places everything itself. Metrics are replicated.
  frozen_shardings: the frozen params' shardings, for a step made with `join`
  (train_step(state, frozen, batch)); the frozen params are not donated.
  """
  if state_shardings is None:
    return jax.jit(step_fn, donate_argnums=0)
  step_fn = sharding.traced_on(step_fn, _mesh(state_shardings))
  inputs = (state_shardings, batch_shardings)
  if frozen_shardings is not None:
    inputs = (state_shardings, frozen_shardings, batch_shardings)
  return jax.jit(step_fn, in_shardings=inputs,
                 out_shardings=(state_shardings, _replicated(state_shardings)),
                 donate_argnums=0)


def compile_eval_step(eval_fn: Callable, param_shardings: PyTree | None = None,
                      batch_shardings: PyTree | None = None):
  """jax.jit of an eval step; params are not donated (training continues with them)."""
  if param_shardings is None:
    return jax.jit(eval_fn)
  eval_fn = sharding.traced_on(eval_fn, _mesh(param_shardings))
  return jax.jit(eval_fn, in_shardings=(param_shardings, batch_shardings),
                 out_shardings=_replicated(param_shardings))
