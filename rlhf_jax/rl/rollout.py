"""The engine's rollout stage: prompts -> samples (a prompt's prefix once per group) -> the
per-token quantities every online algorithm trains on, in ONE compiled function per shape.

Layout of every BxT array: T = P + N, the LEFT-padded prompt (P slots) followed by the
RIGHT-padded response (N = max_new_tokens slots), so response token j sits at column P + j
and the response block is contiguous. Rows are prompt-major: row i * G + j is sample j of
prompt i (G = group_size). Alignment (the project's log-prob convention):
  logps_BxT[:, t]  = log pi(tokens[:, t] | tokens[:, <t])
  values_BxT[:, t] = V(s_t), s_t = tokens[:, <t], the state BEFORE token t is chosen: the
                     value head's output at column t - 1 (column 0 gets 0, never a target)
  mask_BxT         = 1 on response tokens (EOS included), 0 on prompt and padding.
bootstrap_values_B = V(state after the last response token): GAE bootstraps truncated rows
from it. The reference forward and the value head are traced only when asked for, so an
algorithm without them (GRPO at kl_coef 0) compiles neither.
"""
import dataclasses
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax import sharding
from rlhf_jax.data import pipeline
from rlhf_jax.data.tokenizer import ByteTokenizer, Tokenizer
from rlhf_jax.logprobs import entropy, next_token_logits, token_logps
from rlhf_jax.models.transformer import last_valid_index
from rlhf_jax.rl import grouped_forward
from rlhf_jax.sampling import SamplingConfig, sample, sample_groups


class Rollout(NamedTuple):
  tokens_BxT: jax.Array  # int32 prompt (left-padded) + response (right-padded)
  valid_BxT: jax.Array  # bool, real tokens (prompt or response)
  mask_BxT: jax.Array  # float32, response tokens
  old_logps_BxT: jax.Array  # sampling policy, training forward, 0 off the mask
  ref_logps_BxT: Optional[jax.Array]  # reference policy, 0 off the mask; None without one
  values_BxT: Optional[jax.Array]  # V(s_t) (module docstring), 0 off the mask; None without
  bootstrap_values_B: Optional[jax.Array]  # V(state after the last response token)
  truncated_B: jax.Array  # bool, no EOS within max_new_tokens
  sampler_logps_BxN: jax.Array  # the sampler's own log-probs (response slots)


@dataclasses.dataclass
class Experience:
  """A rollout with its host-side text: prompts and responses per row (EOS and padding
  stripped), the rewards a scorer gave them (None until scored), and whatever else an
  algorithm produced beside it (extras: Nash-MD's opponents and judged pairs)."""
  rollout: Rollout
  prompts: list[str]
  responses: list[str]
  group_size: int
  rewards_B: Optional[object] = None
  extras: dict = dataclasses.field(default_factory=dict)

  @property
  def rows(self) -> int:
    return len(self.responses)

  def local_rows(self) -> slice:
    """The rows this process's devices sampled: what a host-side scorer scores here. (One
    process holds them all, also for an Experience of text alone, without a rollout.)"""
    if jax.process_count() == 1:
      return slice(0, self.rows)
    return sharding.process_rows(sharding.mesh_of(self.rollout.tokens_BxT), self.rows)

  def gather(self, local_values) -> np.ndarray:
    """Per-row values computed for local_rows() -> every row's, on every process."""
    if jax.process_count() == 1:
      return np.asarray(local_values)
    return sharding.gather_rows(local_values, sharding.mesh_of(self.rollout.tokens_BxT),
                                self.rows)


def shift_values(head_BxT):
  """Value-head outputs (column t sees tokens <= t) -> V(s_t) at column t (0 at t = 0)."""
  return jnp.pad(head_BxT[:, :-1], ((0, 0), (1, 0)))


def policy_forward(graphdef, params, tokens_BxT, valid_BxT, temperature: float):
  """(shifted logps BxT, shifted entropy BxT) under softmax(logits / temperature)."""
  model = nnx.merge(graphdef, params)
  hidden, _ = model.hidden(tokens_BxT, valid_BxT=valid_BxT)
  logits = next_token_logits(model.logits, hidden).astype(jnp.float32) / temperature
  pad = lambda x: jnp.pad(x, ((0, 0), (1, 0)))  # noqa: E731  aligned as shifted_logps
  return pad(token_logps(logits, tokens_BxT[:, 1:])), pad(entropy(logits))


def row_logps(graphdef, params, tokens_BxT, valid_BxT, temperature: float,
              groups: grouped_forward.PromptGroups | None):
  """Shifted log-probs BxT of the rows: each group's prompt once (grouped_forward) or row by
  row (policy_forward)."""
  if groups is None:
    return policy_forward(graphdef, params, tokens_BxT, valid_BxT, temperature)[0]
  return grouped_forward.group_logps(graphdef, params, tokens_BxT, valid_BxT, groups,
                                     temperature)


def in_row_chunks(fn, chunk_rows: int, data_parallel: int = 1):
  """fn(tokens_BxT, valid_BxT) -> per-row arrays (BxT), computed chunk_rows rows at a time
  (lax.map): a log-prob forward materialises rows x T x vocab float32 logits, which for a
  rollout of 256 rows x 768 tokens of a 152k vocabulary is 119 GB at once. 0 (or >= B): one
  pass. Each chunk takes chunk_rows / data_parallel rows from every data-parallel shard (rows
  are device-major), so the chunks stay sharded like the rollout and nothing is gathered."""
  def run(tokens, valid):
    b, t = tokens.shape
    if not chunk_rows or chunk_rows >= b:
      return fn(tokens, valid)
    if b % chunk_rows or chunk_rows % data_parallel:
      raise ValueError(f"{b} rollout rows do not split into chunks of {chunk_rows} rows, a "
                       f"multiple of the data-parallel size {data_parallel}")
    n, c = b // chunk_rows, chunk_rows // data_parallel

    def split(x):  # B = D x n x c (device-major) -> n chunks of D x c rows
      x = x.reshape(data_parallel, n, c, *x.shape[1:]).swapaxes(0, 1)
      return x.reshape(n, data_parallel * c, *x.shape[3:])

    def unsplit(y):
      y = y.reshape(n, data_parallel, c, *y.shape[2:]).swapaxes(0, 1)
      return y.reshape(b, *y.shape[3:])

    out = jax.lax.map(lambda tv: fn(*tv), (split(tokens), split(valid)))
    return jax.tree.map(unsplit, out)
  return run


def encode_prompts(prompts: Sequence[str], prompt_len: int,
                   tokenizer: Tokenizer | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Left-padded prompt tokens and validity [B, prompt_len] (bos + prompt)."""
  tok = tokenizer or ByteTokenizer()
  rows = [pipeline.prompt_example(p, "", tok, prompt_len) for p in prompts]
  return (np.stack([r["prompt_tokens"] for r in rows]),
          np.stack([r["prompt_valid"] for r in rows]))


def decode_responses(tokens_BxN, mask_BxN, tokenizer: Tokenizer | None = None) -> list[str]:
  """Response texts of sampled rows: masked-in tokens, EOS dropped."""
  tok = tokenizer or ByteTokenizer()
  tokens, mask = sharding.to_host(tokens_BxN), sharding.to_host(mask_BxN)
  return [tok.decode([t for t in row[m > 0] if t != tok.eos_id]) for row, m in zip(tokens, mask)]


def check_sampling_matches_training(cfg: SamplingConfig) -> None:
  """Importance ratios need the training forward to reproduce the sampling distribution."""
  if cfg.greedy or cfg.top_k or cfg.top_p < 1.0:
    raise ValueError("an online algorithm's ratio needs the training forward to reproduce the "
                     "sampling distribution: use temperature sampling without "
                     "top-k/top-p/greedy")


def make_rollout_fn(policy_graphdef, sampling_cfg: SamplingConfig, *, group_size: int = 1,
                    with_ref: bool = True, value_graphdef=None, mesh=None,
                    forward_chunk_rows: int = 0, share_prompt: bool = False,
                    sampler_old_logps: bool = False):
  """Returns jitted rollout(policy_params, ref_params, value_params, prompt_tokens_BxP,
  prompt_valid_BxP, key, row_ids_B=None) -> Rollout of B * group_size rows, traced on `mesh`
  when given (sharding.traced_on: the forwards keep their rows sharded).

  group_size > 1 samples G responses per prompt from one prefill of the prompt
  (sampling.sample_groups). The reference shares the policy's graphdef; with_ref=False
  needs ref_params None and traces no reference forward; value_graphdef None needs
  value_params None and traces no value head. Log-probs use the sampling temperature;
  forward_chunk_rows > 0 computes them that many rows at a time (in_row_chunks);
  share_prompt computes each group's prompt once in them (rl/grouped_forward.py).
  sampler_old_logps takes the old policy's log-probs from the sampler, which computed them
  while drawing each token with the same params, temperature and no truncation
  (check_sampling_matches_training): no forward pass, and a first ratio of 1 to float32
  rounding (the cached and the full forward sum in another order) instead of exactly 1."""
  check_sampling_matches_training(sampling_cfg)
  if group_size < 1:
    raise ValueError(f"group_size must be >= 1, got {group_size}")
  if share_prompt and forward_chunk_rows:
    raise ValueError("--share_prompt and --rollout_chunk_rows: chunks would split the groups "
                     "whose prompt is computed once; drop one")
  temp = sampling_cfg.temperature
  dp = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]

  def logps(params):
    if share_prompt and group_size > 1:
      return lambda t, v: grouped_forward.group_logps(
          policy_graphdef, params, t, v, grouped_forward.PromptGroups(
              group_size, t.shape[1] - sampling_cfg.max_new_tokens), temp)
    return in_row_chunks(lambda t, v: policy_forward(policy_graphdef, params, t, v, temp)[0],
                         forward_chunk_rows, dp)

  def rollout(policy_params, ref_params, value_params, prompt_tokens_BxP, prompt_valid_BxP,
              key, row_ids_B=None) -> Rollout:
    if (ref_params is None) == with_ref:
      raise ValueError(f"with_ref={with_ref} but ref_params is "
                       f"{'None' if ref_params is None else 'given'}")
    if (value_params is None) != (value_graphdef is None):
      raise ValueError("value_params and value_graphdef come together")
    if group_size == 1:
      out = sample(policy_graphdef, policy_params, prompt_tokens_BxP, prompt_valid_BxP, key,
                   row_ids_B, cfg=sampling_cfg)
    else:
      out = sample_groups(policy_graphdef, policy_params, prompt_tokens_BxP, prompt_valid_BxP,
                          key, row_ids_B, cfg=sampling_cfg, group_size=group_size)
    repeat = lambda x: jnp.repeat(x, group_size, axis=0) if group_size > 1 else x
    prompt_valid = repeat(prompt_valid_BxP.astype(bool))
    tokens = jnp.concatenate([repeat(prompt_tokens_BxP.astype(jnp.int32)), out.tokens_BxN], 1)
    response = out.mask_BxN.astype(bool)
    valid = jnp.concatenate([prompt_valid, response], axis=1)
    mask = jnp.concatenate([jnp.zeros_like(prompt_valid), response], 1).astype(jnp.float32)
    if sampler_old_logps:
      old_logps = jnp.pad(out.logps_BxN, ((0, 0), (prompt_valid.shape[1], 0)))
    else:
      old_logps = logps(policy_params)(tokens, valid)
    ref_logps = values = boot = None
    if with_ref:
      ref_logps = logps(ref_params)(tokens, valid) * mask
    if value_graphdef is not None:
      head = nnx.merge(value_graphdef, value_params)(tokens, valid_BxT=valid)
      boot = jnp.take_along_axis(head, last_valid_index(valid)[:, None], axis=1)[:, 0]
      values = shift_values(head) * mask
    return Rollout(tokens, valid, mask, old_logps * mask, ref_logps, values, boot,
                   ~out.finished_B, out.logps_BxN)

  return jax.jit(rollout if mesh is None else sharding.traced_on(rollout, mesh))


@dataclasses.dataclass
class RolloutStage:
  """The compiled rollout with its prompt encoding and response decoding: experience(...)
  turns prompt texts into an Experience. One compile per (prompts, prompt_len) shape."""
  policy_graphdef: object
  sampling: SamplingConfig
  prompt_len: int
  group_size: int = 1
  with_ref: bool = True
  value_graphdef: object = None
  tokenizer: Tokenizer = dataclasses.field(default_factory=ByteTokenizer)
  forward_chunk_rows: int = 0  # make_rollout_fn's: rows per chunk of the log-prob forwards
  share_prompt: bool = False  # make_rollout_fn's: each group's prompt computed once
  sampler_old_logps: bool = False  # make_rollout_fn's: old log-probs from the sampler

  def __post_init__(self):
    self._fns = {}  # the compiled rollout per mesh

  def _fn(self, mesh):
    if mesh not in self._fns:
      self._fns[mesh] = make_rollout_fn(
          self.policy_graphdef, self.sampling, group_size=self.group_size,
          with_ref=self.with_ref, value_graphdef=self.value_graphdef, mesh=mesh,
          forward_chunk_rows=self.forward_chunk_rows, share_prompt=self.share_prompt,
          sampler_old_logps=self.sampler_old_logps)
    return self._fns[mesh]

  def experience(self, policy_params, ref_params, value_params, prompts: Sequence[str],
                 key, first_id: int = 0) -> Experience:
    """G samples of each prompt; prompts are given once per group, the same (global) list on
    every process. Prompt n samples with row id first_id + n (sampling.py): its responses
    depend on (key, its id), not on its batch-mates or the process count. The rows are
    sharded over the policy's mesh; the responses are decoded on every process."""
    toks, valid = encode_prompts(prompts, self.prompt_len, self.tokenizer)
    ids = np.arange(first_id, first_id + len(prompts), dtype=np.int32)
    mesh = sharding.mesh_of(policy_params)
    inputs = sharding.shard_global({"t": toks, "v": valid, "ids": ids}, mesh)
    ro = self._fn(mesh)(policy_params, ref_params if self.with_ref else None, value_params,
                  inputs["t"], inputs["v"], key, inputs["ids"])
    p = self.prompt_len
    responses = decode_responses(ro.tokens_BxT[:, p:], ro.mask_BxT[:, p:], self.tokenizer)
    rows = [q for q in prompts for _ in range(self.group_size)]
    return Experience(ro, rows, responses, self.group_size)
