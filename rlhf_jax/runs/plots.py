"""Figures of the experiments (matplotlib, Agg backend: no display needed)."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

from rlhf_jax import distributed  # noqa: E402
from rlhf_jax.worlds.intransitive import STYLES  # noqa: E402


def _save(fig, path: str, *, dpi: int) -> None:
  """Process 0 writes the figure (every process of a job draws the same one)."""
  if distributed.is_writer():
    fig.savefig(path, dpi=dpi)


def reward_vs_kl(curve: list[dict], path: str, *, title: str) -> None:
  """Proxy and gold reward (held-out means +- SE) against KL to SFT over training: the
  overoptimisation picture of Gao et al. 2023 (proxy keeps rising, gold peaks)."""
  kl = np.array([c["kl"] for c in curve])
  fig, ax = plt.subplots(figsize=(6, 4))
  for key, label, colour in (("proxy", "proxy (reward model, normalised)", "tab:blue"),
                             ("gold", "gold r*", "tab:orange")):
    y = np.array([c[key] for c in curve])
    se = np.array([c[f"{key}_se"] for c in curve])
    ax.plot(kl, y, "o-", color=colour, label=label)
    ax.fill_between(kl, y - se, y + se, color=colour, alpha=0.2)
  ax.set_xlabel("KL(pi || pi_SFT) per sequence (nats)")
  ax.set_ylabel("held-out reward")
  ax.set_title(title)
  ax.legend()
  fig.tight_layout()
  _save(fig, path, dpi=120)
  plt.close(fig)


def seeds_over_training(runs: list[list[dict]], path: str, *, title: str) -> None:
  """Held-out proxy, gold and KL to SFT against iteration for several seeds: thin lines per
  seed, the thick line their mean. Against iteration rather than KL because a weakly
  regularised run's KL is not monotone in time."""
  fig, axes = plt.subplots(1, 3, figsize=(14, 4))
  labels = {"proxy": "held-out proxy reward (normalised)", "gold": "held-out gold reward r*",
            "kl": "KL(pi || pi_SFT) per sequence (nats)"}
  for ax, key in zip(axes, labels):
    for run in runs:
      ax.plot([c["iteration"] for c in run], [c[key] for c in run], "-", alpha=0.4)
    n = min(len(r) for r in runs)
    ax.plot([c["iteration"] for c in runs[0][:n]],
            np.mean([[c[key] for c in r[:n]] for r in runs], axis=0), "k-o", lw=2,
            label=f"mean of {len(runs)} seeds")
    ax.set_xlabel("PPO iteration")
    ax.set_ylabel(labels[key])
    ax.legend()
  fig.suptitle(title)
  fig.tight_layout()
  _save(fig, path, dpi=120)
  plt.close(fig)


def curve_with_se(curve: list[dict], x_key: str, key: str, path: str, *, title: str,
                  xlabel: str, ylabel: str, baselines: dict[str, float] | None = None) -> None:
  """One metric (mean +- SE band, from `key` and `key`_se) against x_key, with optional
  horizontal lines for baselines ({label: value}) that the curve should be compared to."""
  x = np.array([c[x_key] for c in curve])
  y = np.array([c[key] for c in curve])
  se = np.array([c[f"{key}_se"] for c in curve])
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot(x, y, "o-", color="tab:orange", label=key)
  ax.fill_between(x, y - se, y + se, color="tab:orange", alpha=0.2)
  for (label, value), style in zip((baselines or {}).items(), ("--", ":", "-.")):
    ax.axhline(value, color="k", ls=style, lw=1, label=label)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.legend()
  fig.tight_layout()
  _save(fig, path, dpi=120)
  plt.close(fig)


def bars_over_seeds(values: dict[str, dict[str, list[float]]], path: str, *,
                    title: str) -> None:
  """One panel per metric ({metric: {policy: [value per seed]}}): a bar per policy at the
  mean over seeds, with each seed's value as a dot, so the spread is visible."""
  fig, axes = plt.subplots(1, len(values), figsize=(5 * len(values), 4), squeeze=False)
  for ax, (metric, per_policy) in zip(axes[0], values.items()):
    names = list(per_policy)
    ax.bar(names, [np.mean(per_policy[n]) for n in names], color="lightgray",
           edgecolor="k")
    for i, n in enumerate(names):
      ax.plot(np.full(len(per_policy[n]), i), per_policy[n], "o", color="tab:red", alpha=0.7)
    ax.tick_params(axis="x", labelrotation=25)
    ax.set_ylabel(metric)
  fig.suptitle(title)
  fig.tight_layout()
  _save(fig, path, dpi=120)
  plt.close(fig)


def metric_over_seeds(runs: list[list[dict]], key: str, path: str, *, title: str,
                      xlabel: str, ylabel: str, baselines: dict[str, list[float]] | None = None
                      ) -> None:
  """One held-out metric against iteration for several seeds (thin lines, the thick line
  their mean), with baselines ({label: per-seed values}) drawn as their mean (a line) and
  min-max range (a band)."""
  fig, ax = plt.subplots(figsize=(6, 4))
  for run in runs:
    ax.plot([c["iteration"] for c in run], [c[key] for c in run], "-", alpha=0.4)
  n = min(len(r) for r in runs)
  ax.plot([c["iteration"] for c in runs[0][:n]], np.mean([[c[key] for c in r[:n]] for r in runs],
                                                         axis=0),
          "k-o", lw=2, label=f"mean of {len(runs)} seeds")
  for (label, values), colour in zip((baselines or {}).items(), ("tab:blue", "tab:red",
                                                                 "tab:green")):
    ax.axhline(float(np.mean(values)), color=colour, ls="--", lw=1, label=label)
    ax.axhspan(float(np.min(values)), float(np.max(values)), color=colour, alpha=0.1)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.legend()
  fig.tight_layout()
  _save(fig, path, dpi=120)
  plt.close(fig)


def styles_over_training(runs: dict[str, list[dict]], nash, path: str, *, title: str) -> None:
  """Per run (a list of eval points, or several seeds' lists): the share of each style, the
  exploitability and the TV distance to Nash against iteration; dashed lines: the Nash
  shares (and 0 for the other two panels). The intransitive world's figure (experiments.nash_md
  and nash_md_sweep)."""
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  colours = {"formal": "tab:blue", "casual": "tab:orange", "poetic": "tab:green"}
  styles = ("-", "--", ":", "-.")
  for (name, curves), ls in zip(runs.items(), styles):
    seeds = curves if curves and isinstance(curves[0], list) else [curves]
    for s, curve in enumerate(seeds):
      x = [c["iteration"] for c in curve]
      for style in STYLES:
        axes[0].plot(x, [c[f"share_{style}"] for c in curve], ls, color=colours[style],
                     alpha=0.8, label=f"{name}: {style}" if s == 0 else None)
      for ax, key in ((axes[1], "exploitability"), (axes[2], "nash_distance")):
        ax.plot(x, [c[key] for c in curve], ls, color="k", alpha=0.6,
                label=name if s == 0 else None)
  for style, q in zip(STYLES, nash):
    axes[0].axhline(q, color=colours[style], lw=0.8, ls=(0, (1, 3)))
  axes[0].set_ylabel("share of held-out samples (dotted: Nash)")
  axes[1].set_ylabel("exploitability max_y P(y > pi) - 1/2")
  axes[2].set_ylabel("TV distance to the Nash equilibrium")
  for ax in axes:
    ax.set_xlabel("iteration")
    ax.legend(fontsize=7)
  fig.suptitle(title)
  fig.tight_layout()
  _save(fig, path, dpi=110)
  plt.close(fig)


def stage_curves(curves: dict[str, dict[str, list]], metric: str, path: str, *,
                 title: str) -> None:
  """One panel per stage: the held-out `metric` over steps of every variant (seeds solid,
  float-rounding perturbations dashed), so a transition's timing and its spread show."""
  order = ("pretrain", "sft", "reward", "run")  # the chain's order, the run last
  stages = sorted({s for per_stage in curves.values() for s in per_stage},
                  key=lambda s: (order.index(s) if s in order else len(order), s))
  if not stages:
    return
  fig, axes = plt.subplots(1, len(stages), figsize=(4.5 * len(stages), 3.6), squeeze=False)
  for ax, stage in zip(axes[0], stages):
    for name, per_stage in curves.items():
      if stage in per_stage:
        steps, values = zip(*per_stage[stage])
        ax.plot(steps, values, "-" if name.startswith("seed") else "--", marker=".",
                label=name)
    ax.set_title(f"{stage}")
    ax.set_xlabel("step")
    ax.set_ylabel(f"held-out {metric}")
  axes[0][0].legend(fontsize=7)
  fig.suptitle(title)
  fig.tight_layout()
  _save(fig, path, dpi=120)
  plt.close(fig)
