"""Optimizer: AdamW with linear warmup + cosine decay and global-norm clipping.

The schedule, in closed form (t = number of updates already applied, i.e. state.step):
  t <  W:        lr(t) = peak * t / W                         (linear warmup from 0)
  W <= t <= T:   lr(t) = end + (peak - end) * (1 + cos(pi * (t - W) / (T - W))) / 2
  t >  T:        lr(t) = end,      where end = peak * end_lr_ratio, W = warmup_steps, T = total_steps
With warmup_steps=0 the first update already uses the peak rate.

Weight decay is decoupled (AdamW) and applied only to parameters with ndim >= 2 (matrices,
embeddings, conv kernels). 1-D parameters -- norm scales and biases -- are not decayed:
decaying a norm scale towards 0 fights the normalisation it implements, and biases carry
no capacity worth regularising. This is the usual GPT/Llama convention.
"""
import dataclasses

import jax
import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Hyperparameters of make_optimizer. Validated on construction (fail before compiling).

  learning_rate: peak learning rate, reached at the end of warmup.
  warmup_steps: number of linear-warmup updates (0 disables warmup).
  total_steps: update count at which the cosine reaches its end value.
  end_lr_ratio: final learning rate as a fraction of the peak.
  b1, b2, eps: Adam moment decay rates and denominator epsilon.
  weight_decay: decoupled weight decay coefficient (ndim >= 2 params only).
  grad_clip_norm: clip the global gradient norm to this value; None disables clipping.
  """
  learning_rate: float
  total_steps: int
  warmup_steps: int = 0
  end_lr_ratio: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  grad_clip_norm: float | None = 1.0

  def __post_init__(self):
    if self.learning_rate <= 0:
      raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
    if self.total_steps <= 0:
      raise ValueError(f"total_steps must be > 0, got {self.total_steps}")
    if not 0 <= self.warmup_steps < self.total_steps:
      raise ValueError(
          f"need 0 <= warmup_steps < total_steps, got {self.warmup_steps}, {self.total_steps}")
    if not 0.0 <= self.end_lr_ratio <= 1.0:
      raise ValueError(f"end_lr_ratio must be in [0, 1], got {self.end_lr_ratio}")
    if self.weight_decay < 0:
      raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
    if self.grad_clip_norm is not None and self.grad_clip_norm <= 0:
      raise ValueError(f"grad_clip_norm must be > 0 or None, got {self.grad_clip_norm}")


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
  """The learning-rate schedule described in the module docstring (a function of step)."""
  if cfg.warmup_steps == 0:  # optax's warmup variant warns on a zero-length warmup
    return optax.cosine_decay_schedule(
        cfg.learning_rate, decay_steps=cfg.total_steps, alpha=cfg.end_lr_ratio)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=cfg.learning_rate,
      warmup_steps=cfg.warmup_steps,
      decay_steps=cfg.total_steps,
      end_value=cfg.learning_rate * cfg.end_lr_ratio,
  )


def decay_mask(params):
  """True for parameters that get weight decay: those with ndim >= 2."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW with make_schedule(cfg) and the ndim>=2 decay mask."""
  adamw = optax.adamw(
      learning_rate=make_schedule(cfg),
      b1=cfg.b1,
      b2=cfg.b2,
      eps=cfg.eps,
      weight_decay=cfg.weight_decay,
      mask=decay_mask,
  )
  if cfg.grad_clip_norm is None:
    return adamw
  return optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), adamw)
