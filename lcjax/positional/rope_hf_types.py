"""The Hugging Face RoPE types, registered in `lcjax.positional.rope.ROPE_TYPES`.

`default`, `linear` (PI), `dynamic` (NTK), `yarn`, `llama3`, `longrope` and `proportional`,
each following transformers 5.24 `modeling_rope_utils.py` (`ROPE_INIT_FUNCTIONS`) and its
config semantics; each function cites the HF function it transcribes. `lcjax.positional`
imports this module, so the types are registered whenever `lcjax.positional.rope` is
(the package is imported first); lcjax's own additions are in `rope_variants`.
"""

import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from lcjax.positional.rope import (
  Params,
  RopeType,
  _base_inv_freq,
  _exponents,
  _f32,
  _is_number,
  _is_static,
  _partial_rotary_factor,
  _rotary_dim,
  register_rope_type,
)


def _inv_freq_default(params: Params, head_dim: int, dim: int, seq_len: Any):
  """Original RoPE; HF `LlamaRotaryEmbedding.compute_default_rope_parameters`."""
  del head_dim, seq_len
  return _base_inv_freq(params["rope_theta"], dim), 1.0


def _inv_freq_linear(params: Params, head_dim: int, dim: int, seq_len: Any):
  """Position Interpolation (Chen et al. 2023, arXiv:2306.15595, eq. 4: positions m -> m/s).

  Dividing inv_freq by `factor` equals dividing positions; HF
  `_compute_linear_scaling_rope_parameters`.
  """
  del head_dim, seq_len
  return _base_inv_freq(params["rope_theta"], dim) / float(params["factor"]), 1.0


def _inv_freq_dynamic(params: Params, head_dim: int, dim: int, seq_len: Any):
  """Dynamic NTK scaling (/u/emozilla, /u/bloc97); HF `_compute_dynamic_ntk_parameters`.

  `base' = base * (factor * L / L_max - (factor - 1))^(d / (d - 2))` with
  `L = max(seq_len, L_max)`, `L_max = max_position_embeddings` and `seq_len = max position + 1`.

  lcjax is pure: the base is recomputed from `seq_len` on every call. HF's `dynamic_rope_update`
  is stateful instead: it grows a cached base when a longer sequence arrives and only resets it
  when a sequence shorter than `max_position_embeddings` arrives, so in HF a 16K call followed by
  an 8K call reuses the 16K base, while lcjax uses the 8K base. With `seq_len=None` the base is
  unchanged, as at HF init.
  """
  del head_dim
  inv_freq = _base_inv_freq(params["rope_theta"], dim)
  if seq_len is None:
    return inv_freq, 1.0
  factor = float(params["factor"])
  max_pos = float(params["max_position_embeddings"])
  # base'^(-2i/d) = base^(-2i/d) * ratio^(-2i/(d-2)): only the small ratio term depends on
  # seq_len, which keeps the fp32 (traced) path accurate.
  exponents = np.arange(0, dim, 2, dtype=np.float64) / (dim - 2)
  if _is_static(seq_len):
    ratio = factor * max(float(seq_len), max_pos) / max_pos - (factor - 1.0)
    return inv_freq * ratio ** (-exponents), 1.0
  seq = jnp.maximum(_f32(seq_len), max_pos)
  ratio = factor * seq / max_pos - (factor - 1.0)
  return _f32(inv_freq) * jnp.exp(-_f32(exponents) * jnp.log(ratio)), 1.0


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
  """YaRN `sqrt(1/t) = 0.1 ln(s) + 1` (Peng et al. 2023, arXiv:2309.00071); HF `get_mscale`."""
  if scale <= 1:
    return 1.0
  return 0.1 * mscale * math.log(scale) + 1.0


def _inv_freq_yarn(params: Params, head_dim: int, dim: int, seq_len: Any):
  """YaRN "NTK-by-parts" + attention temperature (Peng et al. 2023, arXiv:2309.00071).

  HF `_compute_yarn_parameters`: frequencies making more than `beta_fast` rotations over
  `original_max_position_embeddings` are kept (extrapolated), fewer than `beta_slow` are divided
  by `factor` (interpolated), with a linear ramp between the correction dims (floored/ceiled when
  `truncate`, the default). `attention_factor` defaults to `0.1 ln(factor) + 1`, or to
  `mscale(factor, mscale) / mscale(factor, mscale_all_dim)` when both are set (DeepSeek-V3).
  """
  del head_dim, seq_len
  base = float(params["rope_theta"])
  factor = float(params["factor"])
  original_max = float(params["original_max_position_embeddings"])
  attention_factor = params.get("attention_factor")
  mscale = params.get("mscale")
  mscale_all_dim = params.get("mscale_all_dim")
  if attention_factor is None:
    if mscale and mscale_all_dim:
      attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
    else:
      attention_factor = _yarn_mscale(factor)
  beta_fast = params.get("beta_fast") or 32
  beta_slow = params.get("beta_slow") or 1

  def correction_dim(num_rotations):
    return dim * math.log(original_max / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

  low, high = correction_dim(beta_fast), correction_dim(beta_slow)
  if params.get("truncate", True):
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001  # HF: prevent a singular ramp.
  inv_freq_extrapolation = _base_inv_freq(base, dim)
  inv_freq_interpolation = inv_freq_extrapolation / factor
  ramp = np.clip((np.arange(len(inv_freq_extrapolation)) - low) / (high - low), 0.0, 1.0)
  extrapolation_weight = 1.0 - ramp
  inv_freq = (
    inv_freq_interpolation * (1.0 - extrapolation_weight)
    + inv_freq_extrapolation * extrapolation_weight
  )
  return inv_freq, float(attention_factor)


def _inv_freq_llama3(params: Params, head_dim: int, dim: int, seq_len: Any):
  """Llama 3.1 frequency bands ("The Llama 3 Herd of Models", arXiv:2407.21783).

  HF `_compute_llama3_parameters`: with `lambda_i = 2 pi / theta_i` and `L = original_max`,
  keep `theta_i` if `lambda_i < L / high_freq_factor`, use `theta_i / factor` if
  `lambda_i > L / low_freq_factor`, else `(1 - a) theta_i / factor + a theta_i` with
  `a = (L / lambda_i - low_freq_factor) / (high_freq_factor - low_freq_factor)`.
  """
  del head_dim, seq_len
  inv_freq = _base_inv_freq(params["rope_theta"], dim)
  factor = float(params["factor"])
  low_freq_factor = float(params["low_freq_factor"])
  high_freq_factor = float(params["high_freq_factor"])
  original_max = float(params["original_max_position_embeddings"])
  wavelen = 2 * math.pi / inv_freq
  smooth = (original_max / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
  smoothed = (1.0 - smooth) * inv_freq / factor + smooth * inv_freq
  inv_freq = np.where(
    wavelen < original_max / high_freq_factor,
    inv_freq,
    np.where(wavelen > original_max / low_freq_factor, inv_freq / factor, smoothed),
  )
  return inv_freq, 1.0


def _longrope_factor(params: Params) -> float:
  factor = params.get("factor")
  if factor is None:
    factor = params["max_position_embeddings"] / params["original_max_position_embeddings"]
  return float(factor)


def _inv_freq_longrope(params: Params, head_dim: int, dim: int, seq_len: Any):
  """LongRoPE (Ding et al. 2024, arXiv:2402.13753); HF `_compute_longrope_parameters`.

  `inv_freq_i = 1 / (ext_i * base^(2i/d))` with `ext = long_factor` when
  `seq_len > original_max_position_embeddings`, else `short_factor` (also when seq_len is None).
  `factor` defaults to `max_position_embeddings / original_max_position_embeddings`, and
  `attention_factor` to `sqrt(1 + ln(factor) / ln(original_max))` (1 when factor <= 1), used for
  both the short and the long factors.
  """
  del head_dim
  base = float(params["rope_theta"])
  original_max = params["original_max_position_embeddings"]
  factor = _longrope_factor(params)
  attention_factor = params.get("attention_factor")
  if attention_factor is None:
    if factor <= 1.0:
      attention_factor = 1.0
    else:
      attention_factor = math.sqrt(1 + math.log(factor) / math.log(original_max))
  base_freq = float(base) ** _exponents(dim)
  short = 1.0 / (np.asarray(params["short_factor"], dtype=np.float64) * base_freq)
  long = 1.0 / (np.asarray(params["long_factor"], dtype=np.float64) * base_freq)
  if seq_len is None:
    return short, float(attention_factor)
  if _is_static(seq_len):
    return (long if seq_len > original_max else short), float(attention_factor)
  return jnp.where(seq_len > original_max, _f32(long), _f32(short)), float(attention_factor)


def _inv_freq_proportional(params: Params, head_dim: int, dim: int, seq_len: Any):
  """Proportional RoPE; HF `_compute_proportional_rope_parameters`.

  Rotates the first `int(partial_rotary_factor * head_dim // 2)` pairs with exponent
  `2j / head_dim` (head_dim, not the rotary dim), zero frequency for the rest, then `/ factor`.
  """
  del dim, seq_len
  rope_angles = int(_partial_rotary_factor(params) * head_dim // 2)
  exponents = np.arange(0, 2 * rope_angles, 2, dtype=np.float64) / head_dim
  inv_freq = 1.0 / (float(params["rope_theta"]) ** exponents)
  inv_freq = np.pad(inv_freq, (0, head_dim // 2 - rope_angles))
  return inv_freq / float(params.get("factor") or 1.0), 1.0


# ------------------------------------------------------------------------------------------------
# Validation beyond required and positive keys.


def _check_factor_list(params: Params, key: str, name: str, head_dim: int | None) -> None:
  value = params[key]
  if not isinstance(value, list | tuple) or not all(_is_number(x) for x in value):
    raise ValueError(f"rope_parameters[{key!r}] must be a list of numbers for rope_type {name!r}")
  if head_dim is not None:
    expected = len(range(0, _rotary_dim(params, head_dim), 2))
    if len(value) != expected:
      raise ValueError(
        f"rope_parameters[{key!r}] must have {expected} entries (rotary_dim / 2) for rope_type "
        f"{name!r} and head_dim {head_dim}, got {len(value)}"
      )


def _check_longrope(params: Params, name: str, head_dim: int | None) -> None:
  _check_factor_list(params, "short_factor", name, head_dim)
  _check_factor_list(params, "long_factor", name, head_dim)
  if params.get("factor") is None and params.get("max_position_embeddings") is None:
    raise ValueError(
      f"rope_parameters['factor'] is required for rope_type {name!r} when "
      "rope_parameters['max_position_embeddings'] is absent"
    )


def _check_llama3(params: Params, name: str, head_dim: int | None) -> None:
  del head_dim
  if params["high_freq_factor"] <= params["low_freq_factor"]:
    raise ValueError(
      f"rope_parameters['high_freq_factor'] must exceed rope_parameters['low_freq_factor'] for "
      f"rope_type {name!r}, got {params['high_freq_factor']} <= {params['low_freq_factor']}"
    )


def _check_dynamic(params: Params, name: str, head_dim: int | None) -> None:
  if head_dim is not None and _rotary_dim(params, head_dim) <= 2:
    raise ValueError(f"rope_type {name!r} needs a rotary dim > 2, got head_dim {head_dim}")


# ------------------------------------------------------------------------------------------------
# Registration.

_ORIG = "original_max_position_embeddings"
_MAX = "max_position_embeddings"

register_rope_type("default", RopeType(_inv_freq_default))
register_rope_type("linear", RopeType(_inv_freq_linear, ("rope_theta", "factor"), ("factor",)))
register_rope_type(
  "dynamic",
  RopeType(
    _inv_freq_dynamic,
    ("rope_theta", "factor", _MAX),
    ("factor", _MAX),
    _check_dynamic,
    uses_seq_len=True,
  ),
)
register_rope_type(
  "yarn",
  RopeType(_inv_freq_yarn, ("rope_theta", "factor", _ORIG), ("factor", _ORIG, "attention_factor")),
)
register_rope_type(
  "llama3",
  RopeType(
    _inv_freq_llama3,
    ("rope_theta", "factor", "low_freq_factor", "high_freq_factor", _ORIG),
    ("factor", "low_freq_factor", "high_freq_factor", _ORIG),
    _check_llama3,
  ),
)
register_rope_type(
  "longrope",
  RopeType(
    _inv_freq_longrope,
    ("rope_theta", "short_factor", "long_factor", _ORIG),
    ("factor", _ORIG, _MAX, "attention_factor"),
    _check_longrope,
    uses_seq_len=True,
  ),
)
register_rope_type("proportional", RopeType(_inv_freq_proportional, positive_keys=("factor",)))
