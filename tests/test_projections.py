"""Hand-written VJPs of the dense projection and SwiGLU MLP against autodiff of the plain math.

Both sides compute the same products; only the matmul blocking (and for SwiGLU the
fused gate/up product) differs, so float32 results agree to a few ulps of the
accumulated magnitudes: with O(1) inputs and contractions of <= 192 terms that is
~1e-6, and 1e-5 (abs and rel) catches any wrong transpose or missing factor, which
shows at the 1e-1 level.

In bfloat16 each product and elementwise step rounds to 8 significant bits, and the
two sides round in different places, so an entry that is a sum of n terms of size t
can differ by about sqrt(n) · 2^-8 · t, far more than its own ulp when the terms
cancel. So bfloat16 results are held to the float32 computation on the same rounded
inputs: the hand-written VJP's error must be within 2x autodiff's own error, and its
norm-wise relative error within 2^-6.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcjax.models.layers import Dense, SwiGLU
from lcjax.models.projections import _swiglu_fwd, project, swiglu

FP32_TOL = dict(atol=1e-5, rtol=1e-5)


def _normal(key, shape, dtype, std=1.0):
  return (std * jax.random.normal(key, shape)).astype(dtype)


def _plain_swiglu(x, gate, up, down):
  return (jax.nn.silu(x @ gate) * (x @ up)) @ down


def _assert_close(got, want, tol):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert g.dtype == w.dtype and g.shape == w.shape
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), **tol)


def _assert_no_worse_than_autodiff(got, autodiff, exact):
  """bfloat16: `got` is as close to the float32 result `exact` as autodiff is (see top)."""
  leaves = zip(jax.tree.leaves(got), jax.tree.leaves(autodiff), jax.tree.leaves(exact), strict=True)
  for g, a, e in leaves:
    assert g.dtype == a.dtype and g.shape == a.shape
    g, a, e = (np.asarray(x, np.float32) for x in (g, a, e))
    assert np.abs(g - e).max() <= 2 * np.abs(a - e).max() + 1e-6
    assert np.linalg.norm(g - e) <= 2**-6 * np.linalg.norm(e)


def _check(loss_of, f, plain, args, dtype):
  """Value and grads of loss_of(f) against loss_of(plain) (fp32) or as above (bf16)."""
  argnums = tuple(range(len(args)))
  got = jax.jit(jax.value_and_grad(loss_of(f), argnums=argnums))(*args)
  want = jax.jit(jax.value_and_grad(loss_of(plain), argnums=argnums))(*args)
  if dtype == jnp.float32:
    _assert_close(got, want, FP32_TOL)
    return
  args32 = [a.astype(jnp.float32) for a in args]
  exact = jax.jit(jax.value_and_grad(loss_of(plain), argnums=argnums))(*args32)
  _assert_no_worse_than_autodiff(got, want, exact)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("lead", [(12,), (2, 5), (2, 3, 4)])
def test_project_matches_autodiff(dtype, lead):
  kx, kw, kc = jax.random.split(jax.random.key(0), 3)
  x = _normal(kx, (*lead, 24), dtype)
  w = _normal(kw, (24, 40), dtype, std=0.2)
  c = _normal(kc, (*lead, 40), jnp.float32)

  def loss(f):
    return lambda x, w: jnp.sum(jnp.tanh(f(x, w).astype(jnp.float32)) * c)

  _check(loss, project, jnp.matmul, (x, w), dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_swiglu_matches_autodiff(dtype):
  keys = jax.random.split(jax.random.key(1), 5)
  x = _normal(keys[0], (2, 7, 32), dtype)
  gate, up = (_normal(k, (32, 96), dtype, std=0.2) for k in keys[1:3])
  down = _normal(keys[3], (96, 32), dtype, std=0.2)
  c = _normal(keys[4], (2, 7, 32), jnp.float32)

  def loss(f):
    return lambda *a: jnp.sum(jnp.sin(f(*a).astype(jnp.float32)) * c)

  args = (x, gate, up, down)
  # The primal (no gradient) runs the forward rule too.
  np.testing.assert_array_equal(swiglu(*args), _swiglu_fwd(*args)[0])
  _check(loss, swiglu, _plain_swiglu, args, dtype)


def test_swiglu_gradient_of_silu_is_exact_at_large_gate_values():
  """silu'(a) = σ(a)(1 + a(1 - σ(a))) must not overflow or lose sign for |a| >> 1."""
  a = jnp.asarray([[-60.0, -8.0, -1.0, 0.0, 1.0, 8.0, 60.0]])
  eye = jnp.eye(7)
  # gate = up = down = I: y = silu(a) * a elementwise, so dx holds silu' at each a.
  got = jax.grad(lambda x: swiglu(x, eye, eye, eye).sum())(a)
  want = jax.grad(lambda x: _plain_swiglu(x, eye, eye, eye).sum())(a)
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, want, **FP32_TOL)


@pytest.mark.parametrize("bias", [False, True])
def test_dense_matches_nnx_linear(bias):
  """Same initial values (same key draws), same output and parameter gradients."""
  dense = Dense(16, 8, bias=bias, dtype=jnp.float32, init_std=0.3, rngs=nnx.Rngs(3))
  linear = nnx.Linear(
    16,
    8,
    use_bias=bias,
    param_dtype=jnp.float32,
    kernel_init=nnx.initializers.normal(0.3),
    rngs=nnx.Rngs(3),
  )
  np.testing.assert_array_equal(dense.kernel[...], linear.kernel[...])
  if bias:
    linear.bias[...] = jnp.arange(8.0)
    dense.bias[...] = jnp.arange(8.0)
  x = jax.random.normal(jax.random.key(4), (3, 5, 16))

  def grads(module):
    graphdef, params = nnx.split(module, nnx.Param)
    f = lambda p: jnp.sum(jnp.cos(nnx.merge(graphdef, p)(x)))  # noqa: E731
    return jax.grad(f)(params)

  np.testing.assert_allclose(dense(x), linear(x), **FP32_TOL)
  g_dense, g_linear = grads(dense), grads(linear)
  np.testing.assert_allclose(g_dense["kernel"][...], g_linear["kernel"][...], **FP32_TOL)
  if bias:
    np.testing.assert_allclose(g_dense["bias"][...], g_linear["bias"][...], **FP32_TOL)


@pytest.mark.parametrize("bias", [False, True])
def test_swiglu_module_matches_plain_math(bias):
  """The fused path (no biases) and the per-projection path (biases) give HF's MLP."""
  mlp = SwiGLU(16, 40, bias=bias, dtype=jnp.float32, init_std=0.2, rngs=nnx.Rngs(5))
  x = jax.random.normal(jax.random.key(6), (2, 3, 16))
  k = {name: getattr(mlp, name).kernel[...] for name in ("gate_proj", "up_proj", "down_proj")}
  want = _plain_swiglu(x, k["gate_proj"], k["up_proj"], k["down_proj"])
  np.testing.assert_allclose(mlp(x), want, **FP32_TOL)
