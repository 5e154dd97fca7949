"""Pallas kernels (interpret mode on CPU) == their blockwise twin == the reference.

All three compute scores, softmax and accumulators in float32. In float32 they differ
only in summation order (online softmax over blocks vs one softmax over the row): a few
ulps of O(1) values, ~1e-6, so 1e-5 absolute plus 1e-5 relative flags any masking or
scaling bug (those show up at 1e-2 or more). With bf16 inputs all three see the same
bf16 values and differ by that same fp32 noise before the final rounding to bf16, which
can land one bf16 ulp apart (ulp(x) <= 2^-7 |x|), hence rtol 2^-7 and a small atol.

Interpret-mode cost is mostly compilation, so each case varies several things at once
(mask family, head layout, lengths not multiple of the block, mid-block documents), and
edge cases compare with the reference only (the twin is checked against it in
test_attention.py, and against the kernel in the main cases here).
"""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.experimental.pallas import tpu as pltpu

from lcjax.attention import MaskSpec, blockwise_attention_with_lse, reference_attention_with_lse
from lcjax.attention.masks import EMPTY, FULL, PARTIAL
from pallas_kernels import (
  anchor_attention,
  block_sparse_attention,
  block_sparse_tables,
  block_tables,
  default_interpret,
  visited_blocks,
)

FP32_TOL = dict(atol=1e-5, rtol=1e-5)
BF16_TOL = dict(rtol=2**-7, atol=2**-7 * 0.1)
BLOCK = dict(block_q=16, block_kv=16)


def packed_rows(length, doc_lengths):
  """Segment ids [B, length] of consecutive documents (ids 1, 2, ...), padding id 0."""
  rows = []
  for lengths in doc_lengths:
    row = np.concatenate([np.full(n, d + 1) for d, n in enumerate(lengths)])
    rows.append(np.pad(row, (0, length - len(row))))
  return jnp.asarray(np.stack(rows), jnp.int32)


def random_qkv(seed, B, T, S, Hq, Hkv, D, dtype=jnp.float32):
  kq, kk, kv, kw, kl = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(kq, (B, T, Hq, D)).astype(dtype)
  k = jax.random.normal(kk, (B, S, Hkv, D)).astype(dtype)
  v = jax.random.normal(kv, (B, S, Hkv, D)).astype(dtype)
  w_out = jax.random.normal(kw, (B, T, Hq, D))  # weights of the scalar we differentiate
  w_lse = jax.random.normal(kl, (B, Hq, T))
  return q, k, v, (w_out, w_lse)


def out_lse_grads(fn, q, k, v, weights, **kwargs):
  """(out, lse, (dq, dk, dv)) of sum(w·out) + sum(w·lse) over finite lse; jitted."""
  w_out, w_lse = weights

  def loss(q, k, v):
    out, lse_BHT = fn(q, k, v, **kwargs)
    finite_lse = jnp.where(jnp.isfinite(lse_BHT), lse_BHT, 0.0)
    return (out.astype(jnp.float32) * w_out).sum() + (finite_lse * w_lse).sum(), (out, lse_BHT)

  grads, (out, lse) = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, lse, grads


def kernel(q, k, v, **kwargs):
  return block_sparse_attention(q, k, v, interpret=True, **BLOCK, **kwargs)


def twin(q, k, v, **kwargs):
  return blockwise_attention_with_lse(q, k, v, **BLOCK, **kwargs)


def assert_kernel_matches(q, k, v, weights, tol, fn=kernel, with_twin=True, **kwargs):
  """fn == blockwise twin == reference in out, lse and dq, dk, dv; returns fn's results.

  `with_twin=False` compares with the reference only (one compilation fewer).
  """
  f32 = lambda x: np.asarray(x, np.float32)
  got = out_lse_grads(fn, q, k, v, weights, **kwargs)
  out, lse, grads = got
  assert out.dtype == q.dtype and out.shape == q.shape
  assert lse.dtype == jnp.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
  others = [("twin", twin)] if with_twin else []
  for name, other in others + [("reference", reference_attention_with_lse)]:
    out_o, lse_o, grads_o = out_lse_grads(other, q, k, v, weights, **kwargs)
    np.testing.assert_allclose(f32(out), f32(out_o), **tol, err_msg=f"out vs {name}")
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(lse_o))
    finite = np.isfinite(lse_o)
    np.testing.assert_allclose(lse[finite], lse_o[finite], **FP32_TOL, err_msg=f"lse vs {name}")
    for g_name, g, g_o, x in zip("qkv", grads, grads_o, (q, k, v), strict=True):
      assert g.dtype == x.dtype and g.shape == x.shape
      np.testing.assert_allclose(f32(g), f32(g_o), **tol, err_msg=f"d{g_name} vs {name}")
  return got


# Documents start mid-block (block 16); lengths are not multiples of the block.
DOCS_100 = [[7, 20, 30, 5, 38], [40, 3, 13, 44]]
SEG_100 = packed_rows(100, DOCS_100)

CASES = {
  # name: (kwargs, Hq, Hkv, dtype, T, D); D=24 checks the zero-padding of the head dim.
  "causal_gqa_fp32": (dict(mask=MaskSpec()), 4, 2, jnp.float32, 100, 16),
  "document_mqa_fp32": (
    dict(mask=MaskSpec(document=True), q_segment_ids=SEG_100),
    2,
    1,
    jnp.float32,
    100,
    16,
  ),
  "anchor_gqa_bf16": (
    dict(mask=MaskSpec(document=True, anchor=True), q_segment_ids=SEG_100),
    4,
    2,
    jnp.bfloat16,
    100,
    16,
  ),
  "sink_window_fp32": (
    dict(mask=MaskSpec(window=21, sinks=4), scale=0.3),
    2,
    2,
    jnp.float32,
    90,
    24,
  ),
  # Strided blocks with a per-kv-head phase (S2-Attention / LongGen): per-head tables and
  # element masks. Sparse blocks of 8 inside kernel blocks of 16, with documents and GQA;
  # then sparse blocks of 32 spanning two kernel blocks, with sinks, 3 kv heads, bf16.
  "strided_document_gqa_fp32": (
    dict(mask=MaskSpec(document=True, stride=3, stride_block=8), q_segment_ids=SEG_100),
    4,
    2,
    jnp.float32,
    100,
    16,
  ),
  "strided_sinks_bf16": (
    dict(mask=MaskSpec(sinks=3, stride=3, stride_block=32, head_phase_step=1, stride_offset=1)),
    3,
    3,
    jnp.bfloat16,
    90,
    16,
  ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_twin_and_reference(case):
  kwargs, Hq, Hkv, dtype, T, D = CASES[case]
  q, k, v, weights = random_qkv(1, 2, T, T, Hq, Hkv, D, dtype=dtype)
  assert_kernel_matches(q, k, v, weights, FP32_TOL if dtype == jnp.float32 else BF16_TOL, **kwargs)


def test_anchor_attention_is_the_anchor_mask():
  """anchor_attention is block_sparse_attention with MaskSpec(causal, document, anchor)
  (whose numerics and gradients the cases above and below check)."""
  q, k, v, _ = random_qkv(2, 2, 100, 100, 2, 2, 16)
  got = anchor_attention(q, k, v, q_segment_ids=SEG_100, interpret=True, **BLOCK)
  want = kernel(q, k, v, mask=MaskSpec(document=True, anchor=True), q_segment_ids=SEG_100)
  for x, y in zip(got, want, strict=True):
    np.testing.assert_array_equal(x, y)


def test_empty_rows_and_anchor_only_rows():
  """Rows whose segment has no key: out 0, lse -inf, zero dq. With the anchor the same
  rows see only key 0: out = v_0 exactly and lse = scale · q·k_0."""
  T, D = 48, 8
  q, k, v, weights = random_qkv(3, 2, T, T, 2, 1, D)
  kv_seg = packed_rows(T, [[20, 28], [30, 18]])
  q_seg = kv_seg.at[:, 5:11].set(9).at[1, 40:].set(9)  # segment 9 has no key
  lonely_BT = np.asarray(q_seg == 9)
  kwargs = dict(q_segment_ids=q_seg, kv_segment_ids=kv_seg)
  out, lse, (dq, _, _) = assert_kernel_matches(
    q,
    k,
    v,
    weights,
    FP32_TOL,
    with_twin=False,
    mask=MaskSpec(causal=False, document=True),
    **kwargs,
  )
  lse_BTH = np.asarray(lse).transpose(0, 2, 1)
  np.testing.assert_array_equal(np.asarray(out)[lonely_BT], 0.0)
  np.testing.assert_array_equal(np.asarray(dq)[lonely_BT], 0.0)
  assert np.all(np.isneginf(lse_BTH[lonely_BT])) and np.all(np.isfinite(lse_BTH[~lonely_BT]))

  out, lse, _ = assert_kernel_matches(
    q, k, v, weights, FP32_TOL, with_twin=False, mask=MaskSpec(document=True, anchor=True), **kwargs
  )
  v0_BH = np.broadcast_to(np.asarray(v)[:, 0], (2, 2, D))  # GQA: both heads read kv head 0
  out_BTHD, lse_BTH = np.asarray(out), np.asarray(lse).transpose(0, 2, 1)
  for b, t in zip(*np.nonzero(lonely_BT), strict=True):
    np.testing.assert_allclose(out_BTHD[b, t], v0_BH[b], **FP32_TOL)
    s0_H = np.einsum("hd,d->h", np.asarray(q)[b, t], np.asarray(k)[b, 0, 0]) / np.sqrt(D)
    np.testing.assert_allclose(lse_BTH[b, t], s0_H, **FP32_TOL)


@pytest.mark.slow
def test_cross_attention_longer_kv_bf16():
  """T != S, offset positions, MHA, bf16, three blocks of 32."""
  q, k, v, weights = random_qkv(4, 1, 40, 96, 2, 2, 16, dtype=jnp.bfloat16)
  assert_kernel_matches(
    q,
    k,
    v,
    weights,
    BF16_TOL,
    fn=lambda *a, **kw: block_sparse_attention(*a, interpret=True, block_q=32, block_kv=32, **kw),
    mask=MaskSpec(window=50),
    q_index=jnp.arange(56, 96),
  )


# ---------------------------------------------------------------------------------------
# Block tables.


def test_block_tables_compact_in_kv_order():
  block_map_BQK = jnp.asarray(
    [[[FULL, EMPTY, PARTIAL, EMPTY], [EMPTY, EMPTY, EMPTY, EMPTY], [EMPTY, EMPTY, EMPTY, FULL]]],
    jnp.int8,
  )
  tables = block_tables(block_map_BQK)
  np.testing.assert_array_equal(tables.kv_count_BQ, [[2, 0, 1]])
  # Padding repeats the last visited block (no new copy); an empty row points at 0.
  np.testing.assert_array_equal(tables.kv_index_BQK, [[[0, 2, 2, 2], [0, 0, 0, 0], [3, 3, 3, 3]]])
  np.testing.assert_array_equal(
    tables.kv_kind_BQK, [[[FULL, PARTIAL, EMPTY, EMPTY], [EMPTY] * 4, [FULL, EMPTY, EMPTY, EMPTY]]]
  )
  assert int(visited_blocks(tables)) == 3
  transposed = block_tables(block_map_BQK.swapaxes(1, 2))
  np.testing.assert_array_equal(transposed.kv_count_BQ, [[1, 0, 1, 1]])


def dense_nonempty_blocks(mask, pos_BT, seg_BT, block):
  """[B, n, n] bool: does the dense mask allow any pair of each block? One q block at a time."""
  B, T = pos_BT.shape
  n = T // block

  def q_block(i):
    q_pos_BQ = lax.dynamic_slice_in_dim(pos_BT, i * block, block, axis=1)
    q_seg_BQ = lax.dynamic_slice_in_dim(seg_BT, i * block, block, axis=1)
    allowed_BQS = mask.allowed(
      q_pos_BQ[:, :, None], pos_BT[:, None, :], q_seg_BQ[:, :, None], seg_BT[:, None, :]
    )
    return allowed_BQS.reshape(B, block, n, block).any((1, 3))  # [B, nK]

  return jax.jit(lambda: lax.map(q_block, jnp.arange(n)).transpose(1, 0, 2))()


def listed_blocks(tables, n):
  """[..., n, n] bool: the blocks that the compacted lists name, per row (and head)."""
  index, count = np.asarray(tables.kv_index_BQK), np.asarray(tables.kv_count_BQ)
  listed = np.zeros(index.shape[:-1] + (n,), bool)
  for row in np.ndindex(*count.shape):
    listed[row + (index[row][: count[row]],)] = True
  return listed


def test_strided_tables_visit_exactly_the_nonempty_blocks_at_8k():
  """S2-Attention at T = 8192 with 128-blocks (stride_block=128, local_blocks=4, stride
  8, 8 kv heads): the per-head tables list exactly the (kv head, q block, kv block)
  triples where the dense mask of that head allows a pair, forward and transposed; each
  head visits a fraction of dense causal and the heads together cover all of it."""
  T, block, Hkv = 8192, 128, 8
  n = T // block
  mask = MaskSpec(stride=8, stride_block=128, local_blocks=4)
  pos_BT = jnp.arange(T, dtype=jnp.int32)[None]
  fwd_tables, bwd_tables = block_sparse_tables(
    mask, pos_BT, pos_BT, None, None, block_q=block, block_kv=block, kv_len=T, num_kv_heads=Hkv
  )
  assert fwd_tables.kv_count_BQ.shape == (1, Hkv, n)

  def head_blocks(h):  # [n, n] non-empty blocks of kv head h, one q block at a time
    def q_block(i):
      q_pos_Q1 = lax.dynamic_slice_in_dim(pos_BT[0], i * block, block)[:, None]
      allowed_QS = mask.allowed(q_pos_Q1, pos_BT[0][None, :], kv_head=h, num_kv_heads=Hkv)
      return allowed_QS.reshape(block, n, block).any((0, 2))

    return lax.map(q_block, jnp.arange(n))

  dense_HQK = np.asarray(jax.jit(lambda: lax.map(head_blocks, jnp.arange(Hkv)))())
  n_dense = int(dense_HQK.sum())
  assert int(visited_blocks(fwd_tables)) == int(visited_blocks(bwd_tables)) == n_dense
  np.testing.assert_array_equal(listed_blocks(fwd_tables, n)[0], dense_HQK)
  np.testing.assert_array_equal(listed_blocks(bwd_tables, n)[0], dense_HQK.swapaxes(1, 2))
  n_causal = n * (n + 1) // 2
  assert np.all(dense_HQK.sum((1, 2)) < 0.25 * n_causal)
  np.testing.assert_array_equal(dense_HQK.any(0), np.tril(np.ones((n, n), bool)))


def test_anchor_tables_visit_exactly_the_nonempty_blocks_at_8k():
  """8 documents at T = 8192 with 128-blocks: the tables the kernel loops over list every
  (q block, kv block) pair where the dense anchor mask allows a pair, and nothing else."""
  T, block = 8192, 128
  rng = np.random.default_rng(0)
  cuts = np.sort(rng.choice(np.arange(1, T), size=7, replace=False))
  assert np.any(cuts % block), "some documents must start mid-block"
  seg_BT = jnp.asarray(np.searchsorted(cuts, np.arange(T), side="right")[None] + 1, jnp.int32)
  pos_BT = jnp.arange(T, dtype=jnp.int32)[None]
  mask = MaskSpec(causal=True, document=True, anchor=True)
  fwd_tables, bwd_tables = block_sparse_tables(
    mask, pos_BT, pos_BT, seg_BT, seg_BT, block_q=block, block_kv=block, kv_len=T
  )
  dense_BQK = np.asarray(dense_nonempty_blocks(mask, pos_BT, seg_BT, block))
  n_dense = int(dense_BQK.sum())
  assert int(visited_blocks(fwd_tables)) == n_dense
  assert int(visited_blocks(bwd_tables)) == n_dense
  # The listed blocks are exactly the dense non-empty ones (not just as many).
  np.testing.assert_array_equal(listed_blocks(fwd_tables, T // block), dense_BQK)
  # Every q block visits the anchor block; far fewer pairs than dense causal.
  assert np.all(dense_BQK[0, :, 0])
  n_causal = (T // block) * (T // block + 1) // 2
  assert n_dense < 0.3 * n_causal


# ---------------------------------------------------------------------------------------
# Backends: interpret mode chosen at call time; accelerator lowerings checked from CPU.


def test_interpret_defaults_to_true_on_cpu():
  q, k, v, _ = random_qkv(5, 1, 32, 32, 2, 2, 8)
  assert default_interpret(q)
  out_auto, _ = block_sparse_attention(q, k, v, mask=MaskSpec(), **BLOCK)
  out_interp, _ = kernel(q, k, v, mask=MaskSpec())
  np.testing.assert_array_equal(out_auto, out_interp)
  with pytest.raises(ValueError, match="interpret=False"):
    block_sparse_attention(q, k, v, mask=MaskSpec(), interpret=False)


def test_tpu_launcher_in_tpu_interpreter():
  """The TPU path (pipelined kernels: tables scalar-prefetched into SMEM, index maps
  reading them, VMEM scratch carries; 128-blocks, D=128) run by Pallas' TPU interpreter,
  which simulates VMEM/SMEM and checks out-of-bounds accesses: fwd, lse and grads ==
  reference (fp32, anchor mask, GQA, T=200 padded to 256)."""
  q, k, v, weights = random_qkv(6, 1, 200, 200, 4, 2, 128)
  seg = packed_rows(200, [[70, 130]])

  def tpu_interpreted(q, k, v, **kwargs):
    return block_sparse_attention(q, k, v, interpret=pltpu.InterpretParams(), **kwargs)

  assert_kernel_matches(
    q,
    k,
    v,
    weights,
    FP32_TOL,
    fn=tpu_interpreted,
    with_twin=False,
    mask=MaskSpec(document=True, anchor=True),
    q_segment_ids=seg,
  )


def test_tpu_launcher_in_tpu_interpreter_strided():
  """The same TPU path with per-head tables (S2-Attention strided blocks, stride_block =
  the 128-block, plus sinks): each kv head's index maps fetch only its own listed blocks
  (in q block 2, head 0 skips kv block 1, and head 1 visits kv block 0 only for the 5
  sinks, with the element mask).
  GQA, T=300 padded to 384, fp32 == reference."""
  q, k, v, weights = random_qkv(8, 1, 300, 300, 4, 2, 128)
  mask = MaskSpec(stride=2, stride_block=128, sinks=5)
  pos = jnp.arange(384)[None]
  bmap = mask.block_map(pos, pos, None, None, block_q=128, block_kv=128, num_kv_heads=2)
  np.testing.assert_array_equal(bmap[0, :, 2], [[FULL, EMPTY, PARTIAL], [PARTIAL, FULL, PARTIAL]])

  def tpu_interpreted(q, k, v, **kwargs):
    return block_sparse_attention(q, k, v, interpret=pltpu.InterpretParams(), **kwargs)

  assert_kernel_matches(q, k, v, weights, FP32_TOL, fn=tpu_interpreted, with_twin=False, mask=mask)


def _fwd_and_bwd(mask, T=200):
  """Compiled-mode (interpret=False) forward and forward+backward of the anchor kernel."""

  def fwd(q, k, v, seg):
    return block_sparse_attention(q, k, v, mask=mask, q_segment_ids=seg, interpret=False)

  def fwd_bwd(q, k, v, seg):
    loss = lambda q, k, v: fwd(q, k, v, seg)[0].astype(jnp.float32).sum()
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  B, Hq, Hkv, D = 1, 4, 2, 96  # D padded to 128 inside (T=200 to 256)
  sds = jax.ShapeDtypeStruct
  args = (
    sds((B, T, Hq, D), jnp.bfloat16),
    sds((B, T, Hkv, D), jnp.bfloat16),
    sds((B, T, Hkv, D), jnp.bfloat16),
    sds((B, T), jnp.int32),
  )
  return fwd, fwd_bwd, args


LOWERED_KERNELS = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}
# The anchor mask (one table for all heads) and a strided one (per-head tables and
# element mask, with sparse blocks of 64 inside the 128-blocks).
COMPILED_MASKS = {
  "anchor": MaskSpec(document=True, anchor=True),
  "strided": MaskSpec(document=True, stride=2, stride_block=64, sinks=4),
}


@pytest.mark.parametrize("mask", list(COMPILED_MASKS))
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_lowers_for_accelerators_from_cpu(platform, mask):
  """Forward (1 kernel) and forward+backward (3 kernels: fwd, dQ, dK/dV) lower to Triton
  for CUDA and to Mosaic for TPU. Catches lowering errors; runs no accelerator compiler."""
  fwd, fwd_bwd, args = _fwd_and_bwd(COMPILED_MASKS[mask])
  for fn, n_kernels in ((fwd, 1), (fwd_bwd, 3)):
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    assert text.count(LOWERED_KERNELS[platform]) == n_kernels


NO_LIBTPU = pytest.mark.skipif(
  importlib.util.find_spec("libtpu") is None,
  reason="libtpu is not installed: the Mosaic compile check needs it (no TPU needed)",
)


def _compile_for_tpu(T, mask=COMPILED_MASKS["anchor"]):
  """Compiles fwd and fwd+bwd through Mosaic for one v5p chip (libtpu, no TPU needed)."""
  from jax.experimental import topologies

  # Other processes (parallel test runs, AOT compiles) may hold libtpu's lockfile.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  topology = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1")
  sharding = jax.sharding.SingleDeviceSharding(topology.devices[0])
  fwd, fwd_bwd, args = _fwd_and_bwd(mask, T=T)
  args = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding) for a in args)
  for fn in (fwd, fwd_bwd):
    jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).compile()


@NO_LIBTPU
@pytest.mark.parametrize("mask", list(COMPILED_MASKS))
def test_compiles_for_tpu_topology(mask):
  _compile_for_tpu(200, COMPILED_MASKS[mask])


@NO_LIBTPU
@pytest.mark.slow
def test_compiles_for_tpu_topology_at_32k():
  """The pipelined TPU kernels hold one block per operand in VMEM, so T=32K compiles."""
  _compile_for_tpu(32768)


def test_fwd_and_bwd_entry_points_match_blockwise_twins():
  """block_sparse_fwd / block_sparse_bwd (ring attention's "pallas" step routine) ==
  blockwise_fwd / blockwise_bwd: float32 outputs, keys split in two and the backward
  taken against the *global* out and lse with an lse cotangent, as the ring does.

  GQA, T = 90 (not a multiple of 16, so padded query rows carry lse -inf), head dim
  24 (zero-padded to 32), documents starting mid-block, and a strided mask (per-head
  tables, as a ring runs S2-Attention layers). Same fp32 tolerance as above.
  """
  from lcjax.attention.blockwise import blockwise_bwd, blockwise_fwd
  from pallas_kernels import block_sparse_bwd, block_sparse_fwd

  T, half = 90, 45  # equal halves share one compilation
  q, k, v, (w_out, w_lse) = random_qkv(7, 2, T, T, 4, 2, 24)
  seg = packed_rows(T, [[7, 20, 30, 33], [50, 40]])
  mask = MaskSpec(document=True, stride=3, stride_block=8, sinks=2)
  kw = dict(mask=mask, q_segment_ids=seg, kv_segment_ids=seg, **BLOCK)
  out, lse = block_sparse_fwd(q, k, v, interpret=True, **kw)
  out_t, lse_t = blockwise_fwd(q, k, v, **kw)
  assert out.dtype == jnp.float32 and lse.shape == (2, 4, T)
  np.testing.assert_allclose(out, out_t, **FP32_TOL)
  np.testing.assert_allclose(lse, lse_t, **FP32_TOL)
  pos = np.arange(T)
  for part in (slice(0, half), slice(half, T)):
    part_kw = dict(kw, kv_segment_ids=seg[:, part], kv_index=pos[part], dlse_BHT=w_lse)
    args = (q, k[:, part], v[:, part], out, lse, w_out)
    got = block_sparse_bwd(*args, interpret=True, **part_kw)
    want = blockwise_bwd(*args, **part_kw)
    for name, g, g_t in zip(("dq", "dk", "dv"), got, want, strict=True):
      assert g.dtype == jnp.float32 and g.shape == g_t.shape
      np.testing.assert_allclose(g, g_t, **FP32_TOL, err_msg=name)


def test_backward_accumulate_adds_into_the_accumulators():
  """Ring attention's Pallas path: each call adds its keys' dq, dk, dv into float32 buffers
  in the kernels' layout, which the kernels overwrite in place (aliased operands).

  From random (nonzero) accumulators, the two halves of the keys give dq accumulator + the
  full dq, and each half's dk, dv accumulators + `backward`'s (the loop kernels), in the
  pipelined TPU kernels (TPU interpreter: 128-blocks, D = 128, T = 200 padded to 256, GQA,
  documents, the anchor column). The loop kernels accumulate in every ring test with
  `block_impl="pallas"` (tests/test_ring.py). Same fp32 tolerance as above.
  """
  from lcjax.attention.inputs import AttentionOptions, MaskInputs
  from pallas_kernels.block_sparse_attention import (
    backward,
    backward_accumulate,
    forward,
    grad_accumulators,
    grads_from_accumulators,
  )

  T, half = 200, 100
  q, k, v, (w_out, _) = random_qkv(8, 1, T, T, 4, 2, 128)
  seg = packed_rows(T, [[70, 130]])
  opts = AttentionOptions(MaskSpec(document=True, anchor=True), None, 128, 128)
  interpret = pltpu.InterpretParams()
  out, lse = forward(q, k, v, MaskInputs(q_segment_ids=seg, kv_segment_ids=seg), opts)
  rng = np.random.default_rng(9)
  pos = np.arange(T)
  dq_acc = None
  for part in (slice(0, half), slice(half, T)):
    k_p, v_p = k[:, part], v[:, part]
    zeros = grad_accumulators(q, k_p, opts)
    assert [z.shape for z in zeros] == [(1, 4, 256, 128), (1, 2, 128, 128), (1, 2, 128, 128)]
    start = [jnp.asarray(rng.standard_normal(z.shape), jnp.float32) for z in zeros]
    if dq_acc is not None:
      start[0] = dq_acc
    dq_start, dk_start, dv_start = grads_from_accumulators(start, q, k_p)
    inputs = MaskInputs(None, pos[part], seg, seg[:, part])
    args = (q, k_p, v_p, out, lse, w_out, inputs, opts)
    acc = backward_accumulate(*args, start, interpret=interpret)
    dq_p, dk_p, dv_p = backward(*args, interpret=True)
    dq, dk, dv = grads_from_accumulators(acc, q, k_p)
    np.testing.assert_allclose(dk, dk_start + dk_p, **FP32_TOL, err_msg="dk")
    np.testing.assert_allclose(dv, dv_start + dv_p, **FP32_TOL, err_msg="dv")
    np.testing.assert_allclose(dq, dq_start + dq_p, **FP32_TOL, err_msg="dq")
    assert min(float(jnp.abs(g).max()) for g in (dq_p, dk_p, dv_p)) > 1e-3  # not all 0
    dq_acc = acc[0]
