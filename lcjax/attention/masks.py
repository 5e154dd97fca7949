"""`MaskSpec`: which keys a query may attend to, as a dense mask or a per-block map.

A mask is a predicate on pairs (query, key). It reads *mask positions*, the index of
each token in its packed row (default `arange`), and optional segment ids (one id per
packed document). Mask positions are not RoPE positions: RoPE positions may restart
per document (ProLong) while mask positions do not. A context-parallel layout
(zigzag, striped) permutes the tokens of a row and passes each token's global index,
so nothing here assumes positions are sorted.

The same predicate has two forms:

* `MaskSpec.dense` builds the boolean [B, T, S] mask. It is the reference that every
  other form is tested against.
* `MaskSpec.block_map` classifies each (q block, kv block) pair as EMPTY, PARTIAL or
  FULL in O(T + S) work from per-block min/max of positions and segment ids, never
  from the dense mask. Block-sparse attention (blockwise.py, later the Pallas kernels)
  skips EMPTY blocks and drops the element mask on FULL ones, as FlexAttention's
  block masks and splash attention's mask info do.
"""

from __future__ import annotations

import dataclasses
import operator

import jax
import jax.numpy as jnp

__all__ = ["MaskSpec", "EMPTY", "PARTIAL", "FULL", "resolve_mask_inputs"]

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


@dataclasses.dataclass(frozen=True)
class MaskSpec:
  """An attention mask made of composable parts; frozen and hashable (a static jit arg).

  On mask positions q_pos, k_pos and segment ids q_seg, k_seg a pair is allowed iff

    allowed = (causal_ok & doc_ok & (in_window | is_sink)) | (anchor & k_pos == 0 & causal_ok)

  where each part is True when its feature is off, and otherwise

  * `causal`:   causal_ok = k_pos <= q_pos.
  * `document`: doc_ok = q_seg == k_seg (packed documents see only themselves).
  * `window=w`: in_window = q_pos - k_pos < w, so a query sees the last w keys
    including itself (Mistral's sliding window); when `causal` is False,
    |q_pos - k_pos| < w.
  * `sinks=s`:  is_sink = k_pos < s; the first s keys stay visible outside the window,
    still subject to causal and document (attention sinks, Xiao et al. 2024
    "StreamingLLM"; the Λ-shape of LM-Infinite, Han et al. 2024). Without a window
    every key is already in the window and sinks change nothing.
  * `anchor`:   the key at k_pos == 0 is visible to every query, across documents,
    subject to causal only (AnchorAttention, Wang et al. "When Precision Meets
    Position", TMLR 2025, where the shared anchor token has document id 0).

  A query row may have no visible key (e.g. a non-causal document mask whose segment
  has no key); attention outputs 0 there.
  """

  causal: bool = True
  document: bool = False
  anchor: bool = False
  window: int | None = None
  sinks: int = 0

  def __post_init__(self):
    _check_bool("causal", self.causal)
    _check_bool("document", self.document)
    _check_bool("anchor", self.anchor)
    if self.window is not None:
      object.__setattr__(self, "window", _check_int("window", self.window, 1))
    object.__setattr__(self, "sinks", _check_int("sinks", self.sinks, 0))

  def replace(self, **changes) -> MaskSpec:
    """A copy with some fields changed, e.g. `spec.replace(window=4096)`."""
    return dataclasses.replace(self, **changes)

  def _segments(self, q_segment_ids, kv_segment_ids):
    """The segment ids the mask needs: None unless `document`, then both are required."""
    if not self.document:
      return None, None
    if q_segment_ids is None or kv_segment_ids is None:
      raise ValueError(
        "MaskSpec(document=True) needs q_segment_ids and kv_segment_ids; pass the packed "
        "rows' segment ids or use document=False"
      )
    return jnp.asarray(q_segment_ids, jnp.int32), jnp.asarray(kv_segment_ids, jnp.int32)

  def allowed(self, q_pos, k_pos, q_seg=None, k_seg=None) -> jax.Array:
    """The element predicate on broadcastable int arrays (what a kernel applies per block).

    `q_seg`/`k_seg` are only read when `document` is set. `dense` is this predicate on
    [B, T, 1] against [B, 1, S].
    """
    if self.document and (q_seg is None or k_seg is None):
      raise ValueError("MaskSpec(document=True).allowed needs q_seg and k_seg")
    causal_ok = k_pos <= q_pos if self.causal else True
    doc_ok = q_seg == k_seg if self.document else True
    if self.window is None:
      visible = True
    else:
      distance = q_pos - k_pos if self.causal else jnp.abs(q_pos - k_pos)
      visible = (distance < self.window) | (k_pos < self.sinks)
    allowed = jnp.logical_and(jnp.logical_and(causal_ok, doc_ok), visible)
    if self.anchor:
      allowed = allowed | ((k_pos == 0) & causal_ok)
    return jnp.broadcast_to(allowed, jnp.broadcast_shapes(q_pos.shape, k_pos.shape))

  def dense(
    self,
    q_positions_BT: jax.Array,
    kv_positions_BS: jax.Array,
    q_segment_ids_BT: jax.Array | None = None,
    kv_segment_ids_BS: jax.Array | None = None,
  ) -> jax.Array:
    """The boolean mask allowed[b, t, s] (True = query t may attend to key s); jit-able."""
    q_pos_BT = jnp.asarray(q_positions_BT, jnp.int32)
    k_pos_BS = jnp.asarray(kv_positions_BS, jnp.int32)
    q_seg_BT, k_seg_BS = self._segments(q_segment_ids_BT, kv_segment_ids_BS)
    if q_seg_BT is not None:
      q_seg_BT, k_seg_BS = q_seg_BT[:, :, None], k_seg_BS[:, None, :]
    return self.allowed(q_pos_BT[:, :, None], k_pos_BS[:, None, :], q_seg_BT, k_seg_BS)

  def block_map(
    self,
    q_positions: jax.Array,
    kv_positions: jax.Array,
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    *,
    block_q: int,
    block_kv: int,
    kv_valid: jax.Array | None = None,
  ) -> jax.Array:
    """Classifies each (q block, kv block) pair: int8 [B, nQ, nK] of EMPTY/PARTIAL/FULL.

    Works in O(T + S) from each block's [min, max] of positions and segment ids, so it
    is exact-or-conservative: EMPTY only if no pair of the block is allowed, FULL only
    if every pair is. Interval tests make it correct for unsorted positions (permuted
    context-parallel layouts) and non-monotone segment ids (trailing padding with id
    0). For sorted positions and plain causal/window masks it is exact.

    T and S need not be multiples of the block sizes: the last blocks are padded, and
    padded keys (and keys with `kv_valid` False, shape [B, S]) are never allowed.
    Padded query rows are ignored (their outputs are dropped).
    """
    q_pos_BT = jnp.asarray(q_positions, jnp.int32)
    k_pos_BS = jnp.asarray(kv_positions, jnp.int32)
    q_seg_BT, k_seg_BS = self._segments(q_segment_ids, kv_segment_ids)
    B, T = q_pos_BT.shape
    S = k_pos_BS.shape[1]
    nQ, nK = -(-T // block_q), -(-S // block_kv)
    valid_BS = jnp.ones((B, S), bool) if kv_valid is None else jnp.asarray(kv_valid, bool)
    valid_BS = jnp.pad(valid_BS, ((0, 0), (0, nK * block_kv - S)))
    valid_BNK = valid_BS.reshape(B, nK, block_kv)

    def q_range(x_BT):
      # Edge padding repeats the last real query, so it leaves min and max unchanged.
      x_BNQ = jnp.pad(x_BT, ((0, 0), (0, nQ * block_q - T)), mode="edge").reshape(B, nQ, block_q)
      return x_BNQ.min(-1)[:, :, None], x_BNQ.max(-1)[:, :, None]  # [B, nQ, 1]

    def kv_range(x_BS):
      x_BNK = jnp.pad(x_BS, ((0, 0), (0, nK * block_kv - S)), mode="edge").reshape(B, nK, -1)
      lo = jnp.where(valid_BNK, x_BNK, _INT_MAX).min(-1)
      hi = jnp.where(valid_BNK, x_BNK, _INT_MIN).max(-1)
      return lo[:, None, :], hi[:, None, :]  # [B, 1, nK]

    q_lo, q_hi = q_range(q_pos_BT)
    k_lo, k_hi = kv_range(k_pos_BS)
    any_valid = valid_BNK.any(-1)[:, None, :]
    all_valid = valid_BNK.all(-1)[:, None, :]

    # `some_*`: necessary for any allowed pair; `every_*`: sufficient for all pairs.
    true = jnp.ones((B, nQ, nK), bool)
    some_causal = k_lo <= q_hi if self.causal else true
    every_causal = k_hi <= q_lo if self.causal else true
    if self.document:
      qs_lo, qs_hi = q_range(q_seg_BT)
      ks_lo, ks_hi = kv_range(k_seg_BS)
      some_doc = jnp.maximum(qs_lo, ks_lo) <= jnp.minimum(qs_hi, ks_hi)
      every_doc = (qs_lo == qs_hi) & (ks_lo == ks_hi) & (qs_lo == ks_lo)
    else:
      some_doc = every_doc = true
    if self.window is None:
      some_visible = every_visible = true
    else:
      if self.causal:  # q_pos - k_pos over the block spans [q_lo - k_hi, q_hi - k_lo].
        min_distance = q_lo - k_hi
        max_distance = q_hi - k_lo
      else:  # |q_pos - k_pos| is at least the gap between the two intervals.
        min_distance = jnp.maximum(0, jnp.maximum(k_lo - q_hi, q_lo - k_hi))
        max_distance = jnp.maximum(q_hi - k_lo, k_hi - q_lo)
      some_visible = (min_distance < self.window) | (k_lo < self.sinks)
      every_visible = (max_distance < self.window) | (k_hi < self.sinks)

    some = some_causal & some_doc & some_visible
    if self.anchor:
      k_pos_BNK = jnp.pad(k_pos_BS, ((0, 0), (0, nK * block_kv - S)), mode="edge")
      has_anchor = ((k_pos_BNK.reshape(B, nK, -1) == 0) & valid_BNK).any(-1)[:, None, :]
      some = some | ((has_anchor & (q_hi >= 0)) if self.causal else has_anchor)
    some = some & any_valid
    every = every_causal & every_doc & every_visible & all_valid
    return jnp.where(some, jnp.where(every, FULL, PARTIAL), EMPTY).astype(jnp.int8)


def resolve_mask_inputs(
  mask: MaskSpec,
  batch: int,
  q_len: int,
  kv_len: int,
  q_positions=None,
  kv_positions=None,
  q_segment_ids=None,
  kv_segment_ids=None,
):
  """Fills the attention defaults; returns int32 (q_pos_BT, k_pos_BS, q_seg_BT, k_seg_BS).

  Positions default to arange. For self-attention (q_len == kv_len) a missing kv
  array defaults to its query twin, so callers of a permuted layout pass each once.
  Segment ids come back as None unless `mask.document`, which requires them.
  """
  self_attention = q_len == kv_len
  if kv_positions is None and q_positions is not None and self_attention:
    kv_positions = q_positions
  if kv_segment_ids is None and self_attention:
    kv_segment_ids = q_segment_ids

  def as_rows(x, length, name):
    if x is None:
      x = jnp.arange(length, dtype=jnp.int32)
    x = jnp.asarray(x, jnp.int32)
    bad_batch = x.ndim == 2 and x.shape[0] not in (1, batch)
    if x.ndim not in (1, 2) or x.shape[-1] != length or bad_batch:
      raise ValueError(f"{name} has shape {x.shape}; expected [{batch}, {length}] or [{length}]")
    return jnp.broadcast_to(x, (batch, length))

  q_pos_BT = as_rows(q_positions, q_len, "q_positions")
  k_pos_BS = as_rows(kv_positions, kv_len, "kv_positions")
  q_seg_BT, k_seg_BS = mask._segments(q_segment_ids, kv_segment_ids)
  if q_seg_BT is not None:
    q_seg_BT = as_rows(q_seg_BT, q_len, "q_segment_ids")
    k_seg_BS = as_rows(k_seg_BS, kv_len, "kv_segment_ids")
  return q_pos_BT, k_pos_BS, q_seg_BT, k_seg_BS
