"""Prompts for online RL from local files, with the reference answers a verifier checks, and
the reward functions that score the responses (the flags of a run on real data).

    --prompt_files=data/gsm8k/train.jsonl --prompt_format=gsm8k --test_fraction=0.05
    --reward_fns=math,format_boxed --reward_weights=1,0.1

Records are read, validated and counted as every local file is (data/file_datasets.py: bad
records reported as file:line, --on_error=skip drops and counts them); a prompt longer than
--max_prompt_len tokens (bos included, after the chat template) is malformed ("too_long").
Message prompts (gsm8k and math questions are a user message) are rendered with the
tokenizer's chat template (pipeline/real_models.py: load_tokenizer), --system_prompt first;
the rendered text is what the policy samples from and what reward functions receive as the
prompt.
"""
import dataclasses
import math

import numpy as np

from rlhf_jax.data import builders, file_datasets
from rlhf_jax.data import preference_formats as pf
from rlhf_jax.pipeline.config import flag
from rlhf_jax.rewards import functions
from rlhf_jax.rewards.math_answers import answers_match, extract_answer, reference_answer

NORMALIZATIONS = ("sum", "each")
STD_SCALES = ("group", "batch", "none")


@dataclasses.dataclass(frozen=True)
class PromptFileFlags:
  prompt_files: str = flag("", "Comma-separated prompt files / globs (JSONL, JSON, Parquet) with "
                           "reference answers; set, the run trains on them instead of the "
                           "embedded world.")
  prompt_format: str = flag("gsm8k", "Record format of --prompt_files and --eval_files "
                            "(rlhf_jax/data/preference_formats.py).", choices=pf.PROMPT_FORMATS)
  eval_files: str = flag("", "Held-out prompt files; empty: a hashed --test_fraction of "
                         "--prompt_files.")
  test_fraction: float = flag(0.05, "Held-out fraction of --prompt_files (hashed by prompt) "
                              "when --eval_files is empty.")
  on_error: str = flag("raise", "Malformed records: fail the build or skip and count them.",
                       choices=file_datasets.ON_ERROR)
  system_prompt: str = flag("", "System message put before every prompt conversation.")
  max_prompt_len: int = flag(256, "Longest prompt in tokens (bos included); longer records are "
                             "malformed (too_long).")
  reward_fns: str = flag("math", "Comma-separated reward functions: built-ins "
                         f"({', '.join(functions.BUILTINS)}) or package.module:function, "
                         "which RUNS that code (signature: rlhf_jax/rewards/functions.py).")
  reward_weights: str = flag("", "Comma-separated weights of --reward_fns (empty: all 1).")
  reward_normalization: str = flag(
      "sum", "How several rewards combine: sum (the weighted sum's group advantage) or each "
      "(each function standardised in its group first, then weighted).",
      choices=NORMALIZATIONS)
  adv_std_scale: str = flag("group", "Advantages divided by the std of the group's rewards, of "
                            "the whole batch's, or none (mean-centred only, Dr. GRPO).",
                            choices=STD_SCALES)

  @property
  def file_mode(self) -> bool:
    return bool(self.prompt_files)

  def check_prompt_files(self):
    """Flag checks of a file-mode run (before anything is read or compiled): the reward
    functions resolve (an import error names the module now, not after loading a model)."""
    if not 0.0 < self.test_fraction < 1.0 and not self.eval_files:
      raise ValueError(f"--test_fraction must be in (0, 1) without --eval_files, got "
                       f"{self.test_fraction}")
    if self.max_prompt_len < 2:
      raise ValueError(f"--max_prompt_len must be >= 2, got {self.max_prompt_len}")
    for name, _ in self.reward_specs:
      functions.resolve(name)

  @property
  def reward_specs(self) -> list[tuple[str, float]]:
    return functions.parse_specs(self.reward_fns, self.reward_weights)


@dataclasses.dataclass
class PromptSet:
  """Rendered prompt texts of the train and held-out splits and every prompt's reference
  answer ("" when its record has none)."""
  train: list[str]
  test: list[str]
  answers: dict[str, str]
  report: file_datasets.Report
  prompt_len: int  # tokens of the longest prompt, bos included


def _prompts(source, fmt: str, render_fn, answers: dict[str, str]) -> list[str]:
  out = []
  for i in range(len(source)):
    record = source[i]
    (prompt, _), = pf.render_pairs(record, fmt, render_fn)
    answer = record["response"].decode("utf-8")
    if answers.setdefault(prompt, answer) != answer:
      raise ValueError(f"prompt {prompt[:80]!r} appears with two reference answers "
                       f"({answers[prompt][-40:]!r} and {answer[-40:]!r}); deduplicate the "
                       "files")
    out.append(prompt)
  return out


def build_prompt_set(cfg: PromptFileFlags, *, data_dir: str, tokenizer, render_fn,
                     render_id: str) -> PromptSet:
  """The train and held-out prompts of the flags' files (built once, reused while the files
  and the rendering are unchanged)."""
  files = cfg.prompt_files.split(",")
  if cfg.eval_files:
    files = {"train": files, "test": cfg.eval_files.split(",")}
  built = file_datasets.build_file_dataset(
      files, format=cfg.prompt_format, data_dir=data_dir, on_error=cfg.on_error,
      test_fraction=None if cfg.eval_files else cfg.test_fraction, tokenizer=tokenizer,
      max_len=cfg.max_prompt_len, render_fn=render_fn, render_id=render_id)
  answers: dict[str, str] = {}
  train, test = (_prompts(builders.load_split(built.builder, split), cfg.prompt_format,
                          render_fn, answers) for split in ("train", "test"))
  prompt_len = max(1 + len(tokenizer.encode(p)) for p in train + test)
  print(f"prompts: {len(train)} train, {len(test)} held out, longest {prompt_len} tokens; "
        f"{built.report.num_skipped} malformed skipped {built.report.skipped or ''}")
  return PromptSet(train, test, answers, built.report, prompt_len)


def verify_math(response: str, answer: str) -> bool:
  """The held-out accuracy's verdict: the response's final answer equals the reference's."""
  reference = reference_answer(answer)
  return reference is not None and answers_match(extract_answer(response), reference)


def weighted_total(rewards_BxK, weights) -> np.ndarray:
  """sum_k w_k r_k over the functions that scored a row (NaN where none did)."""
  r = np.asarray(rewards_BxK, np.float64)
  w = np.asarray(weights, np.float64)
  scored = ~np.isnan(r)
  total = np.where(scored, r, 0.0) @ w
  return np.where(scored.any(1), total, math.nan)
