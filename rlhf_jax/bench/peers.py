"""python -m rlhf_jax.bench.peers: the benchmark's workloads in the peers, side by side.

    python -m rlhf_jax.bench.peers --install            # once: the scratch virtualenv
    python -m rlhf_jax.bench.peers [--presets=peers_tiny,small] [--repeats=3] [--venv=DIR]

Peers (docs/benchmarks.md): the DPO step against TRL's DPOTrainer and a plain PyTorch loop
(transformers.LlamaForCausalLM of the same shape), the sampler against Hugging Face generate
and tunix's Sampler, the GRPO iteration against TRL's GRPOTrainer. They run in a scratch
virtualenv (torch and tensorflow never enter rlhf_jax's own), each workload as a subprocess
that prints JSON (bench/peer_scripts/), and rlhf_jax's side as `python -m rlhf_jax.bench`
subprocesses, so every run starts cold alike. Everything runs ONE AFTER ANOTHER: repetition r
runs, per preset and workload, rlhf_jax then each of its peers, and each pair gives a ratio
peer seconds / rlhf_jax seconds (> 1: rlhf_jax faster); the report keeps the median of the
paired ratios. Prints one JSON object on stdout and a table on stderr. Never part of the test
suite; nothing is downloaded at run time (random weights, a word-level tokenizer).
"""
import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import venv

from rlhf_jax.bench import suite
from rlhf_jax.bench.common import model_preset

DEFAULT_VENV = os.path.join(os.path.expanduser("~"), ".cache", "rlhf_jax", "peers-venv")
SCRIPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer_scripts")
# rlhf_jax's workload -> its peers (name, script); the key of rlhf_jax's seconds.
# dpo_shared is rlhf_jax's DPO step with the prompt computed once (--response_len) against
# the same peer steps as dpo (they have no such layout).
DPO_PEERS = [("trl", "trl_dpo.py"), ("torch_loop", "torch_dpo.py")]
PEERS = {"dpo": DPO_PEERS, "dpo_shared": DPO_PEERS,
         "sampler": [("hf_generate", "hf_generate.py"), ("tunix", "tunix_sampler.py")],
         "grpo": [("trl", "trl_grpo.py")], "grpo_shared": [("trl", "trl_grpo.py")],
         "grpo_fast": [("trl", "trl_grpo.py")]}
SECONDS_KEY = {"dpo": "seconds_per_step", "dpo_shared": "seconds_per_step",
               "sampler": "seconds", "grpo": "seconds", "grpo_shared": "seconds",
               "grpo_fast": "seconds"}
# Installed in this order, each group its own pip call, so a failing group (tunix) leaves the
# others installed. torch first, pinned: the CPU build the comparison was made with. kernels
# last: a dependency of the stack pulls a release that transformers' import rejects
# ("Either a revision or a version must be specified"); transformers declares >=0.12,<0.13.
PACKAGES = (("torch==2.13.0",), ("trl", "transformers"), ("google-tunix",),
            ("kernels>=0.12,<0.13",))


def python_of(venv_dir: str) -> str:
  return os.path.join(venv_dir, "bin", "python")


def install(venv_dir: str) -> dict:
  """Creates the virtualenv (if absent) and pip-installs PACKAGES; {group: "ok" or the end
  of pip's output}."""
  if not os.path.exists(python_of(venv_dir)):
    venv.create(venv_dir, with_pip=True)
  status = {}
  for group in PACKAGES:
    done = subprocess.run([python_of(venv_dir), "-m", "pip", "install", *group],
                          capture_output=True, text=True)
    status[" ".join(group)] = "ok" if done.returncode == 0 else (done.stdout + done.stderr)[-2000:]
    print(f"[install] {' '.join(group)}: {'ok' if done.returncode == 0 else 'FAILED'}",
          file=sys.stderr, flush=True)
  return status


def peer_spec(preset: str, repeats: int) -> dict:
  """The JSON argument of every peer script (peer_scripts/peer_common.py)."""
  cfg = model_preset(preset, "float32")
  model = {"vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "n_layers": cfg.n_layers,
           "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads, "d_ff": cfg.d_ff,
           "rope_theta": cfg.rope_theta, "norm_eps": cfg.norm_eps,
           "tie_embeddings": cfg.tie_embeddings}
  return {"model": model, "shapes": dataclasses.asdict(suite.Shapes()), "repeats": repeats}


def _last_json(cmd: list[str], env=None) -> dict:
  """The JSON object a command prints last on stdout, or {"error": the end of its output}."""
  done = subprocess.run(cmd, capture_output=True, text=True, env=env)
  lines = done.stdout.strip().splitlines()
  if done.returncode == 0 and lines:
    # One line (the peer scripts) or an indented object (python -m rlhf_jax.bench).
    text = lines[-1] if lines[-1].startswith("{") else done.stdout
    try:
      return json.loads(text)
    except json.JSONDecodeError:
      pass
  return {"error": (done.stdout + done.stderr)[-2000:]}


def run_rlhf_jax(preset: str, workload: str, repeats: int) -> dict:
  out = _last_json([sys.executable, "-m", "rlhf_jax.bench", f"--presets={preset}",
                    f"--workloads={workload}", f"--repeats={repeats}"])
  return out if "error" in out else out["presets"][preset][workload]


def run_peer(venv_dir: str, script: str, spec: dict) -> dict:
  # Peers on the CPU only; the scripts import from their own folder.
  env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "JAX_PLATFORMS": "cpu"}
  return _last_json([python_of(venv_dir), os.path.join(SCRIPTS, script), json.dumps(spec)],
                    env=env)


def compare(presets, workloads, *, venv_dir: str, repeats: int, inner_repeats: int) -> dict:
  """{"runs": [every measurement], "ratios": {preset: {workload: {peer: median ratio}}}}."""
  runs, pairs = [], {}
  for rep in range(repeats):
    for preset in presets:
      spec = peer_spec(preset, inner_repeats)
      for workload in workloads:
        ours = run_rlhf_jax(preset, workload, inner_repeats)
        runs.append({"repetition": rep, "preset": preset, "workload": workload,
                     "framework": "rlhf_jax", "result": ours})
        print(f"[peers] {rep} {preset} {workload} rlhf_jax", file=sys.stderr, flush=True)
        for peer, script in PEERS[workload]:
          theirs = run_peer(venv_dir, script, spec)
          runs.append({"repetition": rep, "preset": preset, "workload": workload,
                       "framework": peer, "result": theirs})
          print(f"[peers] {rep} {preset} {workload} {peer}"
                + (" FAILED" if "error" in theirs else ""), file=sys.stderr, flush=True)
          if "error" not in ours and "error" not in theirs:
            pairs.setdefault((preset, workload, peer), []).append(
                theirs["seconds"] / ours[SECONDS_KEY[workload]])
  ratios = {}
  for (preset, workload, peer), values in pairs.items():
    ratios.setdefault(preset, {}).setdefault(workload, {})[peer] = {
        "median_ratio": statistics.median(values), "pairs": values}
  return {"runs": runs, "ratios": ratios}


def table(ratios: dict) -> str:
  lines = [f"{'preset':<11} {'workload':<9} {'peer':<12} {'rlhf_jax/peer speed':>20}"]
  for preset, by_workload in ratios.items():
    for workload, by_peer in by_workload.items():
      for peer, r in by_peer.items():
        lines.append(f"{preset:<11} {workload:<9} {peer:<12} {r['median_ratio']:>19.2f}x")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--install", action="store_true",
                      help="create the scratch virtualenv and pip-install the peers, then exit")
  parser.add_argument("--venv", default=DEFAULT_VENV, help="the peers' scratch virtualenv")
  parser.add_argument("--presets", default="peers_tiny,small", help="comma-separated presets")
  parser.add_argument("--workloads", default=",".join(PEERS),
                      help=f"comma-separated, from {','.join(PEERS)}")
  parser.add_argument("--repeats", type=int, default=3,
                      help="paired repetitions (the ratio's median is over them)")
  parser.add_argument("--inner_repeats", type=int, default=3,
                      help="timed steps/calls per run after the warm-up (each run's median)")
  args = parser.parse_args(argv)
  if args.install:
    print(json.dumps({"venv": args.venv, "install": install(args.venv)}, indent=1))
    return
  if not os.path.exists(python_of(args.venv)):
    parser.error(f"no virtualenv at {args.venv}: run with --install first")
  workloads = args.workloads.split(",")
  unknown = [w for w in workloads if w not in PEERS]
  if unknown or args.repeats < 1 or args.inner_repeats < 1:
    parser.error(f"--workloads from {tuple(PEERS)}, --repeats and --inner_repeats >= 1")
  report = compare(args.presets.split(","), workloads, venv_dir=args.venv,
                   repeats=args.repeats, inner_repeats=args.inner_repeats)
  print(table(report["ratios"]), file=sys.stderr)
  print(json.dumps(report, indent=1))


if __name__ == "__main__":
  main()
