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
import json
import math

import numpy as np

from rlhf_jax.data import builders, file_datasets, pipeline
from rlhf_jax.data import preference_formats as pf
from rlhf_jax.data.chat import TemplateRenderError
from rlhf_jax.pipeline import real_models
from rlhf_jax.pipeline.config import flag
from rlhf_jax.rewards import functions
from rlhf_jax.rewards.math_answers import answers_match, extract_answer, reference_answer

NORMALIZATIONS = ("sum", "each")
STD_SCALES = ("group", "batch", "none")
PROMPT_SOURCES = (*pf.PROMPT_FORMATS, *pf.PREFERENCE_FORMATS)


@dataclasses.dataclass(frozen=True)
class PromptFileFlags:
  prompt_files: str = flag("", "Comma-separated prompt files / globs (JSONL, JSON, Parquet) with "
                           "reference answers; set, the run trains on them instead of the "
                           "embedded world.")
  prompt_format: str = flag("gsm8k", "Record format of --prompt_files and --eval_files "
                            "(rlhf_jax/data/preference_formats.py); of a preference format, "
                            "the prompts of its pairs.", choices=PROMPT_SOURCES)
  eval_files: str = flag("", "Held-out prompt files; empty: a hashed --test_fraction of "
                         "--prompt_files.")
  test_fraction: float = flag(0.05, "Held-out fraction of --prompt_files (hashed by prompt) "
                              "when --eval_files is empty.")
  on_error: str = flag("raise", "Malformed records: fail the build or skip and count them.",
                       choices=file_datasets.ON_ERROR)
  system_prompt: str = flag("", "System message put before every prompt conversation.")
  max_prompt_len: int = flag(256, "Longest prompt in tokens (bos included); longer records are "
                             "malformed (too_long).")

  @property
  def file_mode(self) -> bool:
    return bool(self.prompt_files)

  def check_prompt_files(self):
    """Flag checks of a file-mode run, before anything is read or compiled."""
    if not 0.0 < self.test_fraction < 1.0 and not self.eval_files:
      raise ValueError(f"--test_fraction must be in (0, 1) without --eval_files, got "
                       f"{self.test_fraction}")
    if self.max_prompt_len < 2:
      raise ValueError(f"--max_prompt_len must be >= 2, got {self.max_prompt_len}")
    getattr(super(), "check_prompt_files", lambda: None)()


@dataclasses.dataclass(frozen=True)
class RolloutFlags:
  rollout_chunk_rows: int = flag(0, "With --prompt_files: rows per chunk of the rollout's "
                                 "log-prob forwards (policy, reference), whose logits are rows x "
                                 "tokens x vocabulary floats; 0: every rollout row at once.")

  def __post_init__(self):
    if self.rollout_chunk_rows < 0:
      raise ValueError(f"--rollout_chunk_rows must be >= 0, got {self.rollout_chunk_rows}")
    getattr(super(), "__post_init__", lambda: None)()


@dataclasses.dataclass(frozen=True)
class RewardFunctionFlags:
  """How a run on prompt files scores responses with reward functions (GRPO)."""
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

  def check_prompt_files(self):
    """The reward functions resolve: an import error names the module now, not after a
    model has been loaded."""
    for name, _ in self.reward_specs:
      functions.resolve(name)
    getattr(super(), "check_prompt_files", lambda: None)()

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
  too_long: int = 0  # preference files' prompts over --max_prompt_len, skipped
  refused: int = 0  # preference files' prompts the chat template refuses, skipped


def prompt_text(record, render_fn) -> str:
  """The text a policy samples from: a text prompt verbatim, a message prompt rendered with
  the generation cue (the chat template's assistant header)."""
  prompt = pipeline._text(record["prompt"])
  if pipeline._text(record["prompt_kind"]) == "text":
    return prompt
  return render_fn(json.loads(prompt))[0]


def _prompts(source, answers: dict[str, str], prompt_of, files) -> list[str]:
  """Distinct prompts of a split in order (a preference file repeats a prompt per pair);
  prompt_of(record) is a record's rendered prompt, or None to skip it."""
  out = []
  for i in range(len(source)):
    record = source[i]
    prompt = prompt_of(record)
    if prompt is None:
      continue
    answer = pipeline._text(record.get("response", b""))
    if prompt in answers:
      if answers[prompt] != answer:
        raise ValueError(f"prompt {prompt[:80]!r} appears in {files} with two reference answers "
                         f"({answers[prompt][-40:]!r} and {answer[-40:]!r}); deduplicate the "
                         "files")
      continue
    answers[prompt] = answer
    out.append(prompt)
  return out


def build_prompt_set(cfg: PromptFileFlags, *, data_dir: str, tokenizer, render_fn,
                     render_id: str) -> PromptSet:
  """The train and held-out prompts of the flags' files (built once, reused while the files
  and the rendering are unchanged). Prompt formats are length-checked at the build (too_long
  records skipped or raised by --on_error); preference files, whose build checks whole
  pairs, have their prompts checked here the same way (and rendered alone: a chat template's
  refusal of one is skipped or raised the same way too)."""
  files = cfg.prompt_files.split(",")
  if cfg.eval_files:
    files = {"train": files, "test": cfg.eval_files.split(",")}
  checked = cfg.prompt_format in pf.PROMPT_FORMATS
  built = file_datasets.build_file_dataset(
      files, format=cfg.prompt_format, data_dir=data_dir, on_error=cfg.on_error,
      test_fraction=None if cfg.eval_files else cfg.test_fraction,
      tokenizer=tokenizer if checked else None, max_len=cfg.max_prompt_len if checked else None,
      render_fn=render_fn, render_id=render_id)
  too_long, refused = [], []

  def prompt_of(record) -> str | None:
    try:  # a preference file's prompts meet the chat template alone only here
      prompt = prompt_text(record, render_fn)
    except TemplateRenderError as e:
      refused.append(str(e))
      return None
    if 1 + len(tokenizer.encode(prompt)) <= cfg.max_prompt_len:
      return prompt
    too_long.append(prompt)
    return None

  answers: dict[str, str] = {}
  train, test = (_prompts(builders.load_split(built.builder, split), answers, prompt_of, files)
                 for split in ("train", "test"))
  if refused and cfg.on_error == "raise":
    raise ValueError(f"the chat template refuses {len(refused)} prompts of {files} (first: "
                     f"{refused[0]}); fix them, the template or --system_prompt, or pass "
                     "--on_error=skip to drop and count them")
  if too_long and cfg.on_error == "raise":
    raise ValueError(f"{len(too_long)} prompts of {files} are over --max_prompt_len="
                     f"{cfg.max_prompt_len} tokens (first: {too_long[0][:60]!r}); raise it, or "
                     "pass --on_error=skip to drop and count them")
  for split, prompts in (("train", train), ("held-out", test)):
    if not prompts:  # all skipped (too long), or every held-out prompt is also a train one
      raise ValueError(f"no {split} prompts left in {files} ({len(too_long)} over "
                       f"--max_prompt_len={cfg.max_prompt_len} skipped, "
                       f"{len(refused)} refused by the chat template, "
                       f"{built.report.num_skipped} malformed records skipped); raise "
                       "--max_prompt_len or add prompts (held out: not also in --prompt_files)")
  prompt_len = max(1 + len(tokenizer.encode(p)) for p in train + test)
  print(f"prompts: {len(train)} train, {len(test)} held out, longest {prompt_len} tokens; "
        f"malformed records skipped: {built.report.skipped or 0}, prompts over "
        f"--max_prompt_len skipped: {len(too_long)}, prompts the chat template refuses "
        f"skipped: {len(refused)}")
  return PromptSet(train, test, answers, built.report, prompt_len, len(too_long), len(refused))


def load(cfg, mcfg):
  """(tokenizer, PromptSet) of a file-mode RL run: the tokenizer with its chat template and
  --system_prompt, checked against the model's vocabulary, and the flags' prompt files."""
  tok, render_fn, render_id = real_models.load_tokenizer(cfg, cfg.system_prompt)
  real_models.check_vocabulary(tok, mcfg)
  return tok, build_prompt_set(cfg, data_dir=cfg.data_dir, tokenizer=tok, render_fn=render_fn,
                               render_id=render_id)


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
