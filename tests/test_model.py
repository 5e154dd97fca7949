"""Llama-family model: document masking, generation with a KV cache, config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcjax.attention import MaskSpec
from lcjax.config import ConfigError
from lcjax.models import build_model, generate, llama_config
from lcjax.models.config import longgen_layer_types
from lcjax.models.remat import REMAT_POLICIES


def _model(seed=0, **overrides):
  cfg = llama_config(**{"dtype": "float32", **overrides})
  return build_model(cfg, rngs=nnx.Rngs(seed)), cfg


@nnx.jit
def _logits(model, tokens, positions=None, segment_ids=None, token_index=None):
  """The forward pass as one compiled program (called eagerly it compiles op by op,
  which made most of this file's time)."""
  return model(tokens, positions=positions, segment_ids=segment_ids, token_index=token_index)


def test_forward_shapes_and_dtypes():
  model, cfg = _model()
  tokens = jnp.zeros((2, 16), jnp.int32)
  logits = _logits(model, tokens)
  assert logits.shape == (2, 16, cfg.vocab_size) and logits.dtype == jnp.float32
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert all(p.dtype == jnp.float32 for p in params)


def test_bfloat16_compute_keeps_float32_params():
  model, _ = _model(dtype="bfloat16")
  logits = _logits(model, jnp.ones((1, 8), jnp.int32))
  assert model.embed_tokens.embedding[...].dtype == jnp.float32
  assert logits.dtype == jnp.float32
  ref, _ = _model(dtype="float32")
  # bf16 has 8 mantissa bits: ~1e-2 relative error per op, a few ops deep.
  np.testing.assert_allclose(logits, _logits(ref, jnp.ones((1, 8), jnp.int32)), atol=5e-2)


@pytest.mark.parametrize(
  "impl",
  [pytest.param("reference", marks=pytest.mark.slow), "blockwise", "pallas"],  # ref: ~10 s
)
def test_packed_documents_equal_separate_documents(impl):
  """Document masking + per-document positions make a packed row equal separate rows."""
  model, _ = _model(attention_impl=impl, attention_block_q=8, attention_block_kv=8)
  rng = np.random.default_rng(0)
  doc_a, doc_b = rng.integers(3, 300, size=11), rng.integers(3, 300, size=13)
  packed = np.concatenate([doc_a, doc_b])[None]
  segment_ids = np.array([[1] * 11 + [2] * 13])
  positions = np.array([list(range(11)) + list(range(13))])
  logits = _logits(model, packed, positions=positions, segment_ids=segment_ids)
  np.testing.assert_allclose(logits[0, :11], _logits(model, doc_a[None])[0], atol=1e-5)
  np.testing.assert_allclose(logits[0, 11:], _logits(model, doc_b[None])[0], atol=1e-5)
  # Without the document mask, doc_b would see doc_a: the check above can fail.
  leaky = _logits(model, packed, positions=positions)
  assert np.max(np.abs(leaky[0, 11:] - _logits(model, doc_b[None])[0])) > 1e-3


@pytest.mark.parametrize(
  "overrides",
  [
    dict(),
    dict(num_kv_heads=1, sliding_window=5, tie_embeddings=True),
    dict(
      rope=dict(
        rope_type="yarn",
        rope_theta=1e4,
        factor=4.0,
        original_max_position_embeddings=8,
        max_position_embeddings=32,
      ),
      max_position_embeddings=32,
    ),
    # eabf decodes layer by layer with its per-layer query scale (layer 2 of 3 scales).
    dict(
      num_layers=3,
      rope=dict(
        rope_type="eabf",
        rope_theta=1e4,
        original_max_position_embeddings=4,
        max_position_embeddings=2048,
      ),
    ),
  ],
)
def test_greedy_generate_equals_full_forward_argmax(overrides):
  model, _ = _model(seed=1, initializer_range=0.2, **overrides)
  prompt = np.random.default_rng(1).integers(0, 384, size=(2, 7))
  out = np.asarray(generate(model, prompt, max_new_tokens=9))
  assert out.shape == (2, 16)
  np.testing.assert_array_equal(out[:, :7], prompt)
  # Causal: the full forward's logits at t-1 see exactly the tokens the decoder
  # had when it chose token t, so one pass checks every step.
  want = np.argmax(np.asarray(_logits(model, out[:, :-1])), axis=-1)[:, 6:]
  np.testing.assert_array_equal(out[:, 7:], want)


def test_sampling_is_seeded_and_in_vocab():
  model, cfg = _model(initializer_range=0.2)
  prompt = np.zeros((3, 4), np.int32)
  a = generate(model, prompt, max_new_tokens=6, temperature=1.0, rng=jax.random.key(5))
  b = generate(model, prompt, max_new_tokens=6, temperature=1.0, rng=jax.random.key(5))
  np.testing.assert_array_equal(a, b)
  assert int(a.max()) < cfg.vocab_size
  with pytest.raises(ValueError, match="rng"):
    generate(model, prompt, max_new_tokens=2, temperature=0.7)


@pytest.mark.parametrize(
  "overrides, match",
  [
    (dict(num_heads=6, num_kv_heads=4), "multiple of model.num_kv_heads"),
    (dict(layer_types=("full_attention", "sliding_attention")), "sliding_window"),
    (dict(layer_types=("full_attention",)), "num_layers=2"),
    (dict(dtype="float8"), "model.dtype"),
    (dict(rope=dict(rope_type="yarn", rope_theta=1e4)), "factor"),
  ],
)
def test_bad_model_config_is_one_clear_error(overrides, match):
  with pytest.raises(ValueError, match=match):
    _model(**overrides)


def test_unknown_field_and_family():
  with pytest.raises(ConfigError, match="no field 'hiden_size'"):
    llama_config(hiden_size=3)
  with pytest.raises(ConfigError, match="family='gpt'"):
    build_model(llama_config(family="gpt"), rngs=nnx.Rngs(0))


def test_remat_policies_give_identical_gradients():
  """Activation checkpointing recomputes (or offloads), it must not change values.

  Scanned layers (the default for uniform stacks) and the unrolled loop, every policy.
  """
  tokens = np.random.default_rng(0).integers(0, 384, size=(2, 12))
  segments = np.array([[1] * 5 + [2] * 7] * 2)
  for scan in (True, False):
    grads = {}
    # The unrolled loop takes the same policy functions; two of them cover its wrapper.
    policies = REMAT_POLICIES if scan else ("none", "offload")
    for policy in policies:
      model, _ = _model(remat=policy, initializer_range=0.1, scan_layers=scan)
      assert model.scan_layers is scan
      graphdef, params = nnx.split(model, nnx.Param)

      def loss(p, graphdef=graphdef):
        return jnp.mean(nnx.merge(graphdef, p)(tokens, segment_ids=segments) ** 2)

      grads[policy] = jax.jit(jax.grad(loss))(params)
    for policy in policies[1:]:
      # float32: recomputation repeats the same ops, so only fusion order may differ.
      jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
        grads["none"],
        grads[policy],
      )
  with pytest.raises(ValueError, match="model.remat"):
    _model(remat="sometimes")
  with pytest.raises(ValueError, match="model.remat='dots' is now called 'save_dots'"):
    _model(remat="dots")


def test_permuted_rows_with_token_index_give_permuted_logits():
  """A context-parallel layout reorders tokens; token_index keeps masks in global order."""
  model, _ = _model(
    attention_block_q=4,
    attention_block_kv=4,
    sliding_window=6,
    layer_types=("full_attention", "sliding_attention"),
  )
  rng = np.random.default_rng(3)
  T = 16
  tokens = rng.integers(0, 384, size=(2, T))
  segment_ids = np.array([[1] * 7 + [2] * 9, [1] * 12 + [2] * 4])
  positions = np.concatenate([np.arange(7), np.arange(9)])[None].repeat(2, 0)
  want = _logits(model, tokens, positions=positions, segment_ids=segment_ids)
  # zigzag over 4 devices: chunks (0, 7), (1, 6), (2, 5), (3, 4) of length 2
  chunks = np.arange(T).reshape(8, 2)
  perm = np.concatenate([chunks[[r, 7 - r]].ravel() for r in range(4)])
  got = _logits(
    model,
    tokens[:, perm],
    positions=positions[:, perm],
    segment_ids=segment_ids[:, perm],
    token_index=np.broadcast_to(perm, (2, T)),
  )
  np.testing.assert_allclose(got, want[:, perm], atol=1e-5)
  wrong = _logits(
    model, tokens[:, perm], positions=positions[:, perm], segment_ids=segment_ids[:, perm]
  )
  assert np.max(np.abs(wrong - want[:, perm])) > 1e-3  # without token_index, masks break


SPARSE = "sink_window_attention"


def test_longgen_layer_types_put_full_attention_in_the_middle_third():
  """LongGen (Ge et al. 2024): full attention in the middle third, sparse layers around."""
  S, F = SPARSE, "full_attention"
  assert longgen_layer_types(6) == (S, S, F, F, S, S)
  assert longgen_layer_types(3) == (S, F, S)
  assert longgen_layer_types(4) == (S, F, S, S)  # round(4/3) = 1 full layer
  assert longgen_layer_types(1) == (F,)
  assert longgen_layer_types(4, full_fraction=0.0) == (S,) * 4
  assert longgen_layer_types(2, sparse="sliding_attention") == (
    "full_attention",
    "sliding_attention",
  )
  with pytest.raises(ValueError, match="full_fraction=1.5"):
    longgen_layer_types(6, full_fraction=1.5)
  with pytest.raises(ValueError, match="num_layers=0"):
    longgen_layer_types(0)
  with pytest.raises(ValueError, match="sparse='full_attention'"):
    longgen_layer_types(6, sparse="full_attention")


def _manual_logits(model, tokens_BT, masks):
  """The model's forward with an explicit MaskSpec per layer (reference attention)."""
  B, T = tokens_BT.shape
  index_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
  rope = model.rope_tables(index_BT)
  x_BTD = model.embed_tokens(jnp.asarray(tokens_BT))
  layers = [model.layer(i) for i in range(len(masks))]
  for layer, mask in zip(layers, masks, strict=True):
    layer.self_attn.impl = "reference"
    attn_BTD, _ = layer.self_attn(
      layer.input_layernorm(x_BTD), rope, mask=mask, segment_ids_BT=None, q_index_BT=index_BT
    )
    x_BTD = x_BTD + attn_BTD
    x_BTD = x_BTD + layer.mlp(layer.post_attention_layernorm(x_BTD))
  return model.logits(model.norm(x_BTD))


# Entropy-aware ABF (Zhang et al. 2024): the query scale max(1, ln(pos+1)/ln L_train) skips
# the first `rope.eabf_unscaled_layers` layers (default 2, the paper's). L_train = 4 and 24
# tokens make the scale reach ln(24)/ln(4) = 2.3, so a scaled layer shows in the logits.
_ABF = dict(rope_type="abf", rope_theta=5e5, max_position_embeddings=2048)
_EABF = {**_ABF, "rope_type": "eabf", "original_max_position_embeddings": 4}


def _rope_logits(rope, **overrides):
  model, _ = _model(rope=rope, initializer_range=0.1, **overrides)
  tokens = np.random.default_rng(6).integers(0, 384, size=(2, 24))
  return np.asarray(_logits(model, tokens)), model


@pytest.mark.parametrize("scan_layers", [None, False])  # None: scanned (a uniform stack)
def test_eabf_with_two_layers_equals_abf_unless_every_layer_is_scaled(scan_layers):
  """With the paper's 2 unscaled layers a 2-layer model is ABF with the same theta, bit for
  bit; with `eabf_unscaled_layers=0` (every layer scaled) its logits differ."""
  abf, _ = _rope_logits(_ABF, scan_layers=scan_layers)
  paper, model = _rope_logits(_EABF, scan_layers=scan_layers)
  assert model.q_scale_layers == (False, False)
  np.testing.assert_array_equal(paper, abf)
  every, model = _rope_logits({**_EABF, "eabf_unscaled_layers": 0}, scan_layers=scan_layers)
  assert model.q_scale_layers == (True, True)
  assert np.max(np.abs(every - abf)) > 1e-2


def test_eabf_scales_only_the_later_layers_in_the_scanned_and_the_unrolled_stack():
  """3 layers, the paper's default: only layer 2 scales its query. The scan gets that flag as
  data (one body for every layer) and must agree with the unrolled loop, which drops the
  scale in Python; both differ from ABF and from scaling every layer."""
  scanned, model = _rope_logits(_EABF, num_layers=3)
  unrolled, unrolled_model = _rope_logits(_EABF, num_layers=3, scan_layers=False)
  assert model.scan_layers and not unrolled_model.scan_layers
  assert model.q_scale_layers == (False, False, True)
  np.testing.assert_allclose(scanned, unrolled, rtol=1e-5, atol=1e-6)
  abf, _ = _rope_logits(_ABF, num_layers=3)
  every, _ = _rope_logits({**_EABF, "eabf_unscaled_layers": 0}, num_layers=3)
  assert np.max(np.abs(scanned - abf)) > 1e-2
  assert np.max(np.abs(scanned - every)) > 1e-2
  with pytest.raises(ConfigError, match=r"model\.rope: .*'eabf_unscaled_layers'\] must be"):
    _model(rope={**_EABF, "eabf_unscaled_layers": -1})


# LongGen's two sparse layers, as model fields and as the MaskSpec they must produce.
SPARSE_KINDS = {
  "sink_window": (
    dict(layer_types=longgen_layer_types(3), sparse_window=4, sparse_sinks=2),
    MaskSpec(causal=True, window=4, sinks=2),
  ),
  "strided": (
    dict(
      layer_types=longgen_layer_types(3, sparse="strided_attention"),
      sparse_stride=3,
      sparse_block=4,
      sparse_local_blocks=1,
      sparse_sinks=1,
    ),
    MaskSpec(causal=True, stride=3, stride_block=4, local_blocks=1, sinks=1),
  ),
}


@pytest.mark.parametrize(
  "impl, kind",
  [
    ("blockwise", "sink_window"),
    ("blockwise", "strided"),
    ("pallas", "strided"),
    # The kernels' sink + window tables are covered by tests/test_pallas_kernels.py.
    pytest.param("pallas", "sink_window", marks=pytest.mark.slow),
  ],
)
def test_longgen_hybrid_model_equals_per_layer_masks(impl, kind):
  """Sparse layers see the last `sparse_window` keys plus `sparse_sinks` sinks (or the
  strided S2 pattern, per kv head), full layers everything: the hybrid model equals a
  forward built from those masks."""
  fields, sparse = SPARSE_KINDS[kind]
  hybrid = dict(num_layers=3, **fields)
  blocks = dict(attention_block_q=8, attention_block_kv=8)
  model, _ = _model(attention_impl=impl, initializer_range=0.1, **hybrid, **blocks)
  tokens = np.random.default_rng(1).integers(0, 384, size=(2, 20))
  got = _logits(model, tokens)
  want = _manual_logits(model, tokens, [sparse, MaskSpec(causal=True), sparse])
  np.testing.assert_allclose(got, want, atol=1e-5)
  # The sparse mask matters: with an all-full stack (same parameters) the logits differ.
  dense, _ = _model(initializer_range=0.1, **{**hybrid, "layer_types": None}, **blocks)
  assert np.max(np.abs(_logits(dense, tokens) - got)) > 1e-3


def test_window_changes_only_the_sparse_layers():
  """A window that covers the whole row makes the sparse layers full: the hybrid then
  equals the dense model with the same parameters; the sinks change nothing there."""
  tokens = np.random.default_rng(2).integers(0, 384, size=(1, 12))
  kw = dict(num_layers=3, initializer_range=0.1)
  dense, _ = _model(**kw)
  wide, _ = _model(**kw, layer_types=longgen_layer_types(3), sparse_window=12, sparse_sinks=3)
  np.testing.assert_allclose(_logits(wide, tokens), _logits(dense, tokens), atol=1e-5)
  narrow, _ = _model(**kw, layer_types=longgen_layer_types(3), sparse_window=3, sparse_sinks=3)
  assert np.max(np.abs(_logits(narrow, tokens) - _logits(dense, tokens))) > 1e-3
  sparse = (("sinks", 3), ("window", 3))
  assert [narrow.layer(i).mask_fields for i in range(3)] == [sparse, (), sparse]


@pytest.mark.parametrize(
  "overrides, match",
  [
    (dict(layer_types=(SPARSE, "full_attention")), "model.sparse_window is not a positive"),
    (dict(layer_types=(SPARSE, SPARSE), sparse_window=0), "model.sparse_window is not a positive"),
    (dict(sparse_sinks=-1), "model.sparse_sinks=-1"),
    (dict(layer_types=("strided_attention",) * 2), "model.sparse_stride is not a positive"),
    (
      dict(layer_types=("strided_attention",) * 2, sparse_stride=4, sparse_block=0),
      "model.sparse_block=0 must be a positive integer",
    ),
    (dict(layer_types=("dilated_attention",) * 2), "'dilated_attention' is unknown"),
  ],
)
def test_bad_sparse_layer_config_is_one_clear_error(overrides, match):
  with pytest.raises(ValueError, match=match):
    _model(**overrides)


@pytest.mark.parametrize("hf_model_type", ["llama", "qwen2"])
def test_hf_export_refuses_sink_window_layers(hf_model_type):
  """transformers has no sink + window layer: exporting one must fail, not silently
  write a full-attention (llama) or unknown-layer (qwen2) config."""
  from lcjax.interop.hf import config_to_hf

  bias = dict(qkv_bias=True) if hf_model_type == "qwen2" else {}
  _, cfg = _model(
    hf_model_type=hf_model_type,
    num_layers=3,
    layer_types=longgen_layer_types(3),
    sparse_window=4,
    sparse_sinks=2,
    **bias,
  )
  with pytest.raises(ValueError, match="sink_window_attention"):
    config_to_hf(cfg)


def test_context_parallel_hybrid_with_pallas_ring_steps():
  """Under a mesh with context=2, impl="pallas" runs every ring step through the kernels
  (interpret mode on CPU); the hybrid model's logits equal the single-device reference."""
  from lcjax.parallel import make_mesh

  kw = dict(num_layers=3, layer_types=longgen_layer_types(3), sparse_window=5, sparse_sinks=2)
  blocks = dict(attention_block_q=8, attention_block_kv=8, initializer_range=0.1)
  model, _ = _model(attention_impl="pallas", **kw, **blocks)
  reference, _ = _model(attention_impl="reference", **kw, **blocks)
  tokens = np.random.default_rng(4).integers(0, 384, size=(2, 16))
  segment_ids = np.array([[1] * 6 + [2] * 10, [1] * 16])
  want = _logits(reference, tokens, segment_ids=segment_ids)
  with jax.set_mesh(make_mesh(dict(data=1, context=2), devices=jax.devices()[:2])):
    got = jax.jit(lambda t, s: model(t, segment_ids=s))(tokens, segment_ids)
  np.testing.assert_allclose(got, want, atol=1e-5)


def _hybrid(**overrides):
  fields = dict(
    num_layers=3,
    layer_types=("full_attention", "mamba2", "sliding_attention"),
    sliding_window=6,
    mamba=dict(d_state=8, head_dim=16, chunk_size=8),
    initializer_range=0.2,
  )
  return _model(seed=2, **{**fields, **overrides})


def test_hybrid_attention_mamba2_stack_generates_like_its_forward():
  """layer_types mixes attention and Mamba-2 layers; caches are per layer kind."""
  model, _ = _hybrid()
  assert model.layer(1).mixer is not None and model.layer(1).self_attn is None
  prompt = np.random.default_rng(4).integers(0, 384, size=(2, 6))
  out = np.asarray(generate(model, prompt, max_new_tokens=7))
  want = np.argmax(np.asarray(_logits(model, out[:, :-1])), axis=-1)[:, 5:]
  np.testing.assert_array_equal(out[:, 6:], want)


@pytest.mark.slow  # ~18 s; document masks and Mamba-2 state resets each have their own tests
def test_hybrid_packed_documents_equal_separate_documents():
  """Document masks (attention) and state resets (Mamba-2) keep packed documents apart."""
  model, _ = _hybrid(attention_block_q=4, attention_block_kv=4)
  rng = np.random.default_rng(5)
  doc_a, doc_b = rng.integers(3, 300, size=9), rng.integers(3, 300, size=11)
  packed = np.concatenate([doc_a, doc_b])[None]
  segment_ids = np.array([[1] * 9 + [2] * 11])
  positions = np.array([list(range(9)) + list(range(11))])
  logits = _logits(model, packed, positions=positions, segment_ids=segment_ids)
  np.testing.assert_allclose(logits[0, 9:], _logits(model, doc_b[None])[0], atol=1e-4)
  with pytest.raises(NotImplementedError, match="mesh.context=1"):
    model(packed, token_index=np.arange(20)[None])
  with pytest.raises(ValueError, match="mamba"):
    _hybrid(mamba=dict(d_state=8, head_dim=7))  # expand * d_model not divisible by head_dim
