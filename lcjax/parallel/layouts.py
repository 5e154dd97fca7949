"""Sequence layouts for context parallelism: which tokens of a row each `context` device holds.

With W devices on the `context` axis, the sequence dimension of every activation is
split into W equal chunks, chunk r on device r. A layout decides which tokens form
chunk r, by reordering each row once at the input boundary:

* `contiguous`: device r holds tokens [r·T/W, (r+1)·T/W). Under a causal mask device
  W-1 attends to every chunk and device 0 to one, so ring steps wait for the slowest
  device: work imbalance 2 − 1/W (RingAttention, Liu et al. 2023).
* `zigzag`: the row is cut into 2W chunks and device r holds chunks r and 2W−1−r, one
  early and one late (ring-flash-attention's zigzag ring; the Llama 3 context
  parallelism of Dubey et al. 2024). Every ring step costs every device the same.
* `striped`: token i goes to device i mod W (Striped Attention, Brandon et al. 2023).
  Every device holds an even sample of the row, so causal work is balanced too.

`apply_layout` permutes tokens, targets, RoPE positions, segment ids and loss weights
together and adds `token_index`, each token's index in the original row. RoPE keeps
each token's original (global) position and masks read `token_index` as their mask
positions, so attention sees exactly the pairs it would see without the layout; the
loss is a sum over tokens and does not depend on their order.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.attention.masks import EMPTY, MaskSpec
from lcjax.config import ConfigError

__all__ = [
  "LAYOUTS",
  "check_layout",
  "permutation",
  "inverse_permutation",
  "to_layout",
  "from_layout",
  "apply_layout",
  "ring_work",
  "work_imbalance",
]

LAYOUTS = ("contiguous", "zigzag", "striped")


def check_layout(seq_len: int, context: int, layout: str) -> None:
  """Raises a `ConfigError` unless `layout` can split `seq_len` tokens over `context` devices."""
  if layout not in LAYOUTS:
    raise ConfigError(f"parallel.layout={layout!r} is not a layout; use one of {LAYOUTS}")
  if not isinstance(context, int) or context < 1:
    raise ConfigError(f"context={context!r} must be a positive number of devices")
  if layout == "zigzag" and seq_len % (2 * context):
    raise ConfigError(
      f"sequence length {seq_len} is not divisible by 2*context={2 * context} needed by the "
      "zigzag layout; change data.seq_len or mesh.context"
    )
  if seq_len % context:
    raise ConfigError(
      f"sequence length {seq_len} is not divisible by context={context} needed by the {layout} "
      "layout; change data.seq_len or mesh.context"
    )


def permutation(seq_len: int, context: int, layout: str) -> np.ndarray:
  """perm_T (int32): slot i of the laid-out row holds original token perm_T[i].

  `x_laid_out = x[:, perm_T]`; device r holds slots [r·T/W, (r+1)·T/W).
  """
  check_layout(seq_len, context, layout)
  T, W = seq_len, context
  if layout == "contiguous":
    perm_T = np.arange(T)
  elif layout == "zigzag":
    chunks_CN = np.arange(T).reshape(2 * W, T // (2 * W))
    perm_T = np.concatenate(
      [np.concatenate([chunks_CN[r], chunks_CN[2 * W - 1 - r]]) for r in range(W)]
    )
  else:  # striped: slot r·T/W + a holds token a·W + r.
    perm_T = np.arange(T).reshape(T // W, W).T.reshape(T)
  return perm_T.astype(np.int32)


def inverse_permutation(seq_len: int, context: int, layout: str) -> np.ndarray:
  """inv_T (int32) with `x = x_laid_out[:, inv_T]`: token t sits at slot inv_T[t]."""
  perm_T = permutation(seq_len, context, layout)
  inv_T = np.empty_like(perm_T)
  inv_T[perm_T] = np.arange(seq_len, dtype=np.int32)
  return inv_T


def _take(x, index_T, axis):
  if isinstance(x, np.ndarray):
    return np.take(x, index_T, axis=axis)
  return jnp.take(jnp.asarray(x), jnp.asarray(index_T), axis=axis)


def to_layout(x, context: int, layout: str, *, axis: int = 1):
  """Reorders the sequence `axis` of x (numpy stays numpy) into the layout's slot order."""
  return _take(x, permutation(x.shape[axis], context, layout), axis)


def from_layout(x, context: int, layout: str, *, axis: int = 1):
  """Undoes `to_layout`: back to the original token order along `axis`."""
  return _take(x, inverse_permutation(x.shape[axis], context, layout), axis)


def apply_layout(batch: Mapping[str, object], context: int, layout: str) -> dict:
  """Lays out a batch of packed rows once, at the input boundary; returns a new dict.

  Every array of the batch is reordered along axis 1 (tokens, targets, segment_ids,
  positions, loss_weights: all [B, T]); they must share T. Adds `token_index` [B, T]
  int32, the original index of each token, which the model passes to attention as
  its mask positions; adds `positions` (RoPE positions) = `token_index` when the batch
  has none, so RoPE keeps using global positions.
  """
  lengths = {key: np.shape(x)[1] for key, x in batch.items() if np.ndim(x) >= 2}
  if not lengths:
    raise ValueError("apply_layout needs [B, T] arrays (tokens, targets, ...) in the batch")
  if len(set(lengths.values())) != 1:
    raise ValueError(f"apply_layout needs one sequence length for every array; got {lengths}")
  T = next(iter(lengths.values()))
  B = np.shape(next(x for key, x in batch.items() if key in lengths))[0]
  perm_T = permutation(T, context, layout)
  out = {key: _take(x, perm_T, 1) if key in lengths else x for key, x in batch.items()}
  out["token_index"] = np.broadcast_to(perm_T, (B, T)).copy()
  if "positions" not in out:
    out["positions"] = out["token_index"].copy()
  return out


def ring_work(
  seq_len: int,
  context: int,
  layout: str,
  block: int,
  *,
  mask: MaskSpec | None = None,
  segment_ids=None,
) -> np.ndarray:
  """work_JW (int64): (q block, kv block) pairs device r computes at ring step j.

  At step j device r attends its query chunk to the key chunk of device (r − j) mod W,
  in blocks of `block` tokens (clipped to the chunk, the last block padded), and
  computes exactly the pairs `MaskSpec.block_map` does not call EMPTY: the count of
  the blockwise impl's block skipping. `mask` defaults to causal; `segment_ids` [T]
  (original order) are needed by a document mask.
  """
  mask = MaskSpec(causal=True) if mask is None else mask
  W = context
  perm_T = permutation(seq_len, W, layout)
  chunk = seq_len // W
  blk = min(block, chunk)
  pos_WC = perm_T.reshape(W, chunk)
  seg_WC = None if segment_ids is None else np.asarray(segment_ids)[perm_T].reshape(W, chunk)
  steps, devices = np.meshgrid(np.arange(W), np.arange(W), indexing="ij")
  src_JW = (devices - steps) % W  # whose keys device r holds at step j
  q_pos = pos_WC[devices.ravel()]
  k_pos = pos_WC[src_JW.ravel()]
  q_seg = None if seg_WC is None else seg_WC[devices.ravel()]
  k_seg = None if seg_WC is None else seg_WC[src_JW.ravel()]
  block_map_NQK = mask.block_map(q_pos, k_pos, q_seg, k_seg, block_q=blk, block_kv=blk)
  visited_N = np.asarray(jax.device_get(block_map_NQK != EMPTY)).sum(axis=(1, 2))
  return visited_N.reshape(W, W).astype(np.int64)


def work_imbalance(
  seq_len: int,
  context: int,
  layout: str,
  block: int,
  *,
  mask: MaskSpec | None = None,
  segment_ids=None,
) -> float:
  """Ring time over ideal time: Σ_steps max_device work ÷ (total work / W).

  Each ring step ends with a `ppermute`, so it lasts as long as its busiest device;
  1.0 is perfect balance. Work is counted in computed (q block, kv block) pairs (see
  `ring_work`). For a causal mask with many blocks per chunk: contiguous ≈ 2 − 1/W,
  zigzag and striped ≈ 1.
  """
  work_JW = ring_work(seq_len, context, layout, block, mask=mask, segment_ids=segment_ids)
  total = work_JW.sum()
  if total == 0:
    return 1.0
  return float(work_JW.max(axis=1).sum() / (total / context))
