"""Launchers of the block-sparse flash attention kernels: BlockSpecs, grids and platforms.

`_forward` and `_backward` build, for each kernel (forward; dQ; dK/dV of FlashAttention-2,
Dao 2023), both launch variants of `block_sparse_kernels` and `_launch` picks one at call
time: the loop kernels interpreted (CPU) or through Triton (GPU), the pipelined kernels
through Mosaic with scalar-prefetched tables (TPU) or in the TPU interpreter. The
dK/dV kernel reads the transposed tables (q blocks per kv block) and the G query heads
of each kv head (GQA), so K and V are never repeated. A per-head (strided) mask has
tables per kv head, which the index maps and kernels read at the program's kv head.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.block_sparse_kernels import (
  _dkv_kernel,
  _dkv_kernel_tpu,
  _dq_kernel,
  _dq_kernel_tpu,
  _forward_kernel,
  _forward_kernel_tpu,
)
from pallas_kernels.block_sparse_steps import _table_row
from pallas_kernels.block_tables import BlockTables


class _Variant(NamedTuple):
  """One way to launch a kernel: body, grid, specs (without the tables) and scratch."""

  kernel: object
  grid: tuple
  in_specs: list
  out_specs: object
  scratch: tuple = ()


def _launch(st, tables, inputs, out_shapes, loop: _Variant, tpu: _Variant, aliases=None):
  """Runs the call: interpreted, or lowered per platform (TPU / GPU) at lowering time.

  `aliases` maps an index into `inputs` to the output it is updated into in place.
  """
  # pallas_call numbers its operands from the tables on.
  io_aliases = {len(tables) + i: o for i, o in (aliases or {}).items()}

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
      input_output_aliases=io_aliases,
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
      input_output_aliases=io_aliases,
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


def _stat_row_specs(block):
  """(loop, pipelined) BlockSpecs of a per-query statistic stored as rows [B, H, 1, Tp]:
  the [1, block] piece of q block i of head h (lane-dense; see `_row_to_column`)."""
  loop = pl.BlockSpec((None, None, 1, block), lambda b, h, i, *_: (b, h, 0, i))
  tpu = pl.BlockSpec((None, None, 1, block), lambda b, h, i, s, *_: (b, h, 0, i))
  return loop, tpu


def _whole_spec(shape, *, head_axis=True, group=1):
  """BlockSpec of all rows [.., T, X] of one batch row (and head h // group).

  `lax.div`, not `//`: floor division of traced ints lowers through `sign`, which Mosaic
  only lowers for a known TPU generation.
  """
  if head_axis:
    return pl.BlockSpec((None, None, *shape), lambda b, h, i, *_: (b, lax.div(h, group), 0, 0))
  return pl.BlockSpec((None, *shape), lambda b, h, i, *_: (b, 0, 0))


def _listed(st, n_outer, n_steps, group):
  """The block that grid step (b, h, i, s) visits, read from a scalar-prefetched table.

  h is a query head (group = G: kv head h // G) or a kv head (group = 1); only a
  per-head mask's tables depend on it.
  """

  def listed(b, h, i, s, index_ref):
    kv_head = lax.div(h, group) if st.mask.per_head and group > 1 else h
    return index_ref[_table_row(st, b, kv_head, i, n_outer) * n_steps + s]

  return listed


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
    listed = _listed(st, n_kv, n_q, 1)
    own_spec = _rows_spec((st.block_kv, 1), head_axis=False)  # k ids, by kv block
    loop_other = _whole_spec((1, Tp), head_axis=False)
    tpu_other = pl.BlockSpec(
      (None, 1, st.block_q), lambda b, h, j, s, idx, *_: (b, 0, listed(b, h, j, s, idx))
    )
    as_q, as_k = (lambda x: x[:, None, :]), (lambda x: x[:, :, None])
  else:
    listed = _listed(st, n_q, n_kv, st.groups)
    own_spec = _rows_spec((st.block_q, 1), head_axis=False)  # q ids, by q block
    loop_other = _whole_spec((1, Sp), head_axis=False)
    tpu_other = pl.BlockSpec(
      (None, 1, st.block_kv), lambda b, h, i, s, idx, *_: (b, 0, listed(b, h, i, s, idx))
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
  listed = _listed(st, n_q, n_kv, G)
  q_tpu = pl.BlockSpec((None, None, bq, D), lambda b, h, i, s, *_: (b, h, i, 0))
  kv_tpu = pl.BlockSpec(
    (None, None, bk, D),
    lambda b, h, i, s, idx, *_: (b, lax.div(h, G), listed(b, h, i, s, idx), 0),
  )
  lse_loop, lse_tpu = _stat_row_specs(bq)
  out_tpu = [q_tpu, lse_tpu]
  statics = dict(st=st, n_q=n_q, n_kv=n_kv)
  loop = _Variant(
    functools.partial(_forward_kernel, **statics),
    (B, Hq, n_q),
    loop_id_specs + [_rows_spec((bq, D)), *[_whole_spec((Sp, D), group=G)] * 2],
    [_rows_spec((bq, D)), lse_loop],
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
    jax.ShapeDtypeStruct((B, Hq, 1, Tp), jnp.float32),  # lse as rows
  ]
  return _launch(st, _flat(fwd_tables), [*ids, q_BHTD, k_BKSD, v_BKSD], out_shapes, loop, tpu)


def _backward(st, res, dout_BHTD, lse_BH1T, delta_BH1T, grads_in):
  """dQ and dK/dV kernels: (dq_in + dq, dk_in + dk, dv_in + dv) float32, kernel layout.

  The lse and Delta come as rows [B, H, 1, Tp]. `delta_BH1T` is
  Delta_i = rowsum(dO_i ∘ O_i) - dL_i (d lse_i / d S_ij = P_ij), formed by the caller in
  whichever layout holds O. `grads_in` = (dq_in_BHTD, dk_in_BKSD, dv_in_BKSD):
  each kernel adds its result to them and writes the sums over them (aliased operands), so
  ring attention accumulates dQ, and the dK, dV that travel with the keys, across steps in
  this layout, without fresh buffers or transposes per step.
  """
  dq_in_BHTD, dk_in_BKSD, dv_in_BKSD = grads_in
  q_BHTD, k_BKSD, v_BKSD, q_pos, k_pos, q_seg, k_seg, fwd_tables, bwd_tables = res
  B, Hq, Tp, D = q_BHTD.shape
  Hkv, Sp = k_BKSD.shape[1], k_BKSD.shape[2]
  G, bq, bk = st.groups, st.block_q, st.block_kv
  n_q, n_kv = Tp // bq, Sp // bk
  statics = dict(st=st, n_q=n_q, n_kv=n_kv)
  # dO stays in the input dtype for the kernels (they upcast), which halves its on-chip
  # size for bf16.
  dout_BHTD = dout_BHTD.astype(q_BHTD.dtype)
  # Rows with no visible key have lse -inf; +inf makes their P = exp(S - inf) = 0.
  lse_BH1T = jnp.where(lse_BH1T == -jnp.inf, jnp.inf, lse_BH1T)

  # dQ: grid over q blocks, like the forward.
  ids, loop_id_specs, tpu_id_specs = _mask_inputs(
    st, (q_pos, q_seg), (k_pos, k_seg), transposed=False
  )
  listed = _listed(st, n_q, n_kv, G)
  q_rows = [_rows_spec((bq, D))]
  q_tpu = pl.BlockSpec((None, None, bq, D), lambda b, h, i, s, *_: (b, h, i, 0))
  kv_tpu = pl.BlockSpec(
    (None, None, bk, D),
    lambda b, h, i, s, idx, *_: (b, lax.div(h, G), listed(b, h, i, s, idx), 0),
  )
  stat_loop, stat_tpu = _stat_row_specs(bq)
  loop = _Variant(
    functools.partial(_dq_kernel, **statics),
    (B, Hq, n_q),
    loop_id_specs
    + [q_rows[0], *[_whole_spec((Sp, D), group=G)] * 2, q_rows[0], stat_loop, stat_loop]
    + [q_rows[0]],
    q_rows[0],
  )
  tpu = _Variant(
    functools.partial(_dq_kernel_tpu, **statics),
    (B, Hq, n_q, n_kv),
    tpu_id_specs + [q_tpu, kv_tpu, kv_tpu, q_tpu, stat_tpu, stat_tpu, q_tpu],
    q_tpu,
    [_vmem(bq, D)],
  )
  dq_inputs = [*ids, q_BHTD, k_BKSD, v_BKSD, dout_BHTD, lse_BH1T, delta_BH1T, dq_in_BHTD]
  dq_BHTD = _launch(
    st,
    _flat(fwd_tables),
    dq_inputs,
    jax.ShapeDtypeStruct((B, Hq, Tp, D), jnp.float32),
    loop,
    tpu,
    aliases={len(dq_inputs) - 1: 0},
  )

  # dK/dV: grid over kv heads and kv blocks; the G query heads of kv head k are rows
  # k*G..k*G+G-1. Per-query values (lse, Delta) are lane-dense [1, T] rows for Sᵀ blocks.
  ids, loop_id_specs, tpu_id_specs = _mask_inputs(
    st, (q_pos, q_seg), (k_pos, k_seg), transposed=True
  )
  listed = _listed(st, n_kv, n_q, 1)
  q_BKGTD, do_BKGTD = (x.reshape(B, Hkv, G, Tp, D) for x in (q_BHTD, dout_BHTD))
  lse_BKG1T, delta_BKG1T = (x.reshape(B, Hkv, G, 1, Tp) for x in (lse_BH1T, delta_BH1T))

  def group_spec(*shape):
    return pl.BlockSpec((None, None, G, *shape), lambda b, h, j, *_: (b, h, 0, 0, 0))

  q_tpu = pl.BlockSpec(
    (None, None, G, bq, D), lambda b, h, j, s, idx, *_: (b, h, 0, listed(b, h, j, s, idx), 0)
  )
  row_tpu = pl.BlockSpec(
    (None, None, G, 1, bq), lambda b, h, j, s, idx, *_: (b, h, 0, 0, listed(b, h, j, s, idx))
  )
  kv_block = _rows_spec((bk, D))
  loop = _Variant(
    functools.partial(_dkv_kernel, **statics),
    (B, Hkv, n_kv),
    loop_id_specs
    + [group_spec(Tp, D), kv_block, kv_block, group_spec(Tp, D)]
    + [group_spec(1, Tp), group_spec(1, Tp), kv_block, kv_block],
    [kv_block] * 2,
  )
  tpu = _Variant(
    functools.partial(_dkv_kernel_tpu, **statics),
    (B, Hkv, n_kv, n_q),
    tpu_id_specs + [q_tpu, kv_block, kv_block, q_tpu, row_tpu, row_tpu, kv_block, kv_block],
    [kv_block] * 2,
    [_vmem(bk, D), _vmem(bk, D)],
  )
  dkv_inputs = [*ids, q_BKGTD, k_BKSD, v_BKSD, do_BKGTD, lse_BKG1T, delta_BKG1T]
  dkv_inputs += [dk_in_BKSD, dv_in_BKSD]
  n = len(dkv_inputs)
  dk_BKSD, dv_BKSD = _launch(
    st,
    _flat(bwd_tables),
    dkv_inputs,
    [jax.ShapeDtypeStruct((B, Hkv, Sp, D), jnp.float32)] * 2,
    loop,
    tpu,
    aliases={n - 2: 0, n - 1: 1},
  )
  return dq_BHTD, dk_BKSD, dv_BKSD
