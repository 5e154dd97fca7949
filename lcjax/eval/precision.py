"""bf16 RoPE breakdown: does attention stay a function of relative position under a shift?

Wang et al. 2024, "When Precision Meets Position: BFloat16 Breaks Down RoPE in Long-Context
Training" (arXiv:2411.13476, TMLR 2025), §2: RoPE (Su et al. 2021, arXiv:2104.09864, eq. 16)
makes the logit of query position m and key position n depend on m - n alone, but only in
exact arithmetic. In bf16, shifting every position by Δ changes the attention, more so in
longer contexts, and mostly through the first token (the attention sink). AnchorAttention
(§3; haonan3/AnchorContext `train.py`) gives all documents one shared anchor token at
position 0. The measurement shifts all position ids by Δ and compares with Δ = 0.

- Kernel level (`kernel_shift_study`): random q, k; the mean |Δlogit| of (query, key) pairs
  under a shift, and the L1 change of softmax rows over L keys with and without a
  high-logit first key (a sink), for each rotation path of `ROTATIONS`: lcjax's fp32 path,
  fp32 with HF's angles (one rounded fp32 product), HF-style bf16 (cos/sin cast to bf16
  first, `hf_bf16_rope`) and lcjax's bf16 path (fp32 rotation, one cast at the end). Logits
  and softmax are then taken in float64 on the host, so the numbers measure the rotation only.
- Model level (`lcjax.eval.precision_model`: `attention_probs`, `model_shift_study`): a
  trained model's attention probabilities per layer, recomputed from each layer's own q/k
  projections and RoPE while the hidden states advance through the layers themselves; the
  L1 change of attention rows from Δ = 0 per layer and per context length, with and without
  the first column, in fp32 and bf16, with global positions and with the first (anchor)
  token held at 0; and the perplexity of the same file under the shift (`shift_perplexity`).
- Side finding (`angle_rounding`): HF forms the angle as one fp32 product
  `float32(pos) * inv_freq`, whose rounding step grows with the angle (2^-5 rad at angles in
  [2^18, 2^19)); lcjax did too until it counted angles in turns
  (`lcjax.positional.angles`). `fp32_hf_angles` keeps HF's product to measure what it costs.
- `bf16_rope_evaluation`: all of it for one checkpoint, as `eval/bf16_rope.json`, a figure
  and metric lines; `final_evaluations` runs it when `eval.bf16_rope.enabled`. The study is
  configs/bf16_rope.py, run by scripts/sweep.py.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.data import make_eval_documents
from lcjax.eval.io import write_json
from lcjax.eval.precision_model import (
  MODEL_VARIANTS,
  attention_probs,
  model_shift_study,
  shift_perplexity,
)
from lcjax.eval.precision_report import acceptance_checks, at_delta, format_tables, plot_bf16_rope
from lcjax.positional.rope import apply_rope, compute_inv_freq, rope_cos_sin

__all__ = [
  "MODEL_VARIANTS",
  "ROTATIONS",
  "angle_rounding",
  "attention_probs",
  "bf16_rope_evaluation",
  "format_tables",
  "hf_bf16_rope",
  "kernel_shift_study",
  "model_shift_study",
  "plot_bf16_rope",
  "rotate",
  "shift_perplexity",
]

# fp32: lcjax's rope_cos_sin (exact angles) + apply_rope on float32 q/k. fp32_hf_angles: the
# same rotation on HF's angles, one fp32 product `float32(pos) * inv_freq` (what lcjax did
# before it counted angles in turns). hf_bf16: transformers' bf16 path (HF's angles, cos/sin
# cast to bf16, bf16 ops). lcjax_bf16: apply_rope on bf16 q/k (exact angles, fp32 rotation,
# then one cast), what lcjax's models do in bf16.
ROTATIONS = ("fp32", "fp32_hf_angles", "hf_bf16", "lcjax_bf16")
_EXACT_ANGLES = {"fp32": True, "fp32_hf_angles": False, "hf_bf16": False, "lcjax_bf16": True}


def _bf16_round(x: jax.Array) -> jax.Array:
  """Rounds float32 `x` to the nearest bf16 value (ties to even), kept as float32.

  An explicit op: XLA may keep a fused chain of bf16 elementwise ops in fp32
  (`xla_allow_excess_precision`), which would hide the per-op rounding torch does.
  """
  return jax.lax.reduce_precision(x, exponent_bits=8, mantissa_bits=7)


def hf_bf16_rope(x_BTHD: jax.Array, cos_BTK: jax.Array, sin_BTK: jax.Array) -> jax.Array:
  """HF-style RoPE under bf16: returns float32 values that are all bf16 numbers.

  An independent transcription of transformers' Llama path (`models/llama/modeling_llama.py`,
  as shipped in haonan3/AnchorContext `anchor_context/library_modified_files/modified_files/
  my_modeling_llama.py`): `LlamaRotaryEmbedding.forward` forms the angles and cos/sin in fp32
  (autocast disabled, transformers PR #29285) and returns `cos.to(dtype=x.dtype)`, i.e. bf16
  (lines 164-185); `apply_rotary_pos_emb` computes `q * cos + rotate_half(q) * sin` with
  `cos = cat(cos_K, cos_K)` and `rotate_half(x) = cat(-x[D/2:], x[:D/2])` (lines 294-325), three
  bf16 ops, each rounded to bf16. `x_BTHD` is cast to bf16 first (a bf16 model's activations).
  """
  x_BTHD = x_BTHD.astype(jnp.bfloat16).astype(jnp.float32)
  half = x_BTHD.shape[-1] // 2
  cos_BT1D = _bf16_round(jnp.concatenate([cos_BTK, cos_BTK], axis=-1))[..., None, :]
  sin_BT1D = _bf16_round(jnp.concatenate([sin_BTK, sin_BTK], axis=-1))[..., None, :]
  rotated_BTHD = jnp.concatenate([-x_BTHD[..., half:], x_BTHD[..., :half]], axis=-1)
  return _bf16_round(_bf16_round(x_BTHD * cos_BT1D) + _bf16_round(rotated_BTHD * sin_BT1D))


def rotate(x_ND: Any, positions_N: Any, path: str, inv_freq_K: Any) -> jax.Array:
  """Rotates vectors `x_ND` at `positions_N` by the rotation path `path` (see `ROTATIONS`).

  Returns float32 [N, D]; for the bf16 paths every value is a bf16 number. The cos/sin tables
  are formed eagerly (exact angles need `inv_freq_K` on the host), the rotation compiled.
  """
  if path not in ROTATIONS:
    raise ValueError(f"rotation path {path!r} is unknown; choose one of {', '.join(ROTATIONS)}")
  positions_1N = jnp.asarray(np.asarray(positions_N)[None], jnp.int32)
  cos_1NK, sin_1NK = rope_cos_sin(
    np.asarray(inv_freq_K, np.float32), 1.0, positions_1N, exact_angles=_EXACT_ANGLES[path]
  )
  return _rotate_jit(jnp.asarray(x_ND, jnp.float32), cos_1NK, sin_1NK, path)


@jax.jit(static_argnames="path")
def _rotate_jit(x_ND, cos_1NK, sin_1NK, path):
  x_1N1D = x_ND[None, :, None, :]
  if path == "hf_bf16":
    out_1N1D = hf_bf16_rope(x_1N1D, cos_1NK, sin_1NK)
  elif path == "lcjax_bf16":
    out_1N1D = apply_rope(x_1N1D.astype(jnp.bfloat16), cos_1NK, sin_1NK)
  else:
    out_1N1D = apply_rope(x_1N1D, cos_1NK, sin_1NK)
  return out_1N1D[0, :, 0].astype(jnp.float32)


def _rotate64(x_ND: np.ndarray, positions_N: np.ndarray, inv_freq_K: np.ndarray) -> np.ndarray:
  """Exact (float64) half-split RoPE, to build sink keys with a known logit."""
  angles_NK = positions_N[:, None].astype(np.float64) * inv_freq_K
  cos_NK, sin_NK = np.cos(angles_NK), np.sin(angles_NK)
  half = x_ND.shape[-1] // 2
  x1, x2 = x_ND[:, :half], x_ND[:, half:]
  return np.concatenate([x1 * cos_NK - x2 * sin_NK, x2 * cos_NK + x1 * sin_NK], axis=-1)


def _kernel_scores(path, delta, keys_LD, q_RD, q_pos_R, sink_RD, inv_freq_K):
  """Logits [R, L] (float64) of queries at q_pos_R + Δ over keys at arange(L) + Δ, and [R]
  the logit of each row's sink key `sink_RD[r]` at position Δ (instead of keys_LD[0])."""
  R, L = q_RD.shape[0], keys_LD.shape[0]
  scale = 1.0 / math.sqrt(q_RD.shape[-1])
  positions = np.concatenate([q_pos_R, np.arange(L), np.zeros(R, np.int64)]) + delta
  rotated = rotate(np.concatenate([q_RD, keys_LD, sink_RD]), positions, path, inv_freq_K)
  q_RD, k_LD, first_RD = np.split(np.asarray(rotated, np.float64), [R, R + L])
  sink_R = np.einsum("rd,rd->r", q_RD, first_RD) * scale
  return q_RD @ k_LD.T * scale, sink_R


def _softmax64(s_RL: np.ndarray) -> np.ndarray:
  p_RL = np.exp(s_RL - s_RL.max(axis=-1, keepdims=True))
  return p_RL / p_RL.sum(axis=-1, keepdims=True)


def kernel_shift_study(
  *,
  head_dim: int = 128,
  rope_theta: float = 10000.0,
  logit_deltas: Sequence[int] = (1, 16, 256, 4096, 65536, 524288),
  logit_pairs: int = 4096,
  max_distance: int = 2048,
  lengths: Sequence[int] = (1024, 8192, 32768),
  softmax_deltas: Sequence[int] = (1, 4096, 65536),
  rows: int = 32,
  sink_logit: float = 12.0,
  paths: Sequence[str] = ROTATIONS,
  seed: int = 0,
) -> dict[str, Any]:
  """Random q, k under a shift of every position by Δ, per rotation path (`ROTATIONS`).

  Logits: `logit_pairs` pairs of iid N(0, 1) vectors (`head_dim`), keys at positions
  n ~ U[0, max_distance), queries at n + d with d ~ U[0, max_distance); the mean over pairs
  of |logit(m + Δ, n + Δ) - logit(m, n)|, logit = q·k / sqrt(head_dim).
  Softmax: for each L in `lengths`, `rows` query rows at position L - 1 over L keys at
  positions 0..L-1 (iid N(0, 1)); with a sink, key 0 of each row is set so that its exact
  logit is `sink_logit` (the row's query direction, rotated in float64). Returns per path,
  per L, per Δ in `softmax_deltas` the mean over rows of the L1 change Σ_j |p_j(Δ) - p_j(0)|,
  over all keys (`l1`) and over keys j >= 1 (`l1_nofirst`), and the sink's mass p_0.
  The rotation is done by each path in JAX; logits and softmax in float64 on the host.

  Returns:
    dict(settings..., logit={path: [mean |Δlogit| per Δ]}, softmax={"sink"|"nosink":
    {path: {"l1"|"l1_nofirst": [[per Δ] per L]}}}, sink_mass=[per L]).
  """
  for name, values in (("logit_deltas", logit_deltas), ("softmax_deltas", softmax_deltas)):
    if any(int(v) < 0 for v in values):
      raise ValueError(f"{name} must be shifts >= 0, got {list(values)}")
  if any(int(n) < 2 for n in lengths):
    raise ValueError(f"lengths must be >= 2 keys (a first key and others), got {list(lengths)}")
  rope = {"rope_type": "default", "rope_theta": float(rope_theta)}
  inv_freq_K, _ = compute_inv_freq(rope, head_dim)
  inv_freq64_K = np.asarray(inv_freq_K, np.float64)
  rng = np.random.default_rng(seed)
  scale = 1.0 / math.sqrt(head_dim)

  q_PD = rng.standard_normal((logit_pairs, head_dim)).astype(np.float32)
  k_PD = rng.standard_normal((logit_pairs, head_dim)).astype(np.float32)
  n_P = rng.integers(0, max_distance, logit_pairs)
  m_P = n_P + rng.integers(0, max_distance, logit_pairs)

  def pair_logits(path, delta):
    both = rotate(
      np.concatenate([q_PD, k_PD]), np.concatenate([m_P, n_P]) + delta, path, inv_freq_K
    )
    q, k = np.split(np.asarray(both, np.float64), 2)
    return np.einsum("pd,pd->p", q, k) * scale

  logit = {}
  for path in paths:
    base_P = pair_logits(path, 0)
    logit[path] = [float(np.mean(np.abs(pair_logits(path, d) - base_P))) for d in logit_deltas]

  softmax = {kind: {p: {"l1": [], "l1_nofirst": []} for p in paths} for kind in ("sink", "nosink")}
  sink_mass = []
  for length in lengths:
    keys_LD = rng.standard_normal((length, head_dim)).astype(np.float32)
    q_RD = rng.standard_normal((rows, head_dim)).astype(np.float32)
    q_pos_R = np.full(rows, length - 1)
    q64_RD = _rotate64(q_RD.astype(np.float64), q_pos_R, inv_freq64_K)
    # Exact logit sink_logit at Δ = 0: k_0 = s·sqrt(D)·R(m)q / |q|² (R(0) is the identity).
    sink_RD = sink_logit * math.sqrt(head_dim) * q64_RD / np.sum(q64_RD**2, -1, keepdims=True)
    sink_RD = sink_RD.astype(np.float32)

    for path in paths:
      base, change = None, {"sink": [], "nosink": []}
      for delta in (0, *softmax_deltas):
        s_RL, sink_R = _kernel_scores(path, delta, keys_LD, q_RD, q_pos_R, sink_RD, inv_freq_K)
        probs = {"nosink": _softmax64(s_RL)}
        s_RL[:, 0] = sink_R
        probs["sink"] = _softmax64(s_RL)
        if base is None:
          base = probs
          if path == paths[0]:
            sink_mass.append(float(probs["sink"][:, 0].mean()))
          continue
        for kind in change:
          change[kind].append(np.abs(probs[kind] - base[kind]))
      for kind in ("sink", "nosink"):
        diffs = change[kind]
        softmax[kind][path]["l1"].append([float(c.sum(-1).mean()) for c in diffs])
        softmax[kind][path]["l1_nofirst"].append([float(c[:, 1:].sum(-1).mean()) for c in diffs])
  return dict(
    head_dim=head_dim,
    rope_theta=float(rope_theta),
    logit_deltas=[int(d) for d in logit_deltas],
    logit_pairs=logit_pairs,
    max_distance=max_distance,
    lengths=[int(n) for n in lengths],
    softmax_deltas=[int(d) for d in softmax_deltas],
    rows=rows,
    sink_logit=float(sink_logit),
    seed=seed,
    logit=logit,
    softmax=softmax,
    sink_mass=sink_mass,
  )


def angle_rounding(
  *,
  head_dim: int = 128,
  rope_theta: float = 10000.0,
  starts: Sequence[int] = (4096, 65536, 262144, 524288),
  span: int = 2048,
) -> dict[str, Any]:
  """How far RoPE angles and tables are from exact, at positions [start, start + span).

  HF forms `float32(pos) * inv_freq` in fp32: the product is rounded to the fp32 grid of the
  angle (spacing 2^(e-23) for angles in [2^e, 2^(e+1))), and the error depends on the absolute
  position, so it breaks relative invariance even in fp32. Per start, in radians, against the
  float64 angle with the same float32 inv_freq: `product_rounding`, the largest error of that
  product; `hf_table_error` and `table_error`, the largest angle error of the cos/sin tables
  of `rope_cos_sin` with HF's angles and with lcjax's (exact) angles (atan2 of the tables,
  wrapped to (-π, π]), which adds the fp32 cos/sin themselves; `inv_freq_rounding`, the
  largest |float64(float32 inv_freq) - exact inv_freq| × position, a consistent change of
  frequency that keeps relative invariance.
  """
  inv_freq_K, _ = compute_inv_freq({"rope_type": "default", "rope_theta": rope_theta}, head_dim)
  inv64_K = np.asarray(inv_freq_K, np.float64)
  exact_K = 1.0 / (float(rope_theta) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
  out = {"starts": [int(s) for s in starts], "span": span}
  keys = ("product_rounding", "hf_table_error", "table_error", "inv_freq_rounding")
  for key in keys:
    out[key] = []

  def table_error(pos_1T, angle64_TK, exact):
    cos_1TK, sin_1TK = rope_cos_sin(inv_freq_K, 1.0, pos_1T, exact_angles=exact)
    table_TK = np.arctan2(np.asarray(sin_1TK[0], np.float64), np.asarray(cos_1TK[0], np.float64))
    return float(np.abs(np.angle(np.exp(1j * (table_TK - angle64_TK)))).max())

  for start in starts:
    pos_T = np.arange(start, start + span)
    pos_1T = jnp.asarray(pos_T[None], jnp.int32)
    angle32_TK = np.asarray(jnp.asarray(pos_T, jnp.float32)[:, None] * inv_freq_K, np.float64)
    angle64_TK = pos_T[:, None].astype(np.float64) * inv64_K
    out["product_rounding"].append(float(np.abs(angle32_TK - angle64_TK).max()))
    out["hf_table_error"].append(table_error(pos_1T, angle64_TK, exact=False))
    out["table_error"].append(table_error(pos_1T, angle64_TK, exact=True))
    out["inv_freq_rounding"].append(float((np.abs(inv64_K - exact_K) * pos_T[-1]).max()))
  return out


# ------------------------------------------------------------------------------------------------
# The study: one checkpoint, all measurements, tables, JSON, figure.


def _plain(value: Any) -> Any:
  return value.to_dict() if hasattr(value, "to_dict") else dict(value)


def held_out_tokens(data_config, length: int) -> tuple[np.ndarray, int]:
  """The first `length` tokens of the first validation document that long, and its index."""
  for index, doc in enumerate(make_eval_documents(data_config, split="validation")):
    if doc.shape[0] >= length:
      return np.asarray(doc[:length], np.int32), index
  raise ValueError(
    f"no validation document of data.source has {length} tokens; lower eval.bf16_rope.length"
  )


def bf16_rope_evaluation(
  settings, params, model_cfg, data_config, workdir, *, model_from_params
) -> tuple[dict, dict]:
  """The study on one checkpoint: JSON (`eval/bf16_rope.json`), figure, table, metric lines.

  `model_from_params(params, model_cfg)` builds a model (`lcjax.train.run_model`'s, passed in
  because lcjax.train imports this module).

  `settings` is the `eval.bf16_rope` section (configs/bf16_rope.py): `kernel` (the
  arguments of `kernel_shift_study`), `angle_starts`, `length` (tokens of the held-out
  file), `deltas`, `contexts`, `rows_per_context`, `schemes`, `variants`, `block` (the
  blockwise attention's block size), `perplexity` (`window`, `deltas`: `shift_perplexity`),
  `summary_delta` (the Δ of the by-length tables) and
  `plot` (the figure's path, relative to `workdir`). The model level is skipped when
  `length` is 0 or the model has no RoPE.
  """
  s = _plain(settings)
  summary: dict[str, Any] = {"summary_delta": int(s["summary_delta"])}
  kernel_args = _plain(s["kernel"])
  summary["kernel"] = kernel_shift_study(**kernel_args)
  summary["angles"] = angle_rounding(
    head_dim=kernel_args["head_dim"],
    rope_theta=kernel_args["rope_theta"],
    starts=tuple(s["angle_starts"]),
  )
  if s["length"] and "rope" in model_cfg:
    tokens_T, index = held_out_tokens(data_config, int(s["length"]))

    def make_model(dtype):
      cfg = model_cfg.copy_and_resolve_references()
      cfg.dtype = dtype
      cfg.anchor = False  # one document: the anchor mask is the causal mask
      cfg.attention_block_q = cfg.attention_block_kv = int(s["block"])
      return model_from_params(params, cfg)

    summary["model"] = model_shift_study(
      make_model,
      tokens_T,
      deltas=tuple(s["deltas"]),
      contexts=tuple(s["contexts"]),
      rows_per_context=int(s["rows_per_context"]),
      schemes=tuple(s["schemes"]),
      variants=tuple(s["variants"]),
    )
    summary["model"]["file"] = f"validation document {index}"
    ppl = _plain(s["perplexity"])
    summary["perplexity"] = shift_perplexity(
      make_model,
      tokens_T,
      window=int(ppl["window"]),
      deltas=tuple(ppl["deltas"]),
      variants=tuple(s["variants"]),
    )
  summary["checks"] = acceptance_checks(summary)
  write_json(os.path.join(workdir, "eval", "bf16_rope.json"), summary)
  plot_bf16_rope(summary, os.path.join(workdir, s["plot"]))
  print(format_tables(summary))
  return summary, _metric_lines(summary)


def _metric_lines(summary: dict) -> dict[str, float]:
  """eval/bf16_rope/... lines: kernel logits per path and Δ, softmax per L, model per Δ."""
  kernel, sd = summary["kernel"], summary["summary_delta"]
  lines = {}
  for path, values in kernel["logit"].items():
    for d, v in zip(kernel["logit_deltas"], values, strict=True):
      lines[f"eval/bf16_rope/logit_{path}@{d}"] = v
  for kind in ("sink", "nosink"):
    for path, entry in kernel["softmax"][kind].items():
      for n, row in zip(kernel["lengths"], entry["l1"], strict=True):
        lines[f"eval/bf16_rope/softmax_{kind}_{path}@{n}"] = at_delta(
          row, kernel["softmax_deltas"], sd
        )
  ppl = summary.get("perplexity")
  if ppl:
    for variant, values in ppl["ppl"].items():
      for d, v in zip(ppl["deltas"], values, strict=True):
        lines[f"eval/bf16_rope/ppl_{variant}@{d}"] = v
  model = summary.get("model")
  if model:
    for name, entry in model["results"].items():
      tag = name.replace("/", "_")
      for key in ("l1", "l1_nofirst"):
        for d, per_layer in zip(model["deltas"], entry[key], strict=True):
          lines[f"eval/bf16_rope/model_{tag}_{key}@{d}"] = float(
            np.mean([layer[-1] for layer in per_layer])
          )
        per_ctx = np.mean(at_delta(entry[key], model["deltas"], sd), axis=0)
        for c, v in zip(model["contexts"], per_ctx, strict=True):
          lines[f"eval/bf16_rope/context_{tag}_{key}@{c}"] = float(v)
  return lines
