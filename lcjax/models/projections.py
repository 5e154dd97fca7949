"""Dense projections and the SwiGLU MLP with hand-written backward passes.

Autodiff of `x_BTI @ w_IO` on a [B, T, I] input gives the weight gradient as a dot that
contracts the two leading axes of x and dy. XLA:CPU (jax 0.10) lowers that dot to a
generic kernel and writes the producer of dy transposed ([O, B·T]) to feed it; for the
SwiGLU backward that transposed elementwise fusion alone took ~100 ms per layer of the
d512/T1024/B4 bench model, and the MLP ran at half of the matmul peak. The VJPs below
state the same gradients as plain row-major matmuls on [B·T, I] views:

  y = x W:                 dx = dy Wᵀ,   dW = xᵀ dy
  h = silu(x Wg) ⊙ (x Wu),  y = h Wd  (Shazeer 2020, eq. 6; HF `LlamaMLP`):
      a = x Wg, b = x Wu, σ = sigmoid(a), silu(a) = a σ, silu'(a) = σ (1 + a (1 - σ)),
      dWd = hᵀ dy,  dh = dy Wdᵀ,  da = dh ⊙ b ⊙ silu'(a),  db = dh ⊙ silu(a),
      [dWg | dWu] = xᵀ [da | db],  dx = [da | db] [Wg | Wu]ᵀ

with gate and up fused into one [I, 2F] matmul in both directions. The residuals are
those autodiff keeps (x, and a, b for the MLP), so memory is unchanged. The gradients
equal autodiff's up to float32 summation order (tests/test_projections.py). Products run
in the inputs' dtype, as autodiff's do.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["project", "swiglu"]


def _rows(x_NI: jax.Array) -> jax.Array:
  """[..., I] -> [N, I]: all leading axes as matrix rows."""
  return x_NI.reshape(-1, x_NI.shape[-1])


@jax.custom_vjp
def project(x_BTI: jax.Array, w_IO: jax.Array) -> jax.Array:
  """x @ w over the last axis of x, any number of leading axes; same dtype rules as `@`."""
  return x_BTI @ w_IO


def _project_fwd(x_BTI, w_IO):
  return x_BTI @ w_IO, (x_BTI, w_IO)


def _project_bwd(res, dy_BTO):
  x_BTI, w_IO = res
  dx_BTI = (_rows(dy_BTO) @ w_IO.T).reshape(x_BTI.shape)
  dw_IO = _rows(x_BTI).T @ _rows(dy_BTO)
  return dx_BTI.astype(x_BTI.dtype), dw_IO.astype(w_IO.dtype)


project.defvjp(_project_fwd, _project_bwd)


def _silu_parts(a):
  sigmoid = jax.nn.sigmoid(a)
  return a * sigmoid, sigmoid


@jax.custom_vjp
def swiglu(x_BTD: jax.Array, gate_DF: jax.Array, up_DF: jax.Array, down_FD: jax.Array):
  """down(silu(x gate) ⊙ (x up)) without biases; HF `LlamaMLP.forward`."""
  return _swiglu_fwd(x_BTD, gate_DF, up_DF, down_FD)[0]


def _swiglu_fwd(x_BTD, gate_DF, up_DF, down_FD):
  F = gate_DF.shape[1]
  ab_NF2 = _rows(x_BTD) @ jnp.concatenate([gate_DF, up_DF], axis=1)
  a_NF, b_NF = ab_NF2[:, :F], ab_NF2[:, F:]
  h_NF = jax.nn.silu(a_NF) * b_NF
  y_BTD = (h_NF @ down_FD).reshape(*x_BTD.shape[:-1], down_FD.shape[1])
  return y_BTD, (x_BTD, ab_NF2, gate_DF, up_DF, down_FD)


def _swiglu_bwd(res, dy_BTD):
  x_BTD, ab_NF2, gate_DF, up_DF, down_FD = res
  F = gate_DF.shape[1]
  a_NF, b_NF = ab_NF2[:, :F], ab_NF2[:, F:]
  silu_NF, sigmoid_NF = _silu_parts(a_NF)
  dy_ND = _rows(dy_BTD)
  d_down_FD = (silu_NF * b_NF).T @ dy_ND
  dh_NF = dy_ND @ down_FD.T
  dsilu_NF = sigmoid_NF * (1 + a_NF * (1 - sigmoid_NF))
  dab_NF2 = jnp.concatenate([dh_NF * b_NF * dsilu_NF, dh_NF * silu_NF], axis=1)
  d_gate_up_DF2 = _rows(x_BTD).T @ dab_NF2
  dx_BTD = (dab_NF2 @ jnp.concatenate([gate_DF, up_DF], axis=1).T).reshape(x_BTD.shape)
  return (
    dx_BTD.astype(x_BTD.dtype),
    d_gate_up_DF2[:, :F].astype(gate_DF.dtype),
    d_gate_up_DF2[:, F:].astype(up_DF.dtype),
    d_down_FD.astype(down_FD.dtype),
  )


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)
