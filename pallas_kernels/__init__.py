"""Pallas kernels with custom VJPs: block-sparse flash attention and AnchorAttention.

out_BTHD, lse_BHT = block_sparse_attention(q_BTHD, k_BSKD, v_BSKD, mask=MaskSpec(...))

Each kernel's pure-JAX twin is `lcjax.attention.blockwise_attention_with_lse` (same
signature and semantics). On CPU the kernels run in Pallas interpret mode, chosen at
call time; on TPU and GPU the lowering is chosen by the platform. `block_sparse_fwd` and
`block_sparse_bwd` (the `blockwise_fwd`/`blockwise_bwd` signatures) are the per-step
routine of ring attention's `block_impl="pallas"`, whose backward accumulates dQ in the
kernels' layout (`block_sparse_attention.backward_accumulate`).

Modules: `block_tables` (block maps -> compacted visiting lists), `block_sparse_steps`
(per-block FlashAttention-2 updates), `block_sparse_kernels` (loop and pipelined kernel
bodies), `block_sparse_launch` (BlockSpecs, grids, platform choice),
`block_sparse_attention` (custom VJP and public entry points), `anchor_attention`.
"""

# lcjax.attention's registry imports these kernels, and the kernels import
# lcjax.attention's masks: loading that package first means that whichever of the two is
# imported first, every module is complete before anyone takes a name from it.
import lcjax.attention  # noqa: F401  (see above)
from pallas_kernels.anchor_attention import ANCHOR_MASK, anchor_attention
from pallas_kernels.block_sparse_attention import (
  block_sparse_attention,
  block_sparse_bwd,
  block_sparse_fwd,
  block_sparse_tables,
  default_interpret,
)
from pallas_kernels.block_tables import BlockTables, block_tables, visited_blocks

__all__ = [
  "ANCHOR_MASK",
  "BlockTables",
  "anchor_attention",
  "block_sparse_attention",
  "block_sparse_bwd",
  "block_sparse_fwd",
  "block_sparse_tables",
  "block_tables",
  "default_interpret",
  "visited_blocks",
]
