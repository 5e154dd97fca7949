"""The bf16 RoPE study at the model level: attention rows and perplexity under a shift.

Part of the AnchorAttention §2 study (Wang et al. 2024, arXiv:2411.13476; see
`lcjax.eval.precision` for the kernel level and the whole study): a trained `DecoderLM`'s
attention probabilities per layer recomputed from its own q/k projections and RoPE
(`attention_probs`), their change when every position shifts by Δ (`model_shift_study`),
and the loss under the same shift (`shift_perplexity`), for lcjax's fp32 and bf16 models
and for fp32 with HF's RoPE angles (`MODEL_VARIANTS`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lcjax.attention import MaskSpec
from lcjax.models.transformer import layer_rope
from lcjax.positional.rope import apply_rope, compute_inv_freq, rope_cos_sin

__all__ = ["MODEL_VARIANTS", "attention_probs", "model_shift_study", "shift_perplexity"]

_HIGHEST = jax.lax.Precision.HIGHEST


def attention_probs(
  model,
  tokens_BT: jax.Array,
  positions_BT: jax.Array,
  *,
  rows_R: jax.Array | None = None,
  segment_ids_BT: jax.Array | None = None,
  rope=None,
) -> list[jax.Array | None]:
  """Per layer, the attention probabilities [B, H, R, T] float32 of a `DecoderLM`'s forward.

  Each layer's q and k are recomputed from its own modules exactly as
  `lcjax.models.transformer.Attention` computes them (q_proj/k_proj in the model's dtype,
  `apply_rope` with the model's `rope_tables`, the eabf query scale when the layer applies
  it); the scores are q·k / sqrt(head_dim) in fp32 at HIGHEST precision (as the reference
  attention), masked as the layer masks them (causal, document with `segment_ids_BT`, the
  anchor with `model.anchor`, the layer type's window/sinks). The hidden states advance
  through the layers themselves, so the next layer's input is the model's own. Only the
  query rows `rows_R` (default all) are returned; mamba2 layers give None. `rope` replaces
  the model's RoPE tables (`RopeTables`), e.g. with exactly computed angles.
  """
  B, T = tokens_BT.shape
  if rope is None:
    rope = model.rope_tables(positions_BT)
  index_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  rows_R = jnp.arange(T, dtype=jnp.int32) if rows_R is None else jnp.asarray(rows_R, jnp.int32)
  rows_BR = jnp.broadcast_to(rows_R, (B, rows_R.shape[0]))
  x_BTD = model.embed_tokens(tokens_BT)
  probs = []
  for i in range(len(model.layer_kinds)):
    layer = model.layer(i)
    rope_i = layer_rope(rope, model._layer_scaled(i))
    if layer.self_attn is None:
      probs.append(None)
    else:
      mask = MaskSpec(
        causal=True,
        document=segment_ids_BT is not None,
        anchor=model.anchor,
        **dict(layer.mask_fields),
      )
      seg_BR = None if segment_ids_BT is None else jnp.take_along_axis(segment_ids_BT, rows_BR, 1)
      h_BTD = layer.input_layernorm(x_BTD)
      probs.append(
        _layer_probs(
          layer.self_attn, h_BTD, rope_i, mask, rows_BR, index_BT, seg_BR, segment_ids_BT
        )
      )
    x_BTD = layer(
      x_BTD,
      rope_i,
      anchor=model.anchor,
      segment_ids_BT=segment_ids_BT,
      q_index_BT=None,
      cache=None,
      cache_index=0,
    )[0]
  return probs


def _layer_probs(attn, h_BTD, rope, mask, rows_BR, index_BT, seg_BR, seg_BT):
  """Probabilities [B, H, R, T] of one `Attention` module on its normed input `h_BTD`."""
  B, T, _ = h_BTD.shape
  H, K, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
  q_BTHD = apply_rope(attn.q_proj(h_BTD).reshape(B, T, H, D), rope.cos_BTK, rope.sin_BTK)
  k_BTKD = apply_rope(attn.k_proj(h_BTD).reshape(B, T, K, D), rope.cos_BTK, rope.sin_BTK)
  if rope.q_scale_BT is not None:
    q_BTHD = (q_BTHD * rope.q_scale_BT[:, :, None, None]).astype(q_BTHD.dtype)
  q_BRHD = jnp.take_along_axis(q_BTHD, rows_BR[:, :, None, None], axis=1)
  q_BRKGD = q_BRHD.astype(jnp.float32).reshape(B, -1, K, H // K, D)
  s_BKGRT = jnp.einsum(
    "brkgd,btkd->bkgrt", q_BRKGD, k_BTKD.astype(jnp.float32), precision=_HIGHEST
  ) / math.sqrt(D)
  allowed = mask.dense(rows_BR, index_BT, seg_BR, seg_BT, num_kv_heads=K)
  allowed = allowed[:, :, None] if mask.per_head else allowed[:, None, None]
  p_BKGRT = jax.nn.softmax(jnp.where(allowed, s_BKGRT, -jnp.inf), axis=-1)
  return p_BKGRT.reshape(B, H, -1, T)


def _context_rows(length: int, contexts: Sequence[int], per_context: int):
  """Query rows for each context c: `per_context` rows spread over [c/2, c) (c/2 >= 1)."""
  rows, window = [], []
  for w, c in enumerate(contexts):
    if not 2 <= c <= length:
      raise ValueError(f"contexts must lie in [2, length={length}], got {list(contexts)}")
    picked = np.unique(np.linspace(c // 2, c - 1, per_context).round().astype(np.int64))
    rows.append(picked)
    window.append(np.full(picked.shape, w))
  return np.concatenate(rows), np.concatenate(window)


def _shifted(length: int, delta: int, scheme: str) -> np.ndarray:
  """Positions [1, T]: arange(T) + Δ; under `anchor` the first (anchor) token stays at 0."""
  positions_1T = (np.arange(length, dtype=np.int64) + delta)[None]
  if scheme == "anchor":
    positions_1T[:, 0] = 0
  if positions_1T.max() >= 2**31:
    raise ValueError(f"shift {delta} puts positions past int32; use shifts below 2^31 - {length}")
  return positions_1T.astype(np.int32)


# Model variants of the model-level study: (model dtype, exact RoPE angles). fp32 and bf16
# are lcjax's models as they run; fp32_hf_angles forms the angles as HF does (one fp32 product).
MODEL_VARIANTS = {
  "fp32": ("float32", True),
  "bf16": ("bfloat16", True),
  "fp32_hf_angles": ("float32", False),
}


def _variant_rope(model, variant: str, positions_BT: np.ndarray):
  """The model's RoPE tables at `positions_BT` with the angles of `variant` (MODEL_VARIANTS)."""
  rope = model.rope_tables(jnp.asarray(positions_BT))  # eager: one compile for all tables
  if MODEL_VARIANTS[variant][1]:
    return rope
  seq_len = int(positions_BT.max()) + 1
  inv_freq_K, factor = compute_inv_freq(model.rope_parameters, model.head_dim, seq_len=seq_len)
  cos_BTK, sin_BTK = rope_cos_sin(inv_freq_K, factor, jnp.asarray(positions_BT), exact_angles=False)
  return rope._replace(cos_BTK=cos_BTK, sin_BTK=sin_BTK)


def model_shift_study(
  make_model,
  tokens_T: np.ndarray,
  *,
  deltas: Sequence[int] = (1, 256, 4096, 65536),
  contexts: Sequence[int] = (256, 512, 1024, 2048, 4096),
  rows_per_context: int = 32,
  schemes: Sequence[str] = ("global", "anchor"),
  variants: Sequence[str] = ("fp32", "bf16", "fp32_hf_angles"),
) -> dict[str, Any]:
  """Per layer, the L1 change of a model's attention rows when positions shift by Δ.

  `make_model(dtype)` returns the `DecoderLM` to measure in `dtype` ("float32" or
  "bfloat16"). Positions are arange(T) + Δ over the T tokens of `tokens_T` (`global`), or
  the same with the first token held at position 0 (`anchor`: AnchorAttention's shared
  anchor, haonan3/AnchorContext `train.py`, whose FlexAttention path keeps global positions).
  On one document the anchor mask (`MaskSpec(anchor=True)`: key 0 visible to every query)
  equals the causal mask, so both schemes run the same model. For each context c in
  `contexts`, `rows_per_context` query rows in [c/2, c) stand for a context of about c
  tokens (a causal row sees only its prefix). Per scheme, variant (`MODEL_VARIANTS`), Δ,
  layer and context: the mean over heads and rows of Σ_t |A_Δ - A_0| (`l1`), the same over
  columns t >= 1 (`l1_nofirst`), and for bf16 the L1 distance from fp32 at the same Δ
  (`l1_vs_fp32`); per layer and context the first column's mass at Δ = 0 (`first_mass`).
  Variant `fp32_hf_angles` feeds the fp32 model RoPE tables whose angles are HF's one fp32
  product, to measure what that rounding costs against lcjax's exact angles.
  """
  length = int(np.asarray(tokens_T).shape[0])
  for v in variants:
    if v not in MODEL_VARIANTS:
      raise ValueError(f"variant {v!r} is unknown; choose from {', '.join(MODEL_VARIANTS)}")
  for s in schemes:
    if s not in ("global", "anchor"):
      raise ValueError(f"scheme {s!r} is unknown; choose global or anchor")
  if any(int(d) <= 0 for d in deltas):
    raise ValueError(f"deltas must be shifts > 0 (Δ = 0 is the reference), got {list(deltas)}")
  rows_R, window_R = _context_rows(length, contexts, rows_per_context)
  tokens_1T = jnp.asarray(np.asarray(tokens_T, np.int32)[None])
  models = {dtype: make_model(dtype) for dtype in {MODEL_VARIANTS[v][0] for v in variants}}

  @nnx.jit
  def probs_fn(model, positions_1T, rope):
    return attention_probs(model, tokens_1T, positions_1T, rows_R=jnp.asarray(rows_R), rope=rope)

  def run(variant, positions_1T):
    model = models[MODEL_VARIANTS[variant][0]]
    rope = _variant_rope(model, variant, positions_1T)
    probs = probs_fn(model, jnp.asarray(positions_1T), rope)
    return [np.asarray(p[0]) for p in probs if p is not None]  # [H, R, T] per attention layer

  def per_window(x_LR: np.ndarray) -> list[list[float]]:
    """[layer][context] means of per-row values."""
    return [[float(x_R[window_R == w].mean()) for w in range(len(contexts))] for x_R in x_LR]

  results: dict[str, Any] = {}
  for scheme in schemes:
    names = [v for v in variants if scheme == "global" or MODEL_VARIANTS[v][1]]
    base = {v: run(v, _shifted(length, 0, scheme)) for v in names}
    for v in names:
      first = np.stack([p[:, :, 0].mean(0) for p in base[v]])
      results[f"{scheme}/{v}"] = {"first_mass": per_window(first), "l1": [], "l1_nofirst": []}
    compare = "bf16" in names and "fp32" in names
    if compare:
      results[f"{scheme}/bf16"]["l1_vs_fp32"] = []
    for delta in deltas:
      shifted = {v: run(v, _shifted(length, delta, scheme)) for v in names}
      for v in names:
        diff = [np.abs(a - b) for a, b in zip(shifted[v], base[v], strict=True)]
        entry = results[f"{scheme}/{v}"]
        entry["l1"].append(per_window(np.stack([d.sum(-1).mean(0) for d in diff])))
        entry["l1_nofirst"].append(per_window(np.stack([d[..., 1:].sum(-1).mean(0) for d in diff])))
      if compare:
        pairs = zip(shifted["bf16"], shifted["fp32"], strict=True)
        gap = np.stack([np.abs(a - b).sum(-1).mean(0) for a, b in pairs])
        results[f"{scheme}/bf16"]["l1_vs_fp32"].append(per_window(gap))
  return dict(
    length=length,
    deltas=[int(d) for d in deltas],
    contexts=[int(c) for c in contexts],
    rows_per_context=rows_per_context,
    layers=len(next(iter(results.values()))["first_mass"]),
    results=results,
  )


def shift_perplexity(
  make_model,
  tokens_T: np.ndarray,
  *,
  window: int,
  deltas: Sequence[int],
  variants: Sequence[str] = ("fp32", "bf16", "fp32_hf_angles"),
) -> dict[str, Any]:
  """Perplexity of `tokens_T` in windows of `window` tokens at positions arange(window) + Δ.

  Does the angle error matter for the loss? RoPE makes an exact model's perplexity the same at
  every Δ; what changes it is arithmetic. Per variant (`MODEL_VARIANTS`) and Δ (0 first),
  the mean next-token NLL over the `len(tokens_T) // window` windows, and its exp. The
  windows are rows of one batch; `make_model(dtype)` as in `model_shift_study`.
  """
  rows = len(tokens_T) // window
  if rows < 1 or window < 2:
    raise ValueError(f"window must be in [2, {len(tokens_T)}] tokens, got {window}")
  for v in variants:
    if v not in MODEL_VARIANTS:
      raise ValueError(f"variant {v!r} is unknown; choose from {', '.join(MODEL_VARIANTS)}")
  tokens_BW = jnp.asarray(np.asarray(tokens_T[: rows * window], np.int32).reshape(rows, window))
  models = {dtype: make_model(dtype) for dtype in {MODEL_VARIANTS[v][0] for v in variants}}

  @nnx.jit
  def mean_nll(model, positions_BL, rope):
    h_BLD, _ = model.hidden_states(tokens_BW[:, :-1], positions=positions_BL, rope=rope)
    logits_BLV = model.logits(h_BLD).astype(jnp.float32)
    picked_BL = jnp.take_along_axis(logits_BLV, tokens_BW[:, 1:, None], axis=-1)[..., 0]
    return jnp.mean(jax.nn.logsumexp(logits_BLV, axis=-1) - picked_BL)

  all_deltas = [0, *(int(d) for d in deltas if int(d) != 0)]
  nll = {v: [] for v in variants}
  for delta in all_deltas:
    positions_BL = np.broadcast_to(_shifted(window - 1, delta, "global"), (rows, window - 1))
    for v in variants:
      model = models[MODEL_VARIANTS[v][0]]
      rope = _variant_rope(model, v, positions_BL)
      nll[v].append(float(mean_nll(model, jnp.asarray(positions_BL), rope)))
  return dict(
    window=window,
    windows=rows,
    deltas=all_deltas,
    nll=nll,
    ppl={v: [math.exp(x) for x in values] for v, values in nll.items()},
  )
