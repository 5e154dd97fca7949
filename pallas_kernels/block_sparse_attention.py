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
  T = 32K with 128-blocks (use larger blocks beyond).

The backend is chosen at call time, never at import: `interpret=None` runs the generic
interpreter when q lives on a CPU; otherwise the call lowers per platform
(`lax.platform_dependent`): pipelined kernels through Mosaic on TPU, loop kernels
through Triton on GPU. `interpret=pltpu.InterpretParams()` runs the pipelined TPU
kernels in Pallas' TPU interpreter. The Triton path is checked by lowering only (no GPU
has run it yet).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from lcjax.attention.masks import PARTIAL, MaskSpec, resolve_mask_inputs
from lcjax.attention.reference import check_qkv
from pallas_kernels.block_tables import BlockTables, block_tables

__all__ = ["block_sparse_attention", "block_sparse_tables", "default_interpret"]


class _Static(NamedTuple):
  """Everything static about one call (hashable: the nondiff argument of the VJP)."""

  mask: MaskSpec
  scale: float
  block_q: int
  block_kv: int
  q_len: int  # T before padding
  kv_len: int  # S before padding: keys at index >= kv_len are padding, never visible
  groups: int  # G = Hq // Hkv
  interpret: bool | pltpu.InterpretParams  # InterpretParams: the TPU launcher, simulated


def default_interpret(x: jax.Array) -> bool:
  """True when `x` lives on a CPU (Pallas runs only in interpret mode there); per call."""
  try:
    platform = next(iter(x.devices())).platform
  except (AttributeError, TypeError, jax.errors.ConcretizationTypeError):
    platform = jax.default_backend()
  return platform == "cpu"


# ---------------------------------------------------------------------------------------
# Kernel bodies. The first three refs are the flattened tables (SMEM on TPU); then the
# position (and, with `document`, segment-id) rows; then the data blocks.


def _split_mask_refs(st, refs):
  """(q_pos, k_pos, q_seg, k_seg, rest): segment refs are present only with `document`."""
  if st.mask.document:
    return refs[0], refs[1], refs[2], refs[3], refs[4:]
  return refs[0], refs[1], None, None, refs[2:]


def _dot_t(x, y):
  """x yᵀ with fp32 accumulation (contracting the last dims)."""
  return lax.dot_general(x, y, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _mask_block(st, s, kind, q_pos, k_pos, q_seg, k_seg, k_index):
  """On PARTIAL blocks, -inf where `MaskSpec.allowed` is False or the key is padding.

  The ids broadcast to s's shape: [bq, 1] against [1, bk] for a q kᵀ block, or [1, bq]
  against [bk, 1] for a k qᵀ block (the dK/dV kernel). FULL blocks skip the mask.
  """

  def apply_mask(s):
    allowed = st.mask.allowed(q_pos, k_pos, q_seg, k_seg)
    allowed = jnp.logical_and(allowed, k_index < st.kv_len)
    return jnp.where(allowed, s, -jnp.inf)

  return lax.cond(kind == PARTIAL, apply_mask, lambda s: s, s)


def _kv_block_ids(st, k_pos_ref, k_seg_ref, k_start):
  """Key positions, segments [1, bk] and key indices of the kv block at k_start."""
  cols = pl.ds(k_start, st.block_kv)
  k_seg = None if k_seg_ref is None else k_seg_ref[:, cols]
  k_index = k_start + lax.broadcasted_iota(jnp.int32, (1, st.block_kv), 1)
  return k_pos_ref[:, cols], k_seg, k_index


# Per-block steps on values, shared by the loop kernels (one program walks its list) and
# the pipelined TPU kernels (one grid step per list entry, carries in VMEM scratch).
# q_ids = (q_pos, q_seg) and k_ids = (k_pos, k_seg, k_index) as `_mask_block` takes them.


def _forward_step(st, carry, q, q_ids, k, v, k_ids, kind):
  """One online-softmax update (FlashAttention-2 Alg. 1, inner loop) with kv block j."""
  m, denom, acc = carry
  scores = _mask_block(st, _dot_t(q, k) * st.scale, kind, q_ids[0], k_ids[0], q_ids[1], *k_ids[1:])
  m_new = jnp.maximum(m, jnp.max(scores, axis=1, keepdims=True))
  # While a row has seen no visible key its max is -inf; shift by 0 so exp gives 0.
  m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
  p = jnp.exp(scores - m_safe)
  alpha = jnp.exp(m - m_safe)
  denom = alpha * denom + jnp.sum(p, axis=1, keepdims=True)
  acc = alpha * acc + jnp.dot(p, v.astype(jnp.float32), preferred_element_type=jnp.float32)
  return m_new, denom, acc


def _forward_init(bq, d):
  return (
    jnp.full((bq, 1), -jnp.inf, jnp.float32),
    jnp.zeros((bq, 1), jnp.float32),
    jnp.zeros((bq, d), jnp.float32),
  )


def _forward_finish(carry, o_ref, lse_ref):
  m, denom, acc = carry
  nonempty = denom > 0
  denom_safe = jnp.where(nonempty, denom, 1.0)
  o_ref[...] = (acc / denom_safe).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(nonempty, m + jnp.log(denom_safe), -jnp.inf)


def _dq_step(st, dq, q, q_ids, do, lse, delta, k, v, k_ids, kind):
  """dQ += dS K for kv block j (FlashAttention-2 Alg. 2), unscaled."""
  scores = _mask_block(st, _dot_t(q, k) * st.scale, kind, q_ids[0], k_ids[0], q_ids[1], *k_ids[1:])
  p = jnp.exp(scores - lse)  # P_ij = exp(S_ij - L_i); lse is +inf on empty rows
  ds = p * (_dot_t(do, v) - delta)  # dS = P ∘ (dO Vᵀ - Delta)
  return dq + jnp.dot(ds, k.astype(jnp.float32), preferred_element_type=jnp.float32)


def _dkv_step(st, carry, k, v, k_ids, q, q_ids, do, lse_row, delta_row, kind):
  """dV += Pᵀ dO, dK += dSᵀ Q (unscaled) for one q block of one query head.

  Works on transposed blocks Sᵀ = K Qᵀ [bk, bq], so every product is a plain or an
  A Bᵀ matmul and the per-query values (ids, lse, Delta) are lane-dense rows [1, bq].
  """
  dk, dv = carry
  scores_t = _mask_block(
    st, _dot_t(k, q) * st.scale, kind, q_ids[0], k_ids[0], q_ids[1], *k_ids[1:]
  )
  p_t = jnp.exp(scores_t - lse_row)  # Pᵀ
  dv = dv + jnp.dot(p_t, do.astype(jnp.float32), preferred_element_type=jnp.float32)
  ds_t = p_t * (_dot_t(v, do) - delta_row)  # dSᵀ = Pᵀ ∘ (V dOᵀ - Delta)
  dk = dk + jnp.dot(ds_t, q.astype(jnp.float32), preferred_element_type=jnp.float32)
  return dk, dv


def _q_block_ids(q_pos_ref, q_seg_ref):
  return q_pos_ref[...], None if q_seg_ref is None else q_seg_ref[...]


def _kv_column_ids(st, k_pos_ref, k_seg_ref, j):
  """Key ids of kv block j as columns [bk, 1] (for the transposed dK/dV blocks)."""
  k_index = j * st.block_kv + lax.broadcasted_iota(jnp.int32, (st.block_kv, 1), 0)
  return k_pos_ref[...], None if k_seg_ref is None else k_seg_ref[...], k_index


def _kv_row_block_ids(st, k_pos_ref, k_seg_ref, j):
  """Key ids of kv block j from its own [1, bk] blocks (pipelined kernels)."""
  k_index = j * st.block_kv + lax.broadcasted_iota(jnp.int32, (1, st.block_kv), 1)
  return k_pos_ref[...], None if k_seg_ref is None else k_seg_ref[...], k_index


# Loop kernels: one program per (batch, head, block) walks its whole list with a
# dynamic-trip-count loop, slicing blocks out of whole-row refs (GPU style; also the
# generic interpreter's path).


def _forward_kernel(kv_index_ref, kv_count_ref, kv_kind_ref, *refs, st, n_q, n_kv):
  """FlashAttention-2 Alg. 1 for one (batch, query head, q block) over its kv list."""
  q_pos_ref, k_pos_ref, q_seg_ref, k_seg_ref, refs = _split_mask_refs(st, refs)
  q_ref, k_ref, v_ref, o_ref, lse_ref = refs
  row = pl.program_id(0) * n_q + pl.program_id(2)
  q, q_ids = q_ref[...], _q_block_ids(q_pos_ref, q_seg_ref)

  def step(s, carry):
    k_start = pl.multiple_of(kv_index_ref[row * n_kv + s] * st.block_kv, st.block_kv)
    rows = pl.ds(k_start, st.block_kv)
    k_ids = _kv_block_ids(st, k_pos_ref, k_seg_ref, k_start)
    kind = kv_kind_ref[row * n_kv + s]
    return _forward_step(st, carry, q, q_ids, k_ref[rows, :], v_ref[rows, :], k_ids, kind)

  carry = lax.fori_loop(0, kv_count_ref[row], step, _forward_init(*q_ref.shape))
  _forward_finish(carry, o_ref, lse_ref)


def _dq_kernel(kv_index_ref, kv_count_ref, kv_kind_ref, *refs, st, n_q, n_kv):
  """dQ of FlashAttention-2 Alg. 2 for one (batch, query head, q block) over its kv list."""
  q_pos_ref, k_pos_ref, q_seg_ref, k_seg_ref, refs = _split_mask_refs(st, refs)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
  row = pl.program_id(0) * n_q + pl.program_id(2)
  q, q_ids = q_ref[...], _q_block_ids(q_pos_ref, q_seg_ref)
  do, lse, delta = do_ref[...], lse_ref[...], delta_ref[...]

  def step(s, dq):
    k_start = pl.multiple_of(kv_index_ref[row * n_kv + s] * st.block_kv, st.block_kv)
    rows = pl.ds(k_start, st.block_kv)
    k_ids = _kv_block_ids(st, k_pos_ref, k_seg_ref, k_start)
    kind = kv_kind_ref[row * n_kv + s]
    return _dq_step(st, dq, q, q_ids, do, lse, delta, k_ref[rows, :], v_ref[rows, :], k_ids, kind)

  dq = lax.fori_loop(0, kv_count_ref[row], step, jnp.zeros(q_ref.shape, jnp.float32))
  dq_ref[...] = (dq * st.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_index_ref, q_count_ref, q_kind_ref, *refs, st, n_q, n_kv):
  """dK, dV of FlashAttention-2 Alg. 2 for one (batch, kv head, kv block).

  Loops over the q blocks whose rows see this kv block (the transposed tables) and the
  G query heads that share the kv head; the q-side refs hold all T rows of the heads.
  """
  q_pos_ref, k_pos_ref, q_seg_ref, k_seg_ref, refs = _split_mask_refs(st, refs)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs
  j = pl.program_id(2)
  row = pl.program_id(0) * n_kv + j
  k, v, k_ids = k_ref[...], v_ref[...], _kv_column_ids(st, k_pos_ref, k_seg_ref, j)

  def step(s, carry):
    q_start = pl.multiple_of(q_index_ref[row * n_q + s] * st.block_q, st.block_q)
    rows = pl.ds(q_start, st.block_q)
    q_ids = (q_pos_ref[:, rows], None if q_seg_ref is None else q_seg_ref[:, rows])
    kind = q_kind_ref[row * n_q + s]
    for g in range(st.groups):  # the query heads of this kv head (static, small)
      q, do = q_ref[g, rows, :], do_ref[g, rows, :]
      lse_row, delta_row = lse_ref[g, :, rows], delta_ref[g, :, rows]
      carry = _dkv_step(st, carry, k, v, k_ids, q, q_ids, do, lse_row, delta_row, kind)
    return carry

  zeros = jnp.zeros(k_ref.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, q_count_ref[row], step, (zeros, zeros))
  dk_ref[...] = (dk * st.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


# Pipelined TPU kernels: grid (batch, head, block, step); the index maps read the
# scalar-prefetched tables, so step s of q block i copies in only the s-th listed kv
# block (padding steps repeat the last one: no copy) and the carries live in VMEM
# scratch across steps, as in splash attention.


def _forward_kernel_tpu(kv_index_ref, kv_count_ref, kv_kind_ref, *refs, st, n_q, n_kv):
  """FlashAttention-2 Alg. 1, step s of (batch, query head, q block): its s-th kv block."""
  q_pos_ref, k_pos_ref, q_seg_ref, k_seg_ref, refs = _split_mask_refs(st, refs)
  q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, denom_sc, acc_sc = refs
  row, s = pl.program_id(0) * n_q + pl.program_id(2), pl.program_id(3)

  @pl.when(s == 0)
  def _init():
    for ref, value in zip((m_sc, denom_sc, acc_sc), _forward_init(*q_ref.shape), strict=True):
      ref[...] = value

  @pl.when(s < kv_count_ref[row])
  def _visit():
    j = kv_index_ref[row * n_kv + s]
    k_ids = _kv_row_block_ids(st, k_pos_ref, k_seg_ref, j)
    carry = (m_sc[...], denom_sc[...], acc_sc[...])
    q_ids = _q_block_ids(q_pos_ref, q_seg_ref)
    kind = kv_kind_ref[row * n_kv + s]
    carry = _forward_step(st, carry, q_ref[...], q_ids, k_ref[...], v_ref[...], k_ids, kind)
    for ref, value in zip((m_sc, denom_sc, acc_sc), carry, strict=True):
      ref[...] = value

  @pl.when(s == n_kv - 1)
  def _finish():
    _forward_finish((m_sc[...], denom_sc[...], acc_sc[...]), o_ref, lse_ref)


def _dq_kernel_tpu(kv_index_ref, kv_count_ref, kv_kind_ref, *refs, st, n_q, n_kv):
  """dQ of FlashAttention-2 Alg. 2, step s of (batch, query head, q block)."""
  q_pos_ref, k_pos_ref, q_seg_ref, k_seg_ref, refs = _split_mask_refs(st, refs)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_sc = refs
  row, s = pl.program_id(0) * n_q + pl.program_id(2), pl.program_id(3)

  @pl.when(s == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  @pl.when(s < kv_count_ref[row])
  def _visit():
    j = kv_index_ref[row * n_kv + s]
    k_ids = _kv_row_block_ids(st, k_pos_ref, k_seg_ref, j)
    q_ids = _q_block_ids(q_pos_ref, q_seg_ref)
    kind = kv_kind_ref[row * n_kv + s]
    q_side = (q_ref[...], q_ids, do_ref[...], lse_ref[...], delta_ref[...])
    dq_sc[...] = _dq_step(st, dq_sc[...], *q_side, k_ref[...], v_ref[...], k_ids, kind)

  @pl.when(s == n_kv - 1)
  def _finish():
    dq_ref[...] = (dq_sc[...] * st.scale).astype(dq_ref.dtype)


def _dkv_kernel_tpu(q_index_ref, q_count_ref, q_kind_ref, *refs, st, n_q, n_kv):
  """dK, dV of FlashAttention-2 Alg. 2, step s of (batch, kv head, kv block): the s-th q
  block that sees it, for the G query heads of the kv head (q-side blocks [G, bq, .])."""
  q_pos_ref, k_pos_ref, q_seg_ref, k_seg_ref, refs = _split_mask_refs(st, refs)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_sc, dv_sc = refs
  j, s = pl.program_id(2), pl.program_id(3)
  row = pl.program_id(0) * n_kv + j

  @pl.when(s == 0)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  @pl.when(s < q_count_ref[row])
  def _visit():
    k_ids = _kv_column_ids(st, k_pos_ref, k_seg_ref, j)
    q_ids = _q_block_ids(q_pos_ref, q_seg_ref)  # rows [1, bq]
    kind = q_kind_ref[row * n_q + s]
    carry, k, v = (dk_sc[...], dv_sc[...]), k_ref[...], v_ref[...]
    for g in range(st.groups):  # the query heads of this kv head (static, small)
      q_side = (q_ref[g], q_ids, do_ref[g], lse_ref[g], delta_ref[g])
      carry = _dkv_step(st, carry, k, v, k_ids, *q_side, kind)
    dk_sc[...], dv_sc[...] = carry

  @pl.when(s == n_q - 1)
  def _finish():
    dk_ref[...] = (dk_sc[...] * st.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


# ---------------------------------------------------------------------------------------
# Launchers: the loop kernels run interpreted or through Triton; the pipelined kernels
# run on TPU (or in the TPU interpreter).


class _Variant(NamedTuple):
  """One way to launch a kernel: body, grid, specs (without the tables) and scratch."""

  kernel: object
  grid: tuple
  in_specs: list
  out_specs: object
  scratch: tuple = ()


def _launch(st, tables, inputs, out_shapes, loop: _Variant, tpu: _Variant):
  """Runs the call: interpreted, or lowered per platform (TPU / GPU) at lowering time."""

  def generic(compiler_params, interpret, *args):
    table_specs = [pl.BlockSpec(t.shape, lambda *_: (0,)) for t in tables]
    return pl.pallas_call(
      loop.kernel,
      grid=loop.grid,
      in_specs=table_specs + loop.in_specs,
      out_specs=loop.out_specs,
      out_shape=out_shapes,
      compiler_params=compiler_params,
      interpret=interpret,
    )(*args)

  def on_tpu(*args, interpret=False):
    grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=len(tables),
      grid=tpu.grid,
      in_specs=tpu.in_specs,
      out_specs=tpu.out_specs,
      scratch_shapes=list(tpu.scratch),
    )
    semantics = ("parallel",) * (len(tpu.grid) - 1) + ("arbitrary",)
    params = pltpu.CompilerParams(dimension_semantics=semantics)
    return pl.pallas_call(
      tpu.kernel,
      grid_spec=grid_spec,
      out_shape=out_shapes,
      compiler_params=params,
      interpret=interpret,
    )(*args)

  args = (*tables, *inputs)
  if isinstance(st.interpret, pltpu.InterpretParams):
    return on_tpu(*args, interpret=st.interpret)
  if st.interpret:
    return generic(None, True, *args)
  gpu = functools.partial(generic, pltriton.CompilerParams(num_warps=4, num_stages=2), False)
  return lax.platform_dependent(*args, tpu=on_tpu, cuda=gpu, rocm=gpu)


def _rows_spec(block, *, head_axis=True, group=1):
  """BlockSpec of a [B, H, T, X] array cut into row blocks along T; head h reads h // group."""
  if head_axis:
    return pl.BlockSpec(
      (None, None, block[0], block[1]), lambda b, h, i, *_: (b, lax.div(h, group), i, 0)
    )
  return pl.BlockSpec((None, block[0], block[1]), lambda b, h, i, *_: (b, i, 0))


def _whole_spec(shape, *, head_axis=True, group=1):
  """BlockSpec of all rows [.., T, X] of one batch row (and head h // group).

  `lax.div`, not `//`: floor division of traced ints lowers through `sign`, which Mosaic
  only lowers for a known TPU generation.
  """
  if head_axis:
    return pl.BlockSpec((None, None, *shape), lambda b, h, i, *_: (b, lax.div(h, group), 0, 0))
  return pl.BlockSpec((None, *shape), lambda b, h, i, *_: (b, 0, 0))


def _listed(n_outer, n_steps):
  """The block that grid step (b, ., i, s) visits, read from a scalar-prefetched table."""
  return lambda b, i, s, index_ref: index_ref[(b * n_outer + i) * n_steps + s]


def _mask_inputs(st, q_ids_BT, k_ids_BS, *, transposed):
  """The kernels' position (and segment-id) inputs, with loop and pipelined specs.

  From int [B, T] / [B, S]. For q kᵀ blocks (forward, dQ; grid over q blocks) q ids are
  column blocks [bq, 1] and k ids a row [1, S] (loop) or the listed [1, bk] block
  (pipelined); for k qᵀ blocks (dK/dV; grid over kv blocks) q ids are a row [1, T] or
  the listed [1, bq] block, and k ids column blocks [bk, 1].
  """
  Tp, Sp = q_ids_BT[0].shape[1], k_ids_BS[0].shape[1]
  n_q, n_kv = Tp // st.block_q, Sp // st.block_kv
  if transposed:
    listed = _listed(n_kv, n_q)
    own_spec = _rows_spec((st.block_kv, 1), head_axis=False)  # k ids, by kv block
    loop_other = _whole_spec((1, Tp), head_axis=False)
    tpu_other = pl.BlockSpec(
      (None, 1, st.block_q), lambda b, h, j, s, idx, *_: (b, 0, listed(b, j, s, idx))
    )
    as_q, as_k = (lambda x: x[:, None, :]), (lambda x: x[:, :, None])
  else:
    listed = _listed(n_q, n_kv)
    own_spec = _rows_spec((st.block_q, 1), head_axis=False)  # q ids, by q block
    loop_other = _whole_spec((1, Sp), head_axis=False)
    tpu_other = pl.BlockSpec(
      (None, 1, st.block_kv), lambda b, h, i, s, idx, *_: (b, 0, listed(b, i, s, idx))
    )
    as_q, as_k = (lambda x: x[:, :, None]), (lambda x: x[:, None, :])
  q_spec, k_spec = (loop_other, own_spec) if transposed else (own_spec, loop_other)
  tpu_q, tpu_k = (tpu_other, own_spec) if transposed else (own_spec, tpu_other)
  n_ids = 2 if st.mask.document else 1  # positions, and segment ids with `document`
  args = [as_q(q_ids_BT[0]), as_k(k_ids_BS[0])]
  if n_ids == 2:
    args += [as_q(q_ids_BT[1]), as_k(k_ids_BS[1])]
  return args, [q_spec, k_spec] * n_ids, [tpu_q, tpu_k] * n_ids


def _flat(tables: BlockTables):
  return tuple(t.reshape(-1).astype(jnp.int32) for t in tables)


def _vmem(*shape):
  return pltpu.VMEM(shape, jnp.float32)


def _forward(st, q_BHTD, k_BKSD, v_BKSD, q_pos, k_pos, q_seg, k_seg, fwd_tables):
  B, Hq, Tp, D = q_BHTD.shape
  Sp = k_BKSD.shape[2]
  G, bq, bk = st.groups, st.block_q, st.block_kv
  n_q, n_kv = Tp // bq, Sp // bk
  ids, loop_id_specs, tpu_id_specs = _mask_inputs(
    st, (q_pos, q_seg), (k_pos, k_seg), transposed=False
  )
  listed = _listed(n_q, n_kv)
  q_tpu = pl.BlockSpec((None, None, bq, D), lambda b, h, i, s, *_: (b, h, i, 0))
  kv_tpu = pl.BlockSpec(
    (None, None, bk, D), lambda b, h, i, s, idx, *_: (b, lax.div(h, G), listed(b, i, s, idx), 0)
  )
  out_tpu = [q_tpu, pl.BlockSpec((None, None, bq, 1), lambda b, h, i, s, *_: (b, h, i, 0))]
  statics = dict(st=st, n_q=n_q, n_kv=n_kv)
  loop = _Variant(
    functools.partial(_forward_kernel, **statics),
    (B, Hq, n_q),
    loop_id_specs + [_rows_spec((bq, D)), *[_whole_spec((Sp, D), group=G)] * 2],
    [_rows_spec((bq, D)), _rows_spec((bq, 1))],
  )
  tpu = _Variant(
    functools.partial(_forward_kernel_tpu, **statics),
    (B, Hq, n_q, n_kv),
    tpu_id_specs + [q_tpu, kv_tpu, kv_tpu],
    out_tpu,
    [_vmem(bq, 1), _vmem(bq, 1), _vmem(bq, D)],
  )
  out_shapes = [
    jax.ShapeDtypeStruct((B, Hq, Tp, D), jnp.float32),
    jax.ShapeDtypeStruct((B, Hq, Tp, 1), jnp.float32),
  ]
  return _launch(st, _flat(fwd_tables), [*ids, q_BHTD, k_BKSD, v_BKSD], out_shapes, loop, tpu)


def _backward(st, res, dout_BHTD, dlse_BHT1):
  q_BHTD, k_BKSD, v_BKSD, q_pos, k_pos, q_seg, k_seg, fwd_tables, bwd_tables, o, lse = res
  B, Hq, Tp, D = q_BHTD.shape
  Hkv, Sp = k_BKSD.shape[1], k_BKSD.shape[2]
  G, bq, bk = st.groups, st.block_q, st.block_kv
  n_q, n_kv = Tp // bq, Sp // bk
  statics = dict(st=st, n_q=n_q, n_kv=n_kv)
  # Delta_i = rowsum(dO_i ∘ O_i) - dL_i, since d lse_i / d S_ij = P_ij. dO stays in the
  # input dtype for the kernels (they upcast), which halves its on-chip size for bf16.
  dout_BHTD = dout_BHTD.astype(q_BHTD.dtype)
  delta_BHT1 = jnp.sum(dout_BHTD.astype(jnp.float32) * o, axis=-1, keepdims=True) - dlse_BHT1
  # Rows with no visible key have lse -inf; +inf makes their P = exp(S - inf) = 0.
  lse_BHT1 = jnp.where(lse == -jnp.inf, jnp.inf, lse)

  # dQ: grid over q blocks, like the forward.
  ids, loop_id_specs, tpu_id_specs = _mask_inputs(
    st, (q_pos, q_seg), (k_pos, k_seg), transposed=False
  )
  listed = _listed(n_q, n_kv)
  q_rows = [_rows_spec((bq, D)), _rows_spec((bq, 1))]
  q_tpu = pl.BlockSpec((None, None, bq, D), lambda b, h, i, s, *_: (b, h, i, 0))
  col_tpu = pl.BlockSpec((None, None, bq, 1), lambda b, h, i, s, *_: (b, h, i, 0))
  kv_tpu = pl.BlockSpec(
    (None, None, bk, D), lambda b, h, i, s, idx, *_: (b, lax.div(h, G), listed(b, i, s, idx), 0)
  )
  loop = _Variant(
    functools.partial(_dq_kernel, **statics),
    (B, Hq, n_q),
    loop_id_specs
    + [q_rows[0], *[_whole_spec((Sp, D), group=G)] * 2, q_rows[0], q_rows[1], q_rows[1]],
    q_rows[0],
  )
  tpu = _Variant(
    functools.partial(_dq_kernel_tpu, **statics),
    (B, Hq, n_q, n_kv),
    tpu_id_specs + [q_tpu, kv_tpu, kv_tpu, q_tpu, col_tpu, col_tpu],
    q_tpu,
    [_vmem(bq, D)],
  )
  dq_BHTD = _launch(
    st,
    _flat(fwd_tables),
    [*ids, q_BHTD, k_BKSD, v_BKSD, dout_BHTD, lse_BHT1, delta_BHT1],
    jax.ShapeDtypeStruct((B, Hq, Tp, D), jnp.float32),
    loop,
    tpu,
  )

  # dK/dV: grid over kv heads and kv blocks; the G query heads of kv head k are rows
  # k*G..k*G+G-1. Per-query values (lse, Delta) are lane-dense [1, T] rows for Sᵀ blocks.
  ids, loop_id_specs, tpu_id_specs = _mask_inputs(
    st, (q_pos, q_seg), (k_pos, k_seg), transposed=True
  )
  listed = _listed(n_kv, n_q)
  q_BKGTD, do_BKGTD = (x.reshape(B, Hkv, G, Tp, D) for x in (q_BHTD, dout_BHTD))
  lse_BKG1T, delta_BKG1T = (x.reshape(B, Hkv, G, 1, Tp) for x in (lse_BHT1, delta_BHT1))

  def group_spec(*shape):
    return pl.BlockSpec((None, None, G, *shape), lambda b, h, j, *_: (b, h, 0, 0, 0))

  q_tpu = pl.BlockSpec(
    (None, None, G, bq, D), lambda b, h, j, s, idx, *_: (b, h, 0, listed(b, j, s, idx), 0)
  )
  row_tpu = pl.BlockSpec(
    (None, None, G, 1, bq), lambda b, h, j, s, idx, *_: (b, h, 0, 0, listed(b, j, s, idx))
  )
  kv_block = _rows_spec((bk, D))
  loop = _Variant(
    functools.partial(_dkv_kernel, **statics),
    (B, Hkv, n_kv),
    loop_id_specs
    + [group_spec(Tp, D), kv_block, kv_block, group_spec(Tp, D)]
    + [group_spec(1, Tp), group_spec(1, Tp)],
    [kv_block] * 2,
  )
  tpu = _Variant(
    functools.partial(_dkv_kernel_tpu, **statics),
    (B, Hkv, n_kv, n_q),
    tpu_id_specs + [q_tpu, kv_block, kv_block, q_tpu, row_tpu, row_tpu],
    [kv_block] * 2,
    [_vmem(bk, D), _vmem(bk, D)],
  )
  dk_BKSD, dv_BKSD = _launch(
    st,
    _flat(bwd_tables),
    [*ids, q_BKGTD, k_BKSD, v_BKSD, do_BKGTD, lse_BKG1T, delta_BKG1T],
    [jax.ShapeDtypeStruct((B, Hkv, Sp, D), jnp.float32)] * 2,
    loop,
    tpu,
  )
  return dq_BHTD, dk_BKSD, dv_BKSD


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(st, q, k, v, q_pos, k_pos, q_seg, k_seg, fwd_tables, bwd_tables):
  out_BHTD, lse_BHT1 = _forward(st, q, k, v, q_pos, k_pos, q_seg, k_seg, fwd_tables)
  return out_BHTD.astype(q.dtype), lse_BHT1


def _attend_fwd(st, q, k, v, q_pos, k_pos, q_seg, k_seg, fwd_tables, bwd_tables):
  out_BHTD, lse_BHT1 = _forward(st, q, k, v, q_pos, k_pos, q_seg, k_seg, fwd_tables)
  # Residuals are O(T): inputs, tables, the fp32 output and the lse; never probabilities.
  res = (q, k, v, q_pos, k_pos, q_seg, k_seg, fwd_tables, bwd_tables, out_BHTD, lse_BHT1)
  return (out_BHTD.astype(q.dtype), lse_BHT1), res


def _attend_bwd(st, res, cotangents):
  dout_BHTD, dlse_BHT1 = cotangents
  q, k, v = res[:3]
  dq, dk, dv = _backward(st, res, dout_BHTD, dlse_BHT1)
  # Integer inputs (positions, segment ids, tables) take no cotangent.
  ints = (None,) * 4 + (jax.tree.map(lambda _: None, res[7]), jax.tree.map(lambda _: None, res[8]))
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), *ints)


_attend.defvjp(_attend_fwd, _attend_bwd)


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
) -> tuple[BlockTables, BlockTables]:
  """(forward/dQ tables per q block, dK/dV tables per kv block) for padded mask inputs.

  Keys at index >= kv_len are padding and never visible.
  """
  B, Sp = k_pos_BS.shape
  valid_BS = jnp.broadcast_to(jnp.arange(Sp) < kv_len, (B, Sp))
  block_map_BQK = mask.block_map(
    q_pos_BT, k_pos_BS, q_seg_BT, k_seg_BS, block_q=block_q, block_kv=block_kv, kv_valid=valid_BS
  )
  return block_tables(block_map_BQK), block_tables(block_map_BQK.swapaxes(1, 2))


_STATIC = ("mask", "scale", "block_q", "block_kv", "interpret")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _block_sparse_attention(
  q_BTHD,
  k_BSKD,
  v_BSKD,
  q_segment_ids,
  kv_segment_ids,
  q_positions,
  kv_positions,
  *,
  mask,
  scale,
  block_q,
  block_kv,
  interpret,
):
  G = check_qkv(q_BTHD, k_BSKD, v_BSKD)
  B, T, Hq, D = q_BTHD.shape
  S = k_BSKD.shape[1]
  scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
  # Blocks never exceed the sequence (rounded up to a power of two, as Triton needs), so
  # tiny inputs are one block.
  bq, bk = min(block_q, _pow2_at_least(T)), min(block_kv, _pow2_at_least(S))
  Tp, Sp = _round_up(T, bq), _round_up(S, bk)
  st = _Static(mask, scale, bq, bk, T, S, G, interpret)
  q_pos, k_pos, q_seg, k_seg = resolve_mask_inputs(
    mask, B, T, S, q_positions, kv_positions, q_segment_ids, kv_segment_ids
  )

  def pad(x, n, mode="constant"):
    return jnp.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2), mode=mode)

  # Padded queries repeat the last position and segment (their rows are dropped);
  # padded keys are cut by kv_len in the tables and in the element mask.
  q_pos, k_pos = pad(q_pos, Tp, "edge"), pad(k_pos, Sp, "edge")
  if q_seg is not None:
    q_seg, k_seg = pad(q_seg, Tp, "edge"), pad(k_seg, Sp, "edge")
  fwd_tables, bwd_tables = block_sparse_tables(
    mask, q_pos, k_pos, q_seg, k_seg, block_q=bq, block_kv=bk, kv_len=S
  )
  # Kernel layouts: heads before rows, so a block is a [rows, D] tile of one head.
  # Triton needs power-of-two tiles: zero-pad the head dim (zero columns of q and k add
  # nothing to the scores, zero columns of v give output columns that are dropped).
  Dp = _pow2_at_least(D)
  q_BHTD = pad(_pad_last(q_BTHD, Dp), Tp).transpose(0, 2, 1, 3)
  k_BKSD, v_BKSD = (pad(_pad_last(x, Dp), Sp).transpose(0, 2, 1, 3) for x in (k_BSKD, v_BSKD))
  out_BHTD, lse_BHT1 = _attend(
    st, q_BHTD, k_BKSD, v_BKSD, q_pos, k_pos, q_seg, k_seg, fwd_tables, bwd_tables
  )
  return out_BHTD[:, :, :T, :D].transpose(0, 2, 1, 3), lse_BHT1[:, :, :T, 0]


def block_sparse_attention(
  q_BTHD: jax.Array,
  k_BSKD: jax.Array,
  v_BSKD: jax.Array,
  *,
  mask: MaskSpec,
  q_segment_ids: jax.Array | None = None,
  kv_segment_ids: jax.Array | None = None,
  q_positions: jax.Array | None = None,
  kv_positions: jax.Array | None = None,
  scale: float | None = None,
  block_q: int = 128,
  block_kv: int = 128,
  interpret: bool | pltpu.InterpretParams | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Block-sparse flash attention: (out_BTHD in q's dtype, lse_BHT fp32, -inf for empty rows).

  Same semantics and arguments as its pure-JAX twin
  `lcjax.attention.blockwise.blockwise_attention_with_lse` (see
  `lcjax.attention.dot_product_attention`), differentiable in both outputs through the
  Pallas dQ and dK/dV kernels. `block_q`/`block_kv` are multiples of 8 (powers of two
  for the GPU lowering); they are clipped to the sequence. A head dim that is not a
  power of two is zero-padded to one (Triton tiles must be). `interpret=None` picks
  interpret mode when q lives on a CPU, decided at each call;
  `interpret=pltpu.InterpretParams(...)` runs the TPU launcher (scalar-prefetched tables
  in SMEM) in Pallas' TPU interpreter, which simulates VMEM/SMEM and checks bounds.
  """
  if not isinstance(mask, MaskSpec):
    raise ValueError(f"mask must be a MaskSpec, got {type(mask).__name__}")
  _check_block("block_q", block_q)
  _check_block("block_kv", block_kv)
  if interpret is None:
    interpret = default_interpret(q_BTHD)
  elif not interpret and not isinstance(q_BTHD, jax.core.Tracer) and default_interpret(q_BTHD):
    raise ValueError(
      "block_sparse_attention(interpret=False) compiles for TPU or GPU, but q lives on a CPU; "
      "pass interpret=True (or None) to run the kernels in Pallas interpret mode"
    )
  return _block_sparse_attention(
    q_BTHD,
    k_BSKD,
    v_BSKD,
    q_segment_ids,
    kv_segment_ids,
    q_positions,
    kv_positions,
    mask=mask,
    scale=scale,
    block_q=block_q,
    block_kv=block_kv,
    interpret=interpret if isinstance(interpret, pltpu.InterpretParams) else bool(interpret),
  )
