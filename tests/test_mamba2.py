"""Mamba-2 LM: transformers parity both ways, generation, exact document resets, configs."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from hf_fixtures import randomize_
from safetensors.numpy import load_file, save_file

from lcjax.config import ConfigError
from lcjax.interop.hf import (
  CheckpointError,
  config_from_hf,
  config_to_hf,
  load_pretrained,
  save_pretrained,
)
from lcjax.models import build_model, generate, mamba2_config
from lcjax.models.mamba2 import Mamba2LM

# float32 end to end, as for the transformer families (tests/test_hf_interop.py).
ATOL = 1e-4
VOCAB = 128

# Two tiny transformers configs: groups, Δ limits, biases, padding inside the chunked
# scan (64 tokens, chunk 24); and tied embeddings, one group, a bf16-style residual.
HF_CASES = {
  "groups_limits_bias": dict(n_groups=2, chunk_size=24, time_step_limit=(0.05, 0.8), use_bias=True),
  "tied_one_group": dict(
    n_groups=1, chunk_size=16, tie_word_embeddings=True, residual_in_fp32=False, conv_kernel=3
  ),
}


def _hf_config(**overrides) -> transformers.Mamba2Config:
  kwargs = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    state_size=16,
    expand=2,
    head_dim=16,
    num_heads=8,
    n_groups=2,
    conv_kernel=4,
    chunk_size=16,
    # No special tokens: greedy generation in transformers must not stop at an eos.
    eos_token_id=None,
    bos_token_id=None,
    pad_token_id=None,
  )
  kwargs.update(overrides)
  return transformers.Mamba2Config(**kwargs)


def _hf_model(config, seed=0):
  model = transformers.Mamba2ForCausalLM(config)
  randomize_(model, seed)  # every weight large enough that a mismatch shows
  return model.eval()


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.as_tensor(tokens, dtype=torch.long), use_cache=False).logits.numpy()


def _tokens(seed=0, shape=(2, 64)):
  return np.random.default_rng(seed).integers(0, VOCAB, size=shape)


def _random_lcjax(cfg, seed):
  """An lcjax model with weights large enough that logits vary (as hf_fixtures.randomize_).

  Built abstractly and filled by one jitted function (eager init is slow on CPU).
  """
  graphdef, state = nnx.split(nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0))))
  leaves_with_paths, treedef = jax.tree.flatten_with_path(state)
  specs = [(x.shape, "norm" in jax.tree_util.keystr(p)) for p, x in leaves_with_paths]

  @jax.jit
  def fill(key):
    keys = jax.random.split(key, len(specs))
    return [
      1.0 + 0.2 * jax.random.normal(k, shape)
      if len(shape) == 1 and is_norm
      else 0.15 * jax.random.normal(k, shape)
      for k, (shape, is_norm) in zip(keys, specs, strict=True)
    ]

  return nnx.merge(graphdef, jax.tree.unflatten(treedef, fill(jax.random.key(seed))))


# One small random model shared by the lcjax-only tests (building one costs seconds on CPU).
SMALL = dict(vocab_size=VOCAB, d_model=32, head_dim=16, n_groups=2, chunk_size=4, num_layers=1)


@pytest.fixture(scope="module")
def small_model():
  return _random_lcjax(mamba2_config(**SMALL), seed=4)


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_load_pretrained_matches_transformers(tmp_path, case):
  torch_model = _hf_model(_hf_config(**HF_CASES[case]))
  torch_model.save_pretrained(tmp_path)
  tokens = _tokens()
  want = _hf_logits(torch_model, tokens)
  assert want.std() > 1.0  # the weights are large enough for a mismatch to show

  model, cfg = load_pretrained(str(tmp_path))
  assert isinstance(model, Mamba2LM) and cfg.family == "mamba2"
  got = np.asarray(jax.jit(lambda t: model(t))(tokens))
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_save_pretrained_loads_in_transformers(tmp_path, case):
  cfg = config_from_hf(_hf_config(**HF_CASES[case]).to_dict())
  model = _random_lcjax(cfg, seed=3)
  save_pretrained(model, cfg, str(tmp_path / "out"))

  loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
  assert type(loaded).__name__ == "Mamba2ForCausalLM"
  tokens = _tokens(seed=1)
  want = np.asarray(jax.jit(lambda t: model(t))(tokens))
  assert want.std() > 1.0
  np.testing.assert_allclose(_hf_logits(loaded.eval(), tokens), want, atol=ATOL, rtol=0)

  reloaded, cfg2 = load_pretrained(str(tmp_path / "out"))
  assert cfg2.to_dict() == cfg.to_dict()
  same = jax.tree.map(np.array_equal, nnx.state(reloaded, nnx.Param), nnx.state(model, nnx.Param))
  assert all(jax.tree.leaves(same))


def test_generate_equals_argmax_of_full_forward_and_transformers(tmp_path):
  torch_model = _hf_model(_hf_config(chunk_size=8), seed=2)
  torch_model.save_pretrained(tmp_path)
  model, _ = load_pretrained(str(tmp_path))
  prompt = _tokens(seed=2, shape=(2, 11))
  new = 9

  out = np.asarray(generate(model, prompt, max_new_tokens=new))
  assert out.shape == (2, 11 + new)
  np.testing.assert_array_equal(out[:, :11], prompt)
  full = np.asarray(jax.jit(lambda t: model(t))(out))
  np.testing.assert_array_equal(out[:, 11:], full[:, 10:-1].argmax(-1))

  with torch.no_grad():  # transformers' own recurrent decoding agrees
    hf_out = torch_model.generate(torch.as_tensor(prompt), max_new_tokens=new, do_sample=False)
  np.testing.assert_array_equal(out, hf_out.numpy())


def test_decode_in_pieces_equals_full_forward(small_model):
  """Prefill (chunked, with cache) + single steps + a second chunk == one forward pass."""
  model = small_model
  tokens = _tokens(seed=4, shape=(2, 16))
  want = np.asarray(jax.jit(lambda t: model(t))(tokens))

  decode = jax.jit(lambda t, c: model.decode(t, c, 0))
  caches = model.init_cache(2, 16)
  pieces = []
  for lo, hi in ((0, 7), (7, 8), (8, 9), (9, 16)):
    logits, caches = decode(tokens[:, lo:hi], caches)
    pieces.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(pieces, axis=1), want, atol=1e-5, rtol=0)


def test_segment_ids_reset_state_exactly(small_model):
  """Packed documents give the logits of each document run alone (state and conv reset)."""
  model = small_model
  lengths = (13, 2, 21)  # a boundary inside a chunk, a document shorter than the conv
  tokens = _tokens(seed=5, shape=(1, sum(lengths)))
  segment_ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])[None]
  starts = np.cumsum((0,) + lengths[:-1])
  # Each document alone, right-padded into one batch (causal: the padding changes nothing).
  alone = np.zeros((len(lengths), max(lengths)), np.int64)
  for i, (start, n) in enumerate(zip(starts, lengths, strict=True)):
    alone[i, :n] = tokens[0, start : start + n]

  @jax.jit
  def run(tokens, segment_ids, alone):
    one_doc = model(tokens, segment_ids=jnp.ones_like(tokens))
    return model(tokens, segment_ids=segment_ids), model(alone), model(tokens), one_doc

  packed, separate, unpacked, one_doc = map(np.asarray, run(tokens, segment_ids, alone))
  for i, (start, n) in enumerate(zip(starts, lengths, strict=True)):
    np.testing.assert_allclose(packed[0, start : start + n], separate[i, :n], atol=1e-5, rtol=0)
  assert np.abs(packed[0, 13:] - unpacked[0, 13:]).max() > 1e-2  # the reset does something
  np.testing.assert_allclose(one_doc, unpacked, atol=1e-5, rtol=0)  # rounding only


def test_token_index_permuted_rows_match(small_model):
  """A context-parallel layout permutes a row and passes token_index: same logits, permuted."""
  model = small_model
  tokens = _tokens(seed=8, shape=(2, 16))
  segment_ids = np.repeat(np.array([[1] * 5 + [2] * 11]), 2, axis=0)
  perm = np.random.default_rng(8).permutation(16)  # slot j holds row position perm[j]

  @jax.jit
  def run(tokens, segment_ids):
    plain = model(tokens, segment_ids=segment_ids)
    permuted = model(
      tokens[:, perm], segment_ids=segment_ids[:, perm], token_index=jnp.asarray(perm)[None]
    )
    return plain, permuted

  plain, permuted = run(tokens, segment_ids)
  np.testing.assert_allclose(np.asarray(permuted), np.asarray(plain)[:, perm], atol=1e-6, rtol=0)


def _loss_and_grad(model_cfg, params, tokens, segment_ids):
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: build_model(model_cfg, rngs=nnx.Rngs(0))))

  def loss(params):
    m = nnx.merge(graphdef, params)
    h, _ = m.hidden_states(tokens, segment_ids=segment_ids)
    return jnp.mean(jax.nn.logsumexp(m.logits(h), axis=-1))

  return jax.jit(jax.value_and_grad(loss))(params)


def test_sequential_impl_matches_chunked(small_model):
  model = small_model
  sequential_cfg = mamba2_config(**SMALL, ssd_impl="sequential")
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: build_model(sequential_cfg, rngs=nnx.Rngs(0))))
  reference = nnx.merge(graphdef, nnx.state(model))
  tokens = _tokens(seed=6, shape=(2, 20))
  segment_ids = np.repeat(np.array([[1] * 9 + [2] * 11]), 2, axis=0)
  got, want = jax.jit(lambda t, s: (model(t, segment_ids=s), reference(t, segment_ids=s)))(
    tokens, segment_ids
  )
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("override", [dict(ssd_impl="sequential"), dict(remat="full")])
def test_gradients_of_sequential_impl_and_remat_match(override):
  cfg = mamba2_config(**SMALL)
  params = nnx.state(_random_lcjax(cfg, seed=6), nnx.Param)
  tokens = _tokens(seed=6, shape=(2, 20))
  segment_ids = np.repeat(np.array([[1] * 9 + [2] * 11]), 2, axis=0)
  want_loss, want_grad = _loss_and_grad(cfg, params, tokens, segment_ids)
  other = mamba2_config(**{**cfg.to_dict(), **override})
  got_loss, got_grad = _loss_and_grad(other, params, tokens, segment_ids)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5 * float(np.abs(b).max()) + 1e-7)


def test_config_round_trip_and_params_are_float32():
  cfg = mamba2_config(n_groups=2, time_step_limit=(0.0, 0.5), use_bias=True, tie_embeddings=True)
  assert config_from_hf(config_to_hf(cfg)).to_dict() == cfg.to_dict()
  hf = config_to_hf(cfg)
  assert hf["num_heads"] * hf["head_dim"] == hf["expand"] * hf["hidden_size"]
  transformers.Mamba2Config(**{k: v for k, v in hf.items() if k != "model_type"})  # valid there
  small = dict(vocab_size=VOCAB, d_model=32, head_dim=16, num_layers=1, dtype="bfloat16")
  model = build_model(mamba2_config(**small), rngs=nnx.Rngs(0))
  assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype("float32")}
  logits = jax.jit(lambda t: model(t))(_tokens(shape=(1, 10)))
  assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize(
  "overrides, match",
  [
    (dict(head_dim=30), "not divisible by model.head_dim"),
    (dict(n_groups=3), "must divide the number of heads"),
    (dict(time_step_limit=(0.5, 0.1)), "time_step_limit"),
    (dict(d_conv=0), "model.d_conv=0 must be a positive integer"),
    (dict(ssd_impl="fast"), "model.ssd_impl='fast' is unknown"),
    (dict(dt_min=0.0), "dt_min"),
  ],
)
def test_bad_model_config_raises(overrides, match):
  with pytest.raises(ConfigError, match=match):
    build_model(mamba2_config(**overrides), rngs=nnx.Rngs(0))


def test_unknown_config_field_raises():
  with pytest.raises(ConfigError, match="has no field 'num_kv_heads'"):
    mamba2_config(num_kv_heads=2)


@pytest.mark.parametrize(
  "overrides, match",
  [
    (dict(norm_before_gate=True), "norm_before_gate=True is not supported"),
    (dict(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
    (dict(num_heads=4), "num_heads\\*head_dim=64 must equal expand\\*hidden_size=128"),
    (dict(rms_norm=False), "rms_norm=False is not supported"),
  ],
)
def test_bad_hf_config_raises(overrides, match):
  hf = {**config_to_hf(mamba2_config(d_model=64, head_dim=16)), **overrides}
  with pytest.raises(CheckpointError, match=match):
    config_from_hf(hf)
  missing = {k: v for k, v in hf.items() if k != "hidden_size"}
  with pytest.raises(CheckpointError, match="required key 'hidden_size' is missing"):
    config_from_hf(missing)


def test_checkpoint_errors_and_old_embedding_name(tmp_path):
  cfg = mamba2_config(vocab_size=VOCAB, d_model=32, head_dim=16, num_layers=1)
  model = _random_lcjax(cfg, seed=7)
  save_pretrained(model, cfg, str(tmp_path))
  weights = os.path.join(tmp_path, "model.safetensors")
  tensors = load_file(weights)

  # mamba_ssm-era name for the embedding: accepted, as transformers does.
  renamed = dict(tensors)
  renamed["backbone.embedding.weight"] = renamed.pop("backbone.embeddings.weight")
  save_file(renamed, weights, metadata={"format": "pt"})
  loaded, _ = load_pretrained(str(tmp_path))
  same = jax.tree.map(np.array_equal, nnx.state(loaded, nnx.Param), nnx.state(model, nnx.Param))
  assert all(jax.tree.leaves(same))

  save_file({k: v for k, v in tensors.items() if "A_log" not in k}, weights)
  with pytest.raises(CheckpointError, match="'backbone.layers.0.mixer.A_log' is missing"):
    load_pretrained(str(tmp_path))
  save_file({**tensors, "backbone.layers.0.mixer.extra": np.zeros(2, np.float32)}, weights)
  with pytest.raises(CheckpointError, match="'backbone.layers.0.mixer.extra' .* has no place"):
    load_pretrained(str(tmp_path))
  conv = "backbone.layers.0.mixer.conv1d.weight"
  save_file({**tensors, conv: tensors[conv][:, :, :3].copy()}, weights)
  with pytest.raises(CheckpointError, match="conv1d.weight' has shape"):
    load_pretrained(str(tmp_path))

  with open(os.path.join(tmp_path, "config.json")) as f:
    assert json.load(f)["model_type"] == "mamba2"


# State-collapse mitigations as model knobs (Chen et al. 2024, "Stuffed Mamba", §5).


def _with_config(model, **overrides):
  """The same weights under a config with `overrides` (mitigation knobs)."""
  cfg = mamba2_config(**SMALL, **overrides)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, nnx.state(model))


def test_mitigations_off_and_neutral_settings_equal_the_baseline(small_model):
  """M1 factors 1 is the baseline bit for bit; M2 with a huge cap and M3 with r ≥ T match it."""
  tokens = _tokens(seed=9, shape=(2, 20))
  want = np.asarray(jax.jit(lambda t: small_model(t))(tokens))
  m1 = _with_config(small_model, decay_scale=1.0, input_scale=1.0)
  np.testing.assert_array_equal(np.asarray(jax.jit(lambda t: m1(t))(tokens)), want)
  for knobs in (dict(state_norm_max=1e30), dict(state_window=20), dict(state_window=64)):
    model = _with_config(small_model, **knobs)
    got = np.asarray(jax.jit(lambda t, model=model: model(t))(tokens))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=str(knobs))
  short = _with_config(small_model, state_window=3)
  assert np.abs(np.asarray(jax.jit(lambda t: short(t))(tokens)) - want).max() > 1e-3


def test_decay_scale_equals_shifting_A_log(small_model):
  """M1's decay factor c multiplies A: the same as A_log + log c (and input_scale matters)."""
  tokens = _tokens(seed=10, shape=(1, 16))
  scaled = _with_config(small_model, decay_scale=2.0)
  shifted = nnx.clone(small_model)  # edited below; the shared fixture must stay intact
  for layer in shifted.layers:
    layer.mixer.A_log[...] = layer.mixer.A_log[...] + jnp.log(2.0)
  got, want, base = jax.jit(lambda t: (scaled(t), shifted(t), small_model(t)))(tokens)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  assert np.abs(np.asarray(got) - np.asarray(base)).max() > 1e-3
  less = _with_config(small_model, input_scale=0.5)
  assert np.abs(np.asarray(jax.jit(lambda t: less(t))(tokens)) - np.asarray(base)).max() > 1e-3


def test_state_norm_cap_decodes_like_its_full_forward(small_model):
  """M2 runs the recurrent form everywhere, so decoding step by step equals the forward pass."""
  model = _with_config(small_model, state_norm_max=0.05)
  tokens = _tokens(seed=11, shape=(2, 12))
  want = np.asarray(jax.jit(lambda t: model(t))(tokens))
  base = np.asarray(jax.jit(lambda t: small_model(t))(tokens))
  assert np.abs(want - base).max() > 1e-3  # the cap binds
  decode = jax.jit(lambda t, c: model.decode(t, c, 0))
  caches, pieces = model.init_cache(2, 12), []
  for lo, hi in ((0, 5), (5, 6), (6, 7), (7, 12)):
    logits, caches = decode(tokens[:, lo:hi], caches)
    pieces.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(pieces, axis=1), want, atol=1e-5, rtol=0)
  assert float(jnp.sqrt(jnp.sum(jnp.square(caches[0].ssm_BHPN), axis=(2, 3))).max()) <= 0.05 + 1e-6


def test_state_window_rejects_a_cache_and_bad_knobs_raise(small_model):
  model = _with_config(small_model, state_window=4)
  with pytest.raises(ValueError, match="state_window"):
    model.decode(_tokens(shape=(1, 3)), model.init_cache(1), 0)
  for knobs, match in (
    (dict(decay_scale=0.5), "decay_scale=0.5 must be >= 1"),
    (dict(input_scale=1.5), "input_scale=1.5 must be in"),
    (dict(state_norm_max=-1.0), "state_norm_max=-1.0 must be >= 0"),
    (dict(state_window=-2), "state_window=-2 must be"),
    (dict(state_window=4, state_norm_max=1.0), "cannot both be set"),
  ):
    with pytest.raises(ConfigError, match=match):
      build_model(mamba2_config(**knobs), rngs=nnx.Rngs(0))


def test_state_norm_statistics_shapes_and_mitigations(small_model):
  from lcjax.eval.state_capacity import state_norm_statistics

  tokens = _tokens(seed=12, shape=(2, 40))
  stats = state_norm_statistics(small_model, tokens, every=8)
  H, N = small_model.layers[0].mixer.num_heads, small_model.layers[0].mixer.d_state
  np.testing.assert_array_equal(stats["positions"], [8, 16, 24, 32, 40])
  assert stats["max_abs"].shape == stats["mean_norm"].shape == (1, 5)
  assert stats["channel_max_abs"].shape == (1, 5, H, N)
  assert np.all(stats["max_abs"] > 0) and np.all(np.isfinite(stats["mean_norm"]))
  np.testing.assert_allclose(stats["max_abs"], stats["channel_max_abs"].max(axis=(2, 3)))
  capped = state_norm_statistics(_with_config(small_model, state_norm_max=0.05), tokens, every=8)
  assert capped["mean_norm"].max() <= 0.05 + 1e-6 < stats["mean_norm"].max()
  windowed = state_norm_statistics(_with_config(small_model, state_window=4), tokens, every=8)
  assert windowed["max_abs"].shape == (1, 5)
