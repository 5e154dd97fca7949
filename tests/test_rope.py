"""Tests for lcjax.positional.rope against transformers 5.24 and independent float64 formulas."""

import copy
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama import modeling_llama

from lcjax.positional import rope

NUM_HEADS = 4


def _hf_config(hf_json: dict, head_dim: int) -> transformers.LlamaConfig:
  """A LlamaConfig loaded the way config.json is (`from_dict`), with the given head_dim."""
  config_dict = copy.deepcopy(hf_json)
  config_dict.update(head_dim=head_dim, hidden_size=head_dim * NUM_HEADS)
  config_dict.update(num_attention_heads=NUM_HEADS, num_hidden_layers=1, vocab_size=32)
  config = transformers.LlamaConfig.from_dict(config_dict)
  config.standardize_rope_params()  # What every HF rope init function runs first.
  return config


def _hf_inv_freq(hf_json: dict, head_dim: int, seq_len=None):
  config = _hf_config(hf_json, head_dim)
  rope_type = config.rope_parameters["rope_type"]
  if rope_type == "default":
    fn = modeling_llama.LlamaRotaryEmbedding.compute_default_rope_parameters
  else:
    fn = ROPE_INIT_FUNCTIONS[rope_type]
  inv_freq, attention_factor = fn(config, device="cpu", seq_len=seq_len)
  return inv_freq.numpy().astype(np.float64), float(attention_factor)


def _lin(lo, hi, n):
  return [float(x) for x in np.linspace(lo, hi, n)]


# (id, config.json dict, head_dim, seq_lens passed to both implementations).
HF_CASES = [
  ("default_64", {"rope_theta": 10000.0}, 64, [None]),
  ("default_128_legacy_theta", {"rope_theta": 500000}, 128, [None]),
  (
    "linear_64",
    {"rope_scaling": {"type": "linear", "factor": 4.0}, "rope_theta": 10000.0},
    64,
    [None],
  ),
  (
    "linear_128_partial",
    {"rope_parameters": {"rope_type": "linear", "factor": 3.0}, "partial_rotary_factor": 0.5},
    128,
    [None],
  ),
  (
    "dynamic_128",
    {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}, "max_position_embeddings": 4096},
    128,
    [None, 1000, 4096, 8192, 16384],
  ),
  (
    "dynamic_64_partial",
    {
      "rope_parameters": {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 5e5},
      "max_position_embeddings": 2048,
      "partial_rotary_factor": 0.5,
    },
    64,
    [None, 100, 3000, 50000],
  ),
  (
    "yarn_128",
    {
      "rope_parameters": {"rope_type": "yarn", "factor": 16.0},
      "max_position_embeddings": 65536,
      "original_max_position_embeddings": 4096,
    },
    128,
    [None],
  ),
  (
    "yarn_128_no_truncate",
    {
      "rope_parameters": {
        "rope_type": "yarn",
        "factor": 32.0,
        "truncate": False,
        "original_max_position_embeddings": 4096,
        "rope_theta": 150000.0,
      },
      "max_position_embeddings": 131072,
    },
    128,
    [None],
  ),
  (
    "yarn_64_attention_factor",
    {
      "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "attention_factor": 0.8},
      "max_position_embeddings": 8192,
      "original_max_position_embeddings": 2048,
    },
    64,
    [None],
  ),
  (
    "yarn_64_mscale",
    {
      "rope_parameters": {
        "rope_type": "yarn",
        "factor": 40.0,
        "mscale": 1.0,
        "mscale_all_dim": 0.5,
        "original_max_position_embeddings": 4096,
      },
      "max_position_embeddings": 163840,
    },
    64,
    [None],
  ),
  (
    "yarn_128_betas_partial",
    {
      "rope_parameters": {
        "rope_type": "yarn",
        "factor": 8.0,
        "beta_fast": 16,
        "beta_slow": 2,
        "original_max_position_embeddings": 2048,
      },
      "partial_rotary_factor": 0.5,
      "max_position_embeddings": 16384,
    },
    128,
    [None],
  ),
  (
    "llama3_128",
    {
      "rope_parameters": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_theta": 500000.0,
      },
      "max_position_embeddings": 131072,
    },
    128,
    [None],
  ),
  (
    "llama3_64",
    {
      "rope_scaling": {
        "rope_type": "llama3",
        "factor": 4.0,
        "low_freq_factor": 2.0,
        "high_freq_factor": 8.0,
      },
      "rope_theta": 10000.0,
      "original_max_position_embeddings": 1024,
      "max_position_embeddings": 4096,
    },
    64,
    [None],
  ),
  (
    "longrope_64",
    {
      "rope_scaling": {
        "type": "longrope",
        "short_factor": _lin(1.0, 1.3, 32),
        "long_factor": _lin(1.0, 30.0, 32),
      },
      "original_max_position_embeddings": 4096,
      "max_position_embeddings": 131072,
    },
    64,
    [None, 2000, 4096, 4097, 100000],
  ),
  (
    "longrope_128_attention_factor",
    {
      "rope_parameters": {
        "rope_type": "longrope",
        "short_factor": _lin(1.0, 1.1, 64),
        "long_factor": _lin(1.5, 8.0, 64),
        "attention_factor": 1.1,
        "factor": 8.0,
        "original_max_position_embeddings": 2048,
      },
      "max_position_embeddings": 16384,
    },
    128,
    [None, 1000, 9000],
  ),
  (
    "longrope_128_partial",
    {
      "rope_parameters": {
        "rope_type": "longrope",
        "short_factor": _lin(1.0, 2.0, 32),
        "long_factor": _lin(2.0, 9.0, 32),
      },
      "partial_rotary_factor": 0.5,
      "original_max_position_embeddings": 4096,
      "max_position_embeddings": 32768,
    },
    128,
    [None, 4000, 5000],
  ),
  (
    "proportional_128",
    {
      "rope_parameters": {"rope_type": "proportional", "factor": 2.0, "rope_theta": 1e6},
      "partial_rotary_factor": 0.25,
    },
    128,
    [None],
  ),
]


@pytest.mark.parametrize(
  "hf_json,head_dim,seq_lens", [c[1:] for c in HF_CASES], ids=[c[0] for c in HF_CASES]
)
def test_compute_inv_freq_matches_transformers(hf_json, head_dim, seq_lens):
  params = rope.standardize_rope_parameters(hf_json)
  for seq_len in seq_lens:
    expected, expected_factor = _hf_inv_freq(hf_json, head_dim, seq_len)
    inv_freq, attention_factor = rope.compute_inv_freq(params, head_dim, seq_len=seq_len)
    assert inv_freq.shape == (head_dim // 2,) and inv_freq.dtype == jnp.float32
    got = np.asarray(inv_freq, dtype=np.float64)
    num = expected.shape[0]
    np.testing.assert_allclose(got[:num], expected, rtol=1e-6, err_msg=f"seq_len={seq_len}")
    np.testing.assert_array_equal(got[num:], 0.0)  # Partial rotary: zero-padded.
    np.testing.assert_allclose(attention_factor, expected_factor, rtol=1e-6)


def test_default_partial_rotary_formula():
  # HF's Llama default ignores partial_rotary_factor; compare with base^(-2i/d), d = rotary dim.
  params = rope.standardize_rope_parameters({"partial_rotary_factor": 0.5, "rope_theta": 1e4})
  inv_freq, attention_factor = rope.compute_inv_freq(params, 128)
  expected = 1e4 ** (-np.arange(0, 64, 2) / 64.0)
  np.testing.assert_allclose(np.asarray(inv_freq)[:32], expected, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(inv_freq)[32:], 0.0)
  assert attention_factor == 1.0


@pytest.mark.parametrize("case", ["dynamic_128", "longrope_64", "longrope_128_attention_factor"])
def test_traced_seq_len_matches_transformers(case):
  _, hf_json, head_dim, seq_lens = next(c for c in HF_CASES if c[0] == case)
  params = rope.standardize_rope_parameters(hf_json)
  fn = jax.jit(lambda s: rope.compute_inv_freq(params, head_dim, seq_len=s)[0])
  for seq_len in seq_lens[1:]:
    expected, _ = _hf_inv_freq(hf_json, head_dim, seq_len)
    got = np.asarray(fn(jnp.int32(seq_len)), dtype=np.float64)
    np.testing.assert_allclose(got, expected, rtol=1e-6, err_msg=f"seq_len={seq_len}")


def _strip(params: dict) -> dict:
  """HF keeps the legacy `type` key next to `rope_type`; lcjax adds max_position_embeddings."""
  return {k: v for k, v in params.items() if k not in ("type", "max_position_embeddings")}


STANDARDIZE_CASES = [
  {
    "rope_scaling": {"type": "yarn", "factor": 4},
    "rope_theta": 5e5,
    "original_max_position_embeddings": 2048,
    "max_position_embeddings": 8192,
  },
  {"rope_scaling": {"type": "yarn", "factor": 4}, "max_position_embeddings": 8192},
  {
    "rope_parameters": {"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 1024},
    "max_position_embeddings": 8192,
  },
  {"rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 1e6},
  {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 3e4}, "rope_theta": 7.0},
  {"max_position_embeddings": 4096},
  {"rope_theta": 5e5, "partial_rotary_factor": 0.5},
  {
    "rope_parameters": {
      "rope_type": "llama3",
      "factor": 8.0,
      "low_freq_factor": 1.0,
      "high_freq_factor": 4.0,
    },
    "rope_theta": 5e5,
    "max_position_embeddings": 8192,
  },
]


@pytest.mark.parametrize("hf_json", STANDARDIZE_CASES)
def test_standardize_like_transformers(hf_json):
  params = rope.standardize_rope_parameters(hf_json)
  expected = _strip(_hf_config(hf_json, 64).rope_parameters)
  if "max_position_embeddings" in hf_json:
    expected["max_position_embeddings"] = hf_json["max_position_embeddings"]
  assert params == expected


def test_standardize_legacy_yarn_top_level_original_max():
  hf_json = STANDARDIZE_CASES[0]
  params = rope.standardize_rope_parameters(hf_json)
  assert params["original_max_position_embeddings"] == hf_json["original_max_position_embeddings"]
  assert params["rope_theta"] == hf_json["rope_theta"] and params["rope_type"] == "yarn"
  assert params["max_position_embeddings"] == hf_json["max_position_embeddings"]
  assert hf_json["rope_scaling"] == {"type": "yarn", "factor": 4}  # Input not mutated.
  expected, expected_factor = _hf_inv_freq(hf_json, 128)
  inv_freq, attention_factor = rope.compute_inv_freq(params, 128)
  np.testing.assert_allclose(np.asarray(inv_freq, np.float64), expected, rtol=1e-6)
  np.testing.assert_allclose(attention_factor, expected_factor, rtol=1e-6)


ROUND_TRIP_CASES = (
  [c[1] for c in HF_CASES]
  + STANDARDIZE_CASES
  + [
    {"rope_parameters": {"rope_type": "abf", "rope_theta": 5e5}, "max_position_embeddings": 32768},
    {
      "rope_parameters": {
        "rope_type": "eabf",
        "rope_theta": 5e5,
        "original_max_position_embeddings": 4096,
      }
    },
    {"rope_parameters": {"rope_type": "giraffe", "truncate_wavelength": 4096, "factor": 4.0}},
    {"rope_parameters": {"rope_type": "nope"}},
  ]
)


@pytest.mark.parametrize("hf_json", ROUND_TRIP_CASES)
def test_hf_round_trip(hf_json):
  params = rope.standardize_rope_parameters(hf_json)
  fields = rope.to_hf_rope_fields(params)
  assert rope.standardize_rope_parameters(fields) == params
  assert rope.to_hf_rope_fields(rope.standardize_rope_parameters(fields)) == fields
  # transformers builds the same standardized parameters from the fields, and writes them back.
  config = transformers.LlamaConfig(**copy.deepcopy(fields))
  assert config.rope_parameters == fields["rope_parameters"]
  written = config.to_dict()
  assert written["rope_parameters"] == fields["rope_parameters"]
  if "max_position_embeddings" in fields:
    assert written["max_position_embeddings"] == fields["max_position_embeddings"]


# ------------------------------------------------------------------------------------------------
# Golden numbers (notes/algorithms.md section 1) against independent float64 formulas.


def _theta(base, dim):
  return base ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)


@pytest.mark.parametrize(
  "dim,base,original_max,factor,low,high,golden_factor",
  [
    (128, 1e4, 4096, 16, 20, 46, 1.277259),
    (128, 1e4, 4096, 32, 20, 46, 1.346574),
    (64, 1e4, 2048, 4, 8, 21, 1.138629),
  ],
)
def test_yarn_golden(dim, base, original_max, factor, low, high, golden_factor):
  params = {
    "rope_type": "yarn",
    "rope_theta": base,
    "factor": factor,
    "original_max_position_embeddings": original_max,
  }
  inv_freq, attention_factor = rope.compute_inv_freq(params, dim)
  assert abs(attention_factor - golden_factor) < 1e-6
  ramp = np.clip((np.arange(dim // 2) - low) / (high - low), 0.0, 1.0)
  expected = _theta(base, dim) * ((1 - ramp) + ramp / factor)
  np.testing.assert_allclose(np.asarray(inv_freq, np.float64), expected, rtol=1e-6)


def test_llama3_golden_bands():
  params = {
    "rope_type": "llama3",
    "rope_theta": 5e5,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
  }
  inv_freq, _ = rope.compute_inv_freq(params, 128)
  ratio = _theta(5e5, 128) / np.asarray(inv_freq, np.float64)
  unchanged = np.isclose(ratio, 1.0, rtol=1e-6)
  divided = np.isclose(ratio, 8.0, rtol=1e-6)
  smoothed = ~unchanged & ~divided
  assert (unchanged.sum(), smoothed.sum(), divided.sum()) == (29, 6, 29)
  assert unchanged[:29].all() and divided[35:].all()
  np.testing.assert_allclose(ratio[smoothed], [1.207, 1.553, 2.026, 2.695, 3.684, 5.257], rtol=1e-3)


@pytest.mark.parametrize(
  "seq_len,golden_base",
  [(None, 1e4), (2048, 1e4), (4096, 1e4), (8192, 30527.74), (16384, 72195.86)],
)
def test_dynamic_golden_base(seq_len, golden_base):
  params = {
    "rope_type": "dynamic",
    "rope_theta": 1e4,
    "factor": 2.0,
    "max_position_embeddings": 4096,
  }
  inv_freq, _ = rope.compute_inv_freq(params, 128, seq_len=seq_len)
  np.testing.assert_allclose(np.asarray(inv_freq, np.float64), _theta(golden_base, 128), rtol=1e-6)
  if seq_len is not None:
    traced, _ = jax.jit(lambda s: rope.compute_inv_freq(params, 128, seq_len=s))(seq_len)
    np.testing.assert_allclose(np.asarray(traced, np.float64), _theta(golden_base, 128), rtol=1e-6)


def test_longrope_golden_attention_factor():
  params = {
    "rope_type": "longrope",
    "rope_theta": 1e4,
    "short_factor": [1.0] * 64,
    "long_factor": [4.0] * 64,
    "original_max_position_embeddings": 4096,
    "max_position_embeddings": 131072,
  }
  for seq_len in (None, 10, 5000):
    inv_freq, attention_factor = rope.compute_inv_freq(params, 128, seq_len=seq_len)
    assert abs(attention_factor - 1.190238) < 1e-6
    ext = 4.0 if seq_len == 5000 else 1.0
    np.testing.assert_allclose(np.asarray(inv_freq, np.float64), _theta(1e4, 128) / ext, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Rotation properties.


def _rotate(params, head_dim, x_BTHD, positions_BT):
  inv_freq, attention_factor = rope.compute_inv_freq(params, head_dim)
  cos_BTK, sin_BTK = rope.rope_cos_sin(inv_freq, attention_factor, positions_BT)
  return rope.apply_rope(x_BTHD, cos_BTK, sin_BTK)


@pytest.mark.parametrize("factor", [2.0, 4.0])
def test_linear_is_position_interpolation(factor):
  default = {"rope_type": "default", "rope_theta": 1e4}
  linear = {"rope_type": "linear", "rope_theta": 1e4, "factor": factor}
  positions_BT = jnp.array([[0, 1, 7, 100, 1000, 4095, 8191]], dtype=jnp.int32)
  x_BTHD = jnp.asarray(np.random.default_rng(0).standard_normal((1, 7, 2, 64)), jnp.float32)
  cos_d, sin_d = rope.rope_cos_sin(*rope.compute_inv_freq(default, 64), positions_BT)
  cos_l, sin_l = rope.rope_cos_sin(*rope.compute_inv_freq(linear, 64), positions_BT * int(factor))
  np.testing.assert_allclose(cos_l, cos_d, atol=1e-6)
  np.testing.assert_allclose(sin_l, sin_d, atol=1e-6)
  np.testing.assert_allclose(
    _rotate(linear, 64, x_BTHD, positions_BT * int(factor)),
    _rotate(default, 64, x_BTHD, positions_BT),
    atol=1e-6,
  )


def test_relative_invariance_fp32():
  params = {"rope_type": "default", "rope_theta": 1e4}
  rng = np.random.default_rng(0)
  q_BTHD, k_BTHD = (rng.standard_normal((1, 1, 64, 128)) for _ in range(2))
  q_BTHD /= np.linalg.norm(q_BTHD, axis=-1, keepdims=True)
  k_BTHD /= np.linalg.norm(k_BTHD, axis=-1, keepdims=True)
  q_BTHD, k_BTHD = jnp.asarray(q_BTHD, jnp.float32), jnp.asarray(k_BTHD, jnp.float32)

  def logits(m_q, m_k):
    q = _rotate(params, 128, q_BTHD, jnp.array([[m_q]]))
    k = _rotate(params, 128, k_BTHD, jnp.array([[m_k]]))
    return np.asarray(jnp.sum(q * k, axis=-1))

  for offset in (0, 1, 16, 1000):
    reference = logits(offset, 0)
    for m in (10, 1000, 10_000, 100_000):
      # fp32 angles keep |dlogit| ~1e-4 at m=1e5; bf16 angles give > 5e-2 (notes section 2).
      np.testing.assert_allclose(logits(m + offset, m), reference, atol=1e-3)


def test_apply_rope_matches_transformers():
  rng = np.random.default_rng(1)
  q_BTHD = rng.standard_normal((2, 5, 3, 16)).astype(np.float32)
  k_BTHD = rng.standard_normal((2, 5, 3, 16)).astype(np.float32)
  cos_BTK = rng.standard_normal((2, 5, 8)).astype(np.float32)
  sin_BTK = rng.standard_normal((2, 5, 8)).astype(np.float32)
  cos_full = torch.from_numpy(np.concatenate([cos_BTK, cos_BTK], -1))
  sin_full = torch.from_numpy(np.concatenate([sin_BTK, sin_BTK], -1))
  q_hf, k_hf = modeling_llama.apply_rotary_pos_emb(
    torch.from_numpy(q_BTHD), torch.from_numpy(k_BTHD), cos_full, sin_full, unsqueeze_dim=2
  )
  np.testing.assert_allclose(
    rope.apply_rope(jnp.asarray(q_BTHD), cos_BTK, sin_BTK), q_hf.numpy(), atol=1e-6
  )
  np.testing.assert_allclose(
    rope.apply_rope(jnp.asarray(k_BTHD), cos_BTK, sin_BTK), k_hf.numpy(), atol=1e-6
  )
  out = rope.apply_rope(jnp.asarray(q_BTHD, jnp.bfloat16), cos_BTK, sin_BTK)
  assert out.dtype == jnp.bfloat16


@pytest.mark.parametrize("case", ["yarn_64_mscale", "dynamic_64_partial", "longrope_64"])
def test_cos_sin_match_llama_rotary_embedding(case):
  _, hf_json, head_dim, _ = next(c for c in HF_CASES if c[0] == case)
  config = _hf_config(hf_json, head_dim)
  positions_BT = np.array([[0, 3, 50, 255], [1, 2, 200, 5000]], dtype=np.int64)
  x = torch.zeros(1, dtype=torch.float32)
  cos_hf, sin_hf = modeling_llama.LlamaRotaryEmbedding(config)(x, torch.from_numpy(positions_BT))
  params = rope.standardize_rope_parameters(hf_json)
  seq_len = jnp.max(positions_BT) + 1
  inv_freq, attention_factor = rope.compute_inv_freq(params, head_dim, seq_len=seq_len)
  cos_BTK, sin_BTK = rope.rope_cos_sin(inv_freq, attention_factor, jnp.asarray(positions_BT))
  # HF returns concat(cos, cos) over the rotary dim only; lcjax pads to head_dim // 2.
  num = cos_hf.shape[-1] // 2
  cos_hf, sin_hf = cos_hf.numpy()[..., :num], sin_hf.numpy()[..., :num]
  # Angles reach 5000 rad, where one ulp of inv_freq moves them by ~3e-4.
  np.testing.assert_allclose(cos_BTK[..., :num], cos_hf, atol=2e-3)
  np.testing.assert_allclose(sin_BTK[..., :num], sin_hf, atol=2e-3)
  np.testing.assert_allclose(cos_BTK[:, :3, :num], cos_hf[:, :3], atol=1e-5)
  np.testing.assert_allclose(sin_BTK[:, :3, :num], sin_hf[:, :3], atol=1e-5)
  np.testing.assert_allclose(cos_BTK[..., num:], attention_factor, rtol=1e-6)
  np.testing.assert_array_equal(sin_BTK[..., num:], 0.0)


def test_rope_cos_sin_uses_fp32_angles():
  inv_freq = jnp.ones((4,), jnp.bfloat16)
  positions_BT = jnp.array([[100_001]], dtype=jnp.int32)
  cos_BTK, _ = rope.rope_cos_sin(inv_freq, 1.0, positions_BT)
  assert cos_BTK.dtype == jnp.float32
  np.testing.assert_allclose(cos_BTK, math.cos(100_001.0), atol=1e-4)
