"""RoPE angles `position * inv_freq`, reduced mod 2π without rounding the product to fp32.

RoPE (Su et al. 2021, arXiv:2104.09864, eq. 34) rotates feature pair i of position m by
`m * theta_i`. Hugging Face forms the angle as one float32 product (`inv_freq @ position_ids`
in `LlamaRotaryEmbedding.forward`, fp32 since transformers PR #29285), `fp32_angles` here. The
product is rounded to the fp32 grid of the angle, whose spacing is 2^(e-23) for angles in
[2^e, 2^(e+1)): up to 2^-6 rad of error at 512K positions, and the error depends on the
absolute position, so relative invariance breaks even in fp32 (Wang et al. 2024,
arXiv:2411.13476, §2, blame bf16; lcjax measured the fp32 part in `lcjax.eval.precision`).

`exact_angles` counts the angle in turns (1 turn = 2π) instead. For each frequency the host
computes `g = inv_freq / 2π` in float64 and splits `g · 2^32` into an integer word `W` and a
fraction `r`; then

  m · g  (mod 1)  =  (m · W mod 2^32) · 2^-32  +  m · r · 2^-32

The first term is a wrapping uint32 multiply, exact, that keeps only the fractional turns; the
second is below 1/2 turn and takes one fp32 product. Error for every int32 position: float64
`g` (relative 2^-52, ≤ 2^-24 turns at |m| = 2^31), the uint32 word's conversion to fp32
(≤ 2^-26 turns), the fp32 remainder product and the sum (≤ 2^-24 turns each): below 1e-6 rad
in all, against 2^-6 rad for the fp32 product at 512K. The frequency is the float32
`inv_freq` itself, as in HF: only the product's rounding is removed.

The constants need `inv_freq` on the host (a numpy array, or a concrete jax array); inside a
trace that depends on the data (dynamic NTK's per-batch frequencies) `rope_cos_sin` falls back
to the fp32 product.
"""

import jax
import jax.numpy as jnp
import numpy as np

_TWO_POW_32 = 2.0**32

__all__ = ["exact_angles", "fp32_angles", "is_host_value", "turn_constants"]


def is_host_value(x) -> bool:
  """Whether `x` can be read on the host while tracing (numpy, Python, or a concrete array)."""
  return not isinstance(x, jax.core.Tracer)


def turn_constants(inv_freq_K) -> tuple[np.ndarray, np.ndarray]:
  """Per frequency, `(W_K uint32, r_K float32)`: `inv_freq / 2π = (W + f) · 2^-32`, `r = f · 2^-32`.

  `W` is taken mod 2^32 (whole turns per position drop out of the angle); `f` in [0, 1) is the
  remaining fraction of a 2^-32 turn, pre-scaled by 2^-32 so that `m · r` is in turns.
  """
  turns_K = np.asarray(inv_freq_K, np.float64) / (2.0 * np.pi) * _TWO_POW_32
  whole_K = np.floor(turns_K)
  word_K = np.mod(whole_K, _TWO_POW_32).astype(np.uint32)
  remainder_K = ((turns_K - whole_K) / _TWO_POW_32).astype(np.float32)
  return word_K, remainder_K


def exact_angles(inv_freq_K, positions_BT: jax.Array) -> jax.Array:
  """Angles `positions · inv_freq` mod 2π in [-π, π], float32 `[..., K]` (module docstring).

  `inv_freq_K` must be a host value (`is_host_value`); `positions_BT` integer (any int32,
  negative too: the uint32 multiply wraps the same way).
  """
  word_K, remainder_K = turn_constants(inv_freq_K)
  pos_BT1 = jnp.asarray(positions_BT).astype(jnp.int32)[..., None]
  # (m · W) mod 2^32 counts 2^-32 turns; read as int32 it is the fraction centred on 0.
  word_BTK = jax.lax.bitcast_convert_type(pos_BT1, jnp.uint32) * jnp.asarray(word_K)
  turns_BTK = jax.lax.bitcast_convert_type(word_BTK, jnp.int32).astype(jnp.float32)
  turns_BTK = turns_BTK * np.float32(1.0 / _TWO_POW_32)
  turns_BTK = turns_BTK + pos_BT1.astype(jnp.float32) * jnp.asarray(remainder_K)
  turns_BTK = turns_BTK - jnp.round(turns_BTK)
  return turns_BTK * np.float32(2.0 * np.pi)


def fp32_angles(inv_freq_K, positions_BT: jax.Array) -> jax.Array:
  """HF's angles: `float32(positions) * float32(inv_freq)`, one rounded fp32 product."""
  inv_freq_K = jnp.asarray(inv_freq_K).astype(jnp.float32)
  return jnp.asarray(positions_BT).astype(jnp.float32)[..., None] * inv_freq_K
