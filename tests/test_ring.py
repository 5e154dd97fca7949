"""Context-parallel attention on 8 CPU devices: ring and all_gather against `reference`.

Tolerance: every path computes scores and softmax in float32 and differs from the
reference only in summation order (blocks inside a chunk, then the LSE merge across
ring steps, or per-step gradient sums), i.e. a few ulps of the accumulated O(1)
magnitudes over rows of <= 96 keys: ~1e-6 here. 1e-5 absolute plus 1e-5 relative
flags any masking, merging or gradient-routing bug, which moves results by 1e-2 or
more (e.g. a dK arriving on the wrong device, or a document seen across a boundary).

Shapes are tiny and the cases share compilations (a layout is only a permutation of
traced positions, so the three layouts reuse one executable): compile time dominates.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from lcjax.attention import (
  IMPLS,
  AttentionImpl,
  AttentionOptions,
  MaskInputs,
  MaskSpec,
  blockwise,
  reference_attention,
)
from lcjax.attention.blockwise import blockwise_bwd, blockwise_fwd
from lcjax.attention.reference import reference_attention_with_lse
from lcjax.parallel import (
  LAYOUTS,
  apply_layout,
  make_mesh,
  permutation,
  ring_attention,
  ring_attention_stats,
  ring_work,
  work_imbalance,
)

FP32_TOL = dict(atol=1e-5, rtol=1e-5)
B, T, HQ, HKV, D = 2, 96, 4, 2, 16  # GQA: 2 query heads per kv head
# Blocks that divide no chunk length (T/W = 48, 24, 12; zigzag halves 24, 12, 6).
BLOCKS = dict(block_q=5, block_kv=7)


def packed_segments(doc_lengths, length):
  """Segment ids of consecutive documents (ids 1, 2, ...), then padding id 0."""
  rows = []
  for lengths in doc_lengths:
    row = np.concatenate([np.full(n, d + 1) for d, n in enumerate(lengths)])
    rows.append(np.pad(row, (0, length - len(row))))
  return np.stack(rows).astype(np.int32)


# Documents cross every chunk boundary of every W and layout; row 1 ends in padding.
SEG_BT = packed_segments([[21, 30, 33, 12], [5, 40, 17, 26]], T)


def random_inputs(seed, dtype=jnp.float32):
  kq, kk, kv, kw = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(kq, (B, T, HQ, D)).astype(dtype)
  k = jax.random.normal(kk, (B, T, HKV, D)).astype(dtype)
  v = jax.random.normal(kv, (B, T, HKV, D)).astype(dtype)
  w = jax.random.normal(kw, (B, T, HQ, D))  # weights of the scalar whose gradient we take
  return q, k, v, w


def out_and_grads(attention, q, k, v, w, **kwargs):
  """(out, (dq, dk, dv)) of sum(w * out), one jitted computation."""

  def loss(q, k, v):
    out = attention(q, k, v, **kwargs)
    return (out.astype(jnp.float32) * w).sum(), out

  grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


def reference_out_and_grads(q, k, v, w, mask, seg_BT=None, kv_seg_BT=None):
  return out_and_grads(
    reference_attention, q, k, v, w, mask=mask, q_segment_ids=seg_BT, kv_segment_ids=kv_seg_BT
  )


def check_context_parallel(mesh, mask, layouts=LAYOUTS, kv_seg_BT=None, tol=FP32_TOL, **kwargs):
  """Runs the context-parallel attention in each layout and compares with the reference.

  The inputs are laid out with `apply_layout` (tokens and segment ids permuted together,
  `token_index` as mask positions), and the results are compared in layout order. One
  jitted function serves every layout: positions and segment ids are traced arguments.
  """
  W = mesh.shape[kwargs.get("axis", "context")]
  q, k, v, w = random_inputs(0)
  seg_BT = SEG_BT if mask.document else None
  out_ref, grads_ref = reference_out_and_grads(q, k, v, w, mask, seg_BT, kv_seg_BT)

  @jax.jit
  def run(q, k, v, w, q_seg, kv_seg, q_pos):
    def loss(q, k, v):
      out = ring_attention(
        q,
        k,
        v,
        mask=mask,
        q_segment_ids=q_seg,
        kv_segment_ids=kv_seg,
        q_index=q_pos,
        mesh=mesh,
        **kwargs,
      )
      return (out.astype(jnp.float32) * w).sum(), out

    return jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)

  f32 = lambda x: np.asarray(x, np.float32)
  for layout in layouts:
    batch = dict(q=q, k=k, v=v, w=w, out=out_ref, dq=grads_ref[0], dk=grads_ref[1])
    batch.update(dv=grads_ref[2], seg=SEG_BT)
    if kv_seg_BT is not None:
      batch["kv_seg"] = kv_seg_BT
    lay = apply_layout(batch, W, layout)
    q_seg = lay["seg"] if mask.document else None
    grads, out = run(
      lay["q"], lay["k"], lay["v"], lay["w"], q_seg, lay.get("kv_seg"), lay["token_index"]
    )
    assert out.dtype == q.dtype and out.shape == q.shape
    np.testing.assert_allclose(f32(out), f32(lay["out"]), **tol, err_msg=f"{layout} out")
    for name, g in zip("qkv", grads, strict=True):
      assert g.dtype == lay[name].dtype and g.shape == lay[name].shape
      np.testing.assert_allclose(f32(g), f32(lay[f"d{name}"]), **tol, err_msg=f"{layout} d{name}")


@pytest.mark.parametrize("strategy", ["ring", "all_gather"])
@pytest.mark.parametrize("W", [2, 4, 8])
def test_multi_document_causal_matches_reference(W, strategy):
  """W ∈ {2,4,8} × every layout: packed documents crossing chunks, GQA, odd block sizes."""
  mesh = make_mesh(dict(data=-1, context=W))
  mask = MaskSpec(causal=True, document=True)
  check_context_parallel(mesh, mask, strategy=strategy, **BLOCKS)


MASKS = {
  # AnchorAttention: key 0 visible to every document.
  "anchor": MaskSpec(causal=True, document=True, anchor=True),
  # Sliding window (shorter than a chunk) with attention sinks, across documents.
  "window_sinks": MaskSpec(causal=True, window=10, sinks=3),
  # Bidirectional documents with a window: chunks later in the ring matter too.
  "bidirectional_window": MaskSpec(causal=False, document=True, window=17),
}


@pytest.mark.parametrize("strategy", ["ring", "all_gather"])
@pytest.mark.parametrize("name", sorted(MASKS))
def test_masks_across_the_ring(name, strategy):
  check_context_parallel(make_mesh(dict(data=-1, context=4)), MASKS[name], strategy=strategy)


def test_strided_mask_across_the_ring():
  """S2-Attention strided blocks (per kv head, GQA) with documents and sinks, W = 4, every
  layout: the per-head pattern is evaluated on global positions and kv heads, and chunk
  pairs are skipped only when no kv head sees them. Odd block sizes inside the chunks."""
  mask = MaskSpec(document=True, sinks=2, stride=3, stride_block=4)
  check_context_parallel(make_mesh(dict(data=-1, context=4)), mask, **BLOCKS)


def test_empty_rows_output_zero_with_zero_gradients():
  """Queries of a document with no keys (kv segment ids differ) give 0 and zero grads."""
  kv_seg_BT = np.where(SEG_BT == 2, 9, SEG_BT)  # no key belongs to document 2
  mesh = make_mesh(dict(data=-1, context=4))
  check_context_parallel(mesh, MaskSpec(causal=False, document=True), kv_seg_BT=kv_seg_BT)


def test_batch_and_head_axes():
  """Rows over ('data', 'fsdp'), heads over 'tensor', sequence over 'context' at once;
  sharded inputs in, sharded output out (what the model's attention layer passes)."""
  mesh = make_mesh(dict(data=1, fsdp=2, tensor=2, context=2))
  axes = dict(batch_axes=("data", "fsdp"), head_axis="tensor")
  check_context_parallel(mesh, MaskSpec(document=True), layouts=("zigzag",), **axes, **BLOCKS)
  q, k, v, _ = random_inputs(1)
  spec = PartitionSpec(("data", "fsdp"), "context", "tensor", None)
  q, k, v = (jax.device_put(x, NamedSharding(mesh, spec)) for x in (q, k, v))
  expected = ring_attention(q, k, v, mask=MaskSpec(), mesh=mesh, **axes, **BLOCKS)
  assert expected.sharding.is_equivalent_to(NamedSharding(mesh, spec), expected.ndim)
  # Inside a jitted model under `jax.set_mesh`, the mesh can come from the context.
  attend = jax.jit(lambda q, k, v: ring_attention(q, k, v, mask=MaskSpec(), **axes, **BLOCKS))
  with jax.set_mesh(mesh):
    out = attend(q, k, v)
  np.testing.assert_allclose(out, expected, **FP32_TOL)
  with pytest.raises(ValueError, match="ring_attention needs a mesh: pass mesh="):
    attend(q, k, v)


def test_bfloat16_inputs():
  """bf16 in, bf16 out; fp32 softmax and merge. Tolerance: bf16 rounding of the inputs
  and the output (eps 2^-8 ≈ 4e-3) on O(1) values, against the fp32 reference."""
  q, k, v, w = random_inputs(2)
  mask = MaskSpec(causal=True, document=True)
  out_ref, grads_ref = reference_out_and_grads(q, k, v, w, mask, SEG_BT)
  mesh = make_mesh(dict(data=-1, context=2))
  bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  out, grads = out_and_grads(ring_attention, *bf16, w, mask=mask, q_segment_ids=SEG_BT, mesh=mesh)
  assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
  tol = dict(atol=3e-2, rtol=3e-2)
  np.testing.assert_allclose(np.asarray(out, np.float32), out_ref, **tol)
  for g, g_ref in zip(grads, grads_ref, strict=True):
    np.testing.assert_allclose(np.asarray(g, np.float32), g_ref, **tol)


def test_empty_chunk_pairs_are_skipped():
  """Contiguous causal: device r computes r + 1 chunk pairs, W(W+1)/2 in all, counted
  inside the compute branch; zigzag computes every pair but skips blocks inside them,
  exactly as `ring_work` (the bench's imbalance numbers) predicts."""
  W = 8
  mesh = make_mesh(dict(context=-1))
  q, k, v, _ = random_inputs(3)
  for layout in ("contiguous", "zigzag", "striped"):
    perm = permutation(T, W, layout)
    stats = ring_attention_stats(
      q, k, v, mask=MaskSpec(), q_index=perm, mesh=mesh, block_q=5, block_kv=5
    )
    chunk_pairs, block_pairs = (np.asarray(stats[key][0]) for key in ("chunk_pairs", "block_pairs"))
    np.testing.assert_array_equal(block_pairs, ring_work(T, W, layout, 5).sum(0), err_msg=layout)
    if layout == "contiguous":
      np.testing.assert_array_equal(chunk_pairs, np.arange(1, W + 1))
      assert chunk_pairs.sum() == W * (W + 1) // 2
    else:
      np.testing.assert_array_equal(chunk_pairs, np.full(W, W), err_msg=layout)
      assert len(set(block_pairs.tolist())) == 1, f"{layout} is unbalanced: {block_pairs}"


@pytest.mark.parametrize("W", [2, 4, 8])
def test_causal_work_imbalance(W):
  """Σ_steps max_device work ÷ mean: contiguous ≈ 2 − 1/W, zigzag and striped ≈ 1."""
  T_long, block = 64 * 1024, 64  # many blocks per chunk, so the diagonal is ~half a chunk
  contiguous = work_imbalance(T_long, W, "contiguous", block)
  assert abs(contiguous - (2 - 1 / W)) < 0.01 * (2 - 1 / W), contiguous
  assert work_imbalance(T_long, W, "zigzag", block) <= 1.01
  assert work_imbalance(T_long, W, "striped", block) <= 1.01
  assert work_imbalance(T_long, W, "contiguous", block, mask=MaskSpec(causal=False)) == 1.0


@pytest.mark.parametrize("name", ["blockwise", "reference"])
def test_step_routines_against_global_lse(name):
  """A registered impl's per-step routines: keys split in two, forward parts merged by
  lse equal the full attention, and the backward against the full out/lse gives the
  parts of the full gradient (the reference's is FA-2's backward written densely)."""
  q, k, v, w = random_inputs(4)
  mask = MaskSpec(causal=True, document=True, window=40)
  kw = dict(mask=mask, q_segment_ids=SEG_BT, kv_segment_ids=SEG_BT)
  out_ref, lse_ref = reference_attention_with_lse(q, k, v, **kw)
  _, (dq_ref, dk_ref, dv_ref) = reference_out_and_grads(q, k, v, w, mask, SEG_BT)
  impl, opts = IMPLS[name], AttentionOptions(mask, **BLOCKS)
  out, lse = impl.forward(q, k, v, MaskInputs(q_segment_ids=SEG_BT, kv_segment_ids=SEG_BT), opts)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, out_ref, **FP32_TOL)
  np.testing.assert_allclose(lse, lse_ref, **FP32_TOL)
  half = T // 2
  pos = np.arange(T)
  dq = jnp.zeros_like(q)
  for part in (slice(0, half), slice(half, T)):
    inputs = MaskInputs(None, pos[part], SEG_BT, SEG_BT[:, part])
    dq_p, dk_p, dv_p = impl.backward(q, k[:, part], v[:, part], out, lse, w, inputs, opts)
    dq = dq + dq_p
    np.testing.assert_allclose(dk_p, dk_ref[:, part], **FP32_TOL)
    np.testing.assert_allclose(dv_p, dv_ref[:, part], **FP32_TOL)
  np.testing.assert_allclose(dq, dq_ref, **FP32_TOL)


def test_keyword_step_entry_points_match_the_registry():
  """`blockwise_fwd`/`blockwise_bwd` (the keyword signature) are the registry's routines."""
  q, k, v, w = random_inputs(5)
  kw = dict(mask=MaskSpec(document=True), q_segment_ids=SEG_BT, **BLOCKS)
  out, lse = blockwise_fwd(q, k, v, **kw)
  grads = blockwise_bwd(q, k, v, out, lse, w, **kw)
  opts = AttentionOptions(kw["mask"], **BLOCKS)
  inputs = MaskInputs(q_segment_ids=SEG_BT)
  want_out, want_lse = IMPLS["blockwise"].forward(q, k, v, inputs, opts)
  want = IMPLS["blockwise"].backward(q, k, v, want_out, want_lse, w, inputs, opts)
  for got_x, want_x in zip((out, lse, *grads), (want_out, want_lse, *want), strict=True):
    np.testing.assert_array_equal(got_x, want_x)


def test_pluggable_block_impl():
  """An `AttentionImpl` replaces the per-step routine (how the Pallas kernels plug in)."""
  calls = []

  def forward(*args):
    calls.append("fwd")
    return blockwise.forward(*args)

  def backward(*args):
    calls.append("bwd")
    return blockwise.backward(*args)

  impl = AttentionImpl(blockwise.attention_with_lse, forward, backward)
  mesh = make_mesh(dict(data=-1, context=2))
  check_context_parallel(mesh, MaskSpec(), layouts=("striped",), block_impl=impl)
  assert "fwd" in calls and "bwd" in calls


def test_reference_block_impl_matches_reference():
  """block_impl="reference": each ring step materializes its chunk pair's scores."""
  mesh = make_mesh(dict(data=-1, context=4))
  check_context_parallel(mesh, MaskSpec(causal=True, document=True), layouts=("zigzag",),
                         block_impl="reference")  # fmt: skip


def test_pallas_block_impl_matches_reference():
  """block_impl="pallas": every ring step runs the block-sparse kernels (interpret mode on
  CPU), forward and backward against the global lse, and matches the reference.

  Causal + documents on W = 4 in the zigzag layout, so chunk pairs mix full, partial and
  skipped blocks; blocks of 8 (the kernels need multiples of 8) inside 24-token chunks.
  The kernels compute in float32 like the blockwise impl: same tolerance.
  """
  mesh = make_mesh(dict(data=-1, context=4))
  mask = MaskSpec(causal=True, document=True)
  check_context_parallel(
    mesh, mask, layouts=("zigzag",), block_impl="pallas", block_q=8, block_kv=8
  )


def test_errors():
  """Each bad call fails before tracing with one sentence naming the argument."""
  mesh = make_mesh(dict(data=-1, context=4))  # data=2
  q, k, v, _ = random_inputs(0)

  def attend(rows=slice(None), length=T, **kwargs):
    qkv = (x[rows, :length] for x in (q, k, v))
    return ring_attention(*qkv, mask=kwargs.pop("mask", MaskSpec()), mesh=mesh, **kwargs)

  with pytest.raises(ValueError, match="strategy='ulysses' is not a context-parallel strategy"):
    attend(strategy="ulysses")
  with pytest.raises(ValueError, match="block_impl='splash' is unknown"):
    attend(block_impl="splash")
  with pytest.raises(ValueError, match="axis='seq' is not an axis of the mesh"):
    attend(axis="seq")
  with pytest.raises(ValueError, match="batch 1 is not divisible by the 2 devices"):
    attend(rows=slice(0, 1), batch_axes="data")
  with pytest.raises(ValueError, match="query length 90 is not divisible by the 'context' axis"):
    attend(length=90)
  with pytest.raises(ValueError, match="mask must be a MaskSpec"):
    attend(mask="causal")
  with pytest.raises(ValueError, match="must name different mesh axes"):
    attend(head_axis="context")
  with pytest.raises(ValueError, match="differs per kv head, which head_axis='data'"):
    attend(mask=MaskSpec(stride=2), head_axis="data")
  with pytest.raises(ValueError, match="2 kv heads are not divisible by head_axis='data'"):
    ring_attention(
      q, k, v, mask=MaskSpec(), mesh=make_mesh(dict(data=4, context=2)), head_axis="data"
    )
