"""dot_product_attention: blockwise (flash) against the materialized reference.

Both impls compute scores and softmax in float32; they differ only in summation order
(online softmax over blocks with rescaling vs one softmax over the full row), which
moves fp32 results by a few ulps of the accumulated magnitudes. With O(1) inputs and
rows of at most ~100 keys that is ~1e-6, so 1e-5 absolute (plus 1e-5 relative for the
larger gradient entries) would flag any real masking or scaling bug, which shows up
at the 1e-2 level or above.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.attention import (
  EMPTY,
  MaskSpec,
  blockwise_attention_stats,
  blockwise_attention_with_lse,
  dot_product_attention,
  reference_attention_with_lse,
  visited_block_pairs,
)

FP32_TOL = dict(atol=1e-5, rtol=1e-5)


def packed_rows(batch, length, doc_lengths):
  """Segment ids of consecutive documents (ids 1, 2, ...), the rest padding id 0."""
  rows = []
  for lengths in doc_lengths:
    row = np.concatenate([np.full(n, d + 1) for d, n in enumerate(lengths)])
    rows.append(np.pad(row, (0, length - len(row))))
  return jnp.asarray(np.stack(rows[:batch]), jnp.int32)


def random_qkv(seed, B, T, S, Hq, Hkv, D, dtype=jnp.float32):
  kq, kk, kv, kw = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(kq, (B, T, Hq, D)).astype(dtype)
  k = jax.random.normal(kk, (B, S, Hkv, D)).astype(dtype)
  v = jax.random.normal(kv, (B, S, Hkv, D)).astype(dtype)
  w = jax.random.normal(kw, (B, T, Hq, D))  # weights of the scalar whose gradient we take
  return q, k, v, w


def out_and_grads(impl, q, k, v, w, **kwargs):
  """(out, (dq, dk, dv)) of sum(w * out), jitted; kwargs go to dot_product_attention."""

  def loss(q, k, v):
    out = dot_product_attention(q, k, v, impl=impl, **kwargs)
    return (out.astype(jnp.float32) * w).sum(), out

  grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))
  grads, out = grad_fn(q, k, v)
  return out, grads


def assert_blockwise_matches_reference(q, k, v, w, tol=None, **kwargs):
  """The loop path of impl="blockwise" against the reference.

  Default positions would route impl="blockwise" to the unrolled static schedule
  (tests/test_unrolled_attention.py covers it); passing them explicitly, as context-
  parallel layouts do, keeps this file on the loop over runtime block maps.
  """
  tol = FP32_TOL if tol is None else tol
  out_ref, grads_ref = out_and_grads("reference", q, k, v, w, **kwargs)
  if kwargs.get("q_index") is None and kwargs.get("kv_index") is None:
    kwargs = dict(kwargs, q_index=jnp.arange(q.shape[1]), kv_index=jnp.arange(k.shape[1]))
  out_blk, grads_blk = out_and_grads("blockwise", q, k, v, w, **kwargs)
  assert out_blk.dtype == q.dtype and out_blk.shape == q.shape
  f32 = lambda x: np.asarray(x, np.float32)
  np.testing.assert_allclose(f32(out_blk), f32(out_ref), **tol, err_msg="out")
  for name, g_blk, g_ref, x in zip("qkv", grads_blk, grads_ref, (q, k, v), strict=True):
    assert g_blk.dtype == x.dtype and g_blk.shape == x.shape
    np.testing.assert_allclose(f32(g_blk), f32(g_ref), **tol, err_msg=f"d{name}")
  return out_ref, grads_ref


# Packed rows whose documents start mid-block (block 16), with trailing padding.
DOCS = [[7, 20, 30, 5], [40, 3, 13]]
SEG = packed_rows(2, 64, DOCS)

# Each case also varies the head layout (MHA, GQA Hq=4/Hkv=2, MQA Hkv=1) to keep the
# number of compilations, the bulk of this file's runtime, small.
CASES = {
  "causal_gqa": (dict(mask=MaskSpec()), 4, 2),
  "document_mqa": (dict(mask=MaskSpec(document=True), q_segment_ids=SEG), 4, 1),
  "anchor": (dict(mask=MaskSpec(document=True, anchor=True), q_segment_ids=SEG), 2, 2),
  "window": (dict(mask=MaskSpec(window=19)), 2, 2),
  "window_sinks": (dict(mask=MaskSpec(window=11, sinks=4), scale=0.3), 2, 1),
  "document_window_sinks": (
    dict(mask=MaskSpec(document=True, window=9, sinks=3), q_segment_ids=SEG),
    4,
    2,
  ),
  "non_causal": (dict(mask=MaskSpec(causal=False)), 2, 2),
  "non_causal_document_window": (
    dict(mask=MaskSpec(causal=False, document=True, window=13), q_segment_ids=SEG),
    2,
    1,
  ),
  # Strided blocks with a per-kv-head phase (S2-Attention / LongGen), GQA: sparse blocks
  # of 8 against kernel blocks of 16; then documents, sinks and 4-token sparse blocks.
  "strided_gqa": (dict(mask=MaskSpec(stride=3, stride_block=8)), 4, 2),
  "strided_document_sinks": (
    dict(
      mask=MaskSpec(document=True, sinks=2, stride=4, stride_block=4, head_phase_step=1),
      q_segment_ids=SEG,
    ),
    4,
    4,
  ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_blockwise_matches_reference(case):
  kwargs, Hq, Hkv = CASES[case]
  q, k, v, w = random_qkv(0, 2, 64, 64, Hq, Hkv, 8)
  assert_blockwise_matches_reference(q, k, v, w, block_q=16, block_kv=16, **kwargs)


def test_gqa_head_order_is_hugging_face():
  """Query head h reads kv head h // (Hq // Hkv), as if K and V were `repeat_kv`-ed."""
  q, k, v, _ = random_qkv(2, 1, 16, 16, 4, 2, 8)
  repeat = lambda x: jnp.repeat(x, 2, axis=2)
  for impl in ("reference", "blockwise"):
    out = dot_product_attention(q, k, v, mask=MaskSpec(), impl=impl, block_q=8, block_kv=8)
    mha = dot_product_attention(q, repeat(k), repeat(v), mask=MaskSpec(), impl="reference")
    np.testing.assert_allclose(out, mha, **FP32_TOL)


def test_lengths_not_multiple_of_block():
  q, k, v, w = random_qkv(3, 1, 100, 100, 4, 2, 8)
  seg = packed_rows(1, 100, [[33, 50, 10]])
  assert_blockwise_matches_reference(
    q,
    k,
    v,
    w,
    mask=MaskSpec(document=True, anchor=True),
    q_segment_ids=seg,
    block_q=32,
    block_kv=32,
  )


@pytest.mark.parametrize("T, block_kv", [(3, 16), (20, 8)])
def test_cross_attention_with_offset_positions(T, block_kv):
  """Decode-like: T queries at positions S-T..S-1 against S keys (T != S)."""
  S = 53
  q, k, v, w = random_qkv(4, 2, T, S, 2, 2, 8)
  q_pos = jnp.arange(S - T, S)
  kv_seg = packed_rows(2, S, [[20, 33], [10, 10, 30]])
  assert_blockwise_matches_reference(
    q,
    k,
    v,
    w,
    mask=MaskSpec(document=True, window=24, sinks=2),
    q_index=q_pos,
    q_segment_ids=kv_seg[:, S - T :],
    kv_segment_ids=kv_seg,
    block_q=8,
    block_kv=block_kv,
  )


def test_permuted_layout():
  """A context-parallel layout reorders tokens and passes their global indices."""
  T = 64
  perm = np.concatenate([np.arange(0, 16), np.arange(48, 64), np.arange(16, 48)])  # zigzag-like
  q, k, v, w = random_qkv(5, 2, T, T, 2, 2, 8)
  seg = SEG[:, perm]
  assert_blockwise_matches_reference(
    q,
    k,
    v,
    w,
    mask=MaskSpec(document=True, anchor=True),
    q_segment_ids=seg,
    q_index=jnp.asarray(perm),
    block_q=16,
    block_kv=16,
  )


def test_empty_rows_output_zero_with_zero_gradients():
  """Non-causal document mask where segment 9 has no key: those rows are 0, not NaN."""
  T = 48
  q, k, v, w = random_qkv(6, 2, T, T, 2, 1, 8)
  kv_seg = packed_rows(2, T, [[20, 28], [30, 18]])
  q_seg = kv_seg.at[:, 5:11].set(9).at[1, 40:].set(9)
  empty_BT = np.asarray(q_seg == 9)
  out, (dq, dk, dv) = assert_blockwise_matches_reference(
    q,
    k,
    v,
    w,
    mask=MaskSpec(causal=False, document=True),
    q_segment_ids=q_seg,
    kv_segment_ids=kv_seg,
    block_q=16,
    block_kv=16,
  )
  assert np.all(np.isfinite(out)) and np.all(np.isfinite(dq))
  np.testing.assert_array_equal(np.asarray(out)[empty_BT], 0.0)
  np.testing.assert_array_equal(np.asarray(dq)[empty_BT], 0.0)
  assert np.abs(np.asarray(out)[~empty_BT]).max() > 0.1
  _, lse_BHT = blockwise_attention_with_lse(
    q,
    k,
    v,
    mask=MaskSpec(causal=False, document=True),
    q_segment_ids=q_seg,
    kv_segment_ids=kv_seg,
    block_q=16,
    block_kv=16,
  )
  assert np.all(np.isneginf(np.asarray(lse_BHT).transpose(0, 2, 1)[empty_BT]))
  assert np.all(np.isfinite(np.asarray(lse_BHT).transpose(0, 2, 1)[~empty_BT]))


def test_lse_and_its_gradient_match_reference():
  """Ring attention merges partial results by lse and differentiates through both outputs."""
  q, k, v, w = random_qkv(7, 2, 64, 64, 2, 1, 8)
  w_lse = jax.random.normal(jax.random.key(8), (2, 2, 64))
  kwargs = dict(mask=MaskSpec(document=True, window=20), q_segment_ids=SEG)

  def loss(fn, q, k, v):
    out, lse = fn(q, k, v, **kwargs)
    return (out * w).sum() + (lse * w_lse).sum(), lse

  blockwise = lambda *a, **kw: blockwise_attention_with_lse(*a, block_q=16, block_kv=16, **kw)
  results = {}
  for name, fn in (("reference", reference_attention_with_lse), ("blockwise", blockwise)):
    grad_fn = jax.grad(lambda q, k, v, fn=fn: loss(fn, q, k, v), argnums=(0, 1, 2), has_aux=True)
    results[name] = jax.jit(grad_fn)(q, k, v)
  (g_ref, lse_ref), (g_blk, lse_blk) = results["reference"], results["blockwise"]
  assert lse_blk.shape == (2, 2, 64)
  np.testing.assert_allclose(lse_blk, lse_ref, **FP32_TOL)
  for a, b in zip(g_blk, g_ref, strict=True):
    np.testing.assert_allclose(a, b, **FP32_TOL)


def test_bfloat16_inputs():
  """bf16 in, bf16 out: both impls upcast to fp32, so they differ by fp32 summation order
  (~1e-6) and then the final rounding to bf16, which can land one bf16 ulp apart
  (ulp(x) <= 2^-7 |x| with 8 significant bits). Hence rtol 2^-7 plus a small atol for
  entries near 0; a masking or scaling bug would be off by far more."""
  q, k, v, w = random_qkv(9, 2, 64, 64, 4, 2, 8, dtype=jnp.bfloat16)
  tol = dict(rtol=2**-7, atol=2**-7 * 0.1)
  assert_blockwise_matches_reference(
    q, k, v, w, tol=tol, mask=MaskSpec(document=True), q_segment_ids=SEG, block_q=16, block_kv=16
  )


def test_auto_runs_blockwise_on_cpu():
  q, k, v, _ = random_qkv(10, 1, 40, 40, 2, 2, 8)
  kwargs = dict(mask=MaskSpec(window=8), block_q=16, block_kv=16)
  auto = dot_product_attention(q, k, v, impl="auto", **kwargs)
  np.testing.assert_array_equal(auto, dot_product_attention(q, k, v, impl="blockwise", **kwargs))


def test_causal_block_skipping_is_real():
  """Causal T=512 with blocks of 64: the loop computes exactly nQ(nQ+1)/2 block pairs."""
  T, block = 512, 64
  nQ = T // block
  q, k, v, _ = random_qkv(11, 1, T, T, 1, 1, 8)
  stats = jax.jit(
    lambda q, k, v: blockwise_attention_stats(
      q, k, v, mask=MaskSpec(), block_q=block, block_kv=block
    )
  )(q, k, v)
  assert int(stats["visited"]) == nQ * (nQ + 1) // 2 == 36
  assert int(stats["total"]) == nQ * nQ
  pos = jnp.arange(T)[None]
  block_map = MaskSpec().block_map(pos, pos, None, None, block_q=block, block_kv=block)
  assert int(visited_block_pairs(block_map)) == 36


def test_document_block_skipping_uses_or_over_batch():
  """A pair is computed if any batch row needs it; documents skip more than causal alone."""
  T, block = 64, 8
  q, k, v, _ = random_qkv(12, 2, T, T, 1, 1, 8)
  seg = jnp.asarray(np.stack([np.repeat(np.arange(1, 5), 16), np.repeat(np.arange(1, 3), 32)]))
  stats = lambda s: int(
    blockwise_attention_stats(
      q[:1],
      k[:1],
      v[:1],
      mask=MaskSpec(document=True),
      q_segment_ids=s,
      block_q=block,
      block_kv=block,
    )["visited"]
  )
  both = int(
    blockwise_attention_stats(
      q, k, v, mask=MaskSpec(document=True), q_segment_ids=seg, block_q=block, block_kv=block
    )["visited"]
  )
  assert stats(seg[:1]) == 4 * 3 and stats(seg[1:]) == 2 * 10
  assert both == 2 * 10  # row 1's pairs are a superset of row 0's


def _temp_bytes(fn, *args):
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("T", [16384])
def test_blockwise_memory_is_linear_in_length(T):
  """Compiled (never run) temp memory at T=16384: blockwise < 1/8 of the reference's."""
  x = jax.ShapeDtypeStruct((1, T, 2, 64), jnp.float32)
  mask = MaskSpec(document=True)
  seg = jax.ShapeDtypeStruct((1, T), jnp.int32)
  ratios = {}
  for name in ("forward", "forward+backward"):
    temp = {}
    for impl in ("reference", "blockwise"):
      attn = lambda q, k, v, s, impl=impl: dot_product_attention(
        q, k, v, mask=mask, q_segment_ids=s, impl=impl, block_q=512, block_kv=512
      )
      if name == "forward+backward":
        attn = jax.value_and_grad(lambda q, k, v, s, f=attn: f(q, k, v, s).sum(), argnums=(0, 1, 2))
      temp[impl] = _temp_bytes(attn, x, x, x, seg)
    ratios[name] = temp["blockwise"] / temp["reference"]
    # The reference holds at least one [B, H, T, T] fp32 score array.
    assert temp["reference"] >= 2 * T * T * 4, (name, temp)
    assert ratios[name] < 1 / 8, (name, temp)
  print("blockwise/reference temp memory at T =", T, ratios)


def test_impl_errors():
  q, k, v, _ = random_qkv(13, 1, 8, 8, 2, 2, 8)
  np.testing.assert_allclose(  # impl="pallas" dispatches to the kernel (interpret on CPU)
    dot_product_attention(q, k, v, mask=MaskSpec(), impl="pallas", block_q=8, block_kv=8),
    dot_product_attention(q, k, v, mask=MaskSpec(), impl="reference"),
    atol=1e-5,
  )
  with pytest.raises(ValueError, match="'flash' is unknown; use one of auto, reference, blockwise"):
    dot_product_attention(q, k, v, mask=MaskSpec(), impl="flash")
  for impl in ("reference", "blockwise"):
    with pytest.raises(ValueError, match="segment_ids"):
      dot_product_attention(q, k, v, mask=MaskSpec(document=True), impl=impl)
  with pytest.raises(ValueError, match="multiple"):
    dot_product_attention(
      q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2), mask=MaskSpec()
    )


def test_deprecated_positions_spelling_warns_and_means_the_index():
  """q_positions/kv_positions (the mask indices' old names) still work for one release."""
  q, k, v, _ = random_qkv(15, 1, 16, 16, 2, 2, 8)
  index = jnp.asarray(np.random.default_rng(0).permutation(16))
  want = dot_product_attention(q, k, v, mask=MaskSpec(), impl="reference", q_index=index)
  with pytest.warns(DeprecationWarning, match=r"q_positions=\.\.\.\) is deprecated; pass q_index"):
    got = dot_product_attention(q, k, v, mask=MaskSpec(), impl="reference", q_positions=index)
  np.testing.assert_array_equal(got, want)
  with pytest.raises(ValueError, match="both q_positions and q_index"):
    dot_product_attention(q, k, v, mask=MaskSpec(), q_positions=index, q_index=index)


def test_default_scale_is_inverse_sqrt_head_dim():
  q, k, v, _ = random_qkv(14, 1, 16, 16, 2, 2, 8)
  for impl in ("reference", "blockwise"):
    default = dot_product_attention(q, k, v, mask=MaskSpec(), impl=impl, block_q=8, block_kv=8)
    explicit = dot_product_attention(
      q * math.sqrt(8), k, v, mask=MaskSpec(), impl=impl, scale=1 / 8, block_q=8, block_kv=8
    )
    np.testing.assert_allclose(default, explicit, **FP32_TOL)


def test_strided_reference_matches_numpy_attention():
  """The oracle itself for a strided GQA mask: softmax attention in numpy where query
  head j uses kv head j // G and the S2-Attention pattern of that kv head, written from
  its definition (causal and (q_blk - k_blk < local or (k_blk + h·step) % stride == 0))."""
  T, Hq, Hkv, D, block, stride = 40, 4, 2, 8, 4, 4
  q, k, v, _ = random_qkv(15, 1, T, T, Hq, Hkv, D)
  mask = MaskSpec(stride=stride, stride_block=block, local_blocks=2)
  out = np.asarray(dot_product_attention(q, k, v, mask=mask, impl="reference"))
  pos = np.arange(T)
  q_blk, k_blk = pos[:, None] // block, pos[None, :] // block
  step = stride // Hkv
  for j in range(Hq):
    h = j // (Hq // Hkv)
    vertical = (k_blk + h * step) % stride == 0
    allowed = (pos[None, :] <= pos[:, None]) & ((q_blk - k_blk < 2) | vertical)
    scores = np.asarray(q)[0, :, j] @ np.asarray(k)[0, :, h].T / np.sqrt(D)
    scores = np.where(allowed, scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    want = (p / p.sum(-1, keepdims=True)) @ np.asarray(v)[0, :, h]
    np.testing.assert_allclose(out[0, :, j], want, **FP32_TOL, err_msg=f"query head {j}")


def test_strided_bfloat16_with_documents_and_ragged_length():
  """bf16 (tolerance as in test_bfloat16_inputs), T = 100 with blocks of 32 (padded last
  block), GQA, documents starting mid-block, 8-token sparse blocks with an offset."""
  q, k, v, w = random_qkv(16, 1, 100, 100, 4, 2, 8, dtype=jnp.bfloat16)
  seg = packed_rows(1, 100, [[33, 50, 10]])
  mask = MaskSpec(document=True, stride=4, stride_block=8, local_blocks=2, stride_offset=1)
  tol = dict(rtol=2**-7, atol=2**-7 * 0.1)
  assert_blockwise_matches_reference(
    q, k, v, w, tol=tol, mask=mask, q_segment_ids=seg, block_q=32, block_kv=32
  )


def test_strided_block_skipping_is_the_union_over_heads():
  """The blockwise loop computes a pair iff some kv head's block map needs it: with one
  kv head it skips that head's empty blocks; with stride kv heads it computes the union,
  every causal pair (the Pallas kernels skip per head instead)."""
  T, block = 256, 32
  nQ = T // block
  mask = MaskSpec(stride=4, stride_block=block, local_blocks=1)
  pos = jnp.arange(T)[None]
  for Hkv, want in ((1, None), (4, nQ * (nQ + 1) // 2)):
    q, k, v, _ = random_qkv(17, 1, T, T, Hkv, Hkv, 8)
    stats = blockwise_attention_stats(q, k, v, mask=mask, block_q=block, block_kv=block)
    bmap = mask.block_map(pos, pos, None, None, block_q=block, block_kv=block, num_kv_heads=Hkv)
    assert bmap.shape == (1, Hkv, nQ, nQ)
    union = int((np.asarray(bmap) != EMPTY).any((0, 1)).sum())
    assert int(stats["visited"]) == int(visited_block_pairs(bmap)) == union
    if want is not None:
      assert union == want
    else:  # one head: the diagonal band plus every 4th kv block below it
      assert union == nQ + sum(1 for i in range(nQ) for j in range(i) if j % 4 == 0 and j < i)
