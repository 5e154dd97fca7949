"""The unrolled static-schedule attention against the reference, and its schedule.

Same float32 argument as tests/test_attention.py: both sides take the softmax in
float32 and differ only in summation order (online softmax over blocks vs one softmax
per row), a few ulps of O(1) magnitudes for rows of <= ~200 keys, so 1e-5 absolute and
relative flags any masking, scaling or schedule bug (those show at 1e-2 or above).
bfloat16 inputs: the products of P with V, K, Q, dO run in float32 on both sides, so
only the inputs are rounded and the outputs agree to the output dtype's rounding,
rtol 2^-7 (8 significant bits) plus a small atol.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.attention import (
  AttentionOptions,
  MaskInputs,
  MaskSpec,
  dot_product_attention,
  reference_attention_with_lse,
)
from lcjax.attention import unrolled as unrolled_mod
from lcjax.attention.unrolled import static_schedule, unrolled_attention_with_lse

FP32_TOL = dict(atol=1e-5, rtol=1e-5)
BF16_TOL = dict(rtol=2**-7, atol=2**-7 * 0.1)


def _qkv(seed, B, T, Hq, Hkv, D, dtype=jnp.float32):
  kq, kk, kv, kw, kl = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(kq, (B, T, Hq, D)).astype(dtype)
  k = jax.random.normal(kk, (B, T, Hkv, D)).astype(dtype)
  v = jax.random.normal(kv, (B, T, Hkv, D)).astype(dtype)
  # Weights of the scalar we differentiate: on the output and on the lse, so the lse
  # cotangent path (ring merges) is exercised too.
  return q, k, v, jax.random.normal(kw, (B, T, Hq, D)), jax.random.normal(kl, (B, Hq, T))


def _segments(B, T, seed):
  """Sorted document ids per row, boundaries mid-block, with a trailing padding id 0."""
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(B):
    cuts = np.sort(rng.choice(np.arange(1, T - 5), 3, replace=False))
    row = np.searchsorted(cuts, np.arange(T), side="right") + 1
    row[T - 5 :] = 0
    rows.append(row)
  return jnp.asarray(np.stack(rows), jnp.int32)


def _value_and_grads(fn, q, k, v, w_out, w_lse):
  def loss(q, k, v):
    out, lse = fn(q, k, v)
    finite_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    return (out.astype(jnp.float32) * w_out).sum() + (finite_lse * w_lse).sum(), (out, lse)

  grads, (out, lse) = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, lse, grads


CASES = {
  # name: (mask, B, T, Hq, Hkv, D, block, documents)
  "causal GQA, T not a block multiple": (MaskSpec(), 1, 100, 4, 2, 8, 32, False),
  "documents + anchor, MQA": (MaskSpec(document=True, anchor=True), 2, 90, 4, 1, 8, 32, True),
  "window + sinks": (MaskSpec(window=40, sinks=5), 1, 150, 2, 1, 8, 32, False),
  "non-causal documents": (MaskSpec(causal=False, document=True), 2, 70, 2, 2, 8, 32, True),
  "window, documents": (MaskSpec(window=24, document=True), 1, 100, 2, 2, 8, 16, True),
  "strided per kv head, GQA, documents": (
    MaskSpec(stride=3, stride_block=8, local_blocks=2, sinks=2, document=True),
    1,
    100,
    4,
    2,
    8,
    16,
    True,
  ),
}


@pytest.mark.parametrize("name", CASES)
def test_unrolled_matches_reference(name):
  mask, B, T, Hq, Hkv, D, block, documents = CASES[name]
  q, k, v, w_out, w_lse = _qkv(len(name), B, T, Hq, Hkv, D)
  seg = _segments(B, T, seed=len(name)) if documents else None
  schedule = static_schedule(mask, T, T, block, block, Hkv)
  assert schedule is not None

  def unrolled(q, k, v):
    opts = AttentionOptions(mask, block_q=block, block_kv=block)
    return unrolled_attention_with_lse(q, k, v, MaskInputs(q_segment_ids=seg), opts, schedule)

  def reference(q, k, v):
    return reference_attention_with_lse(q, k, v, mask=mask, q_segment_ids=seg)

  got, want = (_value_and_grads(f, q, k, v, w_out, w_lse) for f in (unrolled, reference))
  names = ["out", "lse", "dq", "dk", "dv"]
  for g, w, what in zip(jax.tree.leaves(got), jax.tree.leaves(want), names, strict=True):
    assert g.shape == w.shape and g.dtype == w.dtype, what
    np.testing.assert_allclose(g, w, **FP32_TOL, err_msg=what)


def test_unrolled_bfloat16_matches_reference():
  mask, T, block = MaskSpec(document=True), 80, 32
  q, k, v, w_out, w_lse = _qkv(7, 2, T, 4, 2, 16, jnp.bfloat16)
  seg = _segments(2, T, seed=7)
  schedule = static_schedule(mask, T, T, block, block, 2)
  opts = AttentionOptions(mask, block_q=block, block_kv=block)
  unrolled = lambda q, k, v: unrolled_attention_with_lse(  # noqa: E731
    q, k, v, MaskInputs(q_segment_ids=seg), opts, schedule
  )
  reference = lambda q, k, v: reference_attention_with_lse(  # noqa: E731
    q, k, v, mask=mask, q_segment_ids=seg
  )
  got, want = (_value_and_grads(f, q, k, v, w_out, w_lse) for f in (unrolled, reference))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert g.dtype == w.dtype
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), **BF16_TOL)


def test_row_with_no_visible_key_outputs_zero_with_zero_gradients():
  """Non-causal documents: padding queries (id 0) see the padding keys only; a row whose
  document has no keys at all is empty. Here: queries of id 3 with no key of id 3."""
  mask, T = MaskSpec(causal=False, document=True), 40
  q_seg = jnp.asarray([[1] * 20 + [3] * 20], jnp.int32)
  kv_seg = jnp.asarray([[1] * 20 + [2] * 20], jnp.int32)
  q, k, v, w_out, w_lse = _qkv(3, 1, T, 2, 2, 8)
  schedule = static_schedule(mask, T, T, 16, 16, 2)
  inputs = MaskInputs(q_segment_ids=q_seg, kv_segment_ids=kv_seg)
  opts = AttentionOptions(mask, block_q=16, block_kv=16)
  fn = lambda q, k, v: unrolled_attention_with_lse(q, k, v, inputs, opts, schedule)  # noqa: E731
  out, lse, (dq, _, _) = _value_and_grads(fn, q, k, v, w_out, w_lse)
  np.testing.assert_array_equal(out[0, 20:], 0.0)
  assert np.all(lse[0, :, 20:] == -np.inf)
  np.testing.assert_array_equal(dq[0, 20:], 0.0)
  assert np.all(np.isfinite(dq))


def _dense_blocks(mask, T, block, Hkv):
  """(some, every) [nQ, nK] from the dense mask on arange positions, documents ignored."""
  pos = jnp.arange(T)[None]
  kwargs = dict(num_kv_heads=Hkv) if mask.per_head else {}
  allowed = np.asarray(mask.replace(document=False).dense(pos, pos, **kwargs))
  allowed = allowed.reshape(-1, T // block, block, T // block, block)
  return allowed.any(axis=(0, 2, 4)), allowed.all(axis=(0, 2, 4))


@pytest.mark.parametrize(
  "mask",
  [
    MaskSpec(),
    MaskSpec(window=100, sinks=8),
    MaskSpec(anchor=True, document=True),
    MaskSpec(stride=4, stride_block=32, local_blocks=2),
  ],
  ids=["causal", "window+sinks", "anchor+documents", "strided"],
)
def test_schedule_visits_exactly_the_nonempty_blocks(mask):
  T, block = 512, 64
  schedule = static_schedule(mask, T, T, block, block, 2)
  some, every = _dense_blocks(mask, T, block, 2)
  visited = {(i, j) for i, row in enumerate(schedule) for j, _ in row}
  assert visited == set(zip(*np.nonzero(some), strict=True))
  for i, row in enumerate(schedule):
    assert [j for j, _ in row] == sorted(j for j, _ in row)  # kv order
    for j, masked in row:
      assert masked == (mask.document or not every[i, j])
  if mask == MaskSpec():
    n = T // block
    assert len(visited) == n * (n + 1) // 2  # the causal triangle, diagonal masked
    assert sum(masked for row in schedule for _, masked in row) == n


def test_schedule_gives_up_beyond_the_unroll_limit():
  assert len(sum(static_schedule(MaskSpec(), 1024, 1024, 64, 64, 1), ())) == 136
  assert static_schedule(MaskSpec(), 2048, 2048, 64, 64, 1) is None  # 528 pairs
  assert static_schedule(MaskSpec(), 512, 512, 64, 64, 1, max_pairs=20) is None  # 36 pairs
  window = static_schedule(MaskSpec(window=64), 512, 512, 64, 64, 1, max_pairs=20)
  assert window is not None  # 15 pairs


def test_schedule_rejects_bad_blocks():
  with pytest.raises(ValueError, match="block_q must be a positive integer"):
    static_schedule(MaskSpec(), 64, 64, 0, 16, 1)
  with pytest.raises(ValueError, match="mask must be a MaskSpec"):
    static_schedule("causal", 64, 64, 16, 16, 1)


def _runs_a_loop(fn, *args) -> bool:
  """Whether fn's jaxpr holds a loop (the runtime block-map `fori_loop`, a scan or while
  in the jaxpr); the unrolled schedule is straight-line code."""
  return re.search(r"\b(scan|while)\[", str(jax.make_jaxpr(fn)(*args))) is not None


def test_dispatch_runs_unrolled_for_default_indices_and_the_loop_otherwise():
  """impl='blockwise' takes the unrolled path when the mask indices are default, the
  loop when they are given (context-parallel layouts) or the score blocks exceed the
  budget, and every path matches the reference."""
  q, k, v, _, _ = _qkv(11, 1, 64, 2, 2, 8)
  mask = MaskSpec()
  want = reference_attention_with_lse(q, k, v, mask=mask)[0]
  blocks = dict(block_q=16, block_kv=16)
  default = lambda q: dot_product_attention(q, k, v, mask=mask, impl="blockwise", **blocks)  # noqa: E731
  assert not _runs_a_loop(default, q)
  np.testing.assert_allclose(default(q), want, **FP32_TOL)
  index = jnp.arange(64)
  given = lambda q: dot_product_attention(  # noqa: E731
    q, k, v, mask=mask, impl="blockwise", q_index=index, **blocks
  )
  assert _runs_a_loop(given, q)
  np.testing.assert_allclose(given(q), want, **FP32_TOL)
  # Score blocks over the memory budget (10 pairs x 2 heads x 16 x 16 x 4 bytes = 20 KiB
  # here) also take the loop.
  opts = AttentionOptions(mask, **blocks)
  over = lambda q, budget: unrolled_mod.attention_with_lse(  # noqa: E731
    q, k, v, MaskInputs(), opts, max_score_bytes=budget
  )[0]
  assert not _runs_a_loop(lambda q: over(q, 20 * 1024), q)
  assert _runs_a_loop(lambda q: over(q, 20 * 1024 - 1), q)
  np.testing.assert_allclose(over(q, 20 * 1024 - 1), want, **FP32_TOL)


def test_fits_unrolled_counts_every_visited_score_block():
  schedule = static_schedule(MaskSpec(), 64, 64, 16, 16, 2)  # 10 pairs
  budget = unrolled_mod.MAX_UNROLLED_SCORE_BYTES
  per_pair = budget // 10 // (16 * 16 * 4)  # batch x heads that just fit
  assert unrolled_mod.fits_unrolled(schedule, per_pair, 1, 16, 16)
  assert not unrolled_mod.fits_unrolled(schedule, per_pair + 1, 1, 16, 16)
  assert not unrolled_mod.fits_unrolled(schedule, 1, 1, 16, 16, max_score_bytes=10 * 1024 - 1)
  assert not unrolled_mod.fits_unrolled(None, 1, 1, 16, 16)
