"""RoPE paper variants (abf, eabf, giraffe, nope, ntk), untuned-study keys, model-level identities
(dynamic NTK = trained at <= T0, = fixed NTK-aware at s * T0), partial rotary, the registry, bad
input."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_rope import _rotate, _theta

from lcjax.models import build_model, llama_config
from lcjax.positional import rope, rope_variants
from lcjax.train.run_model import model_from_params

# ------------------------------------------------------------------------------------------------
# lcjax additions.


def test_eabf_query_scale_and_base():
  params = rope.standardize_rope_parameters(
    {
      "rope_parameters": {"rope_type": "eabf", "original_max_position_embeddings": 4096},
      "rope_theta": 5e5,
    }
  )
  positions_BT = jnp.array([[0, 1, 4094, 4095, 8191, 16383]], dtype=jnp.int32)
  scale_BT = rope.query_scale(params, positions_BT)
  assert scale_BT.shape == (1, 6) and scale_BT.dtype == jnp.float32
  # ln(pos + 1) / ln(4096), floored at 1: 8192 = 2^13 and 16384 = 2^14 against 4096 = 2^12.
  np.testing.assert_allclose(scale_BT, [[1.0, 1.0, 1.0, 1.0, 13 / 12, 14 / 12]], rtol=1e-6)
  inv_freq, attention_factor = rope.compute_inv_freq(params, 128)
  np.testing.assert_allclose(np.asarray(inv_freq, np.float64), _theta(5e5, 128), rtol=1e-6)
  assert attention_factor == 1.0
  for other in (
    {"rope_type": "default", "rope_theta": 1e4},
    {"rope_type": "abf", "rope_theta": 5e5},
    {
      "rope_type": "yarn",
      "rope_theta": 1e4,
      "factor": 4.0,
      "original_max_position_embeddings": 4096,
    },
  ):
    assert rope.query_scale(other, positions_BT) is None


def test_eabf_theta_defaults_to_the_reference_base():
  """GAIR-NLP/Entropy-ABF builds eabf's rotary embedding with base 500000: lcjax uses it when
  neither the dict nor the HF config sets rope_theta (HF's 10000 would drop the ABF half); an
  explicit base still wins, and the HF types keep HF's default."""
  params = {"rope_type": "eabf", "original_max_position_embeddings": 4096}
  inv_freq, _ = rope.compute_inv_freq(params, 128)
  np.testing.assert_allclose(np.asarray(inv_freq, np.float64), _theta(5e5, 128), rtol=1e-6)
  assert rope.standardize_rope_parameters({"rope_parameters": params})["rope_theta"] == 5e5
  explicit = rope.standardize_rope_parameters({"rope_parameters": params, "rope_theta": 1e6})
  assert explicit["rope_theta"] == 1e6
  plain = rope.standardize_rope_parameters({"rope_parameters": {"rope_type": "default"}})
  assert plain["rope_theta"] == rope.DEFAULT_ROPE_THETA


def test_eabf_unscaled_layers_flags_and_validation():
  """`eabf_unscaled_layers` (default 2, the paper's) picks the layers that apply the query
  scale; 0 scales every layer (what the released code may do). It belongs to eabf only."""
  base = {"rope_type": "eabf", "rope_theta": 5e5, "original_max_position_embeddings": 4096}
  assert rope.query_scale_layers(base, 4) == (False, False, True, True)
  assert rope.query_scale_layers({**base, "eabf_unscaled_layers": 0}, 4) == (True,) * 4
  assert rope.query_scale_layers({**base, "eabf_unscaled_layers": 5}, 4) == (False,) * 4
  assert rope.query_scale_layers({"rope_type": "abf", "rope_theta": 5e5}, 4) is None
  # It round-trips through config.json's rope_parameters like any other key of the type.
  fields = rope.to_hf_rope_fields({**base, "eabf_unscaled_layers": 0})
  assert rope.standardize_rope_parameters(fields)["eabf_unscaled_layers"] == 0
  for bad in (-1, 1.5, True, "2"):
    with pytest.raises(ValueError, match=r"'eabf_unscaled_layers'\] must be an integer >= 0"):
      rope.validate_rope_parameters({**base, "eabf_unscaled_layers": bad})
  with pytest.raises(ValueError, match=r"applies only to rope_type 'eabf', not 'abf'"):
    rope.validate_rope_parameters(
      {"rope_type": "abf", "rope_theta": 5e5, "eabf_unscaled_layers": 2}
    )


def test_abf_equals_default_with_its_theta():
  abf, _ = rope.compute_inv_freq({"rope_type": "abf", "rope_theta": 5e5}, 128)
  np.testing.assert_allclose(np.asarray(abf, np.float64), _theta(5e5, 128), rtol=1e-6)


@pytest.mark.parametrize("factor,scale_power", [(None, None), (4.0, None), (1.0, 0.5)])
def test_giraffe_truncated_basis(factor, scale_power):
  truncate_wavelength = 1000
  params = {"rope_type": "giraffe", "rope_theta": 1e4, "truncate_wavelength": truncate_wavelength}
  if factor is not None:
    params["factor"] = factor
  if scale_power is not None:
    params["scale_power"] = scale_power
  inv_freq, attention_factor = rope.compute_inv_freq(params, 128)
  got = np.asarray(inv_freq, np.float64)
  freq = _theta(1e4, 128) / (factor or 1.0)
  if scale_power:
    freq = freq * (1 - np.arange(64) / 64) ** scale_power
  cutoff = 2 * math.pi / truncate_wavelength
  keep, low = freq >= cutoff, (freq >= cutoff / 8) & (freq < cutoff)
  assert keep.any() and low.any() and (~keep & ~low).any()  # All three bands are exercised.
  np.testing.assert_allclose(got[keep], freq[keep], rtol=1e-6)
  np.testing.assert_allclose(got[low], 2 * math.pi / (16 * truncate_wavelength), rtol=1e-6)
  np.testing.assert_array_equal(got[~keep & ~low], 0.0)
  assert attention_factor == 1.0


def test_giraffe_truncation_off_is_linear():
  params = {"rope_type": "giraffe", "rope_theta": 1e4, "truncate_wavelength": 0, "factor": 4.0}
  inv_freq, _ = rope.compute_inv_freq(params, 64)
  np.testing.assert_allclose(np.asarray(inv_freq, np.float64), _theta(1e4, 64) / 4, rtol=1e-6)


def test_nope_is_identity():
  params = rope.standardize_rope_parameters({"rope_parameters": {"rope_type": "nope"}})
  inv_freq, attention_factor = rope.compute_inv_freq(params, 64)
  np.testing.assert_array_equal(inv_freq, np.zeros(32))
  x_BTHD = jnp.asarray(np.random.default_rng(1).standard_normal((2, 9, 3, 64)), jnp.float32)
  positions_BT = jnp.broadcast_to(jnp.arange(9) * 1000, (2, 9))
  np.testing.assert_array_equal(_rotate(params, 64, x_BTHD, positions_BT), x_BTHD)
  assert attention_factor == 1.0


@pytest.mark.parametrize("factor,head_dim", [(4.0, 128), (16.0, 32)])
def test_ntk_aware_base(factor, head_dim):
  """bloc97's fixed NTK-aware RoPE: base' = base * s^(d/(d-2)); the last pair is PI's, the first
  unchanged."""
  params = {"rope_type": "ntk", "rope_theta": 100.0, "factor": factor}
  inv_freq, attention_factor = rope.compute_inv_freq(params, head_dim)
  got = np.asarray(inv_freq, np.float64)
  base = 100.0 * factor ** (head_dim / (head_dim - 2))
  np.testing.assert_allclose(got, _theta(base, head_dim), rtol=1e-6)
  np.testing.assert_allclose(got[-1], _theta(100.0, head_dim)[-1] / factor, rtol=1e-6)
  assert got[0] == 1.0 and attention_factor == 1.0
  with pytest.raises(ValueError, match="rotary dim > 2"):
    rope.compute_inv_freq(params, 2)


def test_longrope_factors_are_the_yarn_ramp():
  """`longrope` with `longrope_factors` has YaRN's frequencies above T0 and the trained ones at
  or below it; only the attention factor differs (sqrt(1 + ln s / ln T0))."""
  head_dim, theta, factor, t0 = 32, 100.0, 4.0, 128
  keys = rope_variants.longrope_factors(head_dim, theta, factor, t0)
  assert keys["short_factor"] == [1.0] * 16 and len(keys["long_factor"]) == 16
  long_factor = np.asarray(keys["long_factor"])
  assert long_factor[0] == 1.0 and long_factor[-1] == pytest.approx(factor)
  assert np.all(np.diff(long_factor) >= 0), "LongRoPE's monotone constraint"
  params = {
    "rope_type": "longrope",
    "rope_theta": theta,
    "factor": factor,
    "original_max_position_embeddings": t0,
    **keys,
  }
  yarn = {k: params[k] for k in ("rope_theta", "factor", "original_max_position_embeddings")}
  yarn_inv_freq, _ = rope.compute_inv_freq({"rope_type": "yarn", **yarn}, head_dim)
  long_inv_freq, attention_factor = rope.compute_inv_freq(params, head_dim, seq_len=4 * t0)
  short_inv_freq, _ = rope.compute_inv_freq(params, head_dim, seq_len=t0)
  np.testing.assert_allclose(long_inv_freq, yarn_inv_freq, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(short_inv_freq, np.float64), _theta(theta, 32), rtol=1e-6)
  assert attention_factor == pytest.approx(math.sqrt(1 + math.log(factor) / math.log(t0)))


def test_giraffe_truncate_wavelength_keeps_what_pretraining_cycled():
  """With truncate_wavelength = s * T0, exactly the pairs whose unscaled wavelength is <= T0 (a
  full cycle in pretraining) keep their linearly scaled frequency."""
  head_dim, theta, factor, t0 = 32, 100.0, 4.0, 128
  params = {
    "rope_type": "giraffe",
    "rope_theta": theta,
    "factor": factor,
    "truncate_wavelength": rope_variants.giraffe_truncate_wavelength(factor, t0),
  }
  got = np.asarray(rope.compute_inv_freq(params, head_dim)[0], np.float64)
  trained = _theta(theta, head_dim)
  cycled = 2 * math.pi / trained <= t0
  assert cycled.sum() == 11, "critical dimension 2*ceil(16 log_100(128 / 2 pi)) = 22 = 2 * 11"
  np.testing.assert_allclose(got[cycled], trained[cycled] / factor, rtol=1e-6)
  np.testing.assert_allclose(got[~cycled], 2 * math.pi / (16 * factor * t0), rtol=1e-6)


def test_partial_rotary_leaves_tail_pairs_unrotated():
  params = {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}
  x_BTHD = jnp.asarray(np.random.default_rng(2).standard_normal((1, 4, 2, 64)), jnp.float32)
  out = _rotate(params, 64, x_BTHD, jnp.array([[0, 5, 50, 500]]))
  # Pairs (i, i + 32) with i >= 16 have zero frequency: features 16..31 and 48..63 unchanged.
  np.testing.assert_array_equal(out[..., 16:32], x_BTHD[..., 16:32])
  np.testing.assert_array_equal(out[..., 48:], x_BTHD[..., 48:])
  assert not np.allclose(out[:, 1:, :, :16], x_BTHD[:, 1:, :, :16])


def test_registry_one_registration():
  name = "test_halved_theta"
  rope.register_rope_type(
    name, rope.RopeType(lambda p, hd, d, s: (rope._base_inv_freq(p["rope_theta"] / 2, d), 1.0))
  )
  try:
    inv_freq, _ = rope.compute_inv_freq({"rope_type": name, "rope_theta": 2e4}, 64)
    np.testing.assert_allclose(np.asarray(inv_freq, np.float64), _theta(1e4, 64), rtol=1e-6)
    with pytest.raises(ValueError, match="already registered"):
      rope.register_rope_type(name, rope.ROPE_TYPES[name])
  finally:
    del rope.ROPE_TYPES[name]


# ------------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize(
  "params,head_dim,match",
  [
    (
      {"rope_type": "foo", "rope_theta": 1e4},
      64,
      r"rope type 'foo' is unknown; choose one of .*yarn",
    ),
    (
      {"rope_type": "yarn", "rope_theta": 1e4, "original_max_position_embeddings": 4096},
      64,
      r"rope_parameters\['factor'\] is required for rope_type 'yarn'",
    ),
    (
      {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0},
      64,
      r"rope_parameters\['original_max_position_embeddings'\] is required",
    ),
    (
      {
        "rope_type": "longrope",
        "rope_theta": 1e4,
        "short_factor": [1.0] * 31,
        "long_factor": [2.0] * 32,
        "original_max_position_embeddings": 4096,
        "factor": 4.0,
      },
      64,
      r"rope_parameters\['short_factor'\] must have 32 entries",
    ),
    (
      {
        "rope_type": "longrope",
        "rope_theta": 1e4,
        "short_factor": [1.0] * 32,
        "long_factor": [2.0] * 64,
        "original_max_position_embeddings": 4096,
        "factor": 4.0,
      },
      64,
      r"rope_parameters\['long_factor'\] must have 32 entries",
    ),
    (
      {
        "rope_type": "longrope",
        "rope_theta": 1e4,
        "short_factor": [1.0] * 32,
        "long_factor": [2.0] * 32,
        "original_max_position_embeddings": 4096,
      },
      64,
      r"rope_parameters\['factor'\] is required",
    ),
    (
      {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0},
      64,
      r"rope_parameters\['max_position_embeddings'\] is required for rope_type 'dynamic'",
    ),
    (
      {"rope_type": "linear", "rope_theta": 1e4, "factor": -1.0},
      64,
      r"rope_parameters\['factor'\] must be a number > 0",
    ),
    (
      {
        "rope_type": "llama3",
        "rope_theta": 5e5,
        "factor": 8.0,
        "low_freq_factor": 4.0,
        "high_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
      },
      64,
      r"rope_parameters\['high_freq_factor'\] must exceed",
    ),
    (
      {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 1.5},
      64,
      r"rope_parameters\['partial_rotary_factor'\] must be <= 1",
    ),
    (
      {"rope_type": "giraffe", "rope_theta": 1e4},
      64,
      r"rope_parameters\['truncate_wavelength'\] is required",
    ),
    ({"rope_type": "default", "rope_theta": 1e4}, 63, r"head_dim must be a positive even integer"),
    ({"rope_theta": 1e4}, 64, r"rope_parameters\['rope_type'\] is required"),
  ],
)
def test_bad_parameters_raise(params, head_dim, match):
  with pytest.raises(ValueError, match=match):
    rope.compute_inv_freq(params, head_dim)


def test_bad_hf_config_raises():
  with pytest.raises(ValueError, match=r"rope type 'foo' is unknown"):
    rope.standardize_rope_parameters({"rope_scaling": {"type": "foo", "factor": 2.0}})
  with pytest.raises(ValueError, match=r"rope_parameters\['factor'\] is required .* 'yarn'"):
    rope.standardize_rope_parameters(
      {"rope_scaling": {"type": "yarn"}, "max_position_embeddings": 4096}
    )
  with pytest.raises(ValueError, match=r"original_max_position_embeddings'\] is required"):
    rope.standardize_rope_parameters({"rope_scaling": {"type": "yarn", "factor": 2.0}})
  with pytest.raises(ValueError, match=r"per-layer"):
    rope.standardize_rope_parameters(
      {
        "rope_parameters": {
          "full_attention": {"rope_type": "default"},
          "sliding_attention": {"rope_type": "default"},
        }
      }
    )
  with pytest.raises(ValueError, match=r"hf_config\['rope_parameters'\] must be a dict"):
    rope.standardize_rope_parameters({"rope_parameters": [1, 2]})


# ------------------------------------------------------------------------------------------------
# Model-level identities: the same weights under another RoPE dict (`model_from_params`).

_T0 = 16


def _tiny_lm():
  """A tiny DecoderLM trained (here: initialized) at T0 = 16 with theta = 100, head_dim 16."""
  rope_dict = dict(rope_type="default", rope_theta=100.0, max_position_embeddings=_T0)
  cfg = llama_config(
    dtype="float32",
    vocab_size=64,
    d_model=32,
    num_heads=2,
    num_kv_heads=1,
    mlp_dim=64,
    num_layers=2,
    max_position_embeddings=_T0,
    rope=rope_dict,
  )
  model = build_model(cfg, rngs=nnx.Rngs(3))
  return nnx.to_pure_dict(nnx.state(model, nnx.Param)), cfg


def _logits(params, cfg, rope_dict, length):
  model = model_from_params(params, cfg, rope_dict)
  tokens_BT = np.random.default_rng(length).integers(0, 64, size=(2, length)).astype(np.int32)
  return np.asarray(model(jnp.asarray(tokens_BT)))


@pytest.mark.parametrize("length", [_T0 // 2, _T0])
def test_dynamic_ntk_at_most_t0_is_the_trained_model(length):
  """HF dynamic NTK: seq_len = max position + 1 <= max_position_embeddings leaves the base
  unchanged (ratio exactly 1 in fp32, times exp(0) = 1), so the logits equal the trained RoPE's
  bit for bit."""
  params, cfg = _tiny_lm()
  dynamic = dict(rope_type="dynamic", rope_theta=100.0, factor=4.0, max_position_embeddings=_T0)
  trained = _logits(params, cfg, None, length)
  np.testing.assert_array_equal(_logits(params, cfg, dynamic, length), trained)


@pytest.mark.parametrize("dynamic_factor,scale", [(1.0, 4), (1.0, 2), (2.0, 4)])
def test_dynamic_ntk_at_s_t0_is_fixed_ntk_aware(dynamic_factor, scale):
  """At length s * T0, HF's dynamic base is base * (f * s - (f - 1))^(d/(d-2)): fixed NTK-aware
  with factor s needs dynamic factor f = 1 (emozilla's original dynamic NTK, alpha = L / T0).
  With HF's f > 1 the same length equals NTK-aware with factor f * s - f + 1 (7 for f=2, s=4).
  The dynamic base is computed in fp32 from the traced length and the fixed one in fp64, so the
  logits agree to fp32 rounding (measured <= 9e-8 of logits ~0.4), not bit for bit."""
  params, cfg = _tiny_lm()
  length = scale * _T0
  dynamic = dict(
    rope_type="dynamic", rope_theta=100.0, factor=dynamic_factor, max_position_embeddings=_T0
  )
  ntk = dict(rope_type="ntk", rope_theta=100.0, factor=dynamic_factor * scale - dynamic_factor + 1)
  got = _logits(params, cfg, dynamic, length)
  np.testing.assert_allclose(got, _logits(params, cfg, ntk, length), rtol=0, atol=1e-6)
  # A random tiny model barely uses position, yet the scaling moves its logits ~1e-3.
  assert np.max(np.abs(got - _logits(params, cfg, None, length))) > 1e-4, "scaling changes it"
