"""What travels with every attention call: the mask inputs and the static options.

Every implementation (reference, blockwise, unrolled, the Pallas kernels, each ring
step) takes its arguments as two bundles instead of a dozen positional arrays, the way
jax's Pallas flash attention passes one `SegmentIds(q, kv)` and a frozen `BlockSizes`:

  impl(q_BTHD, k_BSKD, v_BSKD, inputs: MaskInputs, opts: AttentionOptions)

* `MaskInputs` (a pytree, traced): each token's index in the packed row for queries and
  keys — what causal, window, sink, anchor and strided masks are evaluated on, never the
  RoPE positions — and the document ids of queries and keys.
* `AttentionOptions` (frozen, hashable, a jit static argument): the `MaskSpec`, the score
  scale and the block sizes.

The public functions (`dot_product_attention`, `blockwise_attention_with_lse`,
`reference_attention_with_lse`, `block_sparse_attention`, ...) keep their keyword
signatures; `attention_entry` and `backward_entry` turn a bundle-taking implementation
into one, including the deprecated `q_positions`/`kv_positions` spellings of
`q_index`/`kv_index`.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lcjax.attention.masks import MaskSpec

__all__ = [
  "AttentionOptions",
  "MaskInputs",
  "attention_entry",
  "backward_entry",
  "check_qkv",
]


class MaskInputs(NamedTuple):
  """Per-token mask inputs of one attention call; every field may be None.

  q_index [B, T] / kv_index [B, S] (or [T] / [S]): int, each token's index in the packed
    row, which masks are evaluated on (not its RoPE position). None means arange, i.e.
    rows in order; for self-attention (T == S) a missing kv_index is q_index.
  q_segment_ids [B, T] / kv_segment_ids [B, S]: int document ids, needed by
    `MaskSpec(document=True)` and ignored otherwise; kv defaults to q when T == S.
  """

  q_index: jax.Array | None = None
  kv_index: jax.Array | None = None
  q_segment_ids: jax.Array | None = None
  kv_segment_ids: jax.Array | None = None

  @property
  def in_order(self) -> bool:
    """Whether both indices are the default arange (a static block schedule is possible)."""
    return self.q_index is None and self.kv_index is None

  def resolve(self, mask: MaskSpec, batch: int, q_len: int, kv_len: int) -> MaskInputs:
    """Defaults filled in: int32 [B, T] / [B, S] indices, segment ids or None.

    Segment ids come back as None unless `mask.document`, which requires them.
    """
    q_index, kv_index = self.q_index, self.kv_index
    q_seg, kv_seg = self.q_segment_ids, self.kv_segment_ids
    self_attention = q_len == kv_len
    if kv_index is None and q_index is not None and self_attention:
      kv_index = q_index
    if kv_seg is None and self_attention:
      kv_seg = q_seg

    def as_rows(x, length, name):
      if x is None:
        x = jnp.arange(length, dtype=jnp.int32)
      x = jnp.asarray(x, jnp.int32)
      bad_batch = x.ndim == 2 and x.shape[0] not in (1, batch)
      if x.ndim not in (1, 2) or x.shape[-1] != length or bad_batch:
        raise ValueError(f"{name} has shape {x.shape}; expected [{batch}, {length}] or [{length}]")
      return jnp.broadcast_to(x, (batch, length))

    q_index = as_rows(q_index, q_len, "q_index")
    kv_index = as_rows(kv_index, kv_len, "kv_index")
    q_seg, kv_seg = mask.segments(q_seg, kv_seg)
    if q_seg is not None:
      q_seg = as_rows(q_seg, q_len, "q_segment_ids")
      kv_seg = as_rows(kv_seg, kv_len, "kv_segment_ids")
    return MaskInputs(q_index, kv_index, q_seg, kv_seg)


@dataclasses.dataclass(frozen=True)
class AttentionOptions:
  """The static part of an attention call (hashable: a jit static argument).

  mask: which (query, key) pairs are visible (`MaskSpec`).
  scale: score scale; None means 1/sqrt(head_dim).
  block_q, block_kv: block sizes of the blockwise implementations (clipped to T and S).
  """

  mask: MaskSpec
  scale: float | None = None
  block_q: int = 512
  block_kv: int = 512

  def __post_init__(self):
    if not isinstance(self.mask, MaskSpec):
      raise ValueError(f"mask must be a MaskSpec, got {type(self.mask).__name__}")
    for name in ("block_q", "block_kv"):
      size = getattr(self, name)
      if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"{name} must be a positive integer, got {size!r}")
    if self.scale is not None:
      object.__setattr__(self, "scale", float(self.scale))

  def score_scale(self, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if self.scale is None else self.scale

  def replace(self, **changes) -> AttentionOptions:
    return dataclasses.replace(self, **changes)


def check_qkv(q_BTHD: jax.Array, k_BSKD: jax.Array, v_BSKD: jax.Array) -> int:
  """Validates q [B,T,Hq,D], k and v [B,S,Hkv,D] with Hq % Hkv == 0; returns G = Hq // Hkv."""
  if q_BTHD.ndim != 4 or k_BSKD.ndim != 4 or v_BSKD.shape != k_BSKD.shape:
    raise ValueError(
      f"attention expects q [B,T,Hq,D] and k, v [B,S,Hkv,D] of one shape; got q {q_BTHD.shape}, "
      f"k {k_BSKD.shape}, v {v_BSKD.shape}"
    )
  (B, _, Hq, D), (Bk, _, Hkv, Dk) = q_BTHD.shape, k_BSKD.shape
  if B != Bk or D != Dk or Hq % Hkv:
    raise ValueError(
      f"q {q_BTHD.shape} and k {k_BSKD.shape} need the same batch and head dim and a number "
      "of query heads that is a multiple of the number of kv heads"
    )
  return Hq // Hkv


_RENAMED = (("q_positions", "q_index"), ("kv_positions", "kv_index"))


def mask_inputs(
  where: str,
  q_segment_ids=None,
  kv_segment_ids=None,
  q_index=None,
  kv_index=None,
  q_positions=None,
  kv_positions=None,
) -> MaskInputs:
  """The `MaskInputs` of a public call, accepting the deprecated `*_positions` spellings.

  `q_positions`/`kv_positions` meant the mask indices (a token's index in the packed
  row), easily confused with RoPE positions; they are accepted with a DeprecationWarning
  until lcjax 0.3.
  """
  given = {"q_index": q_index, "kv_index": kv_index}
  for (old, new), value in zip(_RENAMED, (q_positions, kv_positions), strict=True):
    if value is None:
      continue
    warnings.warn(
      f"{where}({old}=...) is deprecated; pass {new}= (mask indices: each token's index in "
      "the packed row). The old name is removed in lcjax 0.3.",
      DeprecationWarning,
      stacklevel=3,
    )
    if given[new] is not None:
      raise ValueError(f"{where} got both {old} and {new}; pass only {new}")
    given[new] = value
  return MaskInputs(given["q_index"], given["kv_index"], q_segment_ids, kv_segment_ids)


def attention_entry(impl: Callable, *, name: str, block: int = 512) -> Callable:
  """The public keyword signature around `impl(q, k, v, inputs, opts, **options)`.

  `options` are extra implementation-specific keywords (the Pallas kernels' `interpret`).
  """

  def entry(
    q_BTHD: jax.Array,
    k_BSKD: jax.Array,
    v_BSKD: jax.Array,
    *,
    mask: MaskSpec,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    q_index: jax.Array | None = None,
    kv_index: jax.Array | None = None,
    scale: float | None = None,
    block_q: int = block,
    block_kv: int = block,
    q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
    **options: Any,
  ):
    inputs = mask_inputs(
      name, q_segment_ids, kv_segment_ids, q_index, kv_index, q_positions, kv_positions
    )
    opts = AttentionOptions(mask, scale, block_q, block_kv)
    return impl(q_BTHD, k_BSKD, v_BSKD, inputs, opts, **options)

  entry.__name__ = entry.__qualname__ = name
  return entry


def backward_entry(impl: Callable, *, name: str, block: int = 512) -> Callable:
  """The public signature around `impl(q, k, v, out, lse, dout, inputs, opts, dlse, **options)`."""

  def entry(
    q_BTHD: jax.Array,
    k_BSKD: jax.Array,
    v_BSKD: jax.Array,
    out_BTHD: jax.Array,
    lse_BHT: jax.Array,
    dout_BTHD: jax.Array,
    *,
    mask: MaskSpec,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    q_index: jax.Array | None = None,
    kv_index: jax.Array | None = None,
    scale: float | None = None,
    block_q: int = block,
    block_kv: int = block,
    dlse_BHT: jax.Array | None = None,
    q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
    **options: Any,
  ):
    inputs = mask_inputs(
      name, q_segment_ids, kv_segment_ids, q_index, kv_index, q_positions, kv_positions
    )
    opts = AttentionOptions(mask, scale, block_q, block_kv)
    return impl(
      q_BTHD, k_BSKD, v_BSKD, out_BTHD, lse_BHT, dout_BTHD, inputs, opts, dlse_BHT, **options
    )

  entry.__name__ = entry.__qualname__ = name
  return entry
