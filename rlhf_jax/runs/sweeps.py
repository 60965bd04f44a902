"""What every multi-seed sweep shares: the --seeds flag's parsing and the mean/spread of
per-seed numbers."""
import numpy as np


def parse_seeds(seeds: str) -> list[int]:
  """"0,1,2" -> [0, 1, 2]; refuses repeats, empties and non-integers with the flag's name."""
  try:
    out = [int(s) for s in seeds.split(",")]
  except ValueError:
    raise ValueError(f"--seeds must be comma-separated integers, got {seeds!r}") from None
  if len(set(out)) != len(out) or not out:
    raise ValueError(f"--seeds must be distinct and non-empty, got {seeds!r}")
  return out


def aggregate(summaries: list[dict]) -> dict:
  """Mean and sample standard deviation over seeds of every per-seed number."""
  out = {}
  for key in summaries[0]:
    values = np.array([s[key] for s in summaries], np.float64)
    out[key] = {"mean": float(values.mean()),
                "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
  return out
