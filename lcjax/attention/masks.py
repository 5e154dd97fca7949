"""`MaskSpec`: which keys a query may attend to, as a dense mask or a per-block map.

A mask is a predicate on pairs (query, key). It reads *mask positions*, the index of
each token in its packed row (default `arange`), and optional segment ids (one id per
packed document). Mask positions are not RoPE positions: RoPE positions may restart
per document (`data.position_scheme="per_document"`) while mask positions do not. A
context-parallel layout (zigzag, striped) permutes the tokens of a row and passes each
token's global index, so nothing here assumes positions are sorted.

The same predicate has two forms:

* `MaskSpec.dense` builds the boolean [B, T, S] mask ([B, Hkv, T, S] for a strided
  mask, whose pattern differs per kv head: `per_head`). It is the reference that every
  other form is tested against.
* `MaskSpec.block_map` classifies each (q block, kv block) pair (per kv head when
  `per_head`) as EMPTY, PARTIAL or FULL in O(T + Hkv·S) work from per-block min/max of
  positions and segment ids, never from the dense mask. Block-sparse attention
  (blockwise.py, the Pallas kernels) skips EMPTY blocks and drops the element mask on
  FULL ones, as FlexAttention's block masks and splash attention's mask info do.
"""

from __future__ import annotations

import dataclasses
import operator

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["MaskSpec", "EMPTY", "PARTIAL", "FULL"]

# Values of `MaskSpec.block_map`.
EMPTY = 0  # no (query, key) pair of the block is allowed: the block can be skipped.
PARTIAL = 1  # some pairs may be allowed: compute the block and apply the element mask.
FULL = 2  # every pair is allowed: compute the block without the element mask.

_INT_MAX = jnp.iinfo(jnp.int32).max
_INT_MIN = jnp.iinfo(jnp.int32).min


def _check_bool(name: str, value) -> bool:
  if not isinstance(value, bool):
    raise ValueError(f"MaskSpec.{name} must be True or False, got {value!r}")
  return value


def _check_int(name: str, value, minimum: int) -> int:
  try:
    if isinstance(value, bool):
      raise TypeError
    value = operator.index(value)
  except TypeError:
    raise ValueError(f"MaskSpec.{name} must be an integer >= {minimum}, got {value!r}") from None
  if value < minimum:
    raise ValueError(f"MaskSpec.{name} must be >= {minimum}, got {value}")
  return value


def _floor_div(x, n: int):
  """floor(x / n) for int arrays and a positive static n, also for negative x.

  Built from truncating `lax.div` and a select rather than `//`, whose lowering goes
  through `sign`, which Mosaic (Pallas TPU) does not lower for every chip: the element
  mask runs inside the kernels.
  """
  return lax.div(jnp.where(x < 0, x - (n - 1), x), n)


@dataclasses.dataclass(frozen=True)
class MaskSpec:
  """An attention mask made of composable parts; frozen and hashable (a static jit arg).

  On mask positions q_pos, k_pos and segment ids q_seg, k_seg a pair is allowed iff

    allowed = (causal_ok & doc_ok & visible) | (anchor & k_pos == 0 & causal_ok)
    visible = True                                       if neither window nor stride,
              in_window | is_sink | in_band | is_vertical  otherwise,

  where each part of `allowed` is True when its feature is off, each part of `visible`
  is False when its feature is off, and otherwise

  * `causal`:   causal_ok = k_pos <= q_pos.
  * `document`: doc_ok = q_seg == k_seg (packed documents see only themselves).
  * `window=w`: in_window = q_pos - k_pos < w, so a query sees the last w keys
    including itself (Mistral's sliding window); when `causal` is False,
    |q_pos - k_pos| < w.
  * `sinks=s`:  is_sink = k_pos < s; the first s keys stay visible outside the window
    and the strided pattern, still subject to causal and document (attention sinks,
    Xiao et al. 2024 "StreamingLLM"; the Λ-shape of LM-Infinite, Han et al. 2024).
    Without a window or a stride every key is already visible and sinks change nothing.
  * `stride=v`: strided blocks with a per-head phase, the sparse layers of LongGen
    (Ge et al. 2024, "A Little Goes a Long Way: Efficient Long Context Training and
    Inference with Partial Contexts") computed by S2-Attention (Lin et al. 2024,
    "S2-Attention: Hardware-Aware Context Sharding Among Attention Heads"; the dkernel
    library's `get_sparse_attn_mask`). Keys and queries fall in sparse blocks of
    `stride_block` tokens, q_blk = q_pos // stride_block and k_blk = k_pos //
    stride_block, and

      in_band     = q_blk - k_blk < local_blocks   (|q_blk - k_blk| without `causal`),
      is_vertical = (k_blk + kv_head · step + stride_offset) % v == 0,

    so every query sees its `local_blocks` most recent sparse blocks and every v-th
    block before them. The phase shifts by `step` per kv head, so the heads cover
    different blocks ("heterogeneous context sharding") and their union covers more
    of the context than any one head. The mask then depends on the kv head
    (`per_head`): query head j reads kv head j // G (GQA), so the G query heads of a
    kv head share one pattern and a kernel still loads each K/V block once per kv head.
    `head_phase_step=None` means step = max(1, v // num_kv_heads), resolved at call
    time, which spreads the kv heads' phases evenly over the stride: with
    num_kv_heads >= v they cover every block, and when num_kv_heads divides v the
    union sees every (v / num_kv_heads)-th block. dkernel divides by the number of *query* heads
    instead; shared per kv head under GQA, that bunches the phases (Hq = 16, Hkv = 4,
    v = 8: step 1, so the heads take phases 0..3 and runs of four blocks are seen by
    no head, where step 2 gives phases 0, 2, 4, 6), so we deliberately differ.
  * `anchor`:   the key at k_pos == 0 is visible to every query, across documents,
    subject to causal only (AnchorAttention, Wang et al. "When Precision Meets
    Position", TMLR 2025, where the shared anchor token has document id 0).

  Mask positions are the tokens' indices in the packed row, so sparse blocks are
  counted from the row's start, not from each document's. A query row may have no
  visible key (e.g. a non-causal document mask whose segment has no key); attention
  outputs 0 there.
  """

  causal: bool = True
  document: bool = False
  anchor: bool = False
  window: int | None = None
  sinks: int = 0
  stride: int | None = None  # vertical stride in sparse blocks (S2's vert_stride); None = off
  stride_block: int = 64  # tokens per sparse block (S2's block_size)
  local_blocks: int = 1  # sparse blocks of the local band, the query's own included
  head_phase_step: int | None = None  # phase shift per kv head; None = max(1, stride // Hkv)
  stride_offset: int = 0  # phase of kv head 0 (dkernel's head_sliding_offset)

  def __post_init__(self):
    _check_bool("causal", self.causal)
    _check_bool("document", self.document)
    _check_bool("anchor", self.anchor)
    if self.window is not None:
      object.__setattr__(self, "window", _check_int("window", self.window, 1))
    object.__setattr__(self, "sinks", _check_int("sinks", self.sinks, 0))
    if self.stride is not None:
      object.__setattr__(self, "stride", _check_int("stride", self.stride, 1))
    object.__setattr__(self, "stride_block", _check_int("stride_block", self.stride_block, 1))
    object.__setattr__(self, "local_blocks", _check_int("local_blocks", self.local_blocks, 1))
    if self.head_phase_step is not None:
      step = _check_int("head_phase_step", self.head_phase_step, 0)
      object.__setattr__(self, "head_phase_step", step)
    object.__setattr__(self, "stride_offset", _check_int("stride_offset", self.stride_offset, 0))

  @property
  def per_head(self) -> bool:
    """True when the mask differs between kv heads (a strided mask with per-head phase)."""
    return self.stride is not None

  def replace(self, **changes) -> MaskSpec:
    """A copy with some fields changed, e.g. `spec.replace(window=4096)`."""
    return dataclasses.replace(self, **changes)

  def phase_step(self, num_kv_heads: int) -> int:
    """The stride phase shift between consecutive kv heads (`head_phase_step` resolved)."""
    if self.head_phase_step is not None:
      return self.head_phase_step
    return max(1, self.stride // num_kv_heads)

  def _check_heads(self, where: str, num_kv_heads) -> int | None:
    """num_kv_heads as an int when `per_head` (then required), else None."""
    if not self.per_head:
      return None
    if num_kv_heads is None:
      raise ValueError(
        f"MaskSpec(stride=...) differs per kv head: {where} needs num_kv_heads (the number "
        "of kv heads Hkv)"
      )
    try:
      if isinstance(num_kv_heads, bool):
        raise TypeError
      heads = operator.index(num_kv_heads)
    except TypeError:
      heads = 0
    if heads < 1:
      raise ValueError(f"{where}: num_kv_heads must be a positive integer, got {num_kv_heads!r}")
    return heads

  def segments(self, q_segment_ids, kv_segment_ids):
    """The segment ids the mask needs: None unless `document`, then both are required."""
    if not self.document:
      return None, None
    if q_segment_ids is None or kv_segment_ids is None:
      raise ValueError(
        "MaskSpec(document=True) needs q_segment_ids and kv_segment_ids; pass the packed "
        "rows' segment ids or use document=False"
      )
    return jnp.asarray(q_segment_ids, jnp.int32), jnp.asarray(kv_segment_ids, jnp.int32)

  def _is_vertical(self, k_pos, kv_head, num_kv_heads: int):
    """S2-Attention's vertical term: is k_pos in a strided sparse block for kv_head?"""
    phase = _floor_div(k_pos, self.stride_block) + kv_head * self.phase_step(num_kv_heads)
    # rem == 0 iff divisible, whatever the sign convention; no `%` (see _floor_div).
    return lax.rem(phase + self.stride_offset, self.stride) == 0

  def allowed(
    self, q_pos, k_pos, q_seg=None, k_seg=None, *, kv_head=None, num_kv_heads=None
  ) -> jax.Array:
    """The element predicate on broadcastable int arrays (what a kernel applies per block).

    `q_seg`/`k_seg` are only read when `document` is set; `kv_head` (an int array that
    broadcasts with the positions) and `num_kv_heads` only when `per_head`, which
    requires them. `dense` is this predicate on [B, T, 1] against [B, 1, S], or on
    [B, 1, T, 1] against [B, 1, 1, S] with kv_head [Hkv, 1, 1] when per head.
    """
    if self.document and (q_seg is None or k_seg is None):
      raise ValueError("MaskSpec(document=True).allowed needs q_seg and k_seg")
    shape = jnp.broadcast_shapes(jnp.shape(q_pos), jnp.shape(k_pos))
    if self.per_head:
      if kv_head is None or num_kv_heads is None:
        raise ValueError(
          "MaskSpec(stride=...) differs per kv head: allowed needs kv_head and num_kv_heads"
        )
      num_kv_heads = self._check_heads("allowed", num_kv_heads)
      shape = jnp.broadcast_shapes(shape, jnp.shape(kv_head))
    causal_ok = k_pos <= q_pos if self.causal else True
    doc_ok = q_seg == k_seg if self.document else True
    if self.window is None and self.stride is None:
      visible = True
    else:
      visible = k_pos < self.sinks
      if self.window is not None:
        distance = q_pos - k_pos if self.causal else jnp.abs(q_pos - k_pos)
        visible = visible | (distance < self.window)
      if self.stride is not None:
        blocks = _floor_div(q_pos, self.stride_block) - _floor_div(k_pos, self.stride_block)
        blocks = blocks if self.causal else jnp.abs(blocks)
        in_band = blocks < self.local_blocks
        visible = visible | in_band | self._is_vertical(k_pos, kv_head, num_kv_heads)
    allowed = jnp.logical_and(jnp.logical_and(causal_ok, doc_ok), visible)
    if self.anchor:
      allowed = allowed | ((k_pos == 0) & causal_ok)
    return jnp.broadcast_to(allowed, shape)

  def dense(
    self,
    q_index_BT: jax.Array,
    kv_index_BS: jax.Array,
    q_segment_ids_BT: jax.Array | None = None,
    kv_segment_ids_BS: jax.Array | None = None,
    *,
    num_kv_heads: int | None = None,
  ) -> jax.Array:
    """The boolean mask allowed[b, t, s] (True = query t may attend to key s); jit-able.

    [B, T, S], or [B, Hkv, T, S] (allowed[b, h, t, s] for kv head h) when `per_head`,
    which requires `num_kv_heads`.
    """
    num_kv_heads = self._check_heads("dense", num_kv_heads)
    q_pos = jnp.asarray(q_index_BT, jnp.int32)
    k_pos = jnp.asarray(kv_index_BS, jnp.int32)
    q_seg, k_seg = self.segments(q_segment_ids_BT, kv_segment_ids_BS)
    kv_head = None
    if self.per_head:  # a kv-head axis between batch and rows
      q_pos, k_pos = q_pos[:, None], k_pos[:, None]
      q_seg, k_seg = (None, None) if q_seg is None else (q_seg[:, None], k_seg[:, None])
      kv_head = jnp.arange(num_kv_heads, dtype=jnp.int32)[:, None, None]
    if q_seg is not None:
      q_seg, k_seg = q_seg[..., :, None], k_seg[..., None, :]
    return self.allowed(
      q_pos[..., :, None],
      k_pos[..., None, :],
      q_seg,
      k_seg,
      kv_head=kv_head,
      num_kv_heads=num_kv_heads,
    )

  def block_map(
    self,
    q_index: jax.Array,
    kv_index: jax.Array,
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    *,
    block_q: int,
    block_kv: int,
    kv_valid: jax.Array | None = None,
    num_kv_heads: int | None = None,
  ) -> jax.Array:
    """Classifies each (q block, kv block) pair: int8 [B, nQ, nK] of EMPTY/PARTIAL/FULL,
    or [B, Hkv, nQ, nK] when `per_head` (which requires `num_kv_heads`).

    Works in O(T + Hkv·S) from each block's [min, max] of positions and segment ids, so
    it is exact-or-conservative: EMPTY only if no pair of the block is allowed, FULL
    only if every pair is. Interval tests make it correct for unsorted positions
    (permuted context-parallel layouts) and non-monotone segment ids (trailing padding
    with id 0). The locality parts (window, sinks, stride) are handled per key class:
    keys visible to every query (sinks, a head's vertical blocks) are set apart per kv
    block, and FULL needs the window or the band to cover the [min, max] of the other
    keys, which for causal masks is exact (both terms favour later keys). For sorted
    positions, plain causal masks, windows, and strided masks whose `stride_block` is a
    multiple or a divisor of equal q and kv blocks are classified exactly.

    T and S need not be multiples of the block sizes: the last blocks are padded, and
    padded keys (and keys with `kv_valid` False, shape [B, S]) are never allowed.
    Padded query rows are ignored (their outputs are dropped).
    """
    num_kv_heads = self._check_heads("block_map", num_kv_heads)
    q_pos_BT = jnp.asarray(q_index, jnp.int32)
    k_pos_BS = jnp.asarray(kv_index, jnp.int32)
    q_seg_BT, k_seg_BS = self.segments(q_segment_ids, kv_segment_ids)
    B, T = q_pos_BT.shape
    S = k_pos_BS.shape[1]
    nQ, nK = -(-T // block_q), -(-S // block_kv)
    valid_BS = jnp.ones((B, S), bool) if kv_valid is None else jnp.asarray(kv_valid, bool)
    valid_BS = jnp.pad(valid_BS, ((0, 0), (0, nK * block_kv - S)))
    # Everything below broadcasts to [B, H, nQ, nK] (H = Hkv when per head, else 1):
    # q-block bounds are [B, 1, nQ, 1], kv-block bounds [B, 1 or Hkv, 1, nK].
    valid_BHNK = valid_BS.reshape(B, 1, nK, block_kv)

    def q_range(x_BT):
      # Edge padding repeats the last real query, so it leaves min and max unchanged.
      x_BNQ = jnp.pad(x_BT, ((0, 0), (0, nQ * block_q - T)), mode="edge").reshape(B, nQ, block_q)
      return x_BNQ.min(-1)[:, None, :, None], x_BNQ.max(-1)[:, None, :, None]

    def kv_blocks(x_BS):
      x_BS = jnp.pad(x_BS, ((0, 0), (0, nK * block_kv - S)), mode="edge")
      return x_BS.reshape(B, 1, nK, block_kv)

    def kv_range(x_BS, keep_BHNK):
      """[min, max] of x over the kept keys of each kv block ([MAX, MIN] if none)."""
      x_BHNK = kv_blocks(x_BS)
      lo = jnp.where(keep_BHNK, x_BHNK, _INT_MAX).min(-1)
      hi = jnp.where(keep_BHNK, x_BHNK, _INT_MIN).max(-1)
      return lo[:, :, None, :], hi[:, :, None, :]

    def distances(q_lo, q_hi, k_lo, k_hi):
      """(min, max) of q - k over the two intervals (of |q - k| without `causal`)."""
      if self.causal:
        return q_lo - k_hi, q_hi - k_lo
      min_distance = jnp.maximum(0, jnp.maximum(k_lo - q_hi, q_lo - k_hi))
      return min_distance, jnp.maximum(q_hi - k_lo, k_hi - q_lo)

    q_lo, q_hi = q_range(q_pos_BT)
    k_lo, k_hi = kv_range(k_pos_BS, valid_BHNK)
    any_valid = valid_BHNK.any(-1)[:, :, None, :]
    all_valid = valid_BHNK.all(-1)[:, :, None, :]

    # `some_*`: necessary for any allowed pair; `every_*`: sufficient for all pairs.
    true = jnp.ones((B, 1, nQ, nK), bool)
    some_causal = k_lo <= q_hi if self.causal else true
    every_causal = k_hi <= q_lo if self.causal else true
    if self.document:
      qs_lo, qs_hi = q_range(q_seg_BT)
      ks_lo, ks_hi = kv_range(k_seg_BS, valid_BHNK)
      some_doc = jnp.maximum(qs_lo, ks_lo) <= jnp.minimum(qs_hi, ks_hi)
      every_doc = (qs_lo == qs_hi) & (ks_lo == ks_hi) & (qs_lo == ks_lo)
    else:
      some_doc = every_doc = true
    if self.window is None and self.stride is None:
      some_visible = every_visible = true
    else:
      # Keys visible to every query wherever it is: the sinks and, per kv head, the keys
      # of vertical blocks. The others are visible only near the query (window, band).
      always_BHNK = kv_blocks(k_pos_BS) < self.sinks
      some_visible = k_lo < self.sinks
      if self.stride is not None:
        kv_head_H11 = jnp.arange(num_kv_heads, dtype=jnp.int32)[:, None, None]
        vertical_BHNK = self._is_vertical(kv_blocks(k_pos_BS), kv_head_H11, num_kv_heads)
        vertical_BHNK = vertical_BHNK & valid_BHNK
        always_BHNK = always_BHNK | vertical_BHNK
        v_lo, v_hi = kv_range(k_pos_BS, vertical_BHNK)
        # Some query sees a vertical key iff causality allows the earliest one.
        some_visible = some_visible | ((v_lo <= q_hi) if self.causal else (v_lo <= v_hi))
      near_lo, near_hi = kv_range(k_pos_BS, valid_BHNK & ~always_BHNK)
      # No near-only key: every key is always visible. (Then near_lo, near_hi are
      # [MAX, MIN] and the distances below may wrap around; this term wins the OR.)
      every_visible = near_lo > near_hi
      if self.window is not None:
        some_visible = some_visible | (distances(q_lo, q_hi, k_lo, k_hi)[0] < self.window)
        every_visible = every_visible | (distances(q_lo, q_hi, near_lo, near_hi)[1] < self.window)
      if self.stride is not None:
        qb_lo, qb_hi = (_floor_div(x, self.stride_block) for x in (q_lo, q_hi))
        kb_lo, kb_hi, nb_lo, nb_hi = (
          _floor_div(x, self.stride_block) for x in (k_lo, k_hi, near_lo, near_hi)
        )
        some_band = distances(qb_lo, qb_hi, kb_lo, kb_hi)[0] < self.local_blocks
        every_band = distances(qb_lo, qb_hi, nb_lo, nb_hi)[1] < self.local_blocks
        some_visible, every_visible = some_visible | some_band, every_visible | every_band

    some = some_causal & some_doc & some_visible
    if self.anchor:
      has_anchor = ((kv_blocks(k_pos_BS) == 0) & valid_BHNK).any(-1)[:, :, None, :]
      some = some | ((has_anchor & (q_hi >= 0)) if self.causal else has_anchor)
    some = some & any_valid
    every = every_causal & every_doc & every_visible & all_valid
    kinds = jnp.where(some, jnp.where(every, FULL, PARTIAL), EMPTY).astype(jnp.int8)
    kinds_BHQK = jnp.broadcast_to(kinds, (B, num_kv_heads or 1, nQ, nK))
    return kinds_BHQK if self.per_head else kinds_BHQK[:, 0]
