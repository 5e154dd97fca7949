"""Attention: `MaskSpec`, `dot_product_attention` and the implementations it dispatches to.

out_BTHD = dot_product_attention(q_BTHD, k_BSKD, v_BSKD, mask=MaskSpec(document=True),
                                 q_segment_ids=segment_ids_BT)

The implementations live in one registry (`lcjax.attention.registry.IMPLS`: reference,
blockwise, pallas), which this dispatcher, ring attention and the model all read.
"""

from __future__ import annotations

import jax

from lcjax.attention.blockwise import (
  block_kinds,
  blockwise_attention,
  blockwise_attention_stats,
  blockwise_attention_with_lse,
  blockwise_bwd,
  blockwise_fwd,
  visited_block_pairs,
)
from lcjax.attention.inputs import AttentionOptions, MaskInputs, check_qkv, mask_inputs
from lcjax.attention.masks import EMPTY, FULL, PARTIAL, MaskSpec
from lcjax.attention.reference import reference_attention, reference_attention_with_lse
from lcjax.attention.registry import (
  IMPLS,
  AttentionImpl,
  attention_impl,
  impl_names,
  register_attention_impl,
  resolve_impl,
  target_platform,
)

__all__ = [
  "EMPTY",
  "FULL",
  "IMPLS",
  "PARTIAL",
  "AttentionImpl",
  "AttentionOptions",
  "MaskInputs",
  "MaskSpec",
  "attention_impl",
  "block_kinds",
  "blockwise_attention",
  "blockwise_attention_stats",
  "blockwise_attention_with_lse",
  "blockwise_bwd",
  "blockwise_fwd",
  "check_qkv",
  "dot_product_attention",
  "impl_names",
  "reference_attention",
  "reference_attention_with_lse",
  "register_attention_impl",
  "resolve_impl",
  "target_platform",
  "visited_block_pairs",
]


def dot_product_attention(
  q_BTHD: jax.Array,
  k_BSKD: jax.Array,
  v_BSKD: jax.Array,
  *,
  mask: MaskSpec,
  q_segment_ids: jax.Array | None = None,
  kv_segment_ids: jax.Array | None = None,
  q_index: jax.Array | None = None,
  kv_index: jax.Array | None = None,
  impl: str = "auto",
  scale: float | None = None,
  block_q: int = 512,
  block_kv: int = 512,
  q_positions: jax.Array | None = None,
  kv_positions: jax.Array | None = None,
) -> jax.Array:
  """Masked multi-head attention softmax(q kᵀ · scale) v; returns [B, T, Hq, D] in q's dtype.

  Args:
    q_BTHD, k_BSKD, v_BSKD: queries [B,T,Hq,D], keys and values [B,S,Hkv,D]. Hq must be
      a multiple of Hkv (GQA): query head h reads kv head h // (Hq // Hkv), the Hugging
      Face `repeat_kv` order; K and V are never repeated in memory.
    mask: which pairs are visible (see `MaskSpec`).
    q_segment_ids, kv_segment_ids: int [B,T] / [B,S] document ids; required when
      `mask.document`, ignored otherwise. kv defaults to q when T == S.
    q_index, kv_index: int [B,T] / [B,S] (or [T] / [S]) mask indices, each token's index
      in the packed row (not its RoPE position); default arange, and kv defaults to q
      when T == S. `q_positions`/`kv_positions` are their deprecated names.
    impl: a registered implementation (`lcjax.attention.registry`): "reference"
      (materialized scores, the oracle), "blockwise" (pure-JAX flash attention that
      skips empty blocks; with default indices and a small enough block schedule it
      runs unrolled, `lcjax.attention.unrolled`), "pallas"
      (`pallas_kernels.block_sparse_attention`: Mosaic on TPU, Triton on GPU, interpret
      mode on CPU with a one-time notice) or "auto" (pallas on TPU/GPU, blockwise on
      CPU; decided per call, never at import).
    scale: score scale, default 1/sqrt(D).
    block_q, block_kv: block sizes of the blockwise and Pallas impls (clipped to T, S).

  Softmax runs in float32 whatever the input dtype. A query with no visible key
  outputs 0 and gets zero gradients.
  """
  name = resolve_impl(impl, q_BTHD)
  inputs = mask_inputs(
    "dot_product_attention",
    q_segment_ids,
    kv_segment_ids,
    q_index,
    kv_index,
    q_positions,
    kv_positions,
  )
  opts = AttentionOptions(mask, scale, block_q, block_kv)
  return attention_impl(name).attention(q_BTHD, k_BSKD, v_BSKD, inputs, opts)[0]
