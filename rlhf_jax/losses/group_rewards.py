"""Group advantages from several reward functions, some of which may not score every row.

Layout: rewards_BxK holds K reward functions' values of B rows in prompt-major groups (row
i*G + j is sample j of prompt i); NaN (or +-inf) marks a value a function could not compute
(`rewards.functions`: no reference answer, a failed call). A row is VALID when at least one
function scored it. Invalid rows are masked, not scored 0: they enter no mean, no std and no
statistic, their advantage is exactly 0 and valid_B is False, so the caller zeroes their loss
mask. Scoring them 0 would teach the policy that an unverifiable prompt was answered wrongly.

With C_ik = [r_ik computed], w_k the weights, std with `std_ddof` (0 or 1), means and stds of a
group g or of the batch taken over its valid rows (over the rows where C_ik for a function's
own statistics), and "constant" meaning all those values are equal (always so with < 2):

  normalization="sum" (TRL's multi-reward GRPO, nansum over functions):
    R_i = sum_k C_ik w_k r_ik                      X_i = R_i - mean_g(R)
  normalization="each" (each function standardised in its group before the weighted sum):
    z_ik = C_ik (r_ik - mean_g(r_k)) / (std_g(r_k) + eps),  0 where group g's r_k is constant
    X_i = A_i = sum_k w_k z_ik
    Not centred again: each z_k sums to 0 over its computed rows, all of them valid, so A
    already sums to 0 over each group's valid rows.
  then, by std_scale:
    "group": adv_i = X_i / (std_g(Y) + eps)
    "batch": adv_i = X_i / (std_batch(Y) + eps)   (batch std; 1 + eps if the batch is constant)
    "none":  adv_i = X_i                            (centred only: Dr. GRPO, Liu et al. 2025)
  with Y = R for "sum" (the batch std of the raw combined reward, as TRL's
  scale_rewards="batch") and Y = A for "each"; adv_i = 0 where group g's Y is constant (a
  group of one valid row included) or row i is invalid.

baseline="leave_one_out" (RLOO, Ahmadian et al. 2024; "sum" only): X_i = R_i - (S_g - R_i) /
(n_g - 1), S_g and n_g the sum and count of group g's valid R, 0 for a group of fewer than 2.

So K = 1, no NaN, "sum" with "group" is GRPO (Shao et al. 2024, DeepSeekMath) exactly as
`grpo.group_advantages(ddof=std_ddof, eps=eps)`: eps added to the std, a constant group 0;
"each" with "none" is the plain weighted sum of standardised rewards.

stats (scalars unless named _K): reward_mean and reward_std (population) of R over valid rows
(before any scaling; R is defined for "each" too), unscored_frac (invalid rows / B),
zero_variance_frac (groups whose Y is constant, i.e. whose advantages are all 0, among groups
with a valid row; for "sum" exactly the groups whose valid R are all equal),
advantages_abs_mean over valid rows, reward_means_K (each function's mean over its computed
rows, 0 if none) and computed_frac_K (the fraction of rows each function scored).
"""
import jax.numpy as jnp

from rlhf_jax.losses import _shapes

NORMALIZATIONS = ("sum", "each")
STD_SCALES = ("group", "batch", "none")
BASELINES = ("mean", "leave_one_out")


def _masked_moments(x, valid, axis: int, ddof: int):
  """(mean, x - mean, std, constant) over the valid entries along `axis` (kept as size 1).

  `x` must be finite everywhere (invalid entries are 0), so no NaN is ever formed. constant
  is True when the valid values are all equal, or fewer than 2; std is then 1 (no sqrt(0)).
  """
  n = jnp.sum(valid, axis=axis, keepdims=True).astype(x.dtype)
  mean = jnp.sum(jnp.where(valid, x, 0), axis=axis, keepdims=True) / jnp.maximum(n, 1)
  centred = jnp.where(valid, x - mean, 0)
  var = jnp.sum(jnp.square(centred), axis=axis, keepdims=True) / jnp.maximum(n - ddof, 1)
  hi = jnp.max(jnp.where(valid, x, -jnp.inf), axis=axis, keepdims=True)
  lo = jnp.min(jnp.where(valid, x, jnp.inf), axis=axis, keepdims=True)
  constant = hi <= lo  # no valid value: -inf <= inf
  return mean, centred, jnp.sqrt(jnp.where(constant, 1, var)), constant


def _check(rewards_BxK, weights_K, group_size, normalization, std_scale, std_ddof):
  _shapes.check_rank("rewards_BxK", rewards_BxK, 2)
  _shapes.check_rank("weights_K", weights_K, 1)
  B, K = rewards_BxK.shape
  if K < 1 or weights_K.shape[0] != K:
    raise ValueError(f"weights_K{tuple(weights_K.shape)} must hold one weight per column of "
                     f"rewards_BxK{tuple(rewards_BxK.shape)} (at least one reward function)")
  if group_size < 1 or B % group_size:
    raise ValueError(f"rewards_BxK{tuple(rewards_BxK.shape)}: {B} rows do not split into "
                     f"groups of group_size={group_size}")
  if normalization not in NORMALIZATIONS:
    raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
  if std_scale not in STD_SCALES:
    raise ValueError(f"std_scale must be one of {STD_SCALES}, got {std_scale!r}")
  if std_ddof not in (0, 1):
    raise ValueError(f"std_ddof must be 0 or 1, got {std_ddof!r}")


def combined_group_advantages(rewards_BxK, weights_K, *, group_size: int, normalization: str,
                              std_scale: str, std_ddof: int = 0, eps: float = 1e-4,
                              baseline: str = "mean"):
  """(advantages_B, valid_B, stats) of K reward functions over prompt-major groups of
  `group_size` rows, NaN = not computed. Equations in the module docstring."""
  rewards_BxK, weights_K = jnp.asarray(rewards_BxK), jnp.asarray(weights_K)
  _check(rewards_BxK, weights_K, group_size, normalization, std_scale, std_ddof)
  if baseline not in BASELINES or (baseline == "leave_one_out" and normalization != "sum"):
    raise ValueError(f"baseline must be one of {BASELINES} (leave_one_out with "
                     f"normalization='sum'), got {baseline!r} with {normalization!r}")
  B, K = rewards_BxK.shape
  dtype = jnp.promote_types(rewards_BxK.dtype, jnp.float32)
  computed_BxK = jnp.isfinite(rewards_BxK)
  r_BxK = jnp.where(computed_BxK, rewards_BxK, 0).astype(dtype)
  w_K = weights_K.astype(dtype)
  valid_B = jnp.any(computed_BxK, axis=1)
  R_B = jnp.sum(r_BxK * w_K, axis=1)
  valid_NxG = valid_B.reshape(-1, group_size)

  if normalization == "sum":
    y_NxG = R_B.reshape(-1, group_size)
    _, x_NxG, std_Nx1, constant_Nx1 = _masked_moments(y_NxG, valid_NxG, 1, std_ddof)
    if baseline == "leave_one_out":  # R_i - mean of the others = G/(G-1) (R_i - mean)
      n_Nx1 = jnp.sum(valid_NxG, axis=1, keepdims=True).astype(dtype)
      x_NxG = x_NxG * n_Nx1 / jnp.maximum(n_Nx1 - 1, 1)
  else:
    _, c_NxGxK, std_Nx1xK, constant_Nx1xK = _masked_moments(
        r_BxK.reshape(-1, group_size, K), computed_BxK.reshape(-1, group_size, K), 1, std_ddof)
    z_NxGxK = jnp.where(constant_Nx1xK, 0, c_NxGxK / (std_Nx1xK + eps))
    y_NxG = jnp.sum(z_NxGxK * w_K, axis=2)
    x_NxG = y_NxG
    _, _, std_Nx1, constant_Nx1 = _masked_moments(y_NxG, valid_NxG, 1, std_ddof)

  if std_scale == "group":
    scale = std_Nx1 + eps
  elif std_scale == "batch":
    _, _, std_b, constant_b = _masked_moments(y_NxG.reshape(-1), valid_B, 0, std_ddof)
    scale = jnp.where(constant_b, 1, std_b) + eps
  else:
    scale = jnp.ones((), dtype)
  zero_NxG = constant_Nx1 | ~valid_NxG
  adv_B = jnp.where(zero_NxG, 0, x_NxG / scale).reshape(-1)

  n_valid = jnp.sum(valid_B).astype(dtype)
  reward_mean = jnp.sum(jnp.where(valid_B, R_B, 0)) / jnp.maximum(n_valid, 1)
  reward_var = jnp.sum(jnp.where(valid_B, jnp.square(R_B - reward_mean), 0)) / jnp.maximum(
      n_valid, 1)
  scored_N = jnp.any(valid_NxG, axis=1)
  count_K = jnp.sum(computed_BxK, axis=0).astype(dtype)
  stats = {
      "reward_mean": reward_mean,
      "reward_std": jnp.sqrt(reward_var),
      "unscored_frac": 1 - n_valid / B,
      "zero_variance_frac": (jnp.sum(constant_Nx1[:, 0] & scored_N)
                             / jnp.maximum(jnp.sum(scored_N), 1)).astype(dtype),
      "advantages_abs_mean": jnp.sum(jnp.abs(adv_B)) / jnp.maximum(n_valid, 1),
      "reward_means_K": jnp.sum(r_BxK, axis=0) / jnp.maximum(count_K, 1),
      "computed_frac_K": count_K / B,
  }
  return adv_B, valid_B, stats
