"""Scanned layers (`model.scan_layers`), chunked MLPs and their per-layer conversions.

Every optimized path against its simple twin: the scanned stack against the unrolled
loop (logits, gradients, decoding), the chunked MLP against one chunk, and stacked
parameters against the per-layer names that Hugging Face files, freeze regexes and
checkpoints of unrolled models use. float32 throughout: the twins run the same ops in
another order, so 1e-5 relative is summation-order noise, not an approximation.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcjax.config import ConfigError
from lcjax.interop.native import load_params, save_params
from lcjax.models import build_model, generate, llama_config
from lcjax.models.stacking import stack_layers, unstack_layers
from lcjax.models.transformer import token_chunks
from lcjax.parallel.mesh import make_mesh
from lcjax.parallel.sharding import param_logical_axes
from lcjax.train.checkpoint import Checkpointer
from lcjax.train.optim import _decay_mask

RTOL, ATOL = 1e-5, 1e-6
KW = dict(num_layers=3, initializer_range=0.1, dtype="float32")


def _pair(**overrides):
  kw = {**KW, **overrides}
  scanned = build_model(llama_config(**kw), rngs=nnx.Rngs(0))
  unrolled = build_model(llama_config(**kw, scan_layers=False), rngs=nnx.Rngs(0))
  assert scanned.scan_layers and not unrolled.scan_layers
  return scanned, unrolled


def _pure(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=RTOL, atol=ATOL), a, b)


def test_scanned_stack_initializes_as_the_stacked_unrolled_layers():
  scanned, unrolled = _pair()
  assert scanned.layers.mlp.gate_proj.kernel.shape == (3, 128, 352)
  jax.tree.map(np.testing.assert_array_equal, _pure(scanned), stack_layers(_pure(unrolled)))
  jax.tree.map(np.testing.assert_array_equal, unstack_layers(_pure(scanned)), _pure(unrolled))


@pytest.mark.parametrize(
  "overrides", [dict(), dict(sliding_window=5, remat="full"), dict(anchor=True, remat="offload")]
)
def test_scanned_equals_unrolled_logits_and_gradients(overrides):
  scanned, unrolled = _pair(**overrides)
  tokens = np.random.default_rng(0).integers(0, 384, size=(2, 16))
  segments = np.array([[1] * 6 + [2] * 10, [1] * 16])
  positions = np.concatenate([np.arange(6), np.arange(10)])[None].repeat(2, 0)

  def loss_and_grads(model):
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p):
      logits = nnx.merge(graphdef, p)(tokens, positions=positions, segment_ids=segments)
      return jnp.mean(logits**2), logits

    (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return value, logits, nnx.to_pure_dict(grads)

  value_s, logits_s, grads_s = loss_and_grads(scanned)
  value_u, logits_u, grads_u = loss_and_grads(unrolled)
  np.testing.assert_allclose(logits_s, logits_u, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(value_s, value_u, rtol=RTOL)
  _close(grads_s, stack_layers(grads_u))


def test_scanned_model_decodes_like_the_unrolled_one():
  scanned, unrolled = _pair()
  prompt = np.random.default_rng(1).integers(0, 384, size=(2, 7))
  out_s = generate(scanned, prompt, max_new_tokens=5)
  out_u = generate(unrolled, prompt, max_new_tokens=5)
  np.testing.assert_array_equal(out_s, out_u)
  assert scanned.layer(2).mlp.up_proj.kernel.shape == (128, 352)


def test_scan_layers_is_off_for_hybrids_and_refused_when_forced():
  kinds = ("sliding_attention", "full_attention")
  hybrid = build_model(
    llama_config(num_layers=2, sliding_window=4, layer_types=kinds), rngs=nnx.Rngs(0)
  )
  assert not hybrid.scan_layers
  with pytest.raises(ConfigError, match="model.scan_layers=True needs layers of one attention"):
    build_model(
      llama_config(num_layers=2, sliding_window=4, layer_types=kinds, scan_layers=True),
      rngs=nnx.Rngs(0),
    )


def test_stacked_parameters_shard_with_a_leading_layer_axis_and_decay_per_layer_rank():
  assert param_logical_axes("layers/mlp/gate_proj/kernel", 3) == ("layers", "embed", "mlp")
  assert param_logical_axes("layers/2/mlp/gate_proj/kernel", 2) == ("embed", "mlp")
  assert param_logical_axes("layers/input_layernorm/scale", 2) == (None, None)
  scanned, _ = _pair()
  decay = _decay_mask(_pure(scanned))
  assert decay["layers"]["mlp"]["gate_proj"]["kernel"]
  assert not decay["layers"]["input_layernorm"]["scale"]  # [L, D]: a norm scale per layer
  assert decay["embed_tokens"]["embedding"] and not decay["norm"]["scale"]


def test_checkpoints_of_unrolled_models_restore_into_scanned_ones_and_back(tmp_path):
  scanned, unrolled = _pair()
  # A params folder written before model.scan_layers (per-layer names) loads stacked.
  save_params(unrolled, llama_config(**KW, scan_layers=False), str(tmp_path / "old"))
  config_file = tmp_path / "old" / "model_config.json"
  old_cfg = json.loads(config_file.read_text())
  del old_cfg["scan_layers"]  # as written before the field existed
  config_file.write_text(json.dumps(old_cfg))
  loaded, cfg = load_params(str(tmp_path / "old"))
  assert loaded.scan_layers
  jax.tree.map(np.testing.assert_array_equal, _pure(loaded), _pure(scanned))
  # Train-state checkpoints (params and optimizer moments), both directions.
  state_u = {"params": _pure(unrolled), "opt": ({"mu": _pure(unrolled)},)}
  state_s = {"params": _pure(scanned), "opt": ({"mu": _pure(scanned)},)}
  for written, wanted, name in ((state_u, state_s, "u"), (state_s, state_u, "s")):
    ckpt = Checkpointer(str(tmp_path / name), keep=2, async_save=False)
    ckpt.save(3, written, {"pos": 1})
    ckpt.wait()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), wanted)
    step, restored, data = ckpt.restore_latest(abstract)
    assert (step, data) == (3, {"pos": 1})
    jax.tree.map(np.testing.assert_array_equal, restored, wanted)
    ckpt.close()
    ckpt = Checkpointer(str(tmp_path / name), keep=2, async_save=False)  # as evaluation does
    _, params = ckpt.restore_params(abstract["params"])
    jax.tree.map(np.testing.assert_array_equal, params, wanted["params"])
    ckpt.close()


@pytest.mark.parametrize("T, chunk", [(32, 8), (30, 8)])  # exact chunks; a padded last chunk
def test_chunked_mlp_equals_one_chunk(T, chunk):
  scanned, _ = _pair()
  chunked = build_model(llama_config(**KW, mlp_chunk=chunk), rngs=nnx.Rngs(0))
  tokens = np.random.default_rng(3).integers(0, 384, size=(2, T))

  def grads(model):
    graphdef, params = nnx.split(model, nnx.Param)
    loss = lambda p: jnp.mean(nnx.merge(graphdef, p)(tokens) ** 2)  # noqa: E731
    return jax.jit(jax.value_and_grad(loss))(params)

  (value_c, grads_c), (value_1, grads_1) = grads(chunked), grads(scanned)
  np.testing.assert_allclose(value_c, value_1, rtol=RTOL)
  _close(nnx.to_pure_dict(grads_c), nnx.to_pure_dict(grads_1))


def test_token_chunks_stay_inside_context_shards():
  """On a context mesh each chunk takes `chunk` tokens of every shard, in shard order."""
  mesh = make_mesh(dict(data=1, fsdp=2, tensor=1, context=4))
  x_BTD = jnp.arange(2 * 64 * 3, dtype=jnp.float32).reshape(2, 64, 3)
  seen = []

  def fn(x_BTD):
    seen.append(x_BTD.shape)
    return x_BTD * 2.0 + jnp.cumsum(x_BTD, axis=1) * 0.0  # token-wise value, whole-array op

  with jax.set_mesh(mesh):
    y_BTD = jax.jit(lambda x: token_chunks(fn, x, 4))(x_BTD)
  np.testing.assert_array_equal(y_BTD, x_BTD * 2.0)
  assert seen == [(2, 16, 3)]  # 4 shards x 4 tokens per chunk, traced once in the scan
  with pytest.raises(ConfigError, match="model.mlp_chunk=-1"):
    build_model(llama_config(mlp_chunk=-1), rngs=nnx.Rngs(0))
