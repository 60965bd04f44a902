"""A world's held-out evaluation of a policy, as the language-modelling stages (pretrain, SFT)
and the offline experiments report it:

  arithmetic    exact-match accuracy of greedy and temperature-1 answers (first field)
  preference    the world's summary (gold +- se, words, its own columns) of one greedy answer
                and EVAL_SAMPLES temperature-1 answers per prompt, prefixed greedy_ / temp1_

Batches come from data.pipeline.make_prompt_iterator; batch i samples with fold_in(key, i)
(evaluation.generate), so every policy answers the same prompts with the same keys.
"""
from typing import Sequence

from rlhf_jax import evaluation
from rlhf_jax.data import pipeline
from rlhf_jax.data.tokenizer import ByteTokenizer
from rlhf_jax.sampling import SamplingConfig
from rlhf_jax.worlds import registry

# Temperature-1 samples per held-out prompt: the gold world has ~40 test prompts, and the
# mean gold reward of one sample each is too noisy to compare policies.
EVAL_SAMPLES = 4


def sample_responses(graphdef, params, prompts: Sequence[str], *, batch_size: int,
                     max_new: int, key, greedy: bool = False,
                     temperature: float = 1.0) -> list[str]:
  """One sampled response per prompt (texts, EOS and padding stripped), in order."""
  tok = ByteTokenizer()
  scfg = SamplingConfig(max_new_tokens=max_new, eos_id=tok.eos_id, pad_id=tok.pad_id,
                        greedy=greedy, temperature=temperature)
  source = [{"prompt": p, "response": ""} for p in prompts]
  batches = pipeline.make_prompt_iterator(source, batch_size=batch_size,
                                          prompt_len=registry.prompt_len(prompts), tokenizer=tok)
  return [text for text, _ in evaluation.generate(graphdef, params, batches, tok, scfg, key)]


def _arithmetic(graphdef, params, source, *, batch_size, max_new, key) -> dict:
  tok = ByteTokenizer()
  out = {}
  for name, greedy in (("greedy", True), ("temp1", False)):
    scfg = SamplingConfig(max_new_tokens=max_new, eos_id=tok.eos_id, pad_id=tok.pad_id,
                          greedy=greedy)
    batches = pipeline.make_prompt_iterator(
        source, batch_size=batch_size,
        prompt_len=registry.prompt_len([r["prompt"] for r in source]), tokenizer=tok)
    pairs = evaluation.generate(graphdef, params, batches, tok, scfg, key)
    out[f"accuracy_{name}"] = evaluation.exact_match_rate(pairs, registry.ArithmeticWorld.verify)
  return out


def _preference(world, world_cfg, graphdef, params, source, *, batch_size, max_new,
                key) -> dict:
  prompts = [pipeline._text(r["prompt"]) for r in source]
  out = {}
  for name, greedy, reps in (("greedy_", True, 1), ("temp1_", False, EVAL_SAMPLES)):
    ps = prompts * reps
    ys = sample_responses(graphdef, params, ps, batch_size=batch_size, max_new=max_new,
                          key=key, greedy=greedy)
    out.update(world.summary(world_cfg, ps, ys, name))
  return out


def heldout_metrics(world: registry.World, world_cfg, graphdef, params, source, *,
                    batch_size: int, max_new: int, key) -> dict:
  """The world's held-out evaluation of a policy on the records of `source` (prompt/response
  dicts of its test split)."""
  if isinstance(world, registry.PreferenceWorld):
    return _preference(world, world_cfg, graphdef, params, source, batch_size=batch_size,
                       max_new=max_new, key=key)
  return _arithmetic(graphdef, params, source, batch_size=batch_size, max_new=max_new, key=key)


def metric_names(world: registry.World, world_cfg, record) -> tuple[str, ...]:
  """The keys heldout_metrics returns, from one held-out record scored as its own answer
  (pure Python: a criterion naming a metric is checked before anything compiles)."""
  if not isinstance(world, registry.PreferenceWorld):
    return ("accuracy_greedy", "accuracy_temp1")
  prompt = pipeline._text(record["prompt"])
  response = pipeline._text(record.get("response", ""))
  return tuple(sorted({f"{prefix}{k}" for prefix in ("greedy_", "temp1_")
                       for k in world.summary(world_cfg, [prompt], [response])}))


def headline(world: registry.World) -> tuple[str, ...]:
  """The metrics a stage prints for a policy of this world."""
  if isinstance(world, registry.PreferenceWorld):
    return ("greedy_gold", "temp1_gold", "temp1_words") + tuple(
        f"temp1_{k}" for k in world.columns)
  return ("accuracy_greedy", "accuracy_temp1")
