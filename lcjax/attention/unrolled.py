"""Flash attention with a static block schedule, unrolled: the fast CPU path for rows in order.

`blockwise.py` decides at run time which (q block, kv block) pairs to compute, inside a
`lax.fori_loop` with a `lax.switch` per pair, because positions may be permuted
(context-parallel layouts) and segment ids are data. When the mask positions are the
default `arange` — every model call that is not context parallel — the positional part
of the mask (causal, window, sinks, anchor column, strides) is known at trace time, so
the pairs to visit and which of them need the element mask are known too. This module
computes that schedule in numpy and emits the FlashAttention-2 forward (Dao 2023,
Alg. 1) and backward (Alg. 2) as straight-line code over the visited pairs only, with
static slices and, on FULL pairs, no mask at all. On XLA:CPU that is about twice as fast
as the loop for the attention of `bench.py train`'s wide model (B 4, H 8, D 64, T 1024,
128-blocks, fwd + bwd: about 200 against 370 ms per layer on 2 cores), mostly because
independent block products can run concurrently on the host's cores and no dynamic
slices are copied.

Documents (segment ids) are data: a pair that the positional mask visits is computed
with the element mask `MaskSpec.allowed` on the segment ids of its rows, so packed
documents cost as much as plain causal attention here (the loop path skips
cross-document blocks; for many short documents at long T it can be the faster one).

The unrolled program grows with the number of visited pairs, so `static_schedule`
returns None beyond `MAX_UNROLLED_PAIRS`, and its peak memory with their total score
size, so callers also check `fits_unrolled`; otherwise they fall back to the loop. The math,
the GQA folding (the G query heads of a kv head are rows of one block) and the
conventions (float32 softmax, rows with no visible key output 0 with lse -inf and get
zero gradients) are those of `blockwise.py`, which the tests compare against.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.attention import blockwise
from lcjax.attention.blockwise import online_softmax_result, online_softmax_step
from lcjax.attention.inputs import AttentionOptions, MaskInputs, check_qkv
from lcjax.attention.masks import MaskSpec

__all__ = [
  "MAX_UNROLLED_PAIRS",
  "MAX_UNROLLED_SCORE_BYTES",
  "fits_unrolled",
  "attention_with_lse",
  "static_schedule",
  "unrolled_attention_with_lse",
]

# Above this many visited (q block, kv block) pairs the unrolled program compiles too
# slowly to pay off (a T = 2K causal row with 128-blocks has 136); use the loop.
MAX_UNROLLED_PAIRS = 160
# XLA schedules the unrolled pairs for concurrency and keeps several pairs' float32
# score blocks live at once, so peak memory grows with the sum of all visited blocks
# (not one block, as in the loop): the quickstart model at T = 8K with 512-blocks
# needed 3.5 GiB of temporaries unrolled against 0.45 GiB looped. Unroll only while
# that sum, B · Hq · block_q · block_kv · 4 bytes per visited pair, stays below this.
MAX_UNROLLED_SCORE_BYTES = 128 * 2**20


def fits_unrolled(
  schedule,
  batch: int,
  num_heads: int,
  block_q: int,
  block_kv: int,
  *,
  max_score_bytes: int = MAX_UNROLLED_SCORE_BYTES,
) -> bool:
  """Whether a schedule's float32 score blocks fit `max_score_bytes` in all (see above)."""
  if schedule is None:
    return False
  pairs = sum(len(row) for row in schedule)
  return pairs * batch * num_heads * block_q * block_kv * 4 <= max_score_bytes


class _Static(NamedTuple):
  mask: MaskSpec
  scale: float
  block_q: int
  block_kv: int
  q_len: int
  kv_len: int
  # schedule[i] = ((j, masked), ...): the kv blocks q block i visits, in kv order.
  schedule: tuple[tuple[tuple[int, bool], ...], ...]


def _static_allowed(mask: MaskSpec, q_pos, k_pos, kv_len: int, num_kv_heads: int) -> np.ndarray:
  """The positional mask (documents left out) on static positions: bool [Hm, Tq, Tk].

  Hm is the number of kv heads for per-head masks (strided) and 1 otherwise. Keys at
  index >= kv_len are padding and never visible.
  """
  positional = mask.replace(document=False)
  q_pos, k_pos = np.asarray(q_pos)[:, None], np.asarray(k_pos)[None, :]
  with jax.ensure_compile_time_eval():
    if positional.per_head:
      kv_head = np.arange(num_kv_heads)[:, None, None]
      allowed = positional.allowed(
        q_pos[None], k_pos[None], kv_head=kv_head, num_kv_heads=num_kv_heads
      )
    else:
      allowed = positional.allowed(q_pos, k_pos)[None]
    allowed = np.asarray(allowed)
  return allowed & (k_pos < kv_len)[None]


def static_schedule(
  mask: MaskSpec,
  q_len: int,
  kv_len: int,
  block_q: int,
  block_kv: int,
  num_kv_heads: int,
  *,
  max_pairs: int = MAX_UNROLLED_PAIRS,
) -> tuple[tuple[tuple[int, bool], ...], ...] | None:
  """Per q block, the kv blocks to visit and whether each needs the element mask.

  For default (arange) positions. A pair is visited iff the positional mask allows some
  pair of it, and computed without the element mask iff it allows all of them and the
  mask has no document part. Returns None when more than `max_pairs` pairs
  would be visited (or the block grid is too large to be worth classifying). Costs
  O(block_q · S) numpy work per q block at trace time.
  """
  if not isinstance(mask, MaskSpec):
    raise ValueError(f"mask must be a MaskSpec, got {type(mask).__name__}")
  for name, size in (("block_q", block_q), ("block_kv", block_kv)):
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
      raise ValueError(f"{name} must be a positive integer, got {size!r}")
  nQ, nK = -(-q_len // block_q), -(-kv_len // block_kv)
  if nQ * nK > 4 * max_pairs:
    return None
  k_pos = np.arange(nK * block_kv)
  schedule, visited = [], 0
  for i in range(nQ):
    q_pos = np.arange(i * block_q, (i + 1) * block_q)
    allowed = _static_allowed(mask, q_pos, k_pos, kv_len, num_kv_heads)
    blocks = allowed.reshape(allowed.shape[0], block_q, nK, block_kv)
    some_K, every_K = blocks.any(axis=(0, 1, 3)), blocks.all(axis=(0, 1, 3))
    row = tuple((j, bool(mask.document or not every_K[j])) for j in range(nK) if some_K[j])
    visited += len(row)
    if visited > max_pairs:
      return None
    schedule.append(row)
  return tuple(schedule)


def _block(x, start, size, axis):
  return jax.lax.slice_in_dim(x, start, start + size, axis=axis)


def _pair_scores(st, i, j, masked, q_BKRD, k_BKSD, q_seg_BT, k_seg_BS):
  """Scaled float32 scores of pair (i, j), -inf where the element mask hides a pair."""
  B, K, R, _ = q_BKRD.shape
  bq, bk = st.block_q, st.block_kv
  G = R // bq
  s_BKRS = jnp.einsum("bkrd,bksd->bkrs", q_BKRD, k_BKSD, preferred_element_type=jnp.float32)
  s_BKRS = s_BKRS * st.scale
  if not masked:
    return s_BKRS
  q_pos, k_pos = np.arange(i * bq, (i + 1) * bq), np.arange(j * bk, (j + 1) * bk)
  allowed_HQS = _static_allowed(st.mask, q_pos, k_pos, st.kv_len, K)  # [Hm, bq, bk]
  allowed_BHQS = jnp.asarray(allowed_HQS)[None]
  if st.mask.document:
    # Segment ids are data: the full predicate (documents and the anchor column) on them.
    q_seg_BQ1 = _block(q_seg_BT, i * bq, bq, 1)[:, None, :, None]
    k_seg_B1S = _block(k_seg_BS, j * bk, bk, 1)[:, None, None, :]
    # `allowed` broadcasts to the positions' shape, so give them the batch axis.
    B_seg = q_seg_BT.shape[0]
    q_pos_B = np.broadcast_to(q_pos[None, None, :, None], (B_seg, 1, bq, 1))
    k_pos_B = k_pos[None, None, None, :]
    if st.mask.per_head:
      kv_head = np.arange(K)[None, :, None, None]
      doc_BHQS = st.mask.allowed(
        q_pos_B, k_pos_B, q_seg_BQ1, k_seg_B1S, kv_head=kv_head, num_kv_heads=K
      )
    else:
      doc_BHQS = st.mask.allowed(q_pos_B, k_pos_B, q_seg_BQ1, k_seg_B1S)
    allowed_BHQS = doc_BHQS & (k_pos < st.kv_len)[None, None, None, :]
  Bm, Hm = allowed_BHQS.shape[:2]
  # Rows fold the G query heads of a kv head: row r = t·G + g reads query t.
  allowed_BHRS = jnp.broadcast_to(allowed_BHQS[:, :, :, None], (Bm, Hm, bq, G, bk))
  return jnp.where(allowed_BHRS.reshape(Bm, Hm, R, bk), s_BKRS, -jnp.inf)


def _forward(st, q_BKTGD, k_BKSD, v_BKSD, q_seg_BT, k_seg_BS):
  """FlashAttention-2 Alg. 1 over the schedule: out fp32 [B,K,Tp,G,D], lse [B,K,Tp,G]."""
  B, K, _, G, D = q_BKTGD.shape
  bq, bk = st.block_q, st.block_kv
  R = bq * G
  outs, lses = [], []
  for i, row in enumerate(st.schedule):
    q_BKRD = _block(q_BKTGD, i * bq, bq, 2).reshape(B, K, R, D)
    m_BKR = jnp.full((B, K, R), -jnp.inf, jnp.float32)
    l_BKR = jnp.zeros((B, K, R), jnp.float32)
    acc_BKRD = jnp.zeros((B, K, R, D), jnp.float32)
    for j, masked in row:
      s_BKRS = _pair_scores(
        st, i, j, masked, q_BKRD, _block(k_BKSD, j * bk, bk, 2), q_seg_BT, k_seg_BS
      )
      v_BKSD_j = _block(v_BKSD, j * bk, bk, 2)
      m_BKR, l_BKR, acc_BKRD = online_softmax_step(m_BKR, l_BKR, acc_BKRD, s_BKRS, v_BKSD_j)
    out_BKRD, lse_BKR = online_softmax_result(m_BKR, l_BKR, acc_BKRD)
    outs.append(out_BKRD.reshape(B, K, bq, G, D))
    lses.append(lse_BKR.reshape(B, K, bq, G))
  return jnp.concatenate(outs, axis=2), jnp.concatenate(lses, axis=2)


def _backward(st, res, cotangents):
  """FlashAttention-2 Alg. 2 over the schedule: (dq, dk, dv) in the input dtypes."""
  q_BKTGD, k_BKSD, v_BKSD, q_seg_BT, k_seg_BS, out_BKTGD, lse_BKTG = res
  dout_BKTGD, dlse_BKTG = cotangents
  B, K, _, G, D = q_BKTGD.shape
  bq, bk = st.block_q, st.block_kv
  R = bq * G
  # D_i = rowsum(dO_i ∘ O_i), minus the lse cotangent (d lse_i / d S_ij = P_ij).
  delta_BKTG = jnp.einsum("bktgd,bktgd->bktg", dout_BKTGD.astype(jnp.float32), out_BKTGD)
  delta_BKTG = delta_BKTG - dlse_BKTG
  # Rows with no visible key have lse = -inf; +inf makes their P = exp(S - inf) = 0.
  lse_BKTG = jnp.where(lse_BKTG == -jnp.inf, jnp.inf, lse_BKTG)
  zeros_q = jnp.zeros((B, K, R, D), jnp.float32)
  zeros_kv = jnp.zeros((B, K, bk, D), jnp.float32)
  n_kv = k_BKSD.shape[2] // bk
  dq_blocks, dk_blocks, dv_blocks = [], [zeros_kv] * n_kv, [zeros_kv] * n_kv
  for i, row in enumerate(st.schedule):
    rows = lambda x, i=i: _block(x, i * bq, bq, 2).reshape(B, K, R, *x.shape[4:])  # noqa: E731
    q_BKRD, do_BKRD = rows(q_BKTGD), rows(dout_BKTGD).astype(jnp.float32)
    lse_BKR, delta_BKR = rows(lse_BKTG), rows(delta_BKTG)
    dq_BKRD = zeros_q
    for j, masked in row:
      k_BKSD_j, v_BKSD_j = _block(k_BKSD, j * bk, bk, 2), _block(v_BKSD, j * bk, bk, 2)
      s_BKRS = _pair_scores(st, i, j, masked, q_BKRD, k_BKSD_j, q_seg_BT, k_seg_BS)
      p_BKRS = jnp.exp(s_BKRS - lse_BKR[..., None])  # P_ij = exp(S_ij - L_i)
      dv_blocks[j] = dv_blocks[j] + jnp.einsum("bkrs,bkrd->bksd", p_BKRS, do_BKRD)
      dp_BKRS = jnp.einsum("bkrd,bksd->bkrs", do_BKRD, v_BKSD_j, preferred_element_type=jnp.float32)
      ds_BKRS = p_BKRS * (dp_BKRS - delta_BKR[..., None]) * st.scale
      dq_BKRD = dq_BKRD + jnp.einsum(
        "bkrs,bksd->bkrd", ds_BKRS, k_BKSD_j, preferred_element_type=jnp.float32
      )
      dk_blocks[j] = dk_blocks[j] + jnp.einsum(
        "bkrs,bkrd->bksd", ds_BKRS, q_BKRD, preferred_element_type=jnp.float32
      )
    dq_blocks.append(dq_BKRD.reshape(B, K, bq, G, D))
  dq_BKTGD = jnp.concatenate(dq_blocks, axis=2)
  dk_BKSD, dv_BKSD = jnp.concatenate(dk_blocks, axis=2), jnp.concatenate(dv_blocks, axis=2)
  return dq_BKTGD.astype(q_BKTGD.dtype), dk_BKSD.astype(k_BKSD.dtype), dv_BKSD.astype(v_BKSD.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st, q, k, v, q_seg, k_seg):
  out_BKTGD, lse_BKTG = _forward(st, q, k, v, q_seg, k_seg)
  return out_BKTGD.astype(q.dtype), lse_BKTG


def _flash_fwd(st, q, k, v, q_seg, k_seg):
  out_BKTGD, lse_BKTG = _forward(st, q, k, v, q_seg, k_seg)
  # Residuals are O(T): inputs, the fp32 output and the lse; never the probabilities.
  return (out_BKTGD.astype(q.dtype), lse_BKTG), (q, k, v, q_seg, k_seg, out_BKTGD, lse_BKTG)


def _flash_bwd(st, res, cotangents):
  return (*_backward(st, res, cotangents), None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def unrolled_attention_with_lse(
  q_BTHD: jax.Array,
  k_BSKD: jax.Array,
  v_BSKD: jax.Array,
  inputs: MaskInputs,
  opts: AttentionOptions,
  schedule: tuple[tuple[tuple[int, bool], ...], ...],
) -> tuple[jax.Array, jax.Array]:
  """(out_BTHD in q's dtype, lse_BHT fp32) for rows in order, over `schedule`.

  `schedule` is `static_schedule(opts.mask, T, S, block_q, block_kv, Hkv)` for the block
  sizes of `opts`, which must already be clipped to T and S. Only the segment ids of
  `inputs` are read: the indices are arange by assumption. Differentiable in both
  outputs (custom VJP).
  """
  if not inputs.in_order:
    raise ValueError("unrolled attention needs rows in order: q_index and kv_index must be None")
  G = check_qkv(q_BTHD, k_BSKD, v_BSKD)
  B, T, Hq, D = q_BTHD.shape
  S, Hkv = k_BSKD.shape[1], k_BSKD.shape[2]
  block_q, block_kv = opts.block_q, opts.block_kv
  Tp, Sp = -(-T // block_q) * block_q, -(-S // block_kv) * block_kv
  _, _, q_seg, k_seg = inputs.resolve(opts.mask, B, T, S)

  def pad(x, n, mode="constant"):
    return jnp.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2), mode=mode)

  if q_seg is not None:
    q_seg, k_seg = pad(q_seg, Tp, "edge"), pad(k_seg, Sp, "edge")
  st = _Static(opts.mask, opts.score_scale(D), block_q, block_kv, T, S, schedule)
  q_BKTGD = pad(q_BTHD, Tp).reshape(B, Tp, Hkv, G, D).transpose(0, 2, 1, 3, 4)
  k_BKSD, v_BKSD = (pad(x, Sp).transpose(0, 2, 1, 3) for x in (k_BSKD, v_BSKD))
  out_BKTGD, lse_BKTG = _flash(st, q_BKTGD, k_BKSD, v_BKSD, q_seg, k_seg)
  out_BTHD = out_BKTGD[:, :, :T].transpose(0, 2, 1, 3, 4).reshape(B, T, Hq, D)
  lse_BHT = lse_BKTG[:, :, :T].transpose(0, 1, 3, 2).reshape(B, Hq, T)
  return out_BTHD, lse_BHT


def attention_with_lse(
  q_BTHD,
  k_BSKD,
  v_BSKD,
  inputs: MaskInputs,
  opts: AttentionOptions,
  *,
  max_pairs: int = MAX_UNROLLED_PAIRS,
  max_score_bytes: int = MAX_UNROLLED_SCORE_BYTES,
):
  """The blockwise implementation's full call: unrolled when it can be, else the loop.

  Rows in order with a schedule of at most `max_pairs` pairs whose score blocks fit
  `max_score_bytes` run the unrolled schedule; everything else (permuted layouts, long
  rows) runs `blockwise.attention_with_lse`.
  """
  if inputs.in_order:
    B, T, Hq = q_BTHD.shape[:3]
    S, Hkv = k_BSKD.shape[1], k_BSKD.shape[2]
    bq, bk = min(opts.block_q, T), min(opts.block_kv, S)
    schedule = static_schedule(opts.mask, T, S, bq, bk, Hkv, max_pairs=max_pairs)
    if fits_unrolled(schedule, B, Hq, bq, bk, max_score_bytes=max_score_bytes):
      clipped = opts.replace(block_q=bq, block_kv=bk)
      return unrolled_attention_with_lse(q_BTHD, k_BSKD, v_BSKD, inputs, clipped, schedule)
  return blockwise.attention_with_lse(q_BTHD, k_BSKD, v_BSKD, inputs, opts)
