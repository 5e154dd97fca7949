"""Reference attention: materialized [B, H, T, S] scores; the oracle for every fast path.

Short on purpose: it builds the dense mask with `MaskSpec.dense`, computes all scores
in float32 and takes a masked softmax. Memory is O(B·H·T·S), so it is only for tests
and small inputs. `reference_bwd` is the FlashAttention-2 backward (Dao 2023, Alg. 2)
written densely, against a given output and log-sum-exp, so the reference also serves
as a ring-attention step routine (`lcjax.attention.registry`), where the softmax
statistics cover more keys than the step's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lcjax.attention.inputs import (
  AttentionOptions,
  MaskInputs,
  attention_entry,
  check_qkv,
)

__all__ = [
  "reference_attention",
  "reference_attention_with_lse",
  "reference_bwd",
  "reference_fwd",
  "reference_with_lse",
]


def _scores(q_BTHD, k_BSKD, inputs: MaskInputs, opts: AttentionOptions):
  """Scaled fp32 scores s[b, kv head, g, t, s], -inf where the mask hides a pair.

  GQA: query head h reads kv head h // G (Hugging Face `repeat_kv` order), and so does a
  per-head (strided) mask: query head h uses kv head h // G's pattern.
  """
  B, T, Hq, D = q_BTHD.shape
  S, Hkv = k_BSKD.shape[1], k_BSKD.shape[2]
  G = Hq // Hkv
  mask = opts.mask
  r = inputs.resolve(mask, B, T, S)
  # [B, T, S] shared by all heads, or [B, Hkv, T, S] per kv head (strided masks), which
  # the G query heads of each kv head share.
  allowed = mask.dense(r.q_index, r.kv_index, r.q_segment_ids, r.kv_segment_ids, num_kv_heads=Hkv)
  mask_BKGTS = allowed[:, :, None] if mask.per_head else allowed[:, None, None]
  q_BTKGD = q_BTHD.astype(jnp.float32).reshape(B, T, Hkv, G, D)
  s_BKGTS = jnp.einsum("btkgd,bskd->bkgts", q_BTKGD, k_BSKD.astype(jnp.float32))
  s_BKGTS = s_BKGTS * opts.score_scale(D)
  return jnp.where(mask_BKGTS, s_BKGTS, -jnp.inf)


def reference_fwd(q_BTHD, k_BSKD, v_BSKD, inputs: MaskInputs, opts: AttentionOptions):
  """softmax(q kᵀ · scale, masked) v: (out_BTHD float32, lse_BHT float32).

  A row with no visible key outputs 0 and has lse -inf. Differentiable by autodiff.
  """
  check_qkv(q_BTHD, k_BSKD, v_BSKD)
  B, T, Hq, D = q_BTHD.shape
  s_BKGTS = _scores(q_BTHD, k_BSKD, inputs, opts)
  # A row with no visible key has max -inf; shifting by 0 makes its weights exp(-inf) = 0.
  m_BKGT = jax.lax.stop_gradient(s_BKGTS.max(-1))
  m_BKGT = jnp.where(jnp.isfinite(m_BKGT), m_BKGT, 0.0)
  p_BKGTS = jnp.exp(s_BKGTS - m_BKGT[..., None])
  l_BKGT = p_BKGTS.sum(-1)
  o_BKGTD = jnp.einsum("bkgts,bskd->bkgtd", p_BKGTS, v_BSKD.astype(jnp.float32))
  o_BKGTD = o_BKGTD / jnp.where(l_BKGT > 0, l_BKGT, 1.0)[..., None]
  out_BTHD = o_BKGTD.transpose(0, 3, 1, 2, 4).reshape(B, T, Hq, D)
  lse_BKGT = jnp.where(l_BKGT > 0, m_BKGT + jnp.log(jnp.where(l_BKGT > 0, l_BKGT, 1.0)), -jnp.inf)
  return out_BTHD, lse_BKGT.reshape(B, Hq, T)


def reference_with_lse(q_BTHD, k_BSKD, v_BSKD, inputs: MaskInputs, opts: AttentionOptions):
  """`reference_fwd` with the output in q's dtype: the registry's differentiable call."""
  out_BTHD, lse_BHT = reference_fwd(q_BTHD, k_BSKD, v_BSKD, inputs, opts)
  return out_BTHD.astype(q_BTHD.dtype), lse_BHT


def reference_bwd(
  q_BTHD, k_BSKD, v_BSKD, out_BTHD, lse_BHT, dout_BTHD, inputs, opts, dlse_BHT=None
):
  """FlashAttention-2 Alg. 2 on dense scores: float32 (dq_BTHD, dk_BSKD, dv_BSKD).

  `out_BTHD` and `lse_BHT` may cover more keys than k and v (a ring step): with
  P = exp(S − lse) each key's share of the full softmax and Δ = rowsum(dO ∘ O) − dlse,
  dV = Pᵀ dO, dS = P ∘ (dO Vᵀ − Δ), dQ = scale · dS K, dK = scale · dSᵀ Q.
  """
  G = check_qkv(q_BTHD, k_BSKD, v_BSKD)
  B, T, Hq, D = q_BTHD.shape
  Hkv = k_BSKD.shape[2]
  s_BKGTS = _scores(q_BTHD, k_BSKD, inputs, opts)
  as_BKGT = lambda x_BHT: x_BHT.astype(jnp.float32).reshape(B, Hkv, G, T)  # noqa: E731
  as_BKGTD = lambda x: (  # noqa: E731
    x.astype(jnp.float32).reshape(B, T, Hkv, G, D).transpose(0, 2, 3, 1, 4)
  )
  lse_BKGT = as_BKGT(lse_BHT)
  # Rows with no visible key have lse -inf: +inf makes their P = exp(S - inf) = 0.
  lse_BKGT = jnp.where(lse_BKGT == -jnp.inf, jnp.inf, lse_BKGT)
  p_BKGTS = jnp.exp(s_BKGTS - lse_BKGT[..., None])
  do_BKGTD, o_BKGTD = as_BKGTD(dout_BTHD), as_BKGTD(out_BTHD)
  delta_BKGT = jnp.sum(do_BKGTD * o_BKGTD, axis=-1)
  if dlse_BHT is not None:
    delta_BKGT = delta_BKGT - as_BKGT(dlse_BHT)
  v32_BSKD, k32_BSKD = v_BSKD.astype(jnp.float32), k_BSKD.astype(jnp.float32)
  dv_BSKD = jnp.einsum("bkgts,bkgtd->bskd", p_BKGTS, do_BKGTD)
  dp_BKGTS = jnp.einsum("bkgtd,bskd->bkgts", do_BKGTD, v32_BSKD)
  ds_BKGTS = p_BKGTS * (dp_BKGTS - delta_BKGT[..., None]) * opts.score_scale(D)
  dq_BKGTD = jnp.einsum("bkgts,bskd->bkgtd", ds_BKGTS, k32_BSKD)
  q32_BKGTD = as_BKGTD(q_BTHD)
  dk_BSKD = jnp.einsum("bkgts,bkgtd->bskd", ds_BKGTS, q32_BKGTD)
  dq_BTHD = dq_BKGTD.transpose(0, 3, 1, 2, 4).reshape(B, T, Hq, D)
  return dq_BTHD, dk_BSKD, dv_BSKD


reference_attention_with_lse = attention_entry(
  reference_with_lse, name="reference_attention_with_lse"
)
reference_attention_with_lse.__doc__ = """softmax(q kᵀ · scale, masked) v and the row log-sum-exp.

Returns (out_BTHD in q's dtype, lse_BHT float32, -inf for rows with no visible key).
Arguments are those of `lcjax.attention.dot_product_attention` (block sizes unused).
Differentiable by autodiff through the materialized scores.
"""


def reference_attention(q_BTHD, k_BSKD, v_BSKD, **kwargs) -> jax.Array:
  """`reference_attention_with_lse` without the lse: out_BTHD in q's dtype."""
  return reference_attention_with_lse(q_BTHD, k_BSKD, v_BSKD, **kwargs)[0]
