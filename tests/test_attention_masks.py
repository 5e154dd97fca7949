"""MaskSpec: the dense mask against a brute-force loop, and the soundness of block maps."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.attention import EMPTY, FULL, PARTIAL, MaskSpec


def brute_force_mask(spec, q_pos, k_pos, q_seg, k_seg):
  """The MaskSpec rules read literally, one (query, key) pair at a time."""
  out = np.zeros((len(q_pos), len(k_pos)), bool)
  for t, s in itertools.product(range(len(q_pos)), range(len(k_pos))):
    qp, kp = int(q_pos[t]), int(k_pos[s])
    if spec.causal and kp > qp:
      continue  # the future is never visible, not even the anchor
    if spec.anchor and kp == 0:
      out[t, s] = True  # the anchor is shared by every document
      continue
    if spec.document and q_seg[t] != k_seg[s]:
      continue
    if spec.window is not None:
      distance = qp - kp if spec.causal else abs(qp - kp)
      if distance >= spec.window and kp >= spec.sinks:
        continue
    out[t, s] = True
  return out


def packed_segment_ids(rng, batch, length, padding=True):
  """Rows of consecutive documents of random lengths (ids 1, 2, ...), then padding id 0."""
  rows = []
  for _ in range(batch):
    cuts = np.sort(rng.choice(np.arange(1, length), size=rng.integers(1, 5), replace=False))
    row = np.searchsorted(cuts, np.arange(length), side="right") + 1
    if padding:
      row[length - rng.integers(0, length // 4 + 1) :] = 0
    rows.append(row)
  return np.stack(rows).astype(np.int32)


ALL_SPECS = [
  MaskSpec(causal=c, document=d, anchor=a, window=w, sinks=s)
  for c, d, a, w, s in itertools.product(
    [True, False], [True, False], [True, False], [None, 1, 3], [0, 2]
  )
]


@pytest.mark.parametrize("layout", ["arange", "permuted", "cross"])
def test_dense_matches_brute_force(layout):
  rng = np.random.default_rng(0)
  T = S = 12
  q_pos = k_pos = np.arange(T)
  if layout == "permuted":  # a context-parallel layout: tokens reordered, global indices kept
    q_pos = k_pos = rng.permutation(T)
  elif layout == "cross":  # decode-like: few queries at the end of a longer key row
    T, q_pos = 4, np.arange(8, 12)
  k_seg = packed_segment_ids(rng, 1, S)[0]
  q_seg = k_seg if layout != "cross" else k_seg[8:]
  for spec in ALL_SPECS:
    got = spec.dense(q_pos[None], k_pos[None], q_seg[None], k_seg[None])
    assert got.shape == (1, T, S) and got.dtype == jnp.bool_
    want = brute_force_mask(spec, q_pos, k_pos, q_seg, k_seg)
    np.testing.assert_array_equal(np.asarray(got[0]), want, err_msg=str(spec))


def test_dense_is_jittable_with_spec_as_static_arg():
  spec = MaskSpec(document=True, window=4, sinks=1)
  pos = jnp.arange(10)[None]
  seg = jnp.array([[1] * 5 + [2] * 5])
  f = jax.jit(lambda s, p, g: s.dense(p, p, g, g), static_argnums=0)
  np.testing.assert_array_equal(f(spec, pos, seg), spec.dense(pos, pos, seg, seg))
  assert hash(spec) == hash(MaskSpec(document=True, window=4, sinks=1))
  assert spec.replace(window=None) == MaskSpec(document=True, sinks=1)


@pytest.mark.parametrize(
  "kwargs, field",
  [
    ({"window": 0}, "window"),
    ({"sinks": -1}, "sinks"),
    ({"window": 2.5}, "window"),
    ({"causal": 1}, "causal"),
  ],
)
def test_invalid_spec_names_the_field(kwargs, field):
  with pytest.raises(ValueError, match=field):
    MaskSpec(**kwargs)


def test_document_needs_segment_ids():
  pos = jnp.arange(4)[None]
  with pytest.raises(ValueError, match="segment_ids"):
    MaskSpec(document=True).dense(pos, pos)
  with pytest.raises(ValueError, match="segment_ids"):
    MaskSpec(document=True).block_map(pos, pos, None, None, block_q=2, block_kv=2)


def dense_classification(allowed_BTS, valid_BTS, block_q, block_kv):
  """EMPTY/PARTIAL/FULL per block from the dense mask; padded pairs are don't-care."""
  B, T, S = allowed_BTS.shape
  nQ, nK = -(-T // block_q), -(-S // block_kv)
  out = np.zeros((B, nQ, nK), np.int8)
  for b, i, j in itertools.product(range(B), range(nQ), range(nK)):
    rows, cols = slice(i * block_q, (i + 1) * block_q), slice(j * block_kv, (j + 1) * block_kv)
    block, real = allowed_BTS[b, rows, cols], valid_BTS[b, rows, cols]
    if not block[real].any():
      out[b, i, j] = EMPTY
    elif block[real].all() and real.all():
      out[b, i, j] = FULL
    else:
      out[b, i, j] = PARTIAL
  return out


def random_specs(rng, count):
  specs = [
    MaskSpec(),
    MaskSpec(document=True),
    MaskSpec(document=True, anchor=True),
    MaskSpec(window=9),
    MaskSpec(window=9, sinks=5, document=True),
    MaskSpec(causal=False, document=True),
    MaskSpec(causal=False, window=7, sinks=2),
  ]
  for _ in range(count):
    window = None if rng.random() < 0.3 else int(rng.integers(1, 30))
    specs.append(
      MaskSpec(
        causal=bool(rng.random() < 0.7),
        document=bool(rng.random() < 0.6),
        anchor=bool(rng.random() < 0.3),
        window=window,
        sinks=int(rng.integers(0, 6)),
      )
    )
  return specs


@pytest.mark.parametrize("layout", ["arange", "permuted"])
def test_block_map_is_sound(layout):
  """EMPTY blocks hold no allowed pair and FULL blocks only allowed pairs (real pairs only)."""
  rng = np.random.default_rng(1)
  B, T, S, block_q, block_kv = 3, 45, 45, 8, 16  # neither length is a multiple of the blocks
  seg_BT = packed_segment_ids(rng, B, T)
  pos_BT = np.broadcast_to(np.arange(T), (B, T))
  if layout == "permuted":
    pos_BT = np.stack([rng.permutation(T) for _ in range(B)])
  kv_valid_BS = rng.random((B, S)) < 0.9  # e.g. unwritten cache slots
  kv_valid_BS[:, :4] = True
  checked_empty = 0
  for spec in random_specs(rng, 25):
    bmap = spec.block_map(
      pos_BT, pos_BT, seg_BT, seg_BT, block_q=block_q, block_kv=block_kv, kv_valid=kv_valid_BS
    )
    assert bmap.shape == (B, -(-T // block_q), -(-S // block_kv)) and bmap.dtype == jnp.int8
    allowed = np.asarray(spec.dense(pos_BT, pos_BT, seg_BT, seg_BT)) & kv_valid_BS[:, None, :]
    bmap = np.asarray(bmap)
    for b, i, j in zip(*np.nonzero(bmap != PARTIAL), strict=True):
      block = allowed[b, i * block_q : (i + 1) * block_q, j * block_kv : (j + 1) * block_kv]
      if bmap[b, i, j] == EMPTY:
        checked_empty += 1
        assert not block.any(), (spec, b, i, j)
      else:
        # Padded query rows are don't-care, padded keys are never allowed.
        assert block.all() and block.shape[1] == block_kv, (spec, b, i, j)
  assert checked_empty > 0  # the test exercised the skip path


@pytest.mark.parametrize("spec", [MaskSpec(), MaskSpec(window=40), MaskSpec(window=40, sinks=8)])
def test_block_map_is_exact_for_sorted_causal_masks(spec):
  T, block_q, block_kv = 64, 16, 8
  pos_BT = np.arange(T)[None]
  bmap = np.asarray(spec.block_map(pos_BT, pos_BT, None, None, block_q=block_q, block_kv=block_kv))
  allowed = np.asarray(spec.dense(pos_BT, pos_BT))
  want = dense_classification(allowed, np.ones_like(allowed), block_q, block_kv)
  np.testing.assert_array_equal(bmap, want)
  assert (want == FULL).any() and (want == EMPTY).any()


def test_block_map_skips_across_documents():
  """With packed documents, more blocks are EMPTY than with the causal mask alone."""
  T = 64
  seg_BT = np.repeat(np.arange(1, 5), 16)[None]
  pos_BT = np.arange(T)[None]
  causal = MaskSpec().block_map(pos_BT, pos_BT, None, None, block_q=8, block_kv=8)
  document = MaskSpec(document=True).block_map(
    pos_BT, pos_BT, seg_BT, seg_BT, block_q=8, block_kv=8
  )
  assert int((document == EMPTY).sum()) == int((causal == EMPTY).sum()) + 24


# ---------------------------------------------------------------------------------------
# Strided blocks with a per-head phase (S2-Attention / LongGen sparse layers).


def s2_mask(q_pos, k_pos, kv_heads, stride, block, local_blocks, step, offset):
  """[len(kv_heads), T, S] causal strided mask of dkernel's get_sparse_attn_mask, in numpy,
  for the listed kv heads h: kept iff causal and (q_blk - k_blk < local_blocks or
  (k_blk + h·step + offset) % stride == 0)."""
  q_blk, k_blk = np.asarray(q_pos)[:, None] // block, np.asarray(k_pos)[None, :] // block
  causal = np.asarray(k_pos)[None, :] <= np.asarray(q_pos)[:, None]
  heads = []
  for h in kv_heads:
    vertical = (k_blk + h * step + offset) % stride == 0
    heads.append(causal & ((q_blk - k_blk < local_blocks) | vertical))
  return np.stack(heads)


@pytest.mark.parametrize(
  "fields, step",
  [
    (dict(stride=4, stride_block=4), 2),  # auto: max(1, 4 // 2)
    (dict(stride=4, stride_block=4, head_phase_step=1, stride_offset=3), 1),
    (dict(stride=3, stride_block=5, local_blocks=2, head_phase_step=0), 0),
    (dict(stride=8, stride_block=2, stride_offset=1), 4),
  ],
)
def test_strided_dense_matches_dkernel_formula(fields, step):
  """Per kv head, incl. GQA: query head j (Hq = 8, Hkv = 2) gets kv head j // 4's pattern."""
  T, Hq, Hkv = 40, 8, 2
  spec = MaskSpec(**fields)
  assert spec.per_head and spec.phase_step(Hkv) == step
  pos = np.arange(T)
  got_BHTS = np.asarray(spec.dense(pos[None], pos[None], num_kv_heads=Hkv))
  assert got_BHTS.shape == (1, Hkv, T, T)
  fields = (spec.stride, spec.stride_block, spec.local_blocks, step, spec.stride_offset)
  want_HTS = s2_mask(pos, pos, range(Hkv), *fields)
  np.testing.assert_array_equal(got_BHTS[0], want_HTS)
  # What query head j sees once the kv heads are repeated (Hugging Face `repeat_kv`).
  want_query_heads = s2_mask(pos, pos, [j // (Hq // Hkv) for j in range(Hq)], *fields)
  np.testing.assert_array_equal(np.repeat(got_BHTS[0], Hq // Hkv, axis=0), want_query_heads)
  # Heads differ (unless the step is 0), and the union covers more than any one head.
  if step:
    assert not np.array_equal(want_HTS[0], want_HTS[1])
    assert want_HTS.any(0).sum() > want_HTS.sum((1, 2)).max()


def test_strided_heads_spread_their_phases():
  """The auto step spreads the kv heads' phases over the stride. stride = Hkv = 4: step 1,
  every phase, so the heads together see every causal pair. stride 8 over Hkv = 4: step
  2, so the far blocks seen by some head are every 2nd block; dkernel's step, stride //
  Hq = 1 for Hq = 16 query heads, would bunch them (phases 0, 7, 6, 5 of every 8)."""
  T, Hkv = 64, 4
  pos = np.arange(T)[None]
  spec = MaskSpec(stride=4, stride_block=4)
  union_TS = np.asarray(spec.dense(pos, pos, num_kv_heads=Hkv))[0].any(0)
  np.testing.assert_array_equal(union_TS, np.tril(np.ones((T, T), bool)))
  for step, far_blocks in ((None, [0, 2, 4, 6]), (1, [0, 5, 6, 7])):
    spec = MaskSpec(stride=8, stride_block=1, head_phase_step=step)
    union_S = np.asarray(spec.dense(pos, pos, num_kv_heads=Hkv))[0].any(0)[T - 1]
    # Keys of the last query outside its local block: those of the heads' phases.
    np.testing.assert_array_equal(np.unique(np.nonzero(union_S[: T - 1])[0] % 8), far_blocks)


def brute_force_strided(spec, q_pos, k_pos, q_seg, k_seg, num_kv_heads):
  """[Hkv, T, S]: the MaskSpec rules with the stride term, one pair and head at a time."""
  step = spec.phase_step(num_kv_heads)
  out = np.zeros((num_kv_heads, len(q_pos), len(k_pos)), bool)
  for h, t, s in itertools.product(range(num_kv_heads), range(len(q_pos)), range(len(k_pos))):
    qp, kp = int(q_pos[t]), int(k_pos[s])
    if spec.causal and kp > qp:
      continue
    if spec.anchor and kp == 0:
      out[h, t, s] = True
      continue
    if spec.document and q_seg[t] != k_seg[s]:
      continue
    q_blk, k_blk = qp // spec.stride_block, kp // spec.stride_block
    distance = qp - kp if spec.causal else abs(qp - kp)
    blocks = q_blk - k_blk if spec.causal else abs(q_blk - k_blk)
    out[h, t, s] = (
      kp < spec.sinks
      or (spec.window is not None and distance < spec.window)
      or blocks < spec.local_blocks
      or (k_blk + h * step + spec.stride_offset) % spec.stride == 0
    )
  return out


STRIDED_SPECS = [
  MaskSpec(stride=3, stride_block=2, sinks=2),
  MaskSpec(stride=4, stride_block=3, window=5, document=True),
  MaskSpec(stride=2, stride_block=2, local_blocks=2, document=True, anchor=True),
  MaskSpec(stride=5, stride_block=1, causal=False, document=True, stride_offset=2),
  MaskSpec(stride=3, stride_block=4, causal=False, window=3, sinks=1, head_phase_step=2),
]


@pytest.mark.parametrize("layout", ["arange", "permuted"])
def test_strided_dense_composes_with_other_parts(layout):
  """Sinks, window, documents, anchor and non-causal combine with the stride term."""
  rng = np.random.default_rng(2)
  T, Hkv = 12, 3
  pos = np.arange(T) if layout == "arange" else rng.permutation(T)
  seg = packed_segment_ids(rng, 1, T)[0]
  for spec in STRIDED_SPECS:
    got = np.asarray(spec.dense(pos[None], pos[None], seg[None], seg[None], num_kv_heads=Hkv))
    want = brute_force_strided(spec, pos, pos, seg, seg, Hkv)
    np.testing.assert_array_equal(got[0], want, err_msg=str(spec))


def test_strided_allowed_takes_the_kv_head():
  spec = MaskSpec(stride=4, stride_block=1, local_blocks=1, head_phase_step=1)
  q, k = jnp.asarray([[9]]), jnp.arange(10)[None]
  # Key 7 is vertical for kv head 1 only ((7 + 1) % 4 == 0); keys 0, 4, 8 for head 0.
  visible_HS = spec.allowed(q, k, kv_head=jnp.arange(2)[:, None], num_kv_heads=2)
  np.testing.assert_array_equal(np.nonzero(visible_HS[0])[0], [0, 4, 8, 9])
  np.testing.assert_array_equal(np.nonzero(visible_HS[1])[0], [3, 7, 9])


def random_strided_specs(rng, count):
  specs = list(STRIDED_SPECS)
  for _ in range(count):
    specs.append(
      MaskSpec(
        causal=bool(rng.random() < 0.7),
        document=bool(rng.random() < 0.5),
        anchor=bool(rng.random() < 0.2),
        window=None if rng.random() < 0.6 else int(rng.integers(1, 20)),
        sinks=int(rng.integers(0, 4)),
        stride=int(rng.integers(1, 6)),
        stride_block=int(rng.integers(1, 12)),
        local_blocks=int(rng.integers(1, 3)),
        head_phase_step=None if rng.random() < 0.5 else int(rng.integers(0, 3)),
        stride_offset=int(rng.integers(0, 4)),
      )
    )
  return specs


@pytest.mark.parametrize("layout", ["arange", "permuted"])
def test_strided_block_map_is_sound(layout):
  """Per kv head: EMPTY blocks hold no allowed pair, FULL blocks only allowed pairs."""
  rng = np.random.default_rng(3)
  B, T, Hkv, block_q, block_kv = 2, 45, 3, 8, 16
  seg_BT = packed_segment_ids(rng, B, T)
  pos_BT = np.broadcast_to(np.arange(T), (B, T))
  if layout == "permuted":
    pos_BT = np.stack([rng.permutation(T) for _ in range(B)])
  kv_valid_BS = rng.random((B, T)) < 0.9
  kv_valid_BS[:, :32] = True  # whole valid kv blocks, so FULL can occur
  counts = {EMPTY: 0, FULL: 0}
  for spec in random_strided_specs(rng, 12):
    bmap = np.asarray(
      spec.block_map(
        pos_BT,
        pos_BT,
        seg_BT,
        seg_BT,
        block_q=block_q,
        block_kv=block_kv,
        kv_valid=kv_valid_BS,
        num_kv_heads=Hkv,
      )
    )
    assert bmap.shape == (B, Hkv, -(-T // block_q), -(-T // block_kv))
    allowed = np.asarray(spec.dense(pos_BT, pos_BT, seg_BT, seg_BT, num_kv_heads=Hkv))
    allowed = allowed & kv_valid_BS[:, None, None, :]
    for b, h, i, j in zip(*np.nonzero(bmap != PARTIAL), strict=True):
      block = allowed[b, h, i * block_q : (i + 1) * block_q, j * block_kv : (j + 1) * block_kv]
      counts[int(bmap[b, h, i, j])] += 1
      if bmap[b, h, i, j] == EMPTY:
        assert not block.any(), (spec, b, h, i, j)
      else:
        assert block.all() and block.shape[1] == block_kv, (spec, b, h, i, j)
  # Both shortcuts were exercised (permuted rows rarely leave a whole block visible).
  assert counts[EMPTY] > 0 and (counts[FULL] > 0 or layout == "permuted")


@pytest.mark.parametrize("stride_block", [4, 8, 16, 32])
def test_strided_block_map_is_exact_for_sorted_positions(stride_block):
  """Causal, sorted positions, equal q and kv blocks of 8, stride_block a divisor or a
  multiple of 8: the per-head block map equals the dense mask reduced to blocks (EMPTY
  iff no allowed pair, FULL iff all are), also with sinks and a window added."""
  T, Hkv, block = 96, 3, 8
  pos_BT = np.arange(T)[None]
  specs = [
    MaskSpec(stride=4, stride_block=stride_block),
    MaskSpec(stride=3, stride_block=stride_block, local_blocks=4, stride_offset=1),
    MaskSpec(stride=4, stride_block=stride_block, head_phase_step=1, sinks=5, window=11),
  ]
  kinds = set()
  for spec in specs:
    bmap = np.asarray(
      spec.block_map(pos_BT, pos_BT, None, None, block_q=block, block_kv=block, num_kv_heads=Hkv)
    )
    kinds |= set(np.unique(bmap).tolist())
    allowed = np.asarray(spec.dense(pos_BT, pos_BT, num_kv_heads=Hkv))
    for h in range(Hkv):
      want = dense_classification(allowed[:, h], np.ones_like(allowed[:, h]), block, block)
      np.testing.assert_array_equal(bmap[:, h], want, err_msg=f"{spec} head {h}")
  assert kinds == {EMPTY, PARTIAL, FULL}


@pytest.mark.parametrize(
  "kwargs, field",
  [
    ({"stride": 0}, "stride"),
    ({"stride": 2.0}, "stride"),
    ({"stride": 4, "stride_block": 0}, "stride_block"),
    ({"stride": 4, "local_blocks": 0}, "local_blocks"),
    ({"stride": 4, "head_phase_step": -1}, "head_phase_step"),
    ({"stride": 4, "stride_offset": -2}, "stride_offset"),
    ({"stride": True}, "stride"),
  ],
)
def test_invalid_stride_fields_name_the_field(kwargs, field):
  with pytest.raises(ValueError, match=f"MaskSpec.{field} must"):
    MaskSpec(**kwargs)


def test_per_head_mask_needs_heads():
  spec = MaskSpec(stride=4)
  pos = jnp.arange(8)[None]
  assert not MaskSpec(window=4).per_head and spec.per_head
  with pytest.raises(ValueError, match="needs num_kv_heads"):
    spec.dense(pos, pos)
  with pytest.raises(ValueError, match="needs num_kv_heads"):
    spec.block_map(pos, pos, None, None, block_q=4, block_kv=4)
  with pytest.raises(ValueError, match="needs kv_head and num_kv_heads"):
    spec.allowed(pos[:, :, None], pos[:, None, :])
  with pytest.raises(ValueError, match="num_kv_heads must be a positive integer"):
    spec.dense(pos, pos, num_kv_heads=0)
  # Masks that are the same for every head ignore the head arguments.
  np.testing.assert_array_equal(
    MaskSpec().dense(pos, pos, num_kv_heads=2), MaskSpec().dense(pos, pos)
  )
