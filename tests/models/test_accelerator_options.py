"""remat, scan_layers and the fused attention: the same function as the plain model.

Each option changes how the forward and backward are computed (what is kept, how the layers
are traced, which kernel computes attention), never what: outputs match the float64 NumPy
Llama (tests/helpers.py) and the plain model to float32 rounding (helpers.f32_tol), and each
option's own effect (less memory kept, a program whose size does not grow with depth, the
fallback when cuDNN refuses) is checked on the compiled program.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import helpers
from rlhf_jax import sharding
from rlhf_jax.models import attention, hf_export, hf_import, layer_stack
from rlhf_jax.models.transformer import ScalarHeadModel, Transformer
from rlhf_jax.sampling import SamplingConfig, sample

CFG = helpers.nano()
T = 12
# Each option alone, then combined: scan with each remat policy and each attention.
OPTIONS = [dict(scan_layers=True, remat="none", attention="einsum"),
           dict(scan_layers=False, remat="block", attention="einsum"),
           dict(scan_layers=False, remat="attention", attention="einsum"),
           dict(scan_layers=False, remat="none", attention="fused"),
           dict(scan_layers=True, remat="block", attention="fused"),
           dict(scan_layers=True, remat="attention", attention="einsum")]


def _tokens(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).integers(1, CFG.vocab_size, shape), jnp.int32)


@pytest.fixture(scope="module")
def listed():
  return helpers.make_model(CFG, seed=3)


def _in_layout(cfg, params):
  return layer_stack.stacked_params(params) if cfg.scan_layers else params


def _graphdef(cfg):
  return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))[0]


def _loss_and_grads(graphdef, params, tokens):
  def loss(p):
    logits = nnx.merge(graphdef, p)(tokens).logits_BxTxV
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0])
  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(map(str, o.values())))
def test_every_option_computes_the_float64_llama(listed, options):
  cfg = dataclasses.replace(CFG, **options)
  _, params = listed
  tokens = _tokens(0, (2, T))
  logits = np.asarray(helpers.apply(_graphdef(cfg), _in_layout(cfg, params), tokens)[0])
  for row in range(2):
    ref = helpers.np_forward(params, CFG, np.asarray(tokens[row]))
    np.testing.assert_allclose(logits[row], ref, **helpers.logits_tol(CFG, T, ref))


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(map(str, o.values())))
def test_every_option_has_the_plain_models_gradients(listed, options):
  graphdef, params = listed
  tokens = _tokens(1, (2, T))
  loss, grads = _loss_and_grads(graphdef, params, tokens)
  cfg = dataclasses.replace(CFG, **options)
  loss_o, grads_o = _loss_and_grads(_graphdef(cfg), _in_layout(cfg, params), tokens)
  # The backward runs the forward's reductions again (twice for the weight gradients).
  tol = helpers.f32_tol(3 * helpers.forward_terms(CFG, T))
  np.testing.assert_allclose(loss_o, loss, **tol)
  for got, want in zip(jax.tree.leaves(layer_stack.listed_params(grads_o)),
                       jax.tree.leaves(grads)):
    np.testing.assert_allclose(got, want, rtol=tol["rtol"],
                               atol=tol["rtol"] * float(np.abs(want).max()))


def _random_qkv_mask(seed, b=2, t=7, s=7, n=4, k=2, h=8):
  rng = np.random.default_rng(seed)
  q, key, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32)
               for shape in ((b, t, n, h), (b, s, k, h), (b, s, k, h)))
  # Causal, a left-padded row (its padding queries see nothing: uniform, not NaN) and two
  # packed segments in the other row.
  causal = np.tril(np.ones((t, s), bool))
  valid = np.ones((b, s), bool)
  valid[0, :2] = False
  seg = np.array([1, 1, 1, 2, 2, 2, 2])
  mask = causal[None] & valid[:, None, :]
  mask[1] &= seg[:, None] == seg[None, :]
  return q, key, v, jnp.asarray(mask)


def test_fused_attention_is_the_written_out_attention():
  q, k, v, mask = _random_qkv_mask(0)
  einsum_cfg, fused_cfg = (dataclasses.replace(CFG, attention=a) for a in ("einsum", "fused"))
  out_e = attention.attend(q, k, v, mask, einsum_cfg)
  out_f = attention.attend(q, k, v, mask, fused_cfg)
  assert np.isfinite(out_f).all()
  # Scores: a dot over H; output: softmax normaliser and weighted sum over S (values ~ 1).
  np.testing.assert_allclose(out_f, out_e, **helpers.f32_tol(8 + 2 * 7, scale=3.0))
  grad = lambda cfg: jax.grad(lambda q: jnp.sum(attention.attend(q, k, v, mask, cfg) ** 2))(q)
  np.testing.assert_allclose(grad(fused_cfg), grad(einsum_cfg),
                             **helpers.f32_tol(3 * (8 + 2 * 7), scale=10.0))


def test_fused_attention_falls_back_when_cudnn_refuses(monkeypatch):
  q, k, v, mask = _random_qkv_mask(1)
  cfg = dataclasses.replace(CFG, attention="fused")
  xla = attention.attend(q, k, v, mask, cfg)
  # On this CPU cuDNN raises while tracing ("cuDNN is not detected"), as it does on a GPU for
  # a shape or dtype it does not support: the next implementation must take over.
  monkeypatch.setattr(attention, "fused_candidates", lambda: ("cudnn", "xla"))
  np.testing.assert_array_equal(attention.attend(q, k, v, mask, cfg), xla)
  monkeypatch.setattr(attention, "fused_candidates", lambda: ("cudnn",))
  with pytest.raises(RuntimeError, match="--attention=einsum"):
    attention.attend(q, k, v, mask, cfg)


def test_auto_attention_is_written_out_on_cpu_and_fused_elsewhere(monkeypatch):
  assert attention.implementation(CFG) == "einsum"  # CFG.attention is "auto"; this is a CPU
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert attention.implementation(CFG) == "fused"
  assert attention.fused_candidates() == ("cudnn", "xla")


def _train_step_temp_bytes(cfg, t):
  graphdef = _graphdef(cfg)
  params = jax.eval_shape(lambda: nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))[1]
                          .to_pure_dict())
  tokens = jax.ShapeDtypeStruct((4, t), jnp.int32)

  def grads(p, tokens):
    return jax.grad(lambda p: jnp.mean(nnx.merge(graphdef, p)(tokens).logits_BxTxV))(p)
  return jax.jit(grads).lower(params, tokens).compile().memory_analysis().temp_size_in_bytes


def test_remat_keeps_less_for_the_backward():
  # 4 layers at 256 tokens: the f32 T x T attention arrays (4 heads x 256^2 x 4 bytes = 1 MiB
  # per row) dominate what a step keeps; "attention" drops them, "block" keeps only each
  # block's input. Measured with the scanned stack: unrolled, XLA:CPU's scheduler runs the
  # recomputation as early as the forward (docs/performance.md), so the saving shows there
  # only on accelerators' memory-aware schedulers.
  cfg = dataclasses.replace(CFG, n_layers=4, scan_layers=True)
  none, block, attn = (_train_step_temp_bytes(dataclasses.replace(cfg, remat=r), 256)
                       for r in ("none", "block", "attention"))
  assert block < 0.5 * none and attn < 0.8 * none, (none, block, attn)


def _program_size(cfg):
  params = jax.eval_shape(lambda: nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))[1]
                          .to_pure_dict())
  graphdef = _graphdef(cfg)
  fn = jax.grad(lambda p, x: jnp.mean(nnx.merge(graphdef, p)(x).logits_BxTxV))
  return len(jax.jit(fn).lower(params, jax.ShapeDtypeStruct((2, 8), jnp.int32)).as_text())


def test_scanned_program_does_not_grow_with_depth():
  sizes = {(scan, layers): _program_size(dataclasses.replace(CFG, n_layers=layers,
                                                              scan_layers=scan))
           for scan in (False, True) for layers in (2, 8)}
  assert sizes[(False, 8)] > 2.5 * sizes[(False, 2)]  # the measure sees depth when unrolled
  assert sizes[(True, 8)] < 1.05 * sizes[(True, 2)]


def test_scanned_init_is_the_listed_init_stacked():
  for factory in (Transformer, ScalarHeadModel):
    states = [nnx.split(factory(dataclasses.replace(CFG, scan_layers=s), rngs=nnx.Rngs(5)))[1]
              for s in (False, True)]
    listed, stacked = (s.to_pure_dict() for s in states)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()),
                                     layer_stack.stacked_params(listed), stacked))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()),
                                     layer_stack.listed_params(stacked), listed))
    axes = sharding.logical_axes(states[1])
    wq = (axes["backbone"] if factory is ScalarHeadModel else axes)["layers"]["attn"]["wq"]
    assert wq == ("layers", "embed", "q_heads", "head_dim")


def test_scanned_model_samples_what_the_listed_one_samples(listed):
  graphdef, params = listed
  prompts = _tokens(2, (3, 5))
  valid = jnp.asarray([[1] * 5, [0, 0, 1, 1, 1], [1, 1, 1, 1, 0]], bool)
  scfg = SamplingConfig(max_new_tokens=6, eos_id=-1, pad_id=0)
  scan_cfg = dataclasses.replace(CFG, scan_layers=True)
  want = sample(graphdef, params, prompts, valid, jax.random.key(0), cfg=scfg)
  got = sample(_graphdef(scan_cfg), layer_stack.stacked_params(params), prompts, valid,
               jax.random.key(0), cfg=scfg)
  np.testing.assert_array_equal(got.tokens_BxN, want.tokens_BxN)
  np.testing.assert_allclose(got.logps_BxN, want.logps_BxN,
                             **helpers.f32_tol(helpers.forward_terms(CFG, 11)))


def test_hugging_face_files_import_and_export_in_the_scanned_layout(listed, tmp_path):
  _, params = listed
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  files = hf_export.save_hf_model(tmp_path / "listed", CFG, params)
  graphdef, stacked, shardings = hf_import.load_hf_model(tmp_path / "listed", mesh,
                                                         scan_layers=True)
  assert nnx.merge(graphdef, stacked).cfg.scan_layers
  assert jax.tree.all(jax.tree.map(lambda a, b: bool((np.asarray(a) == b).all()),
                                   stacked, layer_stack.stacked_params(params)))
  assert jax.tree.structure(shardings) == jax.tree.structure(stacked)
  again = hf_export.save_hf_model(tmp_path / "scanned", graphdef, stacked)
  for a, b in zip(files, again):
    assert a.read_bytes() == b.read_bytes(), a.name


def test_bad_options_are_refused_with_the_flag_to_fix():
  with pytest.raises(ValueError, match="--remat"):
    helpers.nano(remat="everything")
  with pytest.raises(ValueError, match="--attention"):
    helpers.nano(attention="flash")
  with pytest.raises(ValueError, match="--scan_layers"):
    helpers.nano(scan_layers=True, lora_rank=4)
