"""Per-block steps of the block-sparse flash attention kernels (FlashAttention-2, Dao 2023).

The online-softmax forward update (Alg. 1) and the dQ and dK/dV backward updates
(Alg. 2) on one (q block, kv block) pair, plus the element mask that PARTIAL blocks
apply (`MaskSpec.allowed`, at the program's kv head for strided masks; FULL blocks skip
it) and the position / segment-id slices each step masks with. Shared by the loop
kernels (GPU, interpreter) and the pipelined TPU kernels in `block_sparse_kernels`, so
both compute the same thing per block. The visited blocks come from the block tables
(SeerAttention / LongGen block sparsity: LongGen, Ge et al. 2024, "A Little Goes a Long
Way: Efficient Long Context Training and Inference with Partial Contexts";
AnchorAttention's anchor column is one more listed block).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from lcjax.attention.masks import PARTIAL, MaskSpec


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
  kv_heads: int  # Hkv: a per-head (strided) mask has one table and pattern per kv head


# ---------------------------------------------------------------------------------------
# Kernel bodies. The first three refs are the flattened tables (SMEM on TPU); then the
# position (and, with `document`, segment-id) rows; then the data blocks.


def _table_row(st, b, kv_head, block, n_blocks):
  """Row of the flattened [B, H, n_blocks, steps] tables for batch row b and `block`.

  A per-head mask (`MaskSpec.per_head`, strided) has tables per kv head (H = Hkv); any
  other mask one table shared by all heads (H = 1), read as head 0. `kv_head` is the
  program's kv head: query head // G in the forward and dQ grids, the grid's own head
  in the dK/dV grid.
  """
  if not st.mask.per_head:
    return b * n_blocks + block
  return (b * st.kv_heads + kv_head) * n_blocks + block


def _program_kv_head(st, *, query_heads):
  """The kv head of this program: program_id(1) is a query head (GQA: h // G) or a kv head.

  None unless the mask is per head (nothing else reads it). `lax.div`, not `//`, on
  traced ints (see `block_sparse_launch._whole_spec`).
  """
  if not st.mask.per_head:
    return None
  h = pl.program_id(1)
  return lax.div(h, st.groups) if query_heads and st.groups > 1 else h


def _split_mask_refs(st, refs):
  """(q_pos, k_pos, q_seg, k_seg, rest): segment refs are present only with `document`."""
  if st.mask.document:
    return refs[0], refs[1], refs[2], refs[3], refs[4:]
  return refs[0], refs[1], None, None, refs[2:]


def _dot_t(x, y):
  """x yᵀ with fp32 accumulation (contracting the last dims)."""
  return lax.dot_general(x, y, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _mask_block(st, s, kind, q_pos, k_pos, q_seg, k_seg, k_index, kv_head):
  """On PARTIAL blocks, -inf where `MaskSpec.allowed` is False or the key is padding.

  The ids broadcast to s's shape: [bq, 1] against [1, bk] for a q kᵀ block, or [1, bq]
  against [bk, 1] for a k qᵀ block (the dK/dV kernel). FULL blocks skip the mask.
  `kv_head` (a scalar) selects the pattern of a per-head mask; others ignore it.
  """

  def apply_mask(s):
    allowed = st.mask.allowed(q_pos, k_pos, q_seg, k_seg, kv_head=kv_head, num_kv_heads=st.kv_heads)
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
# q_ids = (q_pos, q_seg) and k_ids = (k_pos, k_seg, k_index) as `_mask_block` takes them;
# kv_head is the program's kv head (for per-head masks).


def _forward_step(st, carry, q, q_ids, k, v, k_ids, kind, kv_head):
  """One online-softmax update (FlashAttention-2 Alg. 1, inner loop) with kv block j."""
  m, denom, acc = carry
  scores = _mask_block(
    st, _dot_t(q, k) * st.scale, kind, q_ids[0], k_ids[0], q_ids[1], *k_ids[1:], kv_head
  )
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
  """Writes O and the lse, the latter as a lane-dense row [1, bq] (see `_column_to_row`)."""
  m, denom, acc = carry
  nonempty = denom > 0
  denom_safe = jnp.where(nonempty, denom, 1.0)
  o_ref[...] = (acc / denom_safe).astype(o_ref.dtype)
  lse_ref[...] = _column_to_row(jnp.where(nonempty, m + jnp.log(denom_safe), -jnp.inf))


# Per-row statistics (lse, Delta) live in HBM as rows [.., 1, T]: as columns [.., T, 1] TPU
# tiles the last two dims by (8, 128), so each would take 128x its size (2 GiB for a
# [1, 32, 131072, 1] float32 array, README "Checking a pod run"). The forward and dQ steps
# need columns [bq, 1]; these convert one block in VMEM with a masked reduction over the
# [bq, bq] identity, which every lowering has (a [1, bq] transpose Mosaic may not).


def _identity(n):
  rows = lax.broadcasted_iota(jnp.int32, (n, n), 0)
  return rows == lax.broadcasted_iota(jnp.int32, (n, n), 1)


def _row_to_column(row_1N):
  """[1, n] -> [n, 1]; exact (one nonzero term per sum), infinities kept."""
  n = row_1N.shape[-1]
  return jnp.sum(jnp.where(_identity(n), row_1N, 0.0), axis=1, keepdims=True)


def _column_to_row(col_N1):
  """[n, 1] -> [1, n]; exact, infinities kept."""
  n = col_N1.shape[0]
  return jnp.sum(jnp.where(_identity(n), col_N1, 0.0), axis=0, keepdims=True)


def _dq_step(st, dq, q, q_ids, do, lse, delta, k, v, k_ids, kind, kv_head):
  """dQ += dS K for kv block j (FlashAttention-2 Alg. 2), unscaled."""
  scores = _mask_block(
    st, _dot_t(q, k) * st.scale, kind, q_ids[0], k_ids[0], q_ids[1], *k_ids[1:], kv_head
  )
  p = jnp.exp(scores - lse)  # P_ij = exp(S_ij - L_i); lse is +inf on empty rows
  ds = p * (_dot_t(do, v) - delta)  # dS = P ∘ (dO Vᵀ - Delta)
  return dq + jnp.dot(ds, k.astype(jnp.float32), preferred_element_type=jnp.float32)


def _dkv_step(st, carry, k, v, k_ids, q, q_ids, do, lse_row, delta_row, kind, kv_head):
  """dV += Pᵀ dO, dK += dSᵀ Q (unscaled) for one q block of one query head.

  Works on transposed blocks Sᵀ = K Qᵀ [bk, bq], so every product is a plain or an
  A Bᵀ matmul and the per-query values (ids, lse, Delta) are lane-dense rows [1, bq].
  """
  dk, dv = carry
  scores_t = _mask_block(
    st, _dot_t(k, q) * st.scale, kind, q_ids[0], k_ids[0], q_ids[1], *k_ids[1:], kv_head
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
