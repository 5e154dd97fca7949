"""AnchorAttention as a block-sparse specialization of `block_sparse_attention`.

AnchorAttention (Wang et al., "When Precision Meets Position: BFloat16 Breaks Down RoPE
in Long-Context Training", TMLR 2025) packs several documents into one row, masks the
documents from each other, and keeps one shared anchor token (the first token of the
row, at mask position 0) visible to every query:

  allowed(q, k) = k_index <= q_index & (q_seg == k_seg | k_index == 0).

That is `MaskSpec(causal=True, document=True, anchor=True)`. Its block map has the
diagonal band of each document plus the anchor's kv block in every q-block row, so the
compacted tables always list the anchor block, and the kernel visits about
sum_d (len_d / block)² / 2 + nQ block pairs instead of nQ² / 2 for dense causal: the
saving the paper reports comes out of the tables.
"""

from __future__ import annotations

import jax

from lcjax.attention.inputs import AttentionOptions, mask_inputs
from lcjax.attention.masks import MaskSpec
from pallas_kernels.block_sparse_attention import attention_with_lse

__all__ = ["ANCHOR_MASK", "anchor_attention"]

ANCHOR_MASK = MaskSpec(causal=True, document=True, anchor=True)


def anchor_attention(
  q_BTHD: jax.Array,
  k_BSKD: jax.Array,
  v_BSKD: jax.Array,
  *,
  q_segment_ids: jax.Array,
  kv_segment_ids: jax.Array | None = None,
  q_index: jax.Array | None = None,
  kv_index: jax.Array | None = None,
  scale: float | None = None,
  block_q: int = 128,
  block_kv: int = 128,
  interpret: bool | None = None,
  q_positions: jax.Array | None = None,
  kv_positions: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """AnchorAttention: (out_BTHD in q's dtype, lse_BHT fp32), differentiable in both.

  `block_sparse_attention` with `ANCHOR_MASK`; arguments are the same except that the
  mask is fixed and segment ids are required (kv defaults to q when T == S).
  `q_index`/`kv_index` are mask indices (the token's index in the packed row; the
  deprecated spellings `q_positions`/`kv_positions` still work); the anchor is the key
  at index 0.
  """
  inputs = mask_inputs(
    "anchor_attention", q_segment_ids, kv_segment_ids, q_index, kv_index, q_positions, kv_positions
  )
  opts = AttentionOptions(ANCHOR_MASK, scale, block_q, block_kv)
  return attention_with_lse(q_BTHD, k_BSKD, v_BSKD, inputs, opts, interpret=interpret)
