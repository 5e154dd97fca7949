"""Block-sparse flash attention in Pallas: forward, dQ and dK/dV kernels under one custom VJP.

The forward walks, for each (batch, query head, q block), the compacted list of
non-empty kv blocks of its q block (`block_tables`, from `MaskSpec.block_map`) with the
online softmax of FlashAttention-2 (Dao 2023, Alg. 1):

  m' = max(m, rowmax(S_j)),  P = exp(S_j - m'),  l' = e^(m - m') l + rowsum(P),
  acc' = e^(m - m') acc + P V_j,  O = acc / l,  L = m + log(l).

Only the listed blocks are computed (SeerAttention / LongGen style block sparsity), and
the element mask is recomputed in the kernel from the position and segment-id blocks
(`MaskSpec.allowed`) on PARTIAL blocks only; FULL blocks skip it. Scores, softmax and
accumulators are float32 whatever the input dtype: q kᵀ takes bf16 inputs as they are
with float32 accumulation; the products with P and dS (P V, dS K, ...) run in float32
(v, k, q, dO upcast), as the twin does. Feeding P to the MXU in bf16 is a later speed
option, not done here.

Backward (FlashAttention-2, Alg. 2), two Pallas kernels that recompute P = exp(S - L)
from the saved log-sum-exp L, with Delta = rowsum(dO ∘ O) - dL (dL: the lse cotangent):

  dQ kernel, per (batch, query head, q block), over its kv list:
      dP = dO Vᵀ,  dS = P ∘ (dP - Delta),  dQ += scale · dS K;
  dK/dV kernel, per (batch, kv head, kv block), over the list of q blocks that see it
      (the transposed block map) and the G query heads of the kv head, on transposed
      blocks Sᵀ = K Qᵀ:  dV += Pᵀ dO,  dK += scale · dSᵀ Q.

Residuals are O(T): q, k, v, the fp32 output, the lse and the int tables; never P.

GQA is in the index maps: query head h reads kv head h // G (G = Hq / Hkv, the Hugging
Face `repeat_kv` order); K and V are never repeated. A query row with no visible key
outputs 0 with lse -inf and gets zero gradients.

Two launch styles share the per-block steps (`_forward_step`, `_dq_step`, `_dkv_step`):

* loop kernels (GPU style): grid (batch, head, block); each program walks its list with
  a dynamic-trip-count loop and slices the listed blocks out of whole-row refs (global
  memory pointers under Triton). The generic interpreter (`interpret=True`) runs these.
* pipelined kernels (TPU): grid (batch, head, block, step) with the tables
  scalar-prefetched into SMEM (`PrefetchScalarGridSpec`); the index maps read the
  tables, so step s copies in only the s-th listed block (padding steps repeat the last
  one, so no copy) and the carries live in VMEM scratch, as in splash attention. VMEM
  use is per block; the SMEM tables are O(nQ · nK) ints, which caps one call at about
  T = 32K with 128-blocks (use larger blocks beyond). A per-head (strided) mask has
  tables per kv head, Hkv times the SMEM: about T = 32K / sqrt(Hkv) with 128-blocks
  (11K for 8 kv heads), or larger blocks, or fewer kv heads per call.

The backend is chosen at call time, never at import: `interpret=None` runs the generic
interpreter when q lives on a CPU; otherwise the call lowers per platform
(`lax.platform_dependent`): pipelined kernels through Mosaic on TPU, loop kernels
through Triton on GPU. `interpret=pltpu.InterpretParams()` runs the pipelined TPU
kernels in Pallas' TPU interpreter. The Triton path is checked by lowering only (no GPU
has run it yet).

This module holds the custom VJP and the public entry points; the per-block steps live in
`block_sparse_steps`, the kernel bodies in `block_sparse_kernels` and the launchers in
`block_sparse_launch`. `block_sparse_fwd`/`block_sparse_bwd` expose the forward and the
backward kernels separately with the `blockwise_fwd`/`blockwise_bwd` signatures, which
is how ring attention runs its per-step computation through the kernels
(`BLOCK_IMPLS["pallas"]`). The sparse layers of LongGen (Ge et al. 2024, "A Little Goes
a Long Way: Efficient Long Context Training and Inference with Partial Contexts": sink +
window, and strided blocks with a per-head phase as in S2-Attention, Lin et al. 2024)
and AnchorAttention's documents-plus-anchor mask are block maps like any other. A
strided mask (`MaskSpec.per_head`) differs per kv head, so its block map, tables and
element mask are per kv head: each program reads the lists of its kv head (query head
h // G in the forward and dQ grids), and heads skip different blocks.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from lcjax.attention.inputs import (
  AttentionOptions,
  MaskInputs,
  attention_entry,
  backward_entry,
  check_qkv,
)
from lcjax.attention.masks import MaskSpec
from pallas_kernels.block_sparse_launch import _backward, _forward
from pallas_kernels.block_sparse_steps import _Static
from pallas_kernels.block_tables import BlockTables, block_tables

__all__ = [
  "attention_with_lse",
  "backward",
  "backward_accumulate",
  "forward",
  "grad_accumulators",
  "grads_from_accumulators",
  "block_sparse_attention",
  "block_sparse_bwd",
  "block_sparse_fwd",
  "block_sparse_tables",
  "default_interpret",
]


def default_interpret(x: jax.Array) -> bool:
  """True when `x` lives on a CPU (Pallas runs only in interpret mode there); per call."""
  try:
    platform = next(iter(x.devices())).platform
  except (AttributeError, TypeError, jax.errors.ConcretizationTypeError):
    platform = jax.default_backend()
  return platform == "cpu"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(st, q, k, v, ids: MaskInputs, tables):
  """The kernels under one custom VJP; `tables` = (forward/dQ tables, dK/dV tables)."""
  out_BHTD, lse_BH1T = _forward(st, q, k, v, *ids, tables[0])
  return out_BHTD.astype(q.dtype), lse_BH1T


def _attend_fwd(st, q, k, v, ids: MaskInputs, tables):
  out_BHTD, lse_BH1T = _forward(st, q, k, v, *ids, tables[0])
  # Residuals are O(T): inputs, tables, the fp32 output and the lse; never probabilities.
  return (out_BHTD.astype(q.dtype), lse_BH1T), (q, k, v, ids, tables, out_BHTD, lse_BH1T)


def _attend_bwd(st, res, cotangents):
  q, k, v, ids, tables, out_BHTD, lse_BH1T = res
  dout_BHTD, dlse_BH1T = cotangents
  delta_BH1T = _delta(dout_BHTD, out_BHTD, axis=-1)[:, :, None, :] - dlse_BH1T
  grads_in = tuple(jnp.zeros(x.shape, jnp.float32) for x in (q, k, v))
  dq, dk, dv = _backward(st, (q, k, v, *ids, *tables), dout_BHTD, lse_BH1T, delta_BH1T, grads_in)
  # Integer inputs (mask indices, segment ids, tables) take no cotangent.
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def _delta(dout, out, axis):
  """FlashAttention-2's D_i = rowsum(dO_i ∘ O_i) (Dao 2023, Alg. 2 line 4), in float32,
  summed over the head dim `axis` of arrays in either layout (no float32 copy of O)."""
  return jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=axis)


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _pow2_at_least(n: int) -> int:
  """The smallest power of two >= max(n, 8)."""
  return max(8, 1 << (n - 1).bit_length())


def _pad_last(x, n):
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n - x.shape[-1])])


def _check_block(name, size):
  if not isinstance(size, int) or isinstance(size, bool) or size < 8 or size % 8:
    raise ValueError(f"{name} must be a positive multiple of 8, got {size!r}")


def block_sparse_tables(
  mask: MaskSpec,
  q_pos_BT: jax.Array,
  k_pos_BS: jax.Array,
  q_seg_BT: jax.Array | None,
  k_seg_BS: jax.Array | None,
  *,
  block_q: int,
  block_kv: int,
  kv_len: int,
  num_kv_heads: int | None = None,
) -> tuple[BlockTables, BlockTables]:
  """(forward/dQ tables per q block, dK/dV tables per kv block) for padded mask inputs.

  Keys at index >= kv_len are padding and never visible. A per-head mask
  (`mask.per_head`, strided) needs `num_kv_heads` and gets tables per kv head
  ([B, Hkv, ...]); other masks one set shared by all heads ([B, ...]).
  """
  B, Sp = k_pos_BS.shape
  valid_BS = jnp.broadcast_to(jnp.arange(Sp) < kv_len, (B, Sp))
  block_map_BQK = mask.block_map(
    q_pos_BT,
    k_pos_BS,
    q_seg_BT,
    k_seg_BS,
    block_q=block_q,
    block_kv=block_kv,
    kv_valid=valid_BS,
    num_kv_heads=num_kv_heads,
  )
  return block_tables(block_map_BQK), block_tables(block_map_BQK.swapaxes(-1, -2))


class _Prepared(NamedTuple):
  """One call's statics and its padded kernel-layout inputs (heads before rows)."""

  st: _Static
  q_BHTD: jax.Array  # [B, Hq, Tp, Dp]
  k_BKSD: jax.Array  # [B, Hkv, Sp, Dp]
  v_BKSD: jax.Array
  ids: MaskInputs  # resolved, padded: q [B, Tp], kv [B, Sp]; segments None without document
  fwd_tables: BlockTables
  bwd_tables: BlockTables


def _pad_rows(x, n, mode="constant", value=0):
  """Pads axis 1 of x to length n."""
  widths = [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2)
  if mode == "edge":
    return jnp.pad(x, widths, mode="edge")
  return jnp.pad(x, widths, constant_values=value)


def _to_kernel_layout(x_BTHD, Tp, Dp):
  """[B, T, H, D] -> [B, H, Tp, Dp], zero-padded."""
  return _pad_rows(_pad_last(x_BTHD, Dp), Tp).transpose(0, 2, 1, 3)


def _prepare(q_BTHD, k_BSKD, v_BSKD, inputs: MaskInputs, opts: AttentionOptions, interpret):
  """Statics, padded inputs and block tables shared by the differentiable and ring entries."""
  G = check_qkv(q_BTHD, k_BSKD, v_BSKD)
  B, T, Hq, D = q_BTHD.shape
  S, Hkv = k_BSKD.shape[1], k_BSKD.shape[2]
  mask = opts.mask
  # Blocks never exceed the sequence (rounded up to a power of two, as Triton needs), so
  # tiny inputs are one block.
  bq, bk = min(opts.block_q, _pow2_at_least(T)), min(opts.block_kv, _pow2_at_least(S))
  Tp, Sp = _round_up(T, bq), _round_up(S, bk)
  st = _Static(mask, opts.score_scale(D), bq, bk, T, S, G, interpret, Hkv)
  q_pos, k_pos, q_seg, k_seg = inputs.resolve(mask, B, T, S)
  # Padded queries repeat the last position and segment (their rows are dropped);
  # padded keys are cut by kv_len in the tables and in the element mask.
  q_pos, k_pos = _pad_rows(q_pos, Tp, "edge"), _pad_rows(k_pos, Sp, "edge")
  if q_seg is not None:
    q_seg, k_seg = _pad_rows(q_seg, Tp, "edge"), _pad_rows(k_seg, Sp, "edge")
  fwd_tables, bwd_tables = block_sparse_tables(
    mask, q_pos, k_pos, q_seg, k_seg, block_q=bq, block_kv=bk, kv_len=S, num_kv_heads=Hkv
  )
  # Kernel layouts: heads before rows, so a block is a [rows, D] tile of one head.
  # Triton needs power-of-two tiles: zero-pad the head dim (zero columns of q and k add
  # nothing to the scores, zero columns of v give output columns that are dropped).
  Dp = _pow2_at_least(D)
  q_BHTD = _to_kernel_layout(q_BTHD, Tp, Dp)
  k_BKSD, v_BKSD = (_to_kernel_layout(x, Sp, Dp) for x in (k_BSKD, v_BSKD))
  ids = MaskInputs(q_pos, k_pos, q_seg, k_seg)
  return _Prepared(st, q_BHTD, k_BKSD, v_BKSD, ids, fwd_tables, bwd_tables)


def _from_kernel_layout(x_BHTD, T, D):
  """[B, H, Tp, Dp] -> [B, T, H, D]."""
  return x_BHTD[:, :, :T, :D].transpose(0, 2, 1, 3)


@functools.partial(jax.jit, static_argnums=(4, 5))
def _attention_with_lse(q_BTHD, k_BSKD, v_BSKD, inputs, opts, interpret):
  p = _prepare(q_BTHD, k_BSKD, v_BSKD, inputs, opts, interpret)
  tables = (p.fwd_tables, p.bwd_tables)
  out_BHTD, lse_BH1T = _attend(p.st, p.q_BHTD, p.k_BKSD, p.v_BKSD, p.ids, tables)
  T, D = q_BTHD.shape[1], q_BTHD.shape[3]
  return _from_kernel_layout(out_BHTD, T, D), lse_BH1T[:, :, 0, :T]


@functools.partial(jax.jit, static_argnums=(4, 5))
def _forward_only(q_BTHD, k_BSKD, v_BSKD, inputs, opts, interpret):
  p = _prepare(q_BTHD, k_BSKD, v_BSKD, inputs, opts, interpret)
  out_BHTD, lse_BH1T = _forward(p.st, p.q_BHTD, p.k_BKSD, p.v_BKSD, *p.ids, p.fwd_tables)
  T, D = q_BTHD.shape[1], q_BTHD.shape[3]
  return _from_kernel_layout(out_BHTD, T, D), lse_BH1T[:, :, 0, :T]


def _backward_kernels(
  q_BTHD, k_BSKD, v_BSKD, out_BTHD, lse_BHT, dout_BTHD, inputs, opts, dlse_BHT, grads_in,
  interpret,
):  # fmt: skip
  """`grads_in` + (dq, dk, dv), float32 in the kernel layout ([B, H, Tp, Dp], [B, K, Sp, Dp])."""
  p = _prepare(q_BTHD, k_BSKD, v_BSKD, inputs, opts, interpret)
  T, Tp = q_BTHD.shape[1], p.q_BHTD.shape[2]
  dout_BHTD = _to_kernel_layout(dout_BTHD, Tp, p.q_BHTD.shape[3])
  # Delta from O and dO as the caller holds them: [B, T, H] -> [B, H, T]. Padded query
  # rows get lse -inf (the kernels then give them P = 0), Delta 0 and dlse 0.
  delta_BHT = _delta(dout_BTHD, out_BTHD, axis=-1).transpose(0, 2, 1)
  if dlse_BHT is not None:
    delta_BHT = delta_BHT - dlse_BHT.astype(jnp.float32)
  pad_T = [(0, 0), (0, 0), (0, Tp - T)]
  delta_BH1T = jnp.pad(delta_BHT, pad_T)[:, :, None, :]
  lse_BH1T = jnp.pad(lse_BHT, pad_T, constant_values=-jnp.inf)[:, :, None, :]
  res = (p.q_BHTD, p.k_BKSD, p.v_BKSD, *p.ids, p.fwd_tables, p.bwd_tables)
  return _backward(p.st, res, dout_BHTD, lse_BH1T, delta_BH1T, grads_in)


@functools.partial(jax.jit, static_argnums=(7, 9))
def _backward_only(
  q_BTHD, k_BSKD, v_BSKD, out_BTHD, lse_BHT, dout_BTHD, inputs, opts, dlse_BHT, interpret
):
  grads_in = _grad_accumulators(q_BTHD, k_BSKD, opts)
  args = (q_BTHD, k_BSKD, v_BSKD, out_BTHD, lse_BHT, dout_BTHD, inputs, opts, dlse_BHT)
  grads = _backward_kernels(*args, grads_in, interpret)
  return _from_accumulators(grads, q_BTHD, k_BSKD, jnp.float32)


@functools.partial(jax.jit, static_argnums=(7, 9))
def _backward_accumulate(
  q_BTHD, k_BSKD, v_BSKD, out_BTHD, lse_BHT, dout_BTHD, inputs, opts, grads, interpret
):
  args = (q_BTHD, k_BSKD, v_BSKD, out_BTHD, lse_BHT, dout_BTHD, inputs, opts, None)
  return _backward_kernels(*args, grads, interpret)


def _grad_accumulators(q_BTHD, k_BSKD, opts: AttentionOptions):
  """Zeros (dq, dk, dv) in the kernels' layouts, float32 (rows and head dim padded)."""
  B, T, H, D = q_BTHD.shape
  S, K = k_BSKD.shape[1], k_BSKD.shape[2]
  Tp = _round_up(T, min(opts.block_q, _pow2_at_least(T)))
  Sp = _round_up(S, min(opts.block_kv, _pow2_at_least(S)))
  Dp = _pow2_at_least(D)
  dq = jnp.zeros((B, H, Tp, Dp), jnp.float32)
  return dq, *(jnp.zeros((B, K, Sp, Dp), jnp.float32) for _ in range(2))


def _from_accumulators(grads, q_BTHD, k_BSKD, dtype):
  """(dq_BTHD, dk_BSKD, dv_BSKD) in `dtype`, cast before the transposes."""
  T, S, D = q_BTHD.shape[1], k_BSKD.shape[1], q_BTHD.shape[3]
  dq, dk, dv = (g.astype(dtype) for g in grads)
  return _from_kernel_layout(dq, T, D), _from_kernel_layout(dk, S, D), _from_kernel_layout(dv, S, D)


def _check_interpret(name, q_BTHD, interpret):
  """The interpret setting to run with (the block sizes are checked by `_check_blocks`)."""
  if interpret is None:
    interpret = default_interpret(q_BTHD)
  elif not interpret and not isinstance(q_BTHD, jax.core.Tracer) and default_interpret(q_BTHD):
    raise ValueError(
      f"{name}(interpret=False) compiles for TPU or GPU, but q lives on a CPU; "
      "pass interpret=True (or None) to run the kernels in Pallas interpret mode"
    )
  return interpret if isinstance(interpret, pltpu.InterpretParams) else bool(interpret)


def _check_blocks(opts: AttentionOptions) -> None:
  _check_block("block_q", opts.block_q)
  _check_block("block_kv", opts.block_kv)


def attention_with_lse(q_BTHD, k_BSKD, v_BSKD, inputs, opts, *, interpret=None):
  """Block-sparse flash attention: (out_BTHD in q's dtype, lse_BHT fp32, -inf for empty rows).

  The twin of `lcjax.attention.blockwise.attention_with_lse` (same semantics),
  differentiable in both outputs through the Pallas dQ and dK/dV kernels. Block sizes
  are multiples of 8 (powers of two for the GPU lowering), clipped to the sequence; a
  head dim that is not a power of two is zero-padded to one (Triton tiles must be).
  `interpret=None` picks interpret mode when q lives on a CPU, decided at each call;
  `interpret=pltpu.InterpretParams(...)` runs the TPU launcher (scalar-prefetched tables
  in SMEM) in Pallas' TPU interpreter, which simulates VMEM/SMEM and checks bounds.
  """
  _check_blocks(opts)
  interpret = _check_interpret("block_sparse_attention", q_BTHD, interpret)
  return _attention_with_lse(q_BTHD, k_BSKD, v_BSKD, inputs, opts, interpret)


def forward(q_BTHD, k_BSKD, v_BSKD, inputs, opts, *, interpret=None):
  """The forward kernel alone: (out_BTHD float32, lse_BHT float32); not differentiable.

  The Pallas twin of `lcjax.attention.blockwise.forward` (FlashAttention-2, Dao 2023,
  Alg. 1), so ring attention can run each step through the kernel: the output stays
  float32 so partial results merge by their lse without rounding. Rows with no visible
  key give out 0, lse -inf.
  """
  _check_blocks(opts)
  interpret = _check_interpret("block_sparse_fwd", q_BTHD, interpret)
  return _forward_only(q_BTHD, k_BSKD, v_BSKD, inputs, opts, interpret)


def backward(
  q_BTHD, k_BSKD, v_BSKD, out_BTHD, lse_BHT, dout_BTHD, inputs, opts, dlse_BHT=None, *,
  interpret=None,
):  # fmt: skip
  """The dQ and dK/dV kernels alone: float32 (dq_BTHD, dk_BSKD, dv_BSKD) of these keys.

  The Pallas twin of `lcjax.attention.blockwise.backward` (FlashAttention-2, Dao 2023,
  Alg. 2). `out_BTHD` and `lse_BHT` may be merged over more keys than k and v (ring
  attention passes the global ones): P = exp(S - lse) is then each key's share of the
  full softmax, so dq is these keys' part of the full dq and dk, dv are exact.
  `dlse_BHT` is the lse cotangent (default 0).
  """
  _check_blocks(opts)
  interpret = _check_interpret("block_sparse_bwd", q_BTHD, interpret)
  return _backward_only(
    q_BTHD, k_BSKD, v_BSKD, out_BTHD, lse_BHT, dout_BTHD, inputs, opts, dlse_BHT, interpret
  )


def grad_accumulators(q_BTHD, k_BSKD, opts: AttentionOptions):
  """Zero (dq, dk, dv) accumulators for `backward_accumulate`, in the kernels' layouts."""
  _check_blocks(opts)
  return _grad_accumulators(q_BTHD, k_BSKD, opts)


def backward_accumulate(
  q_BTHD, k_BSKD, v_BSKD, out_BTHD, lse_BHT, dout_BTHD, inputs, opts, grads, *, interpret=None
):
  """`backward` for ring attention: gradients are added into `grads` in the kernels' layout.

  `grads` = (dq, dk, dv) float32 accumulators (`grad_accumulators`); returns them plus these
  keys' dq, dk, dv. Each kernel writes the sums over its accumulators (aliased operands), so
  a ring of W steps holds one float32 dQ buffer and one dK, dV pair per travelling chunk
  and transposes them once (`grads_from_accumulators`), instead of fresh buffers and
  transposes per step. Delta = rowsum(dO ∘ O) is formed from `out_BTHD` as given (no
  float32 copy of O).
  """
  _check_blocks(opts)
  interpret = _check_interpret("block_sparse_bwd", q_BTHD, interpret)
  args = (q_BTHD, k_BSKD, v_BSKD, out_BTHD, lse_BHT, dout_BTHD, inputs, opts, tuple(grads))
  return _backward_accumulate(*args, interpret)


def grads_from_accumulators(grads, q_BTHD, k_BSKD):
  """The accumulated (dq_BTHD, dk_BSKD, dv_BSKD) in the input dtypes (padding dropped)."""
  return _from_accumulators(grads, q_BTHD, k_BSKD, q_BTHD.dtype)


# The public keyword entry points, with `blockwise_attention_with_lse`'s signature plus
# `interpret`; 128-blocks by default (what the kernels are tuned for).
block_sparse_attention = attention_entry(
  attention_with_lse, name="block_sparse_attention", block=128
)
block_sparse_attention.__doc__ = attention_with_lse.__doc__
block_sparse_fwd = attention_entry(forward, name="block_sparse_fwd", block=128)
block_sparse_fwd.__doc__ = forward.__doc__
block_sparse_bwd = backward_entry(backward, name="block_sparse_bwd", block=128)
block_sparse_bwd.__doc__ = backward.__doc__
