"""Attention: `MaskSpec` and `dot_product_attention` with reference and blockwise impls.

out_BTHD = dot_product_attention(q_BTHD, k_BSKD, v_BSKD, mask=MaskSpec(document=True),
                                 q_segment_ids=segment_ids_BT)
"""

from __future__ import annotations

import logging

import jax

from lcjax.attention.blockwise import (
  block_kinds,
  blockwise_attention,
  blockwise_attention_stats,
  blockwise_attention_with_lse,
  visited_block_pairs,
)
from lcjax.attention.masks import EMPTY, FULL, PARTIAL, MaskSpec
from lcjax.attention.reference import reference_attention, reference_attention_with_lse
from lcjax.attention.unrolled import fits_unrolled, static_schedule, unrolled_attention_with_lse

__all__ = [
  "IMPLS",
  "MaskSpec",
  "EMPTY",
  "PARTIAL",
  "FULL",
  "dot_product_attention",
  "reference_attention",
  "reference_attention_with_lse",
  "blockwise_attention",
  "blockwise_attention_with_lse",
  "blockwise_attention_stats",
  "block_kinds",
  "visited_block_pairs",
]

IMPLS = ("auto", "reference", "blockwise", "pallas")
# platform -> impl that "auto" runs: the Pallas kernels on accelerators, the pure-JAX
# twin on CPU (where Pallas only runs in its slow interpret mode).
_AUTO_IMPL = {"cpu": "blockwise", "tpu": "pallas", "gpu": "pallas", "cuda": "pallas"}
_interpret_notice_shown = False


def _platform(x: jax.Array) -> str:
  """The platform x lives on, or the default backend's for tracers (decided per call)."""
  try:
    return next(iter(x.devices())).platform
  except (AttributeError, TypeError, jax.errors.ConcretizationTypeError):
    return jax.default_backend()


def resolve_impl(impl: str, q_BTHD: jax.Array) -> str:
  """Maps `impl` to the implementation that will run; never chosen at import time."""
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r} is not an attention implementation; use one of {IMPLS}")
  if impl == "auto":
    return _AUTO_IMPL.get(_platform(q_BTHD), "blockwise")
  return impl


def dot_product_attention(
  q_BTHD: jax.Array,
  k_BSKD: jax.Array,
  v_BSKD: jax.Array,
  *,
  mask: MaskSpec,
  q_segment_ids: jax.Array | None = None,
  kv_segment_ids: jax.Array | None = None,
  q_positions: jax.Array | None = None,
  kv_positions: jax.Array | None = None,
  impl: str = "auto",
  scale: float | None = None,
  block_q: int = 512,
  block_kv: int = 512,
) -> jax.Array:
  """Masked multi-head attention softmax(q kᵀ · scale) v; returns [B, T, Hq, D] in q's dtype.

  Args:
    q_BTHD, k_BSKD, v_BSKD: queries [B,T,Hq,D], keys and values [B,S,Hkv,D]. Hq must be
      a multiple of Hkv (GQA): query head h reads kv head h // (Hq // Hkv), the Hugging
      Face `repeat_kv` order; K and V are never repeated in memory.
    mask: which pairs are visible (see `MaskSpec`).
    q_segment_ids, kv_segment_ids: int [B,T] / [B,S] document ids; required when
      `mask.document`, ignored otherwise. kv defaults to q when T == S.
    q_positions, kv_positions: int [B,T] / [B,S] (or [T] / [S]) mask positions, the
      token's index in the packed row (not its RoPE position); default arange, and kv
      defaults to q when T == S.
    impl: "reference" (materialized scores, the oracle), "blockwise" (pure-JAX flash
      attention that skips empty blocks; with default positions and a small enough
      block schedule it runs unrolled, `lcjax.attention.unrolled`), "pallas"
      (`pallas_kernels.block_sparse_attention`: Mosaic on TPU, Triton on GPU, interpret
      mode on CPU with a one-time notice) or "auto" (pallas on TPU/GPU, blockwise on
      CPU; decided per call, never at import).
    scale: score scale, default 1/sqrt(D).
    block_q, block_kv: block sizes of the blockwise impl (clipped to T and S).

  Softmax runs in float32 whatever the input dtype. A query with no visible key
  outputs 0 and gets zero gradients.
  """
  impl = resolve_impl(impl, q_BTHD)
  kwargs = dict(
    mask=mask,
    q_segment_ids=q_segment_ids,
    kv_segment_ids=kv_segment_ids,
    q_positions=q_positions,
    kv_positions=kv_positions,
    scale=scale,
  )
  if impl == "reference":
    return reference_attention(q_BTHD, k_BSKD, v_BSKD, **kwargs)
  if impl == "pallas":
    return _pallas_attention(q_BTHD, k_BSKD, v_BSKD, block_q, block_kv, kwargs)
  if q_positions is None and kv_positions is None:
    # Rows in order: the positional mask is static, so the block schedule is too.
    B, T, Hq = q_BTHD.shape[:3]
    S, Hkv = k_BSKD.shape[1], k_BSKD.shape[2]
    bq, bk = min(block_q, T), min(block_kv, S)
    schedule = static_schedule(mask, T, S, bq, bk, Hkv)
    if fits_unrolled(schedule, B, Hq, bq, bk):
      return unrolled_attention_with_lse(
        q_BTHD,
        k_BSKD,
        v_BSKD,
        mask=mask,
        schedule=schedule,
        block_q=bq,
        block_kv=bk,
        q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids,
        scale=scale,
      )[0]
  return blockwise_attention(q_BTHD, k_BSKD, v_BSKD, block_q=block_q, block_kv=block_kv, **kwargs)


def _pallas_attention(q_BTHD, k_BSKD, v_BSKD, block_q, block_kv, kwargs):
  from pallas_kernels import block_sparse_attention
  from pallas_kernels.block_sparse_attention import default_interpret

  global _interpret_notice_shown
  interpret = default_interpret(q_BTHD)
  if interpret and not _interpret_notice_shown:
    _interpret_notice_shown = True
    logging.getLogger(__name__).warning(
      "impl='pallas' on CPU runs the kernels in Pallas interpret mode (slow; for testing); "
      "impl='blockwise' is the fast CPU path"
    )
  out_BTHD, _ = block_sparse_attention(
    q_BTHD, k_BSKD, v_BSKD, block_q=block_q, block_kv=block_kv, interpret=interpret, **kwargs
  )
  return out_BTHD
