"""lcjax.positional.angles and apply_rope's VJP: exact RoPE angles against decimal arithmetic,
their behaviour under jit (traced frequencies, LongRoPE's switch), and the rotation's custom
VJP against autodiff. Split from tests/test_rope.py (the HF-equivalence tests), whose
helpers it reuses."""

import decimal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_rope import HF_CASES, _rotate

from lcjax.positional import rope

# 2π to 70 digits: the reference angles below are reduced in decimal arithmetic, independently of
# lcjax.positional.angles (fixed-point turns) and of float64.
_TWO_PI = decimal.Decimal(
  "6.283185307179586476925286766559005768394338798750211641949889184615632812572417997256069650"
)


def _decimal_angles(positions, inv_freq_K) -> np.ndarray:
  """`position * float32 inv_freq` mod 2π, computed in 60-digit decimal, as float64 [N, K]."""
  with decimal.localcontext() as ctx:
    ctx.prec = 60
    freqs = [decimal.Decimal(float(f)) for f in np.asarray(inv_freq_K, np.float32)]
    return np.array(
      [[float((decimal.Decimal(int(p)) * f) % _TWO_PI) for f in freqs] for p in positions]
    )


def _angle_error(cos_NK, sin_NK, angles_NK) -> np.ndarray:
  got = np.arctan2(np.asarray(sin_NK, np.float64), np.asarray(cos_NK, np.float64))
  return np.abs(np.angle(np.exp(1j * (got - angles_NK))))


EXACT_POSITIONS = np.array(
  [0, 1, 7, 4095, 65_537, 524_287, 524_288 + 1_001, 2**24 + 3, 10**9 + 7, 2**31 - 1, -1, -(2**31)]
)


def test_rope_cos_sin_angles_are_exact_at_every_int32_position():
  """Against decimal arithmetic: < 1e-6 rad (fp32 cos/sin on [-π, π] and the fixed-point
  turns, lcjax.positional.angles), where HF's one fp32 product is off by up to 2^-6 rad at
  512K and by whole radians near 2^31."""
  inv_freq_K, _ = rope.compute_inv_freq({"rope_type": "default", "rope_theta": 1e4}, 64)
  assert isinstance(inv_freq_K, np.ndarray)  # static frequencies stay on the host
  reference_NK = _decimal_angles(EXACT_POSITIONS, inv_freq_K)
  positions_1N = jnp.asarray(EXACT_POSITIONS[None], jnp.int32)
  exact = _angle_error(
    *(t[0] for t in rope.rope_cos_sin(inv_freq_K, 1.0, positions_1N)), reference_NK
  )
  assert exact.max() < 1e-6
  hf = rope.rope_cos_sin(inv_freq_K, 1.0, positions_1N, exact_angles=False)
  hf_error_NK = _angle_error(hf[0][0], hf[1][0], reference_NK)
  assert 3e-3 < hf_error_NK[5].max() <= 2**-6 + 1e-6  # 524,287: half the fp32 spacing 2^-5
  assert hf_error_NK[9].max() > 0.5  # 2^31 - 1 rounds to 2^31 in fp32: a whole position off


def test_exact_angles_keep_logits_relative_at_a_billion_positions():
  params = {"rope_type": "default", "rope_theta": 5e5}
  rng = np.random.default_rng(3)
  q_BTHD = jnp.asarray(rng.standard_normal((1, 16, 2, 128)), jnp.float32)
  k_BTHD = jnp.asarray(rng.standard_normal((1, 16, 2, 128)), jnp.float32)
  m_BT, n_BT = rng.integers(0, 4096, (2, 1, 16))

  def logits(delta):
    q = _rotate(params, 128, q_BTHD, jnp.asarray(m_BT + delta, jnp.int32))
    k = _rotate(params, 128, k_BTHD, jnp.asarray(n_BT + delta, jnp.int32))
    return np.asarray(jnp.sum(q * k, axis=-1))

  # |q||k| ~ 128: fp32 rotations of ~1e-7 relative error move a logit by ~1e-5.
  np.testing.assert_allclose(logits(10**9), logits(0), atol=1e-4)


def test_exact_angles_under_jit_and_the_traced_fallback():
  """In a model, compute_inv_freq runs inside jit: static frequencies keep exact angles; traced
  frequencies fall back to HF's fp32 product; LongRoPE picks between two exact tables."""
  positions_BT = jnp.asarray([[3, 70_000, 600_000]], jnp.int32)
  default = {"rope_type": "default", "rope_theta": 1e4}
  eager = rope.rope_cos_sin(*rope.compute_inv_freq(default, 64), positions_BT)
  jitted = jax.jit(lambda p: rope.cos_sin_for_positions(default, 64, p))(positions_BT)
  np.testing.assert_allclose(jitted, eager, atol=1e-6)

  # Frequencies passed as a traced argument (dynamic NTK's, inside a model) cannot be read
  # on the host: HF's fp32 product, to the bit.
  inv_freq_K, _ = rope.compute_inv_freq(default, 64)
  traced = jax.jit(lambda f, p: rope.rope_cos_sin(f, 1.0, p))(inv_freq_K, positions_BT)
  fp32 = rope.rope_cos_sin(inv_freq_K, 1.0, positions_BT, exact_angles=False)
  np.testing.assert_allclose(traced, fp32, atol=1e-6)
  assert np.abs(np.asarray(eager) - np.asarray(fp32)).max() > 1e-3  # the fallback is visible

  _, hf_json, head_dim, _ = next(c for c in HF_CASES if c[0] == "longrope_64")
  longrope = rope.standardize_rope_parameters(hf_json)
  original = longrope["original_max_position_embeddings"]
  fn = jax.jit(lambda p: rope.cos_sin_for_positions(longrope, head_dim, p))
  for positions in ([[0, 5, original - 1]], [[0, 5, original]]):
    positions_BT = jnp.asarray(positions, jnp.int32)
    seq_len = int(positions_BT.max()) + 1
    expected = rope.rope_cos_sin(
      *rope.compute_inv_freq(longrope, head_dim, seq_len=seq_len), positions_BT
    )
    np.testing.assert_allclose(fn(positions_BT), expected, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_apply_rope_vjp_matches_autodiff_of_the_rotation(dtype):
  """apply_rope's custom VJP (the cotangent rotated by -θ; table cotangents only when the
  tables are differentiated) against autodiff of the same rotation: x, cos, sin, and
  tables broadcast over the batch. fp32 sums in both: a few ulps apart; bf16 dx is the
  same fp32 rotation rounded once."""
  rng = np.random.default_rng(5)
  x_BTHD = jnp.asarray(rng.standard_normal((2, 6, 3, 16)), dtype)
  cos_BTK, sin_BTK = (jnp.asarray(rng.standard_normal((1, 6, 8)), jnp.float32) for _ in "cs")
  w_BTHD = jnp.asarray(rng.standard_normal((2, 6, 3, 16)), jnp.float32)

  def loss(rotate):
    return lambda x, c, s: jnp.sum(rotate(x, c, s).astype(jnp.float32) * w_BTHD)

  got = jax.grad(loss(rope.apply_rope), argnums=(0, 1, 2))(x_BTHD, cos_BTK, sin_BTK)
  want = jax.grad(loss(rope._rotate_half_split), argnums=(0, 1, 2))(x_BTHD, cos_BTK, sin_BTK)
  tol = dict(atol=1e-5, rtol=1e-5) if dtype == jnp.float32 else dict(atol=2e-2, rtol=1e-2)
  for name, g, g_want in zip(("dx", "dcos", "dsin"), got, want, strict=True):
    assert g.shape == g_want.shape and g.dtype == g_want.dtype, name
    np.testing.assert_allclose(
      np.asarray(g, np.float32), np.asarray(g_want, np.float32), **tol, err_msg=name
    )
  dx_only = jax.grad(loss(rope.apply_rope))(x_BTHD, cos_BTK, sin_BTK)  # tables not traced
  np.testing.assert_array_equal(np.asarray(dx_only, np.float32), np.asarray(got[0], np.float32))
