"""Block-sparse flash attention kernel bodies: forward, dQ and dK/dV, in two launch styles.

* Loop kernels (GPU style, and the generic interpreter): one program per (batch, head,
  block) walks its compacted list of blocks with a dynamic-trip-count loop, slicing the
  listed blocks out of whole-row refs (global-memory pointers under Triton).
* Pipelined TPU kernels: grid (batch, head, block, step) over scalar-prefetched tables;
  step s sees only its s-th listed block and the carries live in VMEM scratch, as in
  splash attention.

Both run the per-block steps of `block_sparse_steps` (FlashAttention-2, Dao 2023,
Alg. 1 and 2). The first three refs are the flattened tables (SMEM on TPU; per kv head
for a strided mask, see `_table_row`); then the position (and, with `document`,
segment-id) rows; then the data blocks.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.block_sparse_steps import (
  _dkv_step,
  _dq_step,
  _forward_finish,
  _forward_init,
  _forward_step,
  _kv_block_ids,
  _kv_column_ids,
  _kv_row_block_ids,
  _program_kv_head,
  _q_block_ids,
  _row_to_column,
  _split_mask_refs,
  _table_row,
)

# Loop kernels: one program per (batch, head, block) walks its whole list with a
# dynamic-trip-count loop, slicing blocks out of whole-row refs (GPU style; also the
# generic interpreter's path).


def _forward_kernel(kv_index_ref, kv_count_ref, kv_kind_ref, *refs, st, n_q, n_kv):
  """FlashAttention-2 Alg. 1 for one (batch, query head, q block) over its kv list."""
  q_pos_ref, k_pos_ref, q_seg_ref, k_seg_ref, refs = _split_mask_refs(st, refs)
  q_ref, k_ref, v_ref, o_ref, lse_ref = refs
  kv_head = _program_kv_head(st, query_heads=True)
  row = _table_row(st, pl.program_id(0), kv_head, pl.program_id(2), n_q)
  q, q_ids = q_ref[...], _q_block_ids(q_pos_ref, q_seg_ref)

  def step(s, carry):
    k_start = pl.multiple_of(kv_index_ref[row * n_kv + s] * st.block_kv, st.block_kv)
    rows = pl.ds(k_start, st.block_kv)
    k_ids = _kv_block_ids(st, k_pos_ref, k_seg_ref, k_start)
    kind = kv_kind_ref[row * n_kv + s]
    k, v = k_ref[rows, :], v_ref[rows, :]
    return _forward_step(st, carry, q, q_ids, k, v, k_ids, kind, kv_head)

  carry = lax.fori_loop(0, kv_count_ref[row], step, _forward_init(*q_ref.shape))
  _forward_finish(carry, o_ref, lse_ref)


def _dq_kernel(kv_index_ref, kv_count_ref, kv_kind_ref, *refs, st, n_q, n_kv):
  """dQ of FlashAttention-2 Alg. 2 for one (batch, query head, q block) over its kv list,
  added to the block of `dq_in` (aliased to the output: ring steps accumulate in place)."""
  q_pos_ref, k_pos_ref, q_seg_ref, k_seg_ref, refs = _split_mask_refs(st, refs)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_in_ref, dq_ref = refs
  kv_head = _program_kv_head(st, query_heads=True)
  row = _table_row(st, pl.program_id(0), kv_head, pl.program_id(2), n_q)
  q, q_ids = q_ref[...], _q_block_ids(q_pos_ref, q_seg_ref)
  do, lse, delta = do_ref[...], _row_to_column(lse_ref[...]), _row_to_column(delta_ref[...])

  def step(s, dq):
    k_start = pl.multiple_of(kv_index_ref[row * n_kv + s] * st.block_kv, st.block_kv)
    rows = pl.ds(k_start, st.block_kv)
    k_ids = _kv_block_ids(st, k_pos_ref, k_seg_ref, k_start)
    kind = kv_kind_ref[row * n_kv + s]
    k, v = k_ref[rows, :], v_ref[rows, :]
    return _dq_step(st, dq, q, q_ids, do, lse, delta, k, v, k_ids, kind, kv_head)

  dq = lax.fori_loop(0, kv_count_ref[row], step, jnp.zeros(q_ref.shape, jnp.float32))
  dq_ref[...] = (dq_in_ref[...] + dq * st.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_index_ref, q_count_ref, q_kind_ref, *refs, st, n_q, n_kv):
  """dK, dV of FlashAttention-2 Alg. 2 for one (batch, kv head, kv block), added to the
  blocks of `dk_in`, `dv_in` (aliased to the outputs).

  Loops over the q blocks whose rows see this kv block (the transposed tables) and the
  G query heads that share the kv head; the q-side refs hold all T rows of the heads.
  """
  q_pos_ref, k_pos_ref, q_seg_ref, k_seg_ref, refs = _split_mask_refs(st, refs)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_in_ref, dv_in_ref, dk_ref, dv_ref = refs
  j, kv_head = pl.program_id(2), _program_kv_head(st, query_heads=False)
  row = _table_row(st, pl.program_id(0), kv_head, j, n_kv)
  k, v, k_ids = k_ref[...], v_ref[...], _kv_column_ids(st, k_pos_ref, k_seg_ref, j)

  def step(s, carry):
    q_start = pl.multiple_of(q_index_ref[row * n_q + s] * st.block_q, st.block_q)
    rows = pl.ds(q_start, st.block_q)
    q_ids = (q_pos_ref[:, rows], None if q_seg_ref is None else q_seg_ref[:, rows])
    kind = q_kind_ref[row * n_q + s]

    # The query heads of this kv head, one at a time: a loop, not a Python unroll, so
    # Triton keeps one head's q/dO tiles in shared memory instead of all G of them.
    def head(g, carry):
      q, do = q_ref[g, rows, :], do_ref[g, rows, :]
      lse_row, delta_row = lse_ref[g, :, rows], delta_ref[g, :, rows]
      return _dkv_step(st, carry, k, v, k_ids, q, q_ids, do, lse_row, delta_row, kind, kv_head)

    return lax.fori_loop(0, st.groups, head, carry)

  zeros = jnp.zeros(k_ref.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, q_count_ref[row], step, (zeros, zeros))
  dk_ref[...] = (dk_in_ref[...] + dk * st.scale).astype(dk_ref.dtype)
  dv_ref[...] = (dv_in_ref[...] + dv).astype(dv_ref.dtype)


# Pipelined TPU kernels: grid (batch, head, block, step); the index maps read the
# scalar-prefetched tables, so step s of q block i copies in only the s-th listed kv
# block (padding steps repeat the last one: no copy) and the carries live in VMEM
# scratch across steps, as in splash attention.


def _forward_kernel_tpu(kv_index_ref, kv_count_ref, kv_kind_ref, *refs, st, n_q, n_kv):
  """FlashAttention-2 Alg. 1, step s of (batch, query head, q block): its s-th kv block."""
  q_pos_ref, k_pos_ref, q_seg_ref, k_seg_ref, refs = _split_mask_refs(st, refs)
  q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, denom_sc, acc_sc = refs
  kv_head = _program_kv_head(st, query_heads=True)
  row = _table_row(st, pl.program_id(0), kv_head, pl.program_id(2), n_q)
  s = pl.program_id(3)

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
    k, v = k_ref[...], v_ref[...]
    carry = _forward_step(st, carry, q_ref[...], q_ids, k, v, k_ids, kind, kv_head)
    for ref, value in zip((m_sc, denom_sc, acc_sc), carry, strict=True):
      ref[...] = value

  @pl.when(s == n_kv - 1)
  def _finish():
    _forward_finish((m_sc[...], denom_sc[...], acc_sc[...]), o_ref, lse_ref)


def _dq_kernel_tpu(kv_index_ref, kv_count_ref, kv_kind_ref, *refs, st, n_q, n_kv):
  """dQ of FlashAttention-2 Alg. 2, step s of (batch, query head, q block); the last step
  adds the block of `dq_in` (aliased to the output)."""
  q_pos_ref, k_pos_ref, q_seg_ref, k_seg_ref, refs = _split_mask_refs(st, refs)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_in_ref, dq_ref, dq_sc = refs
  kv_head = _program_kv_head(st, query_heads=True)
  row = _table_row(st, pl.program_id(0), kv_head, pl.program_id(2), n_q)
  s = pl.program_id(3)

  @pl.when(s == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  @pl.when(s < kv_count_ref[row])
  def _visit():
    j = kv_index_ref[row * n_kv + s]
    k_ids = _kv_row_block_ids(st, k_pos_ref, k_seg_ref, j)
    q_ids = _q_block_ids(q_pos_ref, q_seg_ref)
    kind = kv_kind_ref[row * n_kv + s]
    # Converted at every kv step rather than kept: a [bq, bq] select costs ~1/D of the step's
    # [bq, bk, D] matmuls, and a [bq, 1] VMEM scratch would be lane-padded to [bq, 128].
    lse, delta = _row_to_column(lse_ref[...]), _row_to_column(delta_ref[...])
    q_side = (q_ref[...], q_ids, do_ref[...], lse, delta)
    k, v = k_ref[...], v_ref[...]
    dq_sc[...] = _dq_step(st, dq_sc[...], *q_side, k, v, k_ids, kind, kv_head)

  @pl.when(s == n_kv - 1)
  def _finish():
    dq_ref[...] = (dq_in_ref[...] + dq_sc[...] * st.scale).astype(dq_ref.dtype)


def _dkv_kernel_tpu(q_index_ref, q_count_ref, q_kind_ref, *refs, st, n_q, n_kv):
  """dK, dV of FlashAttention-2 Alg. 2, step s of (batch, kv head, kv block): the s-th q
  block that sees it, for the G query heads of the kv head (q-side blocks [G, bq, .]); the
  last step adds the blocks of `dk_in`, `dv_in` (aliased to the outputs)."""
  q_pos_ref, k_pos_ref, q_seg_ref, k_seg_ref, refs = _split_mask_refs(st, refs)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_in_ref, dv_in_ref, *refs = refs
  dk_ref, dv_ref, dk_sc, dv_sc = refs
  j, s, kv_head = pl.program_id(2), pl.program_id(3), _program_kv_head(st, query_heads=False)
  row = _table_row(st, pl.program_id(0), kv_head, j, n_kv)

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
      carry = _dkv_step(st, carry, k, v, k_ids, *q_side, kind, kv_head)
    dk_sc[...], dv_sc[...] = carry

  @pl.when(s == n_q - 1)
  def _finish():
    dk_ref[...] = (dk_in_ref[...] + dk_sc[...] * st.scale).astype(dk_ref.dtype)
    dv_ref[...] = (dv_in_ref[...] + dv_sc[...]).astype(dv_ref.dtype)
