"""Dense projections and the SwiGLU MLP with hand-written backward passes.

Autodiff of `x_BTI @ w_IO` on a [B, T, I] input gives the weight gradient as a dot that
contracts the two leading axes of x and dy. XLA:CPU (jax 0.10) lowers that dot to a
generic kernel and writes the producer of dy transposed ([O, B·T]) to feed it; for the
SwiGLU backward that transposed elementwise fusion alone took ~100 ms per layer of the
d512/T1024/B4 bench model, and the MLP ran at half of the matmul peak. The VJPs below
state the same gradients as plain row-major matmuls on [B·T, I] views (when no mesh
shards the rows; see `_contract_rows`):

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

from lcjax.parallel.mesh import ACTIVATION_BTF, constrain

__all__ = ["project", "swiglu"]


def _contract_rows(x_BTI: jax.Array, y_BTO: jax.Array) -> jax.Array:
  """xᵀ y summed over every leading axis: [..., I], [..., O] -> [I, O] (a weight gradient).

  Without a multi-device mesh the leading axes are merged into rows first, which XLA:CPU
  runs as one row-major GEMM (the speed-up above). Under a mesh that would merge the
  rows sharded over ('data', 'fsdp') with the tokens sharded over 'context' into one
  axis, which GSPMD cannot keep sharded: it gathers the activations instead (every chip
  all-reduced a [B·T, F] gradient in the Llama-3-8B pod compile). There the contraction
  runs over the leading axes as they are, the form autodiff emits, so each chip
  contracts its own tokens and the partial sums reduce-scatter to the sharded weight.
  """
  lead = tuple(range(x_BTI.ndim - 1))
  if _rows_may_merge():
    return _rows(x_BTI).T @ _rows(y_BTO)
  return jax.lax.dot_general(x_BTI, y_BTO, ((lead, lead), ((), ())))


def _rows(x_NI: jax.Array) -> jax.Array:
  """[..., I] -> [N, I]: all leading axes as matrix rows (a free reshape of a row-major array)."""
  return x_NI.reshape(-1, x_NI.shape[-1])


def _rows_may_merge() -> bool:
  """True when no mesh with more than one device is set (`jax.set_mesh`): nothing is sharded."""
  mesh = jax.sharding.get_abstract_mesh()
  return mesh.empty or mesh.size == 1


@jax.custom_vjp
def project(x_BTI: jax.Array, w_IO: jax.Array) -> jax.Array:
  """x @ w over the last axis of x, any number of leading axes; same dtype rules as `@`."""
  return x_BTI @ w_IO


def _project_fwd(x_BTI, w_IO):
  return x_BTI @ w_IO, (x_BTI, w_IO)


def _project_bwd(res, dy_BTO):
  x_BTI, w_IO = res
  dx_BTI = dy_BTO @ w_IO.T
  dw_IO = _contract_rows(x_BTI, dy_BTO)
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
  ab_BTF2 = constrain(x_BTD @ jnp.concatenate([gate_DF, up_DF], axis=1), ACTIVATION_BTF)
  a_BTF, b_BTF = ab_BTF2[..., :F], ab_BTF2[..., F:]
  y_BTD = (jax.nn.silu(a_BTF) * b_BTF) @ down_FD
  return y_BTD, (x_BTD, ab_BTF2, gate_DF, up_DF, down_FD)


def _swiglu_bwd(res, dy_BTD):
  x_BTD, ab_BTF2, gate_DF, up_DF, down_FD = res
  F = gate_DF.shape[1]
  a_BTF, b_BTF = ab_BTF2[..., :F], ab_BTF2[..., F:]
  silu_BTF, sigmoid_BTF = _silu_parts(a_BTF)
  d_down_FD = _contract_rows(silu_BTF * b_BTF, dy_BTD)
  dh_BTF = dy_BTD @ down_FD.T
  dsilu_BTF = sigmoid_BTF * (1 + a_BTF * (1 - sigmoid_BTF))
  dab_BTF2 = jnp.concatenate([dh_BTF * b_BTF * dsilu_BTF, dh_BTF * silu_BTF], axis=-1)
  dab_BTF2 = constrain(dab_BTF2, ACTIVATION_BTF)
  d_gate_up_DF2 = _contract_rows(x_BTD, dab_BTF2)
  dx_BTD = dab_BTF2 @ jnp.concatenate([gate_DF, up_DF], axis=1).T
  return (
    dx_BTD.astype(x_BTD.dtype),
    d_gate_up_DF2[:, :F].astype(gate_DF.dtype),
    d_gate_up_DF2[:, F:].astype(up_DF.dtype),
    d_down_FD.astype(down_FD.dtype),
  )


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)
