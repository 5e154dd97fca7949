"""Reference attention: materialized [B, H, T, S] scores; the oracle for every fast path.

Short on purpose: it builds the dense mask with `MaskSpec.dense`, computes all scores
in float32 and takes a masked softmax. Memory is O(B·H·T·S), so it is only for tests
and small inputs.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lcjax.attention.masks import MaskSpec, resolve_mask_inputs

__all__ = ["reference_attention", "reference_attention_with_lse", "check_qkv"]


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


def reference_attention_with_lse(
  q_BTHD: jax.Array,
  k_BSKD: jax.Array,
  v_BSKD: jax.Array,
  *,
  mask: MaskSpec,
  q_segment_ids: jax.Array | None = None,
  kv_segment_ids: jax.Array | None = None,
  q_positions: jax.Array | None = None,
  kv_positions: jax.Array | None = None,
  scale: float | None = None,
) -> tuple[jax.Array, jax.Array]:
  """softmax(q kᵀ · scale, masked) v and the row log-sum-exp lse_BHT (-inf for empty rows).

  GQA: query head h reads kv head h // (Hq // Hkv) (Hugging Face `repeat_kv` order), and
  so does a per-head (strided) mask: query head h uses kv head h // G's pattern.
  """
  G = check_qkv(q_BTHD, k_BSKD, v_BSKD)
  B, T, Hq, D = q_BTHD.shape
  S, Hkv = k_BSKD.shape[1], k_BSKD.shape[2]
  scale = 1.0 / math.sqrt(D) if scale is None else scale
  mask_inputs = resolve_mask_inputs(
    mask, B, T, S, q_positions, kv_positions, q_segment_ids, kv_segment_ids
  )
  # [B, T, S] shared by all heads, or [B, Hkv, T, S] per kv head (strided masks), which
  # the G query heads of each kv head share.
  allowed = mask.dense(*mask_inputs, num_kv_heads=Hkv)
  mask_BKGTS = allowed[:, :, None] if mask.per_head else allowed[:, None, None]
  q_BTKGD = q_BTHD.astype(jnp.float32).reshape(B, T, Hkv, G, D)
  s_BKGTS = jnp.einsum("btkgd,bskd->bkgts", q_BTKGD, k_BSKD.astype(jnp.float32)) * scale
  s_BKGTS = jnp.where(mask_BKGTS, s_BKGTS, -jnp.inf)
  # A row with no visible key has max -inf; shifting by 0 makes its weights exp(-inf) = 0.
  m_BKGT = jax.lax.stop_gradient(s_BKGTS.max(-1))
  m_BKGT = jnp.where(jnp.isfinite(m_BKGT), m_BKGT, 0.0)
  p_BKGTS = jnp.exp(s_BKGTS - m_BKGT[..., None])
  l_BKGT = p_BKGTS.sum(-1)
  o_BKGTD = jnp.einsum("bkgts,bskd->bkgtd", p_BKGTS, v_BSKD.astype(jnp.float32))
  o_BKGTD = o_BKGTD / jnp.where(l_BKGT > 0, l_BKGT, 1.0)[..., None]
  out_BTHD = o_BKGTD.transpose(0, 3, 1, 2, 4).reshape(B, T, Hq, D).astype(q_BTHD.dtype)
  lse_BKGT = jnp.where(l_BKGT > 0, m_BKGT + jnp.log(jnp.where(l_BKGT > 0, l_BKGT, 1.0)), -jnp.inf)
  return out_BTHD, lse_BKGT.reshape(B, Hq, T)


def reference_attention(q_BTHD, k_BSKD, v_BSKD, **kwargs) -> jax.Array:
  """`reference_attention_with_lse` without the lse: out_BTHD in q's dtype."""
  return reference_attention_with_lse(q_BTHD, k_BSKD, v_BSKD, **kwargs)[0]
