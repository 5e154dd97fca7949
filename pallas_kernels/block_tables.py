"""Block tables: the compacted per-q-block lists of kv blocks that a block-sparse kernel visits.

`MaskSpec.block_map` classifies every (q block, kv block) pair as EMPTY, PARTIAL or FULL.
A kernel should not loop over all nK kv blocks and test each one: it should loop over
the non-empty ones only. `block_tables` compacts each row of the block map into

  kv_index_BQK[b, i, s]  the s-th kv block that q block i of row b visits (kv order),
  kv_count_BQ[b, i]      how many there are (steps s >= count are padding),
  kv_kind_BQK[b, i, s]   PARTIAL (apply the element mask) or FULL (skip it); EMPTY on padding.

These are FlexAttention's `kv_num_blocks`/`kv_indices` and splash attention's mask info
(the block-level sparsity of SeerAttention and of LongGen's sparse layers). Padded steps
repeat the last visited block, so a pipelined TPU grid over steps issues no new copy for
them (splash's "data_next" trick). Transposing the block map first gives the lists of q
blocks per kv block, which the dK/dV pass of FlashAttention-2 (Dao 2023, Alg. 2) loops
over. The tables are computed at run time from segment ids, inside jit, by every backend.

A per-head mask (S2-Attention / LongGen strided blocks, `MaskSpec.per_head`) has a
block map [B, Hkv, nQ, nK] and so one list per (b, kv head, i): leading axes are
compacted alike, and `visited_blocks` then counts (row, kv head, q block, kv block).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lcjax.attention.masks import EMPTY

__all__ = ["BlockTables", "block_tables", "visited_blocks"]


class BlockTables(NamedTuple):
  """Compacted visiting lists of a block map [B, nQ, nK] (all int32).

  For a per-head block map [B, Hkv, nQ, nK] every field has the extra kv-head axis.
  """

  kv_index_BQK: jax.Array  # [B, nQ, nK] kv block of each step; padding repeats the last one
  kv_count_BQ: jax.Array  # [B, nQ] number of real steps
  kv_kind_BQK: jax.Array  # [B, nQ, nK] PARTIAL or FULL per step, EMPTY on padding


def block_tables(block_map_BQK: jax.Array) -> BlockTables:
  """Compacts an int8 EMPTY/PARTIAL/FULL block map into per-row visiting lists; jit-able.

  The non-empty kv blocks of each (b, i) row keep their kv order (a stable sort moves
  the empty ones to the end). For a row with no visible block, count is 0 and every
  index is 0. Pass `block_map_BQK.swapaxes(-1, -2)` to get per-kv-block lists of q
  blocks. A per-head map [B, Hkv, nQ, nK] gives lists per (b, kv head, i).
  """
  block_map_BQK = jnp.asarray(block_map_BQK)
  if block_map_BQK.ndim not in (3, 4):
    raise ValueError(
      f"block_map must be [B, nQ, nK] or [B, Hkv, nQ, nK], got shape {block_map_BQK.shape}"
    )
  n_kv = block_map_BQK.shape[-1]
  visit_BQK = block_map_BQK != EMPTY
  # Stable argsort of "is empty": visited blocks first, each group in kv order.
  order_BQK = jnp.argsort(~visit_BQK, axis=-1, stable=True).astype(jnp.int32)
  kv_count_BQ = visit_BQK.sum(-1, dtype=jnp.int32)
  last_BQ1 = jnp.take_along_axis(order_BQK, jnp.maximum(kv_count_BQ - 1, 0)[..., None], axis=-1)
  real_BQK = jnp.arange(n_kv, dtype=jnp.int32) < kv_count_BQ[..., None]
  last_BQ1 = jnp.where(kv_count_BQ[..., None] > 0, last_BQ1, 0)
  kv_index_BQK = jnp.where(real_BQK, order_BQK, last_BQ1)
  kinds_BQK = jnp.take_along_axis(block_map_BQK, order_BQK, axis=-1).astype(jnp.int32)
  kv_kind_BQK = jnp.where(real_BQK, kinds_BQK, EMPTY)
  return BlockTables(kv_index_BQK, kv_count_BQ, kv_kind_BQK)


def visited_blocks(tables: BlockTables) -> jax.Array:
  """How many (row, q block, kv block) triples a kernel driven by these tables computes
  (per kv head, summed over the heads, for per-head tables)."""
  return tables.kv_count_BQ.sum()
