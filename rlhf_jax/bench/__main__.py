"""python -m rlhf_jax.bench: the project's benchmark of the workloads researchers run.

    python -m rlhf_jax.bench [--presets=peers_tiny,small] [--dtype=float32] [--repeats=5]
        [--workloads=dpo,dpo_ref_in_step,sft,sampler,sampler_naive,grpo]

Prints one JSON object on stdout (suite.run's report) and a short table on stderr. What each
workload times and excludes, and how compile time and peak memory are measured:
docs/benchmarks.md. The persistent compilation cache stays off, so compile times are cold.
Never part of the test suite (tests/test_bench.py runs suite.run at a tiny shape).
"""
import argparse
import json
import sys

from rlhf_jax.bench import suite


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--presets", default="peers_tiny,small",
                      help="comma-separated model presets (peers_tiny, or models/config.py's)")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                      help="compute dtype of the models and of the peak-matmul measurement")
  parser.add_argument("--workloads", default=",".join(suite.WORKLOADS),
                      help=f"comma-separated, from {','.join(suite.WORKLOADS)}")
  parser.add_argument("--repeats", type=int, default=5,
                      help="timed calls per workload after the warm-up (the median is kept)")
  args = parser.parse_args(argv)
  if args.repeats < 1:
    parser.error(f"--repeats must be >= 1, got {args.repeats}")
  report = suite.run(args.presets.split(","), args.workloads.split(","), dtype=args.dtype,
                     repeats=args.repeats)
  print(suite.table(report), file=sys.stderr)
  print(json.dumps(report, indent=1))


if __name__ == "__main__":
  main()
