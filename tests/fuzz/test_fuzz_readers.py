"""Bad-input campaign, local data files: every record format in every container, read through
the dataset build every stage uses (data/file_datasets.py), then through the stages' own
readers (SFT, reward, DPO/KTO, RL prompts) with their tokenizers, chat templates and encoders.

Property (tally.py): an input is accepted, or refused with a ValueError / FileNotFoundError
naming the file (and the record, `file:line` or `file[index]`, where one is to blame), before
anything compiles. Accepted means nothing was dropped silently: every record read is kept or
counted under a reason, the count matches what the file holds, records valid by construction
are kept, on_error="raise" kept nothing bad, and the stage's encoder takes every kept record
(a record the build keeps but the encoder refuses would only fail mid-training).
"""
import re
import tempfile

import pytest
from hypothesis import strategies as st

import inputs
import tally
from rlhf_jax.data import file_datasets, packing
from rlhf_jax.data import preference_formats as pf
from rlhf_jax.data.tokenizer import ByteTokenizer
from rlhf_jax.models.config import preset
from rlhf_jax.pipeline import config, prompt_sets, real_models, reward, reward_files, sft
from rlhf_jax.pipeline import sft_files
from rlhf_jax.runs import dpo, dpo_files, grpo

MCFG = preset("nano", vocab_size=512)  # only its vocabulary is read: the tokenizers' fit


def _check_report(report, written: inputs.Written, on_error: str) -> None:
  """No silent drop: read == kept + skipped == what the files hold; valid records kept."""
  assert report.read == report.kept + report.num_skipped, report
  if written.count is not None:
    assert report.read == written.count, f"read {report.read} of {written.count} records"
  if on_error == "raise":
    assert not report.num_skipped, f"on_error=raise kept going past {report.problems}"
  # A valid record may be too long for the draw's max_len, or one the chat template (or the
  # tokenizer, for masks) cannot handle: those are the record's real problems.
  blamed = {p.split(": ")[0] for p in report.problems
            if ": too_long" not in p and "the chat template cannot render it" not in p}
  assert not blamed & set(written.valid), f"valid records refused: {report.problems}"


def _check_blame(written: inputs.Written):
  """A refusal of malformed records lists them as file:line / file[index]."""
  def verify(error):
    if "malformed of" in str(error):
      assert re.search(r"(:\d+|\[\d+\]): ", str(error)), f"no record named in {error}"
  return verify


@pytest.mark.parametrize("profile", tally.PROFILES)
@pytest.mark.parametrize("container", inputs.CONTAINERS)
@pytest.mark.parametrize("fmt", pf.FORMATS)
def test_file_dataset_build(fmt, container, profile, tmp_path):
  @tally.fuzz(profile, 20, st.data(), st.sampled_from(file_datasets.ON_ERROR),
              st.sampled_from([4, 64, 4096]))
  def run(data, on_error, max_len):
    written = data.draw(inputs.files(fmt, container, tempfile.mkdtemp(dir=tmp_path)))
    tally.check(
        f"records {fmt} {container}",
        lambda: file_datasets.build_file_dataset(
            written.paths, format=fmt, data_dir=str(tmp_path / "built"), on_error=on_error,
            tokenizer=ByteTokenizer(), max_len=max_len),
        names=written.paths,
        verify=lambda built: _check_report(built.report, written, on_error),
        verify_error=_check_blame(written))


def _flags(written, fmt, tokenizer_dir, on_error, tmp_path, *extra):
  return [f"--data_files={','.join(written.paths)}", f"--data_format={fmt}",
          f"--data_dir={tmp_path / 'built'}", f"--on_error={on_error}", "--test_fraction=0.5",
          f"--tokenizer={tokenizer_dir}", *extra]


def _encode_all(encode, *splits):
  for split in splits:
    for i in range(len(split)):
      encode(split[i])


def _sft(cfg, written):
  """sft_files.run's reading and encoding (and packing), up to where it builds the model."""
  template = sft_files._template(cfg)
  tok, render_fn, report, train, test = real_models.read_local_data(cfg, MCFG,
                                                                    chat_template=template)
  _check_report(report, written, cfg.on_error)
  encode = sft_files.make_encoder(cfg.data_format, tok, template, render_fn, cfg.seq_len)
  _encode_all(encode, train, test)
  if cfg.pack:
    packing.pack_examples([encode(train[i]) for i in range(len(train))], cfg.seq_len,
                          tok.pad_id)


def _reward(cfg, written):
  """reward_files.run's reading, encoding and packing (which it does after building the
  model: nothing the build kept may fail there)."""
  tok, render_fn, report, train, test = real_models.read_local_data(cfg, MCFG, packed=cfg.pack)
  _check_report(report, written, cfg.on_error)
  k = max(reward_files.max_responses(train, cfg.data_format),
          reward_files.max_responses(test, cfg.data_format))
  encode = reward_files.make_encoder(cfg.data_format, tok, render_fn, cfg.seq_len, k)
  _encode_all(encode, train, test)
  if cfg.pack:
    packing.pack_rankings([encode(train[i]) for i in range(len(train))], cfg.seq_len,
                          tok.pad_id)


def _dpo(cfg, written):
  """dpo_files.run's reading and encoding (KTO's unpaired examples too), before the model."""
  tok, render_fn, render_id = real_models.load_tokenizer(cfg)
  data = dpo_files.read_pairs(cfg, tok, render_fn, render_id)
  _check_report(data.report, written, cfg.on_error)
  _encode_all(data.train_encode, data.train)
  _encode_all(data.encode, *([data.test] if data.test is not None else []))


STAGES = {  # stage -> (config, formats, extra flags, reader)
    "sft": (sft.SFTConfig, sft_files.SFT_FORMATS, [], _sft),
    "reward": (reward.RewardConfig, reward_files.REWARD_FORMATS, [], _reward),
    "dpo": (dpo.DPOConfig, pf.PREFERENCE_FORMATS, [], _dpo),
    "kto": (dpo.DPOConfig, ("unpaired",), ["--loss=kto", "--nopack"], _dpo),  # KTO packs nothing
}


@pytest.mark.parametrize("profile", tally.PROFILES)
@pytest.mark.parametrize("stage", STAGES)
def test_stage_readers(stage, profile, tmp_path, tokenizer_dirs):
  config_cls, formats, extra, read = STAGES[stage]

  @tally.fuzz(profile, 40, st.data(), st.sampled_from(formats),
              st.sampled_from(inputs.CONTAINERS), st.sampled_from(file_datasets.ON_ERROR),
              st.sampled_from(sorted(tokenizer_dirs)), st.sampled_from([16, 256]),
              st.booleans())
  def run(data, fmt, container, on_error, tokenizer, seq_len, pack):
    written = data.draw(inputs.files(fmt, container, tempfile.mkdtemp(dir=tmp_path)))
    flags = _flags(written, fmt, tokenizer_dirs[tokenizer], on_error, tmp_path,
                   f"--seq_len={seq_len}", f"--pack={pack}", *extra)
    cfg = config.parse(config_cls, flags).effective()
    tally.check(f"stage {stage}", lambda: read(cfg, written), names=written.paths,
                verify_error=_check_blame(written))


@pytest.mark.parametrize("profile", tally.PROFILES)
def test_rl_prompt_files(profile, tmp_path, tokenizer_dirs):
  """The prompt sets of every online RL run (PPO, GRPO, online DPO, Nash-MD, best-of-n share
  prompt_sets.load): prompt formats and the prompts of preference files."""
  @tally.fuzz(profile, 60, st.data(), st.sampled_from(prompt_sets.PROMPT_SOURCES),
              st.sampled_from(inputs.CONTAINERS), st.sampled_from(file_datasets.ON_ERROR),
              st.sampled_from(sorted(tokenizer_dirs)), st.sampled_from([2, 24, 512]),
              st.sampled_from(["", "Be brief."]), st.booleans())
  def run(data, fmt, container, on_error, tokenizer, max_prompt_len, system_prompt, eval_files):
    directory = tempfile.mkdtemp(dir=tmp_path)
    written = data.draw(inputs.files(fmt, container, directory))
    flags = [f"--prompt_files={','.join(written.paths)}", f"--prompt_format={fmt}",
             f"--data_dir={tmp_path / 'built'}", f"--on_error={on_error}",
             f"--tokenizer={tokenizer_dirs[tokenizer]}", f"--max_prompt_len={max_prompt_len}",
             f"--system_prompt={system_prompt}", "--test_fraction=0.5", "--max_new_tokens=8"]
    names = list(written.paths)
    if eval_files:
      held_out = data.draw(inputs.files(fmt, container, directory, name="eval"))
      flags.append(f"--eval_files={','.join(held_out.paths)}")
      names += held_out.paths
    cfg = config.parse(grpo.GRPOConfig, flags).effective()

    def verify(loaded):
      _, prompts = loaded
      _check_report(prompts.report, written if not eval_files else inputs.Written(
          [], None, written.valid + held_out.valid), on_error)
      assert prompts.train and all(p in prompts.answers for p in prompts.train + prompts.test)

    tally.check("rl prompts", lambda: prompt_sets.load(cfg, MCFG), names=names, verify=verify,
                verify_error=_check_blame(written))

