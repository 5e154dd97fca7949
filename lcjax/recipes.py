"""Helpers the continual-pretraining recipe configs share (`configs/recipes/*.py`).

A recipe is published at pod scale (32K–1M tokens, θ up to 1e8, billions of tokens); its
`runlocal` size keeps the recipe's shape on a laptop CPU: lengths divided by a constant,
RoPE θ rescaled so that the same fraction of rotary dimensions completes a period within
the training length, and stage steps in the recipe's token ratios.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["LLAMA2_7B", "scaled_rope_theta", "steps_in_ratio"]

# Llama-2-7b-hf's config.json (the chat model's is the same): the base of several recipes
# (LWM, entropy-ABF); with init_from the folder's own config is used.
LLAMA2_7B = dict(
  vocab_size=32000,
  d_model=4096,
  num_layers=32,
  num_heads=32,
  num_kv_heads=32,
  mlp_dim=11008,
  rms_norm_eps=1e-5,
)


def scaled_rope_theta(theta: float, length: int, new_length: int) -> float:
  """The base θ' at `new_length` whose critical-dimension fraction equals θ's at `length`.

  Rotary dimension pair i (of d/2) has wavelength 2π θ^(2i/d); the pairs whose wavelength
  fits in a training length T are those with 2i/d ≤ log_θ(T / 2π) — the fraction behind
  the critical dimension of Liu et al. 2023 ("Scaling Laws of RoPE-based Extrapolation",
  arXiv:2310.05209, eq. 5: d_extra = 2⌈(d/2)·log_θ(T_train / 2π)⌉). Keeping that fraction
  when T shrinks to T' gives ln θ' = ln θ · ln(T'/2π) / ln(T/2π).
  """
  if not (theta > 1 and length > 2 * math.pi and new_length > 2 * math.pi):
    raise ValueError(
      f"scaled_rope_theta needs theta > 1 and lengths > 2π, got {theta}, {length}, {new_length}"
    )
  ratio = math.log(new_length / (2 * math.pi)) / math.log(length / (2 * math.pi))
  return float(math.exp(math.log(theta) * ratio))


def steps_in_ratio(tokens: Sequence[float], total_steps: int) -> tuple[int, ...]:
  """Steps per stage proportional to `tokens` (each ≥ 1), summing to about `total_steps`."""
  if total_steps < len(tokens) or any(t <= 0 for t in tokens):
    raise ValueError(f"steps_in_ratio({tokens}, {total_steps}): need positive tokens, a step each")
  scale = total_steps / sum(tokens)
  return tuple(max(1, round(t * scale)) for t in tokens)


def cpu_stage(
  length: int,
  theta: float,
  divisor: int,
  *,
  steps: int,
  warmup_steps: int,
  tokens_per_step: int,
  smoke: bool = False,
) -> dict:
  """The overrides of one CPU-sized stage standing in for a published (`length`, θ) stage.

  Rows of length // `divisor` tokens, θ rescaled by `scaled_rope_theta`, `tokens_per_step`
  tokens a step (2 rows in smoke), a checkpoint halfway and at the end. Recipes add their
  own keys (lr, data mixture, optimizer carry-over).
  """
  T = length // divisor
  return {
    "data.seq_len": T,
    "model.max_position_embeddings": T,
    "model.rope": dict(
      rope_type="default",
      rope_theta=round(scaled_rope_theta(theta, length, T), 1),
      max_position_embeddings=T,
    ),
    "train.batch_size": tokens_per_step // T if not smoke else 2,
    "train.steps": steps,
    "train.warmup_steps": warmup_steps,
    "checkpoint.every_steps": max(steps // 2, 1),
  }
