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
