"""Blockwise (flash) attention in pure JAX: online softmax over kv blocks, empty blocks skipped.

Forward (FlashAttention-2, Dao 2023, Alg. 1): for each q block, loop over kv blocks and
keep the running row max m, the running denominator l and the unnormalized output acc
(the online softmax of Milakov & Gimelshein 2018):

  m' = max(m, rowmax(S_ij)),  P = exp(S_ij - m'),  l' = e^(m - m') l + rowsum(P),
  acc' = e^(m - m') acc + P V_j,  and at the end  O_i = acc / l,  L_i = m + log(l).

Backward (FlashAttention-2, Alg. 2): recompute P_ij = exp(S_ij - L_i) from the saved
log-sum-exp L instead of storing P, with D_i = rowsum(dO_i ∘ O_i):

  dV_j += P_ijᵀ dO_i,  dP_ij = dO_i V_jᵀ,  dS_ij = P_ij ∘ (dP_ij - D_i),
  dQ_i += scale · dS_ij K_j,  dK_j += scale · dS_ijᵀ Q_i.

The backward loops over kv blocks (outer; dK_j and dV_j are block-sized carries) and
q blocks (inner; dQ is one [T, D] fp32 accumulator), as Alg. 2 does. Residuals are q,
k, v, O and L, so forward and backward memory is O(T·D + block_q·block_kv), never
O(T·S). The cotangent of L (partial results merged by LSE, as ring attention does)
adds dL_i · P_ij to dS_ij, i.e. D_i becomes D_i - dL_i.

GQA: the G = Hq / Hkv query heads that share a kv head are folded into the rows of a
q block ([B, Hkv, block_q·G, D]), so every block product is one batched matmul and K,
V are never repeated.

Block skipping: `MaskSpec.block_map` classifies every (q block, kv block) pair; the pair
is skipped when EMPTY for every batch row, computed without the element mask when FULL
for every row, and with it otherwise. A strided mask (S2-Attention / LongGen, per kv
head: `MaskSpec.per_head`) is classified per kv head and aggregated over the heads as
well, since one block product covers all of them: the twin only skips blocks that no
head sees (the Pallas kernels skip per head), and its element mask is per kv head.
Each pair is one `lax.switch` inside a `lax.fori_loop` (never vmapped, so the skip is
a real conditional, not a select).
A query row with no visible key has l = 0: it outputs 0, its L is -inf and its
gradients are 0.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from lcjax.attention.inputs import (
  AttentionOptions,
  MaskInputs,
  attention_entry,
  backward_entry,
  check_qkv,
)
from lcjax.attention.masks import EMPTY, FULL, MaskSpec

__all__ = [
  "attention_with_lse",
  "backward",
  "block_kinds",
  "blockwise_attention",
  "blockwise_attention_stats",
  "blockwise_attention_with_lse",
  "blockwise_bwd",
  "blockwise_fwd",
  "forward",
  "online_softmax_result",
  "online_softmax_step",
  "stats",
  "visited_block_pairs",
]

# Branches of the per-block switch (the values coincide with EMPTY/PARTIAL/FULL).
SKIP, MASKED, UNMASKED = 0, 1, 2


class _Static(NamedTuple):
  mask: MaskSpec
  scale: float
  block_q: int
  block_kv: int


def block_kinds(block_map_BQK: jax.Array) -> jax.Array:
  """Per-pair branch int32 [nQ, nK] for a whole batch: SKIP, MASKED or UNMASKED.

  Takes a block map [B, nQ, nK] or, for a per-head mask, [B, Hkv, nQ, nK]. A pair is
  skipped only if EMPTY in every batch row (and kv head) and runs unmasked only if FULL
  in every one (a row mixing FULL and EMPTY still needs the element mask).
  """
  leading = tuple(range(block_map_BQK.ndim - 2))
  visit_QK = (block_map_BQK != EMPTY).any(leading)
  full_QK = (block_map_BQK == FULL).all(leading)
  return jnp.where(visit_QK, jnp.where(full_QK, UNMASKED, MASKED), SKIP).astype(jnp.int32)


def visited_block_pairs(block_map_BQK: jax.Array) -> jax.Array:
  """How many (q block, kv block) pairs the blockwise loop computes for this block map."""
  return (block_kinds(block_map_BQK) != SKIP).sum()


def _rows(x, start, size, axis):
  """x[..., start:start+size, ...] along `axis` for a traced start."""
  return lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def _block_scores(st, masked, G, q_BKRD, k_BKSD, q_pos_BQ, k_pos_BS, q_seg_BQ, k_seg_BS, valid_BS):
  """Scaled fp32 scores s[b, kv head, row, key] of one block, -inf where masked.

  The G query heads that share a kv head are folded into the rows (r = q·G + g), so
  every product is one batched matmul over (batch, kv head) and K, V are never repeated.
  A per-head (strided) mask is evaluated per kv head and shared by its G query heads.
  """
  s_BKRS = jnp.einsum("bkrd,bksd->bkrs", q_BKRD, k_BKSD, preferred_element_type=jnp.float32)
  s_BKRS = s_BKRS * st.scale
  if masked:
    B, K, _, bk = s_BKRS.shape
    bq = q_pos_BQ.shape[1]
    if st.mask.per_head:  # ids [B, 1, Q, 1] against [B, 1, 1, S] and kv heads [K, 1, 1]
      q_pos_BQ, k_pos_BS, valid_BS = q_pos_BQ[:, None], k_pos_BS[:, None], valid_BS[:, None]
      if q_seg_BQ is not None:
        q_seg_BQ, k_seg_BS = q_seg_BQ[:, None], k_seg_BS[:, None]
    if q_seg_BQ is not None:
      q_seg_BQ, k_seg_BS = q_seg_BQ[..., :, None], k_seg_BS[..., None, :]
    kv_head = jnp.arange(K, dtype=jnp.int32)[:, None, None] if st.mask.per_head else None
    allowed = st.mask.allowed(
      q_pos_BQ[..., :, None],
      k_pos_BS[..., None, :],
      q_seg_BQ,
      k_seg_BS,
      kv_head=kv_head,
      num_kv_heads=K,
    )
    allowed = allowed & valid_BS[..., None, :]  # [B, Q, S], or [B, K, Q, S] per head
    allowed_BKQS = allowed if st.mask.per_head else allowed[:, None]
    allowed_BKRS = jnp.broadcast_to(
      allowed_BKQS[:, :, :, None], (B, allowed_BKQS.shape[1], bq, G, bk)
    ).reshape(B, -1, bq * G, bk)
    s_BKRS = jnp.where(allowed_BKRS, s_BKRS, -jnp.inf)
  return s_BKRS


def online_softmax_step(m_BKR, l_BKR, acc_BKRD, s_BKRS, v_BKSD):
  """One kv block of the online softmax (FlashAttention-2 Alg. 1, lines 8-10): the new
  running max m', denominator l' and unnormalized output acc' of each row, given the
  block's float32 scores s (-inf where masked) and values v."""
  m_new = jnp.maximum(m_BKR, s_BKRS.max(-1))
  # While a row has seen no visible key its max is -inf; shift by 0 so exp gives 0.
  m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
  p_BKRS = jnp.exp(s_BKRS - m_safe[..., None])
  alpha_BKR = jnp.exp(m_BKR - m_safe)
  pv_BKRD = jnp.einsum("bkrs,bksd->bkrd", p_BKRS, v_BKSD, preferred_element_type=jnp.float32)
  return m_new, alpha_BKR * l_BKR + p_BKRS.sum(-1), alpha_BKR[..., None] * acc_BKRD + pv_BKRD


def online_softmax_result(m_BKR, l_BKR, acc_BKRD):
  """(O = acc / l, L = m + log l) of finished rows; rows that saw no key give 0 and -inf."""
  nonempty = l_BKR > 0
  l_safe = jnp.where(nonempty, l_BKR, 1.0)
  lse_BKR = jnp.where(nonempty, m_BKR + jnp.log(l_safe), -jnp.inf)
  return acc_BKRD / l_safe[..., None], lse_BKR


def _forward(st, q_BKTGD, k_BKSD, v_BKSD, ids: MaskInputs, valid_BS, kinds_QK):
  """FlashAttention-2 Alg. 1 on padded inputs: (out fp32 [B,K,T,G,D], lse [B,K,T,G], visits).

  `ids` are the resolved, padded mask inputs; `valid_BS` marks real keys and `kinds_QK`
  says which block pairs to skip, mask or compute unmasked (`block_kinds`).
  """
  q_pos_BT, k_pos_BS, q_seg_BT, k_seg_BS = ids
  B, K, Tp, G, D = q_BKTGD.shape
  bq, bk = st.block_q, st.block_kv
  nQ, nK = Tp // bq, k_BKSD.shape[2] // bk
  R = bq * G  # rows of a q block once the query heads of a kv head are folded in

  def q_step(i, carry):
    out_BKTGD, lse_BKTG, visits = carry
    q_BKRD = _rows(q_BKTGD, i * bq, bq, 2).reshape(B, K, R, D)
    q_pos_BQ = _rows(q_pos_BT, i * bq, bq, 1)
    q_seg_BQ = None if q_seg_BT is None else _rows(q_seg_BT, i * bq, bq, 1)

    def visit(masked):
      def compute(j, carry):
        m_BKR, l_BKR, acc_BKRD, n = carry
        s_BKRS = _block_scores(
          st,
          masked,
          G,
          q_BKRD,
          _rows(k_BKSD, j * bk, bk, 2),
          q_pos_BQ,
          _rows(k_pos_BS, j * bk, bk, 1),
          q_seg_BQ,
          None if k_seg_BS is None else _rows(k_seg_BS, j * bk, bk, 1),
          _rows(valid_BS, j * bk, bk, 1),
        )
        v_BKSD_j = _rows(v_BKSD, j * bk, bk, 2)
        return (*online_softmax_step(m_BKR, l_BKR, acc_BKRD, s_BKRS, v_BKSD_j), n + 1)

      return compute

    def kv_step(j, carry):
      return lax.switch(kinds_QK[i, j], [lambda j, c: c, visit(True), visit(False)], j, carry)

    init = (
      jnp.full((B, K, R), -jnp.inf, jnp.float32),
      jnp.zeros((B, K, R), jnp.float32),
      jnp.zeros((B, K, R, D), jnp.float32),
      visits,
    )
    m_BKR, l_BKR, acc_BKRD, visits = lax.fori_loop(0, nK, kv_step, init)
    out_BKRD, lse_BKR = online_softmax_result(m_BKR, l_BKR, acc_BKRD)
    out_BKQGD, lse_BKQG = out_BKRD.reshape(B, K, bq, G, D), lse_BKR.reshape(B, K, bq, G)
    out_BKTGD = lax.dynamic_update_slice_in_dim(out_BKTGD, out_BKQGD, i * bq, axis=2)
    lse_BKTG = lax.dynamic_update_slice_in_dim(lse_BKTG, lse_BKQG, i * bq, axis=2)
    return out_BKTGD, lse_BKTG, visits

  init = (
    jnp.zeros((B, K, Tp, G, D), jnp.float32),
    jnp.zeros((B, K, Tp, G), jnp.float32),
    jnp.int32(0),
  )
  return lax.fori_loop(0, nQ, q_step, init)


def _backward(st, res, cotangents, keep_fp32=False):
  """FlashAttention-2 Alg. 2: (dq, dk, dv) recomputing P from the saved lse, block by block.

  The gradients come back in the input dtypes, or in float32 with `keep_fp32` (for
  callers that accumulate them over several calls, as ring attention does).
  """
  q_BKTGD, k_BKSD, v_BKSD, ids, valid_BS, kinds_QK, out_BKTGD, lse_BKTG = res
  q_pos_BT, k_pos_BS, q_seg_BT, k_seg_BS = ids
  dout_BKTGD, dlse_BKTG = cotangents
  B, K, Tp, G, D = q_BKTGD.shape
  bq, bk = st.block_q, st.block_kv
  nQ, nK = Tp // bq, k_BKSD.shape[2] // bk
  R = bq * G
  # D_i = rowsum(dO_i ∘ O_i), minus the lse cotangent (d lse_i / d S_ij = P_ij).
  delta_BKTG = jnp.einsum("bktgd,bktgd->bktg", dout_BKTGD.astype(jnp.float32), out_BKTGD)
  delta_BKTG = delta_BKTG - dlse_BKTG
  # Rows with no visible key have lse = -inf; +inf makes their P = exp(S - inf) = 0.
  lse_BKTG = jnp.where(lse_BKTG == -jnp.inf, jnp.inf, lse_BKTG)

  def kv_step(j, carry):
    dq_BKTGD, dk_BKSD, dv_BKSD = carry
    k_BKSD_j, v_BKSD_j = _rows(k_BKSD, j * bk, bk, 2), _rows(v_BKSD, j * bk, bk, 2)
    k_pos_BS_j, valid_BS_j = _rows(k_pos_BS, j * bk, bk, 1), _rows(valid_BS, j * bk, bk, 1)
    k_seg_BS_j = None if k_seg_BS is None else _rows(k_seg_BS, j * bk, bk, 1)

    def visit(masked):
      def compute(i, carry):
        dk_BKSD_j, dv_BKSD_j, dq_BKTGD = carry
        q_BKRD = _rows(q_BKTGD, i * bq, bq, 2).reshape(B, K, R, D)
        do_BKRD = _rows(dout_BKTGD, i * bq, bq, 2).reshape(B, K, R, D).astype(jnp.float32)
        lse_BKR = _rows(lse_BKTG, i * bq, bq, 2).reshape(B, K, R)
        delta_BKR = _rows(delta_BKTG, i * bq, bq, 2).reshape(B, K, R)
        s_BKRS = _block_scores(
          st,
          masked,
          G,
          q_BKRD,
          k_BKSD_j,
          _rows(q_pos_BT, i * bq, bq, 1),
          k_pos_BS_j,
          None if q_seg_BT is None else _rows(q_seg_BT, i * bq, bq, 1),
          k_seg_BS_j,
          valid_BS_j,
        )
        p_BKRS = jnp.exp(s_BKRS - lse_BKR[..., None])  # P_ij = exp(S_ij - L_i)
        dv_BKSD_j = dv_BKSD_j + jnp.einsum("bkrs,bkrd->bksd", p_BKRS, do_BKRD)
        dp_BKRS = jnp.einsum(
          "bkrd,bksd->bkrs", do_BKRD, v_BKSD_j, preferred_element_type=jnp.float32
        )
        ds_BKRS = p_BKRS * (dp_BKRS - delta_BKR[..., None])
        dk_BKSD_j = dk_BKSD_j + st.scale * jnp.einsum(
          "bkrs,bkrd->bksd", ds_BKRS, q_BKRD, preferred_element_type=jnp.float32
        )
        dq_BKRD = st.scale * jnp.einsum(
          "bkrs,bksd->bkrd", ds_BKRS, k_BKSD_j, preferred_element_type=jnp.float32
        )
        dq_BKTGD = lax.dynamic_update_slice_in_dim(
          dq_BKTGD,
          _rows(dq_BKTGD, i * bq, bq, 2) + dq_BKRD.reshape(B, K, bq, G, D),
          i * bq,
          axis=2,
        )
        return dk_BKSD_j, dv_BKSD_j, dq_BKTGD

      return compute

    def q_step(i, carry):
      return lax.switch(kinds_QK[i, j], [lambda i, c: c, visit(True), visit(False)], i, carry)

    zeros_BKSD = jnp.zeros((B, K, bk, D), jnp.float32)
    dk_BKSD_j, dv_BKSD_j, dq_BKTGD = lax.fori_loop(
      0, nQ, q_step, (zeros_BKSD, zeros_BKSD, dq_BKTGD)
    )
    dk_BKSD = lax.dynamic_update_slice_in_dim(dk_BKSD, dk_BKSD_j, j * bk, axis=2)
    dv_BKSD = lax.dynamic_update_slice_in_dim(dv_BKSD, dv_BKSD_j, j * bk, axis=2)
    return dq_BKTGD, dk_BKSD, dv_BKSD

  init = (
    jnp.zeros(q_BKTGD.shape, jnp.float32),
    jnp.zeros(k_BKSD.shape, jnp.float32),
    jnp.zeros(v_BKSD.shape, jnp.float32),
  )
  dq_BKTGD, dk_BKSD, dv_BKSD = lax.fori_loop(0, nK, kv_step, init)
  if keep_fp32:
    return dq_BKTGD, dk_BKSD, dv_BKSD
  return dq_BKTGD.astype(q_BKTGD.dtype), dk_BKSD.astype(k_BKSD.dtype), dv_BKSD.astype(v_BKSD.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st, q, k, v, ids, valid, kinds):
  out_BKTGD, lse_BKTG, _ = _forward(st, q, k, v, ids, valid, kinds)
  return out_BKTGD.astype(q.dtype), lse_BKTG


def _flash_fwd(st, q, k, v, ids, valid, kinds):
  out_BKTGD, lse_BKTG, _ = _forward(st, q, k, v, ids, valid, kinds)
  # Residuals are O(T): the inputs, the fp32 output and the lse; never the probabilities.
  res = (q, k, v, ids, valid, kinds, out_BKTGD, lse_BKTG)
  return (out_BKTGD.astype(q.dtype), lse_BKTG), res


def _flash_bwd(st, res, cotangents):
  dq, dk, dv = _backward(st, res, cotangents)
  return dq, dk, dv, None, None, None  # mask inputs, valid keys and kinds are integers


_flash.defvjp(_flash_fwd, _flash_bwd)


def _prepare(q_BTHD, k_BSKD, v_BSKD, inputs: MaskInputs, opts: AttentionOptions):
  """Fills defaults, pads T and S to block multiples and builds the block kinds."""
  G = check_qkv(q_BTHD, k_BSKD, v_BSKD)
  B, T, _, D = q_BTHD.shape
  S, Hkv = k_BSKD.shape[1], k_BSKD.shape[2]
  mask = opts.mask
  bq, bk = min(opts.block_q, T), min(opts.block_kv, S)
  Tp, Sp = -(-T // bq) * bq, -(-S // bk) * bk
  q_pos, k_pos, q_seg, k_seg = inputs.resolve(mask, B, T, S)

  def pad(x, n, mode="constant"):
    return jnp.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2), mode=mode)

  # Padded queries repeat the last position and segment (their rows are dropped);
  # padded keys are marked invalid, so no query ever sees them.
  q_pos, q_seg = pad(q_pos, Tp, "edge"), None if q_seg is None else pad(q_seg, Tp, "edge")
  k_pos, k_seg = pad(k_pos, Sp, "edge"), None if k_seg is None else pad(k_seg, Sp, "edge")
  valid_BS = jnp.broadcast_to(jnp.arange(Sp) < S, (B, Sp))
  block_map_BQK = mask.block_map(  # [B, Hkv, nQ, nK] for a per-head mask
    q_pos, k_pos, q_seg, k_seg, block_q=bq, block_kv=bk, kv_valid=valid_BS, num_kv_heads=Hkv
  )
  st = _Static(mask, opts.score_scale(D), bq, bk)
  # Kernel layouts: kv head first, so each block product is a plain batched matmul.
  q_BKTGD = pad(q_BTHD, Tp).reshape(B, Tp, Hkv, G, D).transpose(0, 2, 1, 3, 4)
  k_BKSD, v_BKSD = (pad(x, Sp).transpose(0, 2, 1, 3) for x in (k_BSKD, v_BSKD))
  ids = MaskInputs(q_pos, k_pos, q_seg, k_seg)
  args = (q_BKTGD, k_BKSD, v_BKSD, ids, valid_BS, block_kinds(block_map_BQK))
  return st, args


def _to_rows(out_BKTGD, lse_BKTG, T):
  """Kernel layout back to (out_BTHD, lse_BHT), padding dropped."""
  B, K, _, G, D = out_BKTGD.shape
  out_BTHD = out_BKTGD[:, :, :T].transpose(0, 2, 1, 3, 4).reshape(B, T, K * G, D)
  lse_BHT = lse_BKTG[:, :, :T].transpose(0, 1, 3, 2).reshape(B, K * G, T)
  return out_BTHD, lse_BHT


@functools.partial(jax.jit, static_argnums=(4,))
def attention_with_lse(q_BTHD, k_BSKD, v_BSKD, inputs: MaskInputs, opts: AttentionOptions):
  """Flash attention: (out_BTHD in q's dtype, lse_BHT fp32, -inf for rows with no key).

  Differentiable in both outputs (a custom VJP, FlashAttention-2 Alg. 2), so partial
  results over disjoint key sets can be merged by their lse (ring attention) and
  trained through.
  """
  st, args = _prepare(q_BTHD, k_BSKD, v_BSKD, inputs, opts)
  return _to_rows(*_flash(st, *args), q_BTHD.shape[1])


@functools.partial(jax.jit, static_argnums=(4,))
def stats(q_BTHD, k_BSKD, v_BSKD, inputs: MaskInputs, opts: AttentionOptions):
  """Work done by the forward loop: {"visited": pairs it computed (counted inside the
  loop's compute branches), "total": nQ·nK}."""
  st, args = _prepare(q_BTHD, k_BSKD, v_BSKD, inputs, opts)
  _, _, visits = _forward(st, *args)
  return {"visited": visits, "total": jnp.int32(args[-1].size)}


# The forward and backward passes as separate functions, for callers that merge partial
# results themselves and need the backward against the merged output and lse: ring
# attention (Liu et al. 2023) runs `forward` per ring step, merges by lse, and in its
# backward runs `backward` per step with the global out and lse.


@functools.partial(jax.jit, static_argnums=(4,))
def forward(q_BTHD, k_BSKD, v_BSKD, inputs: MaskInputs, opts: AttentionOptions):
  """FlashAttention-2 Alg. 1 alone: (out_BTHD float32, lse_BHT float32); not differentiable.

  Rows with no visible key give out 0 and lse -inf. The output stays float32 so that
  partial results can be merged by their lse without rounding.
  """
  st, args = _prepare(q_BTHD, k_BSKD, v_BSKD, inputs, opts)
  out_BKTGD, lse_BKTG, _ = _forward(st, *args)
  return _to_rows(out_BKTGD, lse_BKTG, q_BTHD.shape[1])


@functools.partial(jax.jit, static_argnums=(7,))
def backward(q_BTHD, k_BSKD, v_BSKD, out_BTHD, lse_BHT, dout_BTHD, inputs, opts, dlse_BHT=None):
  """FlashAttention-2 Alg. 2 alone: float32 (dq_BTHD, dk_BSKD, dv_BSKD) of these keys.

  `out_BTHD` and `lse_BHT` are the attention output and log-sum-exp of each query row,
  which may cover more keys than k and v (ring attention passes the merged, global
  ones): P = exp(S - lse) is then each key's share of the full softmax, so the returned
  dq is this key set's part of the full dq, and dk, dv are exact for these keys.
  `dlse_BHT` is the lse cotangent (default 0).
  """
  B, T, Hq, D = q_BTHD.shape
  S, Hkv = k_BSKD.shape[1], k_BSKD.shape[2]
  st, args = _prepare(q_BTHD, k_BSKD, v_BSKD, inputs, opts)
  Tp = args[0].shape[2]
  G = Hq // Hkv

  def rows_to_kernel(x_BTHD):
    x_BTHD = jnp.pad(x_BTHD.astype(jnp.float32), ((0, 0), (0, Tp - T), (0, 0), (0, 0)))
    return x_BTHD.reshape(B, Tp, Hkv, G, D).transpose(0, 2, 1, 3, 4)

  def lse_to_kernel(x_BHT, pad_value):
    x_BHT = jnp.pad(
      x_BHT.astype(jnp.float32), ((0, 0), (0, 0), (0, Tp - T)), constant_values=pad_value
    )
    return x_BHT.reshape(B, Hkv, G, Tp).transpose(0, 1, 3, 2)

  dlse_BHT = jnp.zeros((B, Hq, T), jnp.float32) if dlse_BHT is None else dlse_BHT
  # Padded query rows get lse -inf (P = 0) and a zero cotangent: they add nothing.
  res = args + (rows_to_kernel(out_BTHD), lse_to_kernel(lse_BHT, -jnp.inf))
  cotangents = (rows_to_kernel(dout_BTHD), lse_to_kernel(dlse_BHT, 0.0))
  dq_BKTGD, dk_BKSD, dv_BKSD = _backward(st, res, cotangents, keep_fp32=True)
  dq_BTHD = dq_BKTGD[:, :, :T].transpose(0, 2, 1, 3, 4).reshape(B, T, Hq, D)
  dk_BSKD = dk_BKSD[:, :, :S].transpose(0, 2, 1, 3)
  dv_BSKD = dv_BKSD[:, :, :S].transpose(0, 2, 1, 3)
  return dq_BTHD, dk_BSKD, dv_BSKD


# The public keyword entry points (the signature of `lcjax.attention.dot_product_attention`).
blockwise_attention_with_lse = attention_entry(
  attention_with_lse, name="blockwise_attention_with_lse"
)
blockwise_attention_with_lse.__doc__ = attention_with_lse.__doc__
blockwise_attention_stats = attention_entry(stats, name="blockwise_attention_stats")
blockwise_attention_stats.__doc__ = stats.__doc__
blockwise_fwd = attention_entry(forward, name="blockwise_fwd")
blockwise_fwd.__doc__ = forward.__doc__
blockwise_bwd = backward_entry(backward, name="blockwise_bwd")
blockwise_bwd.__doc__ = backward.__doc__


def blockwise_attention(q_BTHD, k_BSKD, v_BSKD, **kwargs) -> jax.Array:
  """`blockwise_attention_with_lse` without the lse: out_BTHD in q's dtype."""
  return blockwise_attention_with_lse(q_BTHD, k_BSKD, v_BSKD, **kwargs)[0]
